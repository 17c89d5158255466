// tools/cmd_quantize.cpp - `qpkv quantize`: KIVI-style group quantization of one tensor, writing
// the unpacked codes, the group parameters and the dequantized values.
//
// The quantizer is qpkv::Affine<bits, float>: float32 scales and mins, so codes, scales and mins
// are KIVI's bit for bit (zero point minmax) and HQQ's (zero point hqq with --hqq-iters 0 gives
// hqq's optimize=False; the default 20 its proximal solver, optimize=True). The whole tensor is one
// encode call, so HQQ's early stop sees the error of the whole tensor, as hqq does.
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli.hpp"
#include "qpkv/attention/dense.hpp"
#include "qpkv/quant/affine_quantizer.hpp"

namespace qpkv::cli {

namespace {

struct QuantizeOptions {
  std::string input, axis, zero_point = "minmax", codes, scale, zero, deq;
  int bits = 4;
  index_t group = 32;
  int hqq_iters = HqqParams{}.iters;
};

struct Quantized {
  std::vector<std::uint8_t> codes;  // X's layout
  std::vector<float> scale, zero, deq;
};

template <int Bits>
Quantized quantize(const HeadTensor& x, const QuantizeOptions& o) {
  Affine<Bits, float> q;
  q.axis = o.axis == "channel" ? Axis::channel : Axis::token;
  q.group = o.group;
  q.zero_point = o.zero_point == "hqq" ? ZeroPoint::hqq : ZeroPoint::minmax;
  q.hqq.iters = o.hqq_iters;
  q.validate(x.dim, "quantizer");
  // channel: a part is G tokens of one head (groups never cross heads since G divides N);
  // token: a part is one head. Concatenating the parts' parameters gives (H, N/G, D) / (H, N, ceil(D/G)).
  const index_t T = q.axis == Axis::channel ? o.group : x.tokens;
  const index_t parts = x.heads * x.tokens / T;
  const AffineLayout l = q.layout(T, x.dim);
  std::vector<std::uint8_t> buf(l.bytes * static_cast<std::size_t>(parts));
  q.encode(x.data.data(), parts, T, x.dim, buf.data(), l.bytes);
  Quantized r;
  r.codes.resize(x.data.size());
  r.deq.resize(x.data.size());
  for (index_t p = 0; p < parts; ++p) {
    const std::uint8_t* part = buf.data() + static_cast<std::size_t>(p) * l.bytes;
    q.decode(part, T, x.dim, r.deq.data() + p * T * x.dim);
    for (index_t t = 0; t < T; ++t)
      for (index_t c = 0; c < x.dim; ++c)
        r.codes[static_cast<std::size_t>((p * T + t) * x.dim + c)] = static_cast<std::uint8_t>(
            quant::unpack_one<Bits>(part + l.codes + static_cast<std::size_t>(t) * l.row_bytes, static_cast<std::size_t>(c)));
    const auto* sc = reinterpret_cast<const float*>(part + l.scales);
    const auto* mn = reinterpret_cast<const float*>(part + l.mins);
    for (std::size_t g = 0; g < l.params; ++g) {
      r.scale.push_back(sc[g]);
      // minmax: KIVI's mn (value units, x' = code * scale + mn); hqq: hqq's zero (code units,
      // x' = (code - zero) * scale), recovered from the stored min = -zero * scale.
      r.zero.push_back(q.zero_point == ZeroPoint::hqq ? (sc[g] > 0.0f ? -mn[g] / sc[g] : 0.0f) : mn[g]);
    }
  }
  return r;
}

}  // namespace

Command add_quantize(CLI::App& app) {
  auto o = std::make_shared<QuantizeOptions>();
  CLI::App* sub = app.add_subcommand(
      "quantize",
      "Asymmetric group quantization of one tensor (KIVI's min-max rule; HQQ zero points on request), float32\n"
      "scales: writes the unpacked codes, per-group scale and zero, and the dequantized tensor. X is (1,H,N,D),\n"
      "(H,N,D) or (tokens, channels). --axis channel: a group is G consecutive tokens of one channel (KIVI keys;\n"
      "G must divide N); --axis token: G consecutive channels of one token (KIVI values; the last group of a row\n"
      "is shorter when G does not divide D).");
  sub->add_option("--input", o->input, "tensor X: .npy or FILE.safetensors:NAME (float32/float16)")->required();
  sub->add_option("--axis", o->axis, "channel (per-channel groups over tokens) or token (per-token groups over channels)")
      ->required()
      ->check(CLI::IsMember({"channel", "token"}));
  sub->add_option("--bits", o->bits, "code width")->required()->check(CLI::IsMember({1, 2, 3, 4, 8}));
  sub->add_option("--group", o->group, "elements per group G")->required();
  CLI::Option* zp = sub->add_option("--zero-point", o->zero_point, "minmax (KIVI) or hqq (HQQ's proximal solver)")
                        ->check(CLI::IsMember({"minmax", "hqq"}))
                        ->capture_default_str();
  sub->add_option("--hqq-iters", o->hqq_iters, "HQQ solver iterations; 0 = hqq's optimize=False")
      ->capture_default_str()
      ->needs(zp);
  sub->add_option("--codes", o->codes, "output C.npy: uint8 codes, X's shape");
  sub->add_option("--scale", o->scale, "output S.npy: float32 per-group step, X's shape with the group axis shortened");
  sub->add_option("--zero", o->zero,
                  "output Z.npy: float32, as --scale; minmax: the group minimum (x' = code*scale + zero); hqq: "
                  "hqq's zero in code units (x' = (code - zero)*scale)");
  sub->add_option("--deq", o->deq, "output D.npy: float32 dequantized X");

  return {sub, [o] {
            if (o->codes.empty() && o->scale.empty() && o->zero.empty() && o->deq.empty())
              throw UsageError("expected at least one output: --codes, --scale, --zero or --deq");
            if (o->zero_point != "hqq" && o->hqq_iters != HqqParams{}.iters)
              throw UsageError("--hqq-iters: applies to --zero-point hqq only");
            detail::require(o->group >= 1, "--group", ">= 1", o->group);
            detail::require(o->hqq_iters >= 0, "--hqq-iters", ">= 0", o->hqq_iters);
            const HeadTensor x = load_heads(o->input, "--input", "H,N,D", true);
            const bool channel = o->axis == "channel";
            if (channel && x.tokens % o->group != 0)
              throw Error(detail::concat("--group: expected a divisor of the ", x.tokens,
                                         " tokens of --input for --axis channel (a key group is G consecutive "
                                         "tokens), got ", o->group));
            if (!channel && o->group > x.dim)
              throw Error(detail::concat("--group: expected <= the ", x.dim, " channels of --input for --axis token, got ",
                                         o->group));
            Quantized r;
            switch (o->bits) {
              case 1: r = quantize<1>(x, *o); break;
              case 2: r = quantize<2>(x, *o); break;
              case 3: r = quantize<3>(x, *o); break;
              case 4: r = quantize<4>(x, *o); break;
              case 8: r = quantize<8>(x, *o); break;
              default: throw UsageError("--bits: expected 1, 2, 3, 4 or 8");
            }
            std::vector<std::int64_t> pshape = x.shape;  // the group axis shortened
            if (channel) pshape[pshape.size() - 2] = x.tokens / o->group;
            else pshape.back() = (x.dim + o->group - 1) / o->group;
            if (!o->codes.empty()) save_output(o->codes, r.codes, x.shape, "--codes");
            if (!o->scale.empty()) save_output(o->scale, r.scale, pshape, "--scale");
            if (!o->zero.empty()) save_output(o->zero, r.zero, pshape, "--zero");
            if (!o->deq.empty()) save_output(o->deq, r.deq, x.shape, "--deq");
            std::printf("quantized %s along %s: %d-bit, group %lld, zero point %s%s; %zu groups\n",
                        shape_text(x.shape).c_str(), o->axis.c_str(), o->bits, static_cast<long long>(o->group),
                        o->zero_point.c_str(),
                        o->zero_point == "hqq" ? detail::concat(" (", o->hqq_iters, " iterations max)").c_str() : "",
                        r.scale.size());
            std::printf("relative L2 error ||X - deq|| / ||X|| = %.4e\n", relative_l2(r.deq, x.data));
            const std::pair<const std::string*, const char*> outs[] = {
                {&o->codes, "codes uint8"}, {&o->scale, "scale float32"}, {&o->zero, "zero float32"}, {&o->deq, "deq float32"}};
            for (const auto& [path, what] : outs)
              if (!path->empty())
                std::printf("wrote %s: %s %s\n", path->c_str(), what,
                            shape_text(std::string(what).starts_with("codes") || std::string(what).starts_with("deq") ? x.shape : pshape).c_str());
          }};
}

}  // namespace qpkv::cli
