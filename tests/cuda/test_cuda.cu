// The CUDA backend against the CPU backend (include/qpkv/backend/cuda/, docs/cuda.md): codes byte for
// byte, selections equal (exactly on equal scores; up to float32 near-ties on scores the GPU
// recomputes), attention within 1e-4 relative, errors as qpkv::Error. Without a GPU every case
// returns at its first line with the message "no CUDA device: ..." (exit code 0).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "qpkv/backend/cuda/cuda.cuh"
#include "qpkv/io/npy.hpp"
#include "qpkv/qpkv.hpp"

using qpkv::index_t;
namespace cu = qpkv::cuda;

namespace {

/// True when a CUDA device is present; otherwise reports why the case is skipped.
bool device_or_skip() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    (void)cudaGetLastError();
    const std::string why = e == cudaSuccess ? std::string("0 devices") : std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
    const std::string msg = "no CUDA device: skipped (cudaGetDeviceCount: " + why + ")";
    MESSAGE(msg);
    return false;
  }
  return true;
}
#define REQUIRE_DEVICE_OR_SKIP() \
  if (!device_or_skip()) return

std::vector<float> randn(std::size_t n, unsigned seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> x(n);
  for (auto& v : x) v = d(rng);
  return x;
}

/// A device copy of a host vector.
template <class T>
struct Dev {
  cu::DeviceBuffer buf;
  std::size_t n = 0;
  explicit Dev(const std::vector<T>& h) : buf(cu::make_device<T>(h.size())), n(h.size()) {
    cu::upload(buf.as<T>(), h.data(), n);
    QPKV_CUDA_CHECK(cudaDeviceSynchronize());
  }
  explicit Dev(std::size_t count) : buf(cu::make_device<T>(count)), n(count) {}
  T* get() { return buf.as<T>(); }
  const T* get() const { return buf.as<T>(); }
  std::vector<T> host() const {
    std::vector<T> h(n);
    cu::download(h.data(), get(), n);
    return h;
  }
};

template <class T>
std::vector<T> convert(const std::vector<float>& x) {
  std::vector<T> y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = qpkv::from_float<T>(x[i]);
  return y;
}

double relative_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

/// CPU parts vs device parts of `parts` slabs of B x D (src: parts x B x D floats).
template <class Q, class T>
void check_encode(const Q& q, index_t heads, index_t nb, index_t B, index_t D, unsigned seed) {
  const std::vector<float> x = randn(static_cast<std::size_t>(heads * nb * B * D), seed, 2.0f);
  const std::vector<T> xt = convert<T>(x);
  std::vector<float> xf(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) xf[i] = qpkv::to_float(xt[i]);
  const std::size_t part = q.part_bytes(B, D);
  std::vector<std::uint8_t> cpu(part * static_cast<std::size_t>(heads * nb), 0);
  q.encode(xf.data(), heads * nb, B, D, cpu.data(), part);
  Dev<T> dx(xt);
  Dev<std::uint8_t> dout(cpu.size());
  QPKV_CUDA_CHECK(cudaMemset(dout.get(), 0, cpu.size()));
  cu::ErrorFlag flag(0);
  const cu::Rows<T> rows{dx.get(), nb * B * D, D, nullptr, 0, 0};
  cu::encode_parts(q, rows, cu::PartTarget{dout.get(), part, nb, 0, 0}, heads, nb, B, D, flag.device(), 0);
  CHECK(flag.read(0) == 0u);
  const std::vector<std::uint8_t> gpu = dout.host();
  std::size_t first_diff = cpu.size();
  for (std::size_t i = 0; i < cpu.size() && first_diff == cpu.size(); ++i)
    if (cpu[i] != gpu[i]) first_diff = i;
  CAPTURE(first_diff);
  CHECK(gpu == cpu);
}

template <int Bits>
void encode_grid(unsigned seed) {
  CAPTURE(Bits);
  for (auto scale_float : {false, true}) {
    CAPTURE(scale_float);
    // keys: per channel over token groups (KIVI), D a multiple of 8 and not
    for (index_t D : {64, 20}) {
      CAPTURE(D);
      qpkv::Affine<Bits> k{};
      k.axis = qpkv::Axis::channel;
      k.group = 32;
      qpkv::Affine<Bits, float> kf{};
      kf.axis = qpkv::Axis::channel;
      kf.group = 4;
      if (scale_float) check_encode<decltype(kf), float>(kf, 3, 4, 8, D, seed);
      else check_encode<decltype(k), float>(k, 3, 2, 32, D, seed);
      // values: per token over channel groups, including a short last group (D % group != 0)
      for (index_t group : {32, 5}) {
        CAPTURE(group);
        qpkv::Affine<Bits> v{};
        v.axis = qpkv::Axis::token;
        v.group = group;
        check_encode<decltype(v), float>(v, 2, 3, 4, D, seed + 1);
        check_encode<decltype(v), qpkv::half>(v, 2, 3, 4, D, seed + 2);
      }
    }
  }
}

/// q, out on the device; returns host output of the device cache's attend.
template <class Cache>
std::vector<float> device_attend(const Cache& cache, const std::vector<float>& q) {
  Dev<float> dq(q), dout(q.size());
  cache.attend(dq.get(), dout.get());
  return dout.host();
}

/// Compress (and append) the same random layer, of element type E, into a CPU and a device cache;
/// then bytes, positions and dequantized values must be equal and attention within 1e-4.
template <class Sel, class KQ, class VQ, class E = float>
void compare_caches(qpkv::Shape s, index_t n, index_t capacity, unsigned seed, Sel sel = {}, KQ kq = {}, VQ vq = {},
                    qpkv::CacheOptions opt = {}, index_t appends = 0) {
  const auto k = convert<E>(randn(static_cast<std::size_t>(s.kv_heads * n * s.head_dim), seed));
  const auto v = convert<E>(randn(k.size(), seed + 1));
  const auto q = convert<E>(randn(static_cast<std::size_t>(s.q_heads * n * s.head_dim), seed + 2));
  qpkv::CompressedKV<Sel, KQ, VQ> cpu(s, sel, kq, vq, opt);
  qpkv::CompressedKV<Sel, KQ, VQ, qpkv::backend::Cuda> gpu(s, sel, kq, vq, opt);
  Dev<E> dk(k), dv(v), dq(q);
  using qpkv::view;
  cpu.compress(view(k.data(), s.kv_heads, n, s.head_dim), view(v.data(), s.kv_heads, n, s.head_dim),
               view(q.data(), s.q_heads, n, s.head_dim), capacity);
  gpu.compress(view(dk.get(), s.kv_heads, n, s.head_dim), view(dv.get(), s.kv_heads, n, s.head_dim),
               view(dq.get(), s.q_heads, n, s.head_dim), capacity);
  for (index_t h = 0; h < s.kv_heads; ++h) {
    const auto a = cpu.positions(h), b = gpu.positions(h);
    CHECK(std::vector<index_t>(a.begin(), a.end()) == std::vector<index_t>(b.begin(), b.end()));
  }
  const auto check_same = [&] {
    REQUIRE(gpu.tokens() == cpu.tokens());
    REQUIRE(gpu.bytes() == cpu.bytes());
    const auto gb = gpu.bytes_on_host();
    CHECK(std::equal(gb.begin(), gb.end(), cpu.state().data));
    const qpkv::DenseKV dc = cpu.dequantize(), dg = gpu.dequantize();
    CHECK(dc.keys == dg.keys);
    CHECK(dc.values == dg.values);
    const auto qd = convert<E>(randn(static_cast<std::size_t>(s.q_heads * s.head_dim), seed + 7));
    std::vector<float> want(qd.size());
    cpu.attend(qd.data(), want.data());
    Dev<E> dqd(qd);
    Dev<float> dout(qd.size());
    gpu.attend(dqd.get(), dout.get());
    CHECK(relative_l2(dout.host(), want) <= 1e-4);
  };
  check_same();
  for (index_t i = 0; i < appends; ++i) {
    const auto nk = convert<E>(randn(static_cast<std::size_t>(s.kv_heads * s.head_dim), seed + 100 + static_cast<unsigned>(i)));
    const auto nv = convert<E>(randn(nk.size(), seed + 200 + static_cast<unsigned>(i)));
    cpu.append(nk.data(), nv.data());
    Dev<E> dnk(nk), dnv(nv);
    gpu.append(dnk.get(), dnv.get());
  }
  if (appends) check_same();
}

}  // namespace

TEST_CASE("quantize+pack on the device writes the CPU's bytes for 1, 2, 3, 4 and 8 bits along both axes") {
  REQUIRE_DEVICE_OR_SKIP();
  encode_grid<1>(10);
  encode_grid<2>(20);
  encode_grid<3>(30);
  encode_grid<4>(40);
  encode_grid<8>(50);
}

TEST_CASE("Fp16 parts on the device are the CPU's bytes (float and bfloat16 inputs)") {
  REQUIRE_DEVICE_OR_SKIP();
  check_encode<qpkv::Fp16, float>(qpkv::Fp16{}, 2, 3, 1, 13, 3);
  check_encode<qpkv::Fp16, qpkv::bfloat16>(qpkv::Fp16{}, 2, 3, 1, 64, 4);
}

TEST_CASE("a constant group encodes to scale 0 and codes 0 on the device, as on the CPU") {
  REQUIRE_DEVICE_OR_SKIP();
  qpkv::Affine<4> k{};
  k.axis = qpkv::Axis::channel;
  k.group = 4;
  const std::vector<float> x(4 * 8, 1.25f);
  std::vector<std::uint8_t> cpu(k.part_bytes(4, 8));
  k.encode(x.data(), 1, 4, 8, cpu.data(), cpu.size());
  Dev<float> dx(x);
  Dev<std::uint8_t> d(cpu.size());
  QPKV_CUDA_CHECK(cudaMemset(d.get(), 0, cpu.size()));
  cu::ErrorFlag flag(0);
  cu::encode_parts(k, cu::Rows<float>{dx.get(), 32, 8, nullptr, 0, 0}, cu::PartTarget{d.get(), cpu.size(), 1, 0, 0}, 1, 1, 4, 8,
                   flag.device(), 0);
  CHECK(flag.read(0) == 0u);
  CHECK(d.host() == cpu);
}

TEST_CASE("window scores (SnapKV, PyramidKV) and H2O column sums match the CPU within 1e-4") {
  REQUIRE_DEVICE_OR_SKIP();
  const index_t H = 2, Hq = 8, N = 300, D = 64, W = 16;
  const auto k = randn(static_cast<std::size_t>(H * N * D), 1), q = randn(static_cast<std::size_t>(Hq * N * D), 2);
  Dev<float> dk(k), dq(q);
  const auto kv = qpkv::view(k.data(), H, N, D), qv = qpkv::view(q.data(), Hq, N, D);
  const auto dkv = qpkv::view(dk.get(), H, N, D), dqv = qpkv::view(dq.get(), Hq, N, D);
  const auto compare = [&](const qpkv::HeadScores& want, const cu::DeviceScores& got) {
    const std::vector<float> g = got.to_host();
    std::vector<float> w;
    for (const auto& row : want) w.insert(w.end(), row.begin(), row.end());
    REQUIRE(g.size() == w.size());
    CHECK(relative_l2(g, w) <= 1e-4);
    double worst = 0;
    for (std::size_t i = 0; i < w.size(); ++i) worst = std::max(worst, std::abs(static_cast<double>(g[i]) - w[i]) / (std::abs(w[i]) + 1e-6));
    CHECK(worst <= 1e-3);
  };
  cu::ErrorFlag flag(0);
  SUBCASE("unpooled window sums") { compare(qpkv::window_attention_sums(kv, qv, W), cu::window_attention_sums(dkv, dqv, W, flag.device())); }
  for (auto pooling : {qpkv::Pooling::avg, qpkv::Pooling::max})
    for (index_t kernel : {1, 5, 7}) {
      CAPTURE(kernel);
      compare(qpkv::snapkv_scores(kv, qv, W, kernel, pooling), cu::snapkv_scores(dkv, dqv, W, kernel, pooling, flag.device()));
    }
  for (auto mask : {qpkv::H2OMask::causal, qpkv::H2OMask::window_block})
    compare(qpkv::h2o_scores(kv, qv, W, mask), cu::h2o_scores(dkv, dqv, W, mask, flag.device()));
  CHECK(flag.read(0) == 0u);
}

TEST_CASE("window scores of a long prompt (keys split across blocks in pass 1) match the CPU within 1e-4") {
  REQUIRE_DEVICE_OR_SKIP();
  const index_t H = 2, Hq = 4, N = 9000, D = 64, W = 32;  // 9000 keys: 5 key splits of the 16 row blocks
  const auto k = randn(static_cast<std::size_t>(H * N * D), 3), q = randn(static_cast<std::size_t>(Hq * N * D), 4);
  Dev<float> dk(k), dq(q);
  cu::ErrorFlag flag(0);
  const qpkv::HeadScores want = qpkv::snapkv_scores(qpkv::view(k.data(), H, N, D), qpkv::view(q.data(), Hq, N, D), W, 5, qpkv::Pooling::avg);
  const std::vector<float> got =
      cu::snapkv_scores(qpkv::view(dk.get(), H, N, D), qpkv::view(dq.get(), Hq, N, D), W, 5, qpkv::Pooling::avg, flag.device()).to_host();
  std::vector<float> w;
  for (const auto& row : want) w.insert(w.end(), row.begin(), row.end());
  REQUIRE(got.size() == w.size());
  CHECK(relative_l2(got, w) <= 1e-4);
  CHECK(flag.read(0) == 0u);
}

TEST_CASE("device top-k on the CPU's scores keeps exactly the CPU's tokens, ties to the lower position") {
  REQUIRE_DEVICE_OR_SKIP();
  const index_t H = 3, P = 5000, W = 8;
  // scores on a coarse grid: many exact ties, as max pooling produces
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> d(0, 40);
  qpkv::HeadScores scores(static_cast<std::size_t>(H), std::vector<float>(static_cast<std::size_t>(P)));
  std::vector<float> flat;
  for (auto& row : scores)
    for (auto& x : row) {
      x = static_cast<float>(d(rng)) * 0.125f;
      flat.push_back(x);
    }
  Dev<float> ds(flat);
  cu::DeviceScores dev{std::move(ds.buf), H, P};
  for (index_t k : {index_t{0}, index_t{1}, index_t{100}, index_t{2500}, P}) {
    CAPTURE(k);
    const qpkv::Selection want = qpkv::detail::top_k_plus_window(scores, k, P + W, W);
    const cu::DeviceSelection got = cu::top_k_plus_window(dev, k, P + W, W);
    CHECK(got.host == want);
    std::vector<index_t> flat_dev(static_cast<std::size_t>(H * (k + W)));
    cu::download(flat_dev.data(), got.data(), flat_dev.size());
    for (index_t h = 0; h < H; ++h)
      CHECK(std::equal(want.kept[h].begin(), want.kept[h].end(), flat_dev.begin() + h * (k + W)));
  }
}

TEST_CASE("selectors on the device keep the CPU's tokens up to float32 near-ties of their scores") {
  REQUIRE_DEVICE_OR_SKIP();
  const index_t H = 2, Hq = 4, N = 600, D = 32, C = 100;
  const auto k = randn(static_cast<std::size_t>(H * N * D), 11), q = randn(static_cast<std::size_t>(Hq * N * D), 12);
  Dev<float> dk(k), dq(q);
  const auto kv = qpkv::view(k.data(), H, N, D), qv = qpkv::view(q.data(), Hq, N, D);
  const auto dkv = qpkv::view(dk.get(), H, N, D), dqv = qpkv::view(dq.get(), Hq, N, D);
  // tokens only one side keeps must score within 1e-5 (relative) of each other's boundary
  const auto near_ties = [&](const qpkv::Selection& a, const qpkv::Selection& b, const qpkv::HeadScores& s) {
    for (index_t h = 0; h < H; ++h) {
      std::vector<index_t> only_a, only_b;
      std::set_difference(a.kept[h].begin(), a.kept[h].end(), b.kept[h].begin(), b.kept[h].end(), std::back_inserter(only_a));
      std::set_difference(b.kept[h].begin(), b.kept[h].end(), a.kept[h].begin(), a.kept[h].end(), std::back_inserter(only_b));
      CHECK(only_a.size() == only_b.size());
      for (std::size_t i = 0; i < only_a.size() && i < only_b.size(); ++i) {
        const float sa = s[h][only_a[i]], sb = s[h][only_b[i]];
        CHECK(std::abs(sa - sb) <= 1e-5f * std::max(std::abs(sa), std::abs(sb)) + 1e-12f);
      }
    }
  };
  SUBCASE("SnapKV") {
    const qpkv::SnapKV sel{};
    near_ties(sel.select(kv, qv, C), cu::select(sel, dkv, dqv, C).host, qpkv::snapkv_scores(kv, qv, sel.window, sel.kernel, sel.pooling));
  }
  SUBCASE("SnapKV, max pooling") {
    const qpkv::SnapKV sel{8, 7, qpkv::Pooling::max};
    near_ties(sel.select(kv, qv, C), cu::select(sel, dkv, dqv, C).host, qpkv::snapkv_scores(kv, qv, sel.window, sel.kernel, sel.pooling));
  }
  SUBCASE("PyramidKV, layers 0 and 31 of 32") {
    const qpkv::PyramidKV sel{};
    for (index_t layer : {0, 31}) {
      const qpkv::LayerInfo li{layer, 32};
      near_ties(sel.select(kv, qv, C, li), cu::select(sel, dkv, dqv, C, li).host,
                qpkv::snapkv_scores(kv, qv, sel.window, sel.kernel, sel.pooling));
    }
  }
  SUBCASE("H2O, both masks") {
    for (auto mask : {qpkv::H2OMask::causal, qpkv::H2OMask::window_block}) {
      const qpkv::H2O sel{32, mask};
      near_ties(sel.select(kv, qv, C), cu::select(sel, dkv, dqv, C).host, qpkv::h2o_scores(kv, qv, sel.window, mask));
    }
  }
  SUBCASE("StreamingLLM runs on the host copy and equals the CPU exactly") {
    const qpkv::StreamingLLM sel{};
    CHECK(sel.select(kv, qv, C) == cu::select(sel, dkv, dqv, C).host);
  }
  SUBCASE("N <= capacity keeps everything") {
    const qpkv::SnapKV sel{};
    CHECK(cu::select(sel, dkv, dqv, N).host == qpkv::detail::all_positions(H, N));
  }
}

TEST_CASE("compress + append: the device cache equals the CPU cache byte for byte and attends within 1e-4") {
  REQUIRE_DEVICE_OR_SKIP();
  using namespace qpkv;
  SUBCASE("KeepAll + KIVI-4, residual 64, appends through two flushes") {
    compare_caches<KeepAll, Kivi<4, 4, 32, 64>, Kivi<4, 4, 32, 64>>({4, 16, 128}, 1000, 0, 1, {}, {}, {}, {}, 140);
  }
  SUBCASE("KeepAll + KIVI-2, head_dim 80, GQA 8") { compare_caches<KeepAll, Kivi<2>, Kivi<2>>({2, 16, 80}, 777, 0, 2, {}, {}, {}, {}, 40); }
  SUBCASE("KeepAll + 8-bit keys / 3-bit values") { compare_caches<KeepAll, Affine<8>, Affine<3>>({2, 2, 64}, 300, 0, 3, {}, {}, {}, {}, 33); }
  SUBCASE("KeepAll + 1-bit keys / 2-bit values, float scales") {
    compare_caches<KeepAll, Affine<1, float>, Affine<2, float>>({1, 4, 64}, 257, 0, 4);
  }
  SUBCASE("per-token keys, per-channel values (B = 16 tokens)") {
    Affine<4> kq{};
    kq.axis = Axis::token;
    kq.group = 16;
    Affine<2> vq{};
    vq.axis = Axis::channel;
    vq.group = 16;
    compare_caches<KeepAll, Affine<4>, Affine<2>>({2, 4, 64}, 200, 0, 5, {}, kq, vq, {}, 20);
  }
  SUBCASE("Fp16 (16-bit) cache, no residual: B = 1") { compare_caches<KeepAll, Fp16, Fp16>({2, 8, 128}, 500, 0, 6, {}, {}, {}, {}, 5); }
  SUBCASE("SnapKV + KIVI-4") { compare_caches<SnapKV, Kivi<4>, Kivi<4>>({2, 8, 64}, 900, 256, 7); }
  SUBCASE("H2O + KIVI-2") { compare_caches<H2O, Kivi<2>, Kivi<2>>({2, 4, 64}, 500, 128, 8); }
  SUBCASE("GQA 16, many chunks") { compare_caches<KeepAll, Kivi<4>, Kivi<4>>({1, 16, 128}, 20000, 0, 9); }
  SUBCASE("fp16 inputs (SnapKV + KIVI-4, residual 32, appends)") {
    compare_caches<SnapKV, Kivi<4, 4, 32, 32>, Kivi<4, 4, 32, 32>, qpkv::half>({2, 8, 128}, 700, 200, 10, {}, {}, {}, {}, 40);
  }
  SUBCASE("bfloat16 inputs (PyramidKV + KIVI-2)") {
    compare_caches<PyramidKV, Kivi<2>, Kivi<2>, bfloat16>({2, 4, 64}, 800, 160, 11, {}, {}, {}, {}, 3);
  }
}

TEST_CASE("case a: SnapKV + KIVI-4 on the device keeps the reference tokens, the CPU's bytes and its attention") {
  REQUIRE_DEVICE_OR_SKIP();
  using namespace qpkv;
  const std::string dir = std::string(QPKV_TEST_DATA) + "/conformance/";
  const auto k = io::load_npy(dir + "inputs_a_key_states.npy").as<float>();
  const auto v = io::load_npy(dir + "inputs_a_value_states.npy").as<float>();
  const auto q = io::load_npy(dir + "inputs_a_query_states.npy").as<float>();
  const auto ref = io::load_npy(dir + "selection/sel_a_snapkv_cap128_w32_k5_avg.npy").as<index_t>();
  const Shape s{4, 4, 64};
  CompressedKV<SnapKV, Kivi<4>> cpu(s);
  CompressedKV<SnapKV, Kivi<4>, Kivi<4>, backend::Cuda> gpu(s);
  Dev<float> dk(k), dv(v), dq(q);
  cpu.compress(view(k.data(), 4, 512, 64), view(v.data(), 4, 512, 64), view(q.data(), 4, 512, 64), 128);
  gpu.compress(view(dk.get(), 4, 512, 64), view(dv.get(), 4, 512, 64), view(dq.get(), 4, 512, 64), 128);
  for (index_t h = 0; h < 4; ++h) {
    const auto p = gpu.positions(h);
    CHECK(std::vector<index_t>(p.begin(), p.end()) == std::vector<index_t>(ref.begin() + h * 128, ref.begin() + (h + 1) * 128));
  }
  REQUIRE(gpu.bytes() == cpu.bytes());
  const auto gb = gpu.bytes_on_host();
  CHECK(std::equal(gb.begin(), gb.end(), cpu.state().data));
  std::vector<float> qd(4 * 64), want(qd.size());
  for (index_t h = 0; h < 4; ++h)
    for (index_t c = 0; c < 64; ++c) qd[h * 64 + c] = q[(h * 512 + 511) * 64 + c];
  cpu.attend(qd.data(), want.data());
  CHECK(relative_l2(device_attend(gpu, qd), want) <= 1e-4);
}

TEST_CASE("batched attention equals one call per sequence") {
  REQUIRE_DEVICE_OR_SKIP();
  using namespace qpkv;
  using Cache = CompressedKV<KeepAll, Kivi<4>, Kivi<4>, backend::Cuda>;
  const Shape s{2, 8, 64};
  std::vector<Cache> caches;
  std::vector<Dev<float>> qs, outs;
  std::vector<cu::AttendJob<float>> jobs;
  for (unsigned i = 0; i < 3; ++i) {
    const index_t n = 100 + 333 * static_cast<index_t>(i);
    const auto k = randn(static_cast<std::size_t>(2 * n * 64), 30 + i), v = randn(k.size(), 40 + i);
    Dev<float> dk(k), dv(v);
    caches.emplace_back(s);
    caches.back().compress(view(dk.get(), 2, n, 64), view(dv.get(), 2, n, 64), 0);
    qs.emplace_back(randn(8 * 64, 50 + i));
    outs.emplace_back(std::size_t{8 * 64});
  }
  for (std::size_t i = 0; i < caches.size(); ++i) jobs.push_back(caches[i].attend_job(qs[i].get(), outs[i].get()));
  cu::AttendWorkspace ws;
  cu::ErrorFlag flag(0);
  cu::attend_async(caches[0].keys_quantizer(), caches[0].values_quantizer(), caches[0].geometry(),
                   std::span<const cu::AttendJob<float>>(jobs), caches[0].softmax_scale(), ws, flag.device());
  CHECK(flag.read(0) == 0u);
  for (std::size_t i = 0; i < caches.size(); ++i) {
    Dev<float> single(std::size_t{8 * 64});
    caches[i].attend(qs[i].get(), single.get());
    CHECK(relative_l2(outs[i].host(), single.host()) <= 1e-6);
  }
}

TEST_CASE("errors: host pointers, absurd allocations, non-finite inputs and unsupported quantizers are qpkv::Error") {
  REQUIRE_DEVICE_OR_SKIP();
  using namespace qpkv;
  const Shape s{1, 1, 64};
  CompressedKV<KeepAll, Kivi<4>, Kivi<4>, backend::Cuda> cache(s);
  std::vector<float> host(64 * 64, 0.5f);
  SUBCASE("a host pointer where a device pointer is required") {
    CHECK_THROWS_WITH_AS(cache.compress(view(host.data(), 1, 64, 64), view(host.data(), 1, 64, 64), 0),
                         doctest::Contains("keys.data: expected a device"), Error);
    Dev<float> dk(host);
    cache.compress(view(dk.get(), 1, 64, 64), view(dk.get(), 1, 64, 64), 0);
    std::vector<float> out(64);
    CHECK_THROWS_WITH_AS(cache.attend(host.data(), out.data()), doctest::Contains("q: expected a device"), Error);
    CHECK_THROWS_AS(cache.append(host.data(), host.data()), Error);
    CHECK(cache.tokens() == 64);  // unchanged
    std::vector<float> bad_q(64, 0.0f);
    bad_q[3] = std::numeric_limits<float>::quiet_NaN();
    Dev<float> dq(bad_q), dout(std::size_t{64});
    CHECK_THROWS_WITH_AS(cache.attend(dq.get(), dout.get()), doctest::Contains("finite"), Error);
  }
  SUBCASE("an absurd allocation reports cudaMalloc's error") {
    CHECK_THROWS_WITH_AS(cu::DeviceBuffer(std::size_t{1} << 60), doctest::Contains("cudaMalloc"), Error);
    // and the failure does not poison later calls
    cu::DeviceBuffer ok(1024);
    CHECK(ok.size() == 1024);
  }
  SUBCASE("non-finite keys") {
    host[100] = std::numeric_limits<float>::infinity();
    Dev<float> dk(host);
    CHECK_THROWS_WITH_AS(cache.compress(view(dk.get(), 1, 64, 64), view(dk.get(), 1, 64, 64), 0), doctest::Contains("finite"), Error);
    CHECK(cache.tokens() == 0);
  }
  SUBCASE("values above the fp16 range in the residual") {
    CompressedKV<KeepAll, Kivi<4, 4, 32, 32>, Kivi<4, 4, 32, 32>, backend::Cuda> c(s);
    host.assign(host.size(), 1e6f);
    Dev<float> dk(host);
    CHECK_THROWS_WITH_AS(c.compress(view(dk.get(), 1, 40, 64), view(dk.get(), 1, 40, 64), 0), doctest::Contains("65504"), Error);
  }
  SUBCASE("HQQ zero points run on the CPU only") {
    Affine<4> hq{};
    hq.zero_point = ZeroPoint::hqq;
    using C = CompressedKV<KeepAll, Affine<4>, Affine<4>, backend::Cuda>;
    CHECK_THROWS_WITH_AS(C(s, {}, hq, hq), doctest::Contains("zero_point"), Error);
  }
  SUBCASE("a CUDA call that fails names itself") {
    CHECK_THROWS_WITH_AS([] { QPKV_CUDA_CHECK(cudaSetDevice(1 << 20)); }(), doctest::Contains("cudaSetDevice"), Error);
  }
}
