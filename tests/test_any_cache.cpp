// AnyCompressedKV and KVConfig: the run-time cache produces the same bytes, dequantized values and
// attention outputs as the equivalent compile-time CompressedKV; the text form round-trips; every
// invalid field, unknown key and unsupported bit pair is an error naming it.
#include <doctest/doctest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "test_util.hpp"
#include "qpkv/cache/any_cache.hpp"
#include "qpkv/select/any_selector.hpp"

using namespace qpkv;

using testing::randn;

namespace {

template <class T>
std::vector<T> as(const std::vector<float>& x) {
  std::vector<T> y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = from_float<T>(x[i]);
  return y;
}

/// Everything observable about a cache after a prefill, some decode steps and an attention call.
struct Observed {
  std::size_t bytes = 0, metadata_bytes = 0;
  index_t tokens = 0;
  std::vector<std::uint8_t> raw;
  std::vector<std::vector<index_t>> positions;
  std::vector<float> keys, values, out;
};

struct Workload {
  Shape shape{2, 4, 32};
  index_t n = 200, capacity = 96, appends = 45;
  LayerInfo layer{};
  bool given_selection = false;  // compress with a Selection instead of the selector
};

template <class T, class Cache>
Observed run(Cache& cache, const Workload& w) {
  const Shape s = w.shape;
  const index_t D = s.head_dim;
  const auto k = as<T>(randn(static_cast<std::size_t>(s.kv_heads * w.n * D), 1));
  const auto v = as<T>(randn(k.size(), 2));
  const auto q = as<T>(randn(static_cast<std::size_t>(s.q_heads * w.n * D), 3));
  const auto kv = view(k.data(), s.kv_heads, w.n, D), vv = view(v.data(), s.kv_heads, w.n, D);
  if (w.given_selection) {
    Selection sel;
    for (index_t h = 0; h < s.kv_heads; ++h) {
      sel.kept.emplace_back();
      for (index_t t = h; t < w.n; t += 3) sel.kept.back().push_back(t);
      sel.kept.back().resize(static_cast<std::size_t>(w.n / 3));
    }
    cache.compress(kv, vv, sel);
  } else {
    cache.compress(kv, vv, view(q.data(), s.q_heads, w.n, D), w.capacity, w.layer);
  }
  cache.reserve(cache.tokens() + 8);
  for (index_t i = 0; i < w.appends; ++i) {
    const auto nk = as<T>(randn(static_cast<std::size_t>(s.kv_heads * D), 100 + static_cast<unsigned>(i)));
    const auto nv = as<T>(randn(nk.size(), 500 + static_cast<unsigned>(i)));
    cache.append(nk.data(), nv.data());
  }
  Observed o;
  o.bytes = cache.bytes();
  o.metadata_bytes = cache.metadata_bytes();
  o.tokens = cache.tokens();
  const CacheState st = cache.state();
  o.raw.assign(st.data, st.data + o.bytes);
  for (index_t h = 0; h < s.kv_heads; ++h) {
    const auto p = cache.positions(h);
    o.positions.emplace_back(p.begin(), p.end());
  }
  const DenseKV d = cache.dequantize();
  o.keys = d.keys;
  o.values = d.values;
  const auto qd = as<T>(randn(static_cast<std::size_t>(s.q_heads * D), 9));
  o.out.resize(qd.size());
  cache.attend(qd.data(), o.out.data());
  return o;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

/// AnyCompressedKV(config) and the compile-time `reference` cache observe the same for input type T.
template <class T, class Reference>
void check_same(const std::string& config, Reference reference, const Workload& w = {}, float scale = 0.0f) {
  CAPTURE(config);
  const std::string dtype = dtype_name<T>();
  CAPTURE(dtype);
  AnyCompressedKV any(w.shape, KVConfig::parse(config), scale);
  const Observed a = run<T>(any, w), r = run<T>(reference, w);
  CHECK(a.tokens == r.tokens);
  CHECK(a.bytes == r.bytes);
  CHECK(a.metadata_bytes == r.metadata_bytes);
  CHECK(a.raw == r.raw);
  CHECK(a.positions == r.positions);
  CHECK(same_bits(a.keys, r.keys));
  CHECK(same_bits(a.values, r.values));
  CHECK(same_bits(a.out, r.out));
  CHECK(any.residual_length() == reference.residual_length());
  CHECK(any.layout().block_tokens == reference.layout().block_tokens);
  CHECK(any.softmax_scale() == reference.softmax_scale());
  CHECK(any.shape() == w.shape);
  CHECK(any.tokens() > 0);
}

template <int Bits>
QuantizerFor<Bits> quantizer(Axis axis, index_t group = 32, ZeroPoint zero = ZeroPoint::minmax, OutlierRule o = {}) {
  QuantizerFor<Bits> q{};
  q.axis = axis;
  if constexpr (Bits != 16) {
    q.group = group;
    q.zero_point = zero;
    q.outliers = o;
  }
  return q;
}

std::string error_of(auto&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("AnyCompressedKV gives the bytes, values and attention of the equivalent compile-time CompressedKV") {
  const Shape s{2, 4, 32};
  const Workload w{};
  SUBCASE("snapkv, kivi4, group 64, residual 32, max pooling (float, half and bfloat16 inputs)") {
    const std::string cfg = "snapkv,kivi4,group=64,residual=32,window=32,kernel=5,pooling=max";
    auto make = [&] { return CompressedKV<SnapKV, Kivi<4, 4, 64, 32>>(s, SnapKV{32, 5, Pooling::max}); };
    check_same<float>(cfg, make(), w);
    check_same<half>(cfg, make(), w);
    check_same<bfloat16>(cfg, make(), w);
  }
  SUBCASE("h2o, k4v2 (defaults: group 32, no residual, causal mask)") {
    check_same<float>("h2o,k4v2", CompressedKV<H2O, Kivi<4, 2>>(s), w);
  }
  SUBCASE("h2o with the reference mask, window 8") {
    H2O h;
    h.window = 8;
    h.mask = H2OMask::window_block;
    check_same<float>("h2o,kivi8,window=8,mask=reference", CompressedKV<H2O, Kivi<8>>(s, h), w);
  }
  SUBCASE("keep_all, fp16 (one token per block)") {
    check_same<float>("keep_all,fp16", CompressedKV<KeepAll, Fp16>(s), w);
    check_same<half>("keep_all", CompressedKV<KeepAll, Fp16>(s), w);
  }
  SUBCASE("pyramidkv, 2-bit HQQ zero points, middle layer of 8") {
    Workload wl = w;
    wl.layer = LayerInfo{3, 8};
    PyramidKV p;
    p.beta = 10;
    p.window = 16;
    CompressedKV<PyramidKV, Affine<2>> ref(s, p, quantizer<2>(Axis::channel, 32, ZeroPoint::hqq),
                                           quantizer<2>(Axis::token, 32, ZeroPoint::hqq));
    check_same<float>("pyramidkv,kivi2,zero=hqq,beta=10,window=16", std::move(ref), wl);
  }
  SUBCASE("streamingllm: reference mode and sinks mode, 8-bit keys, 4-bit values, residual 64") {
    StreamingLLM r;
    r.mode = StreamingLLM::Mode::reference;
    r.window = 16;
    check_same<float>("streamingllm,k8v4,streaming=reference,window=16,residual=64",
                      CompressedKV<StreamingLLM, Kivi<8, 4, 32, 64>>(s, r), w);
    StreamingLLM k;
    k.sinks = 2;
    check_same<float>("streamingllm,k8v4,sinks=2,residual=64", CompressedKV<StreamingLLM, Kivi<8, 4, 32, 64>>(s, k), w);
  }
  SUBCASE("fp16 keys, 4-bit values with outliers above 2 (dense-and-sparse path)") {
    const OutlierRule o{2.0f, 0.02};
    CompressedKV<SnapKV, Fp16, Affine<4>> ref(s, SnapKV{}, Fp16{}, quantizer<4>(Axis::token, 32, ZeroPoint::minmax, o),
                                              CacheOptions{16, 0.0f});
    check_same<float>("snapkv,k16v4,outliers=0.02,outlier_threshold=2,residual=16", std::move(ref), w);
  }
  SUBCASE("3-bit, group 16, a given Selection, an explicit softmax scale") {
    Workload wl = w;
    wl.given_selection = true;
    CompressedKV<KeepAll, Kivi<3, 3, 16>> ref(s, KeepAll{}, {}, {}, CacheOptions{0, 0.25f});
    check_same<float>("keep_all,kivi3,group=16", std::move(ref), wl, 0.25f);
  }
  SUBCASE("keep_all, kivi4, precision=fast (the integer kernels where the CPU has them)") {
    check_same<float>("keep_all,kivi4,precision=fast",
                      CompressedKV<KeepAll, Kivi<4>>(s, KeepAll{}, {}, {}, CacheOptions{0, 0.0f, AttendPrecision::fast}), w);
  }
  SUBCASE("1-bit, window 16") {
    SnapKV snap;
    snap.window = 16;
    check_same<float>("snapkv,kivi1,window=16", CompressedKV<SnapKV, Kivi<1>>(s, snap), w);
  }
}

TEST_CASE("AnyCompressedKV holds the instantiation of the configured bit pair, for every supported pair") {
  const Shape s{1, 2, 16};
  for (const BitPair p : kAnyBitPairs) {
    KVConfig c;
    c.method = Method::snapkv;
    c.key_bits = p.key;
    c.value_bits = p.value;
    CAPTURE(c.to_string());
    AnyCompressedKV any(s, c);
    CHECK(any.config() == c);
    CHECK(any.selector().method() == Method::snapkv);
    CHECK(any.visit([](const auto& cache) {
      using C = std::remove_cvref_t<decltype(cache)>;
      return C::key_quantizer::bits * 100 + C::value_quantizer::bits;
    }) == p.key * 100 + p.value);
  }
  const AnyCompressedKV a(s, KVConfig::parse("h2o,k4v2"));
  CHECK(a.get_if<4, 2>() != nullptr);
  CHECK(a.get_if<2, 4>() == nullptr);
  CHECK(a.get_if<4, 2>()->keys_quantizer().axis == Axis::channel);
  CHECK(a.get_if<4, 2>()->values_quantizer().axis == Axis::token);
}

TEST_CASE("AnySelector forwards to the selector it holds") {
  static_assert(TokenSelector<AnySelector>);
  const Shape s{2, 4, 16};
  const index_t n = 150;
  const auto k = randn(static_cast<std::size_t>(s.kv_heads * n * s.head_dim), 4);
  const auto q = randn(static_cast<std::size_t>(s.q_heads * n * s.head_dim), 5);
  const auto kv = view(k.data(), s.kv_heads, n, s.head_dim), qv = view(q.data(), s.q_heads, n, s.head_dim);
  PyramidKV p;
  p.pooling = Pooling::max;
  const LayerInfo layer{5, 16};
  const AnySelector a = p;
  CHECK(a.method() == Method::pyramidkv);
  CHECK(a.get_if<PyramidKV>() != nullptr);
  CHECK(a.get_if<SnapKV>() == nullptr);
  CHECK(a.select(kv, qv, 64, layer) == p.select(kv, qv, 64, layer));
  CHECK(a.kept_tokens(n, 64, layer) == p.kept_tokens(n, 64, layer));
  CHECK(a.queries_needed(n) == p.queries_needed(n));
  CHECK(AnySelector{}.method() == Method::keep_all);
  CHECK(AnySelector{H2O{}}.queries_needed(n) == n);
  CHECK_THROWS_WITH_AS(a.validate(8, layer), doctest::Contains("capacity"), Error);

  const AnySelector from_config = KVConfig::parse("snapkv,window=8,kernel=7,pooling=max").selector();
  const SnapKV* snap = from_config.get_if<SnapKV>();
  REQUIRE(snap != nullptr);
  CHECK(snap->window == 8);
  CHECK(snap->kernel == 7);
  CHECK(snap->pooling == Pooling::max);
  for (Method m : kMethods) {
    KVConfig mc;
    mc.method = m;
    CHECK(mc.selector().method() == m);
  }
}

TEST_CASE("KVConfig text form: parse reads every key, to_string is canonical, and they round-trip") {
  const KVConfig c = KVConfig::parse("snapkv,kivi4,group=64,residual=32,window=32,kernel=5,pooling=max");
  CHECK(c.method == Method::snapkv);
  CHECK(c.key_bits == 4);
  CHECK(c.value_bits == 4);
  CHECK(c.group == 64);
  CHECK(c.residual == 32);
  CHECK(c.pooling == Pooling::max);
  CHECK(c.to_string() == "snapkv,kivi4,group=64,residual=32,zero=minmax,outliers=0,outlier_threshold=inf,window=32,kernel=5,pooling=max");
  CHECK(KVConfig::parse("keep_all,fp16").to_string() == "keep_all,fp16,residual=0");
  CHECK(KVConfig::parse("keep_all") == KVConfig{});
  CHECK(KVConfig::parse("h2o,k4v2").to_string() ==
        "h2o,k4v2,group=32,residual=0,zero=minmax,outliers=0,outlier_threshold=inf,window=32,mask=causal");
  CHECK(KVConfig::parse(" streamingllm , k16v2 , streaming = reference , window = 124 ").to_string() ==
        "streamingllm,k16v2,group=32,residual=0,zero=minmax,outliers=0,outlier_threshold=inf,window=124,streaming=reference");
  CHECK(KVConfig::parse("streamingllm,kivi16").to_string() == "streamingllm,fp16,residual=0,streaming=sinks,sinks=4");
  const KVConfig o = KVConfig::parse("pyramidkv,k2v8,zero=hqq,outliers=0.01,outlier_threshold=6.5,beta=7");
  CHECK(o.zero == ZeroPoint::hqq);
  CHECK(o.outliers == 0.01);
  CHECK(o.outlier_threshold == 6.5f);
  CHECK(o.beta == 7);
  CHECK(KVConfig::parse(o.to_string()) == o);
  // precision: written only when fast, so texts from before it existed read and write the same
  const KVConfig f = KVConfig::parse("h2o,k4v2,precision=fast");
  CHECK(f.precision == AttendPrecision::fast);
  CHECK(f.to_string() ==
        "h2o,k4v2,group=32,residual=0,zero=minmax,outliers=0,outlier_threshold=inf,window=32,mask=causal,precision=fast");
  CHECK(KVConfig::parse("h2o,k4v2,precision=exact") == KVConfig::parse("h2o,k4v2"));
  CHECK(KVConfig::parse(f.to_string()) == f);

  // every method x every bit pair x a few parameter sets
  for (Method m : kMethods)
    for (const BitPair p : kAnyBitPairs)
      for (int variant = 0; variant < 3; ++variant) {
        KVConfig x;
        x.method = m;
        x.key_bits = p.key;
        x.value_bits = p.value;
        x.residual = 16 * variant;
        if (variant == 1) {
          if (x.quantized()) {
            x.group = 64;
            x.zero = ZeroPoint::hqq;
            x.outliers = 1.0 / 3.0;
            x.outlier_threshold = 3.25f;
          }
          if (m != Method::keep_all && m != Method::streamingllm) x.window = 7;
          if (m == Method::snapkv || m == Method::pyramidkv) {
            x.kernel = 9;
            x.pooling = Pooling::max;
          }
          if (m == Method::pyramidkv) x.beta = 3;
          if (m == Method::h2o) x.mask = H2OMask::window_block;
          if (m == Method::streamingllm) x.sinks = 0;
        }
        if (variant == 2 && x.quantized()) x.precision = AttendPrecision::fast;
        if (variant == 2 && m == Method::streamingllm) {
          x.streaming = StreamingLLM::Mode::reference;
          x.window = 60;
        }
        CAPTURE(x.to_string());
        CHECK(KVConfig::parse(x.to_string()) == x);
        CHECK(KVConfig::parse(x.to_string()).to_string() == x.to_string());
      }
}

TEST_CASE("KVConfig::validate names the invalid field, what it expected and what it got") {
  auto check = [](auto&& mutate, const char* field, const char* got) {
    KVConfig c;
    mutate(c);
    const std::string msg = error_of([&] { c.validate(); });
    CAPTURE(msg);
    CHECK(msg.find(std::string("KVConfig.") + field + ":") != std::string::npos);
    CHECK(msg.find("expected") != std::string::npos);
    CHECK(msg.find(std::string("got ") + got) != std::string::npos);
  };
  CHECK_NOTHROW(KVConfig{}.validate());
  check([](KVConfig& c) { c.method = static_cast<Method>(9); }, "method", "9");
  check([](KVConfig& c) { c.key_bits = 5; }, "key_bits", "5");
  check([](KVConfig& c) { c.key_bits = 0; }, "key_bits", "0");
  check([](KVConfig& c) { c.value_bits = 32; }, "value_bits", "32");
  check([](KVConfig& c) { c.group = 0; }, "group", "0");
  check([](KVConfig& c) { c.group = 8192; }, "group", "8192");
  check([](KVConfig& c) { c.residual = -1; }, "residual", "-1");
  check([](KVConfig& c) { c.zero = static_cast<ZeroPoint>(7); }, "zero", "7");
  check([](KVConfig& c) { c.outliers = 1.5; }, "outliers", "1.5");
  check([](KVConfig& c) { c.outliers = -0.1; }, "outliers", "-0.1");
  check([](KVConfig& c) { c.outlier_threshold = -1.0f; }, "outlier_threshold", "-1");
  check([](KVConfig& c) { c.outlier_threshold = 6.0f; }, "outliers", "0");
  check([](KVConfig& c) { c.window = 0; }, "window", "0");
  check([](KVConfig& c) { c.kernel = 4; }, "kernel", "4");
  check([](KVConfig& c) { c.kernel = -1; }, "kernel", "-1");
  check([](KVConfig& c) { c.pooling = static_cast<Pooling>(5); }, "pooling", "5");
  check([](KVConfig& c) { c.beta = 0; }, "beta", "0");
  check([](KVConfig& c) { c.mask = static_cast<H2OMask>(5); }, "mask", "5");
  check([](KVConfig& c) { c.streaming = static_cast<StreamingLLM::Mode>(5); }, "streaming", "5");
  check([](KVConfig& c) { c.sinks = -2; }, "sinks", "-2");
  check([](KVConfig& c) { c.precision = static_cast<AttendPrecision>(4); }, "precision", "4");
  // AnyCompressedKV validates before it builds anything
  KVConfig bad;
  bad.group = -3;
  CHECK_THROWS_WITH_AS(AnyCompressedKV(Shape{1, 1, 8}, bad), doctest::Contains("KVConfig.group"), Error);
  CHECK_THROWS_WITH_AS(AnyCompressedKV(Shape{2, 3, 8}, KVConfig{}), doctest::Contains("shape.q_heads"), Error);
}

TEST_CASE("KVConfig::parse rejects unknown keys (listing the valid ones), bad values and keys that do not apply") {
  auto msg = [](const char* text) { return error_of([&] { (void)KVConfig::parse(text); }); };
  const std::string unknown = msg("snapkv,kivi4,windw=8");
  CHECK(unknown.find("'windw'") != std::string::npos);
  CHECK(unknown.find("group, residual, zero, outliers, outlier_threshold, window, kernel, pooling, beta, mask, "
                     "streaming, sinks, precision") != std::string::npos);
  CHECK(msg("snap,kivi4").find("KVConfig.method: expected one of keep_all, streamingllm, snapkv, h2o, pyramidkv") !=
        std::string::npos);
  CHECK(msg("").find("KVConfig.method") != std::string::npos);
  CHECK(msg("snapkv,kivi5").find("fp16, kivi<b> or k<kb>v<vb>") != std::string::npos);
  CHECK(msg("snapkv,k4v").find("'k4v'") != std::string::npos);
  CHECK(msg("snapkv,kivi4,k4v2").find("key=value, got 'k4v2'") != std::string::npos);
  CHECK(msg("snapkv,kivi4,").find("key=value, got ''") != std::string::npos);
  CHECK(msg("snapkv,window=8,window=16").find("KVConfig.window: expected at most once") != std::string::npos);
  CHECK(msg("snapkv,window=eight").find("KVConfig.window: expected an integer, got 'eight'") != std::string::npos);
  CHECK(msg("snapkv,window=8.5").find("KVConfig.window: expected an integer") != std::string::npos);
  CHECK(msg("snapkv,window=").find("KVConfig.window: expected an integer, got ''") != std::string::npos);
  CHECK(msg("snapkv,pooling=mean").find("KVConfig.pooling: expected avg or max, got 'mean'") != std::string::npos);
  CHECK(msg("h2o,mask=full").find("KVConfig.mask: expected causal or reference") != std::string::npos);
  CHECK(msg("streamingllm,streaming=x").find("KVConfig.streaming: expected sinks or reference") != std::string::npos);
  CHECK(msg("snapkv,kivi2,zero=mean").find("KVConfig.zero: expected minmax or hqq") != std::string::npos);
  CHECK(msg("snapkv,kivi2,outliers=lots").find("KVConfig.outliers: expected a number") != std::string::npos);
  CHECK(msg("snapkv,kivi4,precision=approx").find("KVConfig.precision: expected exact or fast, got 'approx'") !=
        std::string::npos);
  // values that parse but are out of range go through validate()
  CHECK(msg("snapkv,kernel=4").find("KVConfig.kernel: expected an odd integer >= 1, got 4") != std::string::npos);
  CHECK(msg("snapkv,kivi4,group=0").find("KVConfig.group") != std::string::npos);
  CHECK(msg("snapkv,residual=-8").find("KVConfig.residual") != std::string::npos);
  CHECK(msg("pyramidkv,beta=0").find("KVConfig.beta") != std::string::npos);
  CHECK(msg("streamingllm,sinks=-1").find("KVConfig.sinks") != std::string::npos);
  CHECK(msg("snapkv,kivi4,outlier_threshold=6").find("KVConfig.outliers: expected > 0 when outlier_threshold") !=
        std::string::npos);
  // keys that exist but do not apply to this method / these bits / this mode
  const std::string window = msg("keep_all,kivi4,window=8");
  CHECK(window.find("KVConfig.window: expected a key that applies to keep_all,kivi4 (group, residual, zero, "
                    "outliers, outlier_threshold, precision), got window") != std::string::npos);
  CHECK(msg("keep_all,fp16,group=64").find("applies to keep_all,fp16 (residual)") != std::string::npos);
  CHECK(msg("keep_all,fp16,precision=fast").find("KVConfig.precision: expected a key that applies") != std::string::npos);
  CHECK(msg("h2o,kernel=5").find("KVConfig.kernel") != std::string::npos);
  CHECK(msg("snapkv,mask=causal").find("KVConfig.mask") != std::string::npos);
  CHECK(msg("snapkv,beta=4").find("KVConfig.beta") != std::string::npos);
  CHECK(msg("streamingllm,window=8").find("applies to streamingllm,fp16,streaming=sinks") != std::string::npos);
  CHECK(msg("streamingllm,streaming=reference,sinks=2").find("KVConfig.sinks") != std::string::npos);
  CHECK_NOTHROW((void)KVConfig::parse("streamingllm,window=8,streaming=reference"));  // order-independent
}

TEST_CASE("a bit width outside {1,2,3,4,8,16} or a pair without an instantiation is an error listing the choices") {
  KVConfig c;
  c.key_bits = 4;
  c.value_bits = 6;
  CHECK_THROWS_WITH_AS(c.validate(), doctest::Contains("KVConfig.value_bits: expected one of 1, 2, 3, 4, 8, 16, got 6"),
                       Error);
  CHECK_THROWS_WITH_AS(AnyCompressedKV(Shape{1, 1, 8}, c), doctest::Contains("KVConfig.value_bits"), Error);
  // With the full set every valid pair has an instantiation; with QPKV_ANY_BIT_PAIRS_REDUCED, k3v8 has none.
  int missing = 0;
  for (int kb : kBitWidths)
    for (int vb : kBitWidths) {
      if (any_supports({kb, vb})) continue;
      ++missing;
      c.key_bits = kb;
      c.value_bits = vb;
      const std::string msg = error_of([&] { c.validate(); });
      CAPTURE(msg);
      CHECK(msg.find("KVConfig.key_bits/value_bits: expected a pair AnyCompressedKV instantiates (k1v1, k2v2") !=
            std::string::npos);
      CHECK(msg.find(qpkv::detail::concat("got k", kb, "v", vb)) != std::string::npos);
    }
  CHECK(missing == 36 - static_cast<int>(kAnyBitPairs.size()));
}
