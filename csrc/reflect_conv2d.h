// Reflection-padded conv2d without a padded copy: the geometry and the frame plan shared by the CPU and CUDA
// kernels, and their entry points.
//
// The frame design, on both devices: the vendor convolution (oneDNN / cuDNN) with implicit zero padding does the
// interior, then a correction over the output frame adds what the reflected pixels contribute (zero padding
// contributed 0). The frame is cut into rectangular regions whose output pixels all read the pad through the same
// set of taps (plan()); each device corrects region by region. The CPU also has its own AVX-512 "direct" design
// (cpu/reflect_conv2d_cpu.h).
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Version.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#ifdef __CUDACC__
#define FASTFUSE_HD __host__ __device__
#else
#define FASTFUSE_HD
#endif

namespace fastfuse {
namespace rconv {

constexpr int kMaxTaps = 64;  // kernels up to 8x8; larger ones run as torch's pad + conv (reflect_conv2d_op)

struct Geom {
  int64_t N, C, H, W, OC, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw, G, Cg, OCg;
};

// Taps (kh, kw) of one region that land in the pad. Fixed-size so it can go to a CUDA kernel by value.
struct Taps {
  int n = 0;
  int kh[kMaxTaps];
  int kw[kMaxTaps];
};

struct Region {
  int64_t r0, r1, c0, c1;  // output rows [r0, r1), columns [c0, c1)
  Taps taps;
  int64_t rows() const { return r1 - r0; }
  int64_t cols() const { return c1 - c0; }
};

// Padded coordinate -> source coordinate. Valid for -size < i < 2 * size - 1, which padding < size ensures.
FASTFUSE_HD inline int64_t reflect(int64_t i, int64_t size) {
  return i < 0 ? -i : (i >= size ? 2 * (size - 1) - i : i);
}

// For each output row (or column): bitmask of the kernel taps along that axis that read the pad.
inline std::vector<uint64_t> pad_taps(int64_t out, int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  std::vector<uint64_t> m(out, 0);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t t = 0; t < k; ++t) {
      const int64_t i = o * s - p + t * d;
      if (i < 0 || i >= in) m[o] |= uint64_t(1) << t;
    }
  return m;
}

// Runs of consecutive outputs with the same pad-tap mask: [begin, end, mask].
inline std::vector<std::tuple<int64_t, int64_t, uint64_t>> segments(const std::vector<uint64_t>& m) {
  std::vector<std::tuple<int64_t, int64_t, uint64_t>> seg;
  for (int64_t o = 0; o < (int64_t)m.size(); ++o) {
    if (!seg.empty() && std::get<2>(seg.back()) == m[o] && std::get<1>(seg.back()) == o)
      std::get<1>(seg.back()) = o + 1;
    else
      seg.emplace_back(o, o + 1, m[o]);
  }
  return seg;
}

inline std::vector<Region> plan(const Geom& g) {
  const auto rows = segments(pad_taps(g.OH, g.H, g.KH, g.sh, g.ph, g.dh));
  const auto cols = segments(pad_taps(g.OW, g.W, g.KW, g.sw, g.pw, g.dw));
  std::vector<Region> out;
  for (const auto& [r0, r1, mh] : rows)
    for (const auto& [c0, c1, mw] : cols) {
      if (!mh && !mw) continue;  // interior: zero padding is already exact there
      Region reg{r0, r1, c0, c1, {}};
      for (int kh = 0; kh < g.KH; ++kh)
        for (int kw = 0; kw < g.KW; ++kw)
          if ((mh >> kh & 1) || (mw >> kw & 1)) {
            reg.taps.kh[reg.taps.n] = kh;
            reg.taps.kw[reg.taps.n] = kw;
            ++reg.taps.n;
          }
      out.push_back(reg);
    }
  return out;
}

inline Geom geometry(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4, "fastfuse reflect_conv2d: expected 4-D input and weight");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "fastfuse reflect_conv2d: stride, padding and dilation must have 2 values");
  Geom g;
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.OC = w.size(0), g.KH = w.size(2), g.KW = w.size(3);
  g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  g.G = groups, g.Cg = g.C / groups, g.OCg = g.OC / groups;
  TORCH_CHECK(g.ph < g.H && g.pw < g.W,
              "fastfuse reflect_conv2d: Padding size should be less than the corresponding input dimension");
  TORCH_CHECK(g.KH * g.KW <= kMaxTaps, "fastfuse reflect_conv2d kernel: at most ", kMaxTaps, " taps");
  g.OH = (g.H + 2 * g.ph - g.dh * (g.KH - 1) - 1) / g.sh + 1;
  g.OW = (g.W + 2 * g.pw - g.dw * (g.KW - 1) - 1) / g.sw + 1;
  return g;
}

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace rconv

// algo (python/fastfuse/ops/reflect_conv2d.py _ALGOS): 0 = pick per shape, 1 = frame, 2 = direct (CPU only; where it
// cannot run, as 0). CUDA runs the frame design for every value. Forward and backward pick independently.
#define FASTFUSE_RCONV_DECLARE(dev)                                                                            \
  at::Tensor reflect_conv2d_##dev(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, \
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,       \
                                  int64_t groups, int64_t algo);                                                   \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> reflect_conv2d_backward_##dev(                                   \
      const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,                     \
      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> mask, int64_t algo);

FASTFUSE_RCONV_DECLARE(cpu)
// The design the CPU forward runs for these arguments ("frame" or "direct"; tests, benchmarks)
std::string reflect_conv2d_cpu_design(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t algo);
#ifdef FASTFUSE_WITH_CUDA
FASTFUSE_RCONV_DECLARE(cuda)
#endif


// ---- fastfuse::reflect_conv2d on one device ------------------------------------------------------------------
// - Output layouts as torch's convolution: channels_last when the input or the weight is; grad_weight like the
//   weight.
// - Kernels of more than rconv::kMaxTaps taps run as torch's reflection pad + convolution (and its backward).
// - FASTFUSE_REFLECT_CONV2D_ALGO forces a CPU design ("frame", "direct"; benchmarks and tests).
// - The kernels check every argument first, with the errors F.conv2d and F.pad(mode="reflect") raise.
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

inline bool rconv_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

inline at::MemoryFormat rconv_out_format(const at::Tensor& x, const at::Tensor& w) {
  return rconv_channels_last(x) || rconv_channels_last(w) ? at::MemoryFormat::ChannelsLast
                                                          : at::MemoryFormat::Contiguous;
}

// The CPU design forced by FASTFUSE_REFLECT_CONV2D_ALGO (0: the automatic pick).
inline int64_t rconv_algo_from_env() {
  const char* v = std::getenv("FASTFUSE_REFLECT_CONV2D_ALGO");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return 0;
  if (std::strcmp(v, "frame") == 0) return 1;
  if (std::strcmp(v, "direct") == 0) return 2;
  TORCH_CHECK(false, "FASTFUSE_REFLECT_CONV2D_ALGO must be auto, frame or direct, got ", v);
}

// The errors F.conv2d and F.pad(mode="reflect") raise for these arguments, before any work is done.
inline void check_reflect_conv2d_args(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "reflect_conv2d: expected a 4-D input (batched), got ", x.dim(), "-D input of size ",
              x.sizes());
  TORCH_CHECK(w.dim() == 4, "weight should have 4 dimensions, got ", w.dim(), "-D weight of size ", w.sizes());
  const bool has_b = b.has_value() && b->defined();
  using Named = std::pair<const at::Tensor*, const char*>;
  for (const auto& [t, name] : {Named{&w, "weight"}, Named{has_b ? &*b : nullptr, "bias"}}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->device() == x.device(), "Input type (", x.device(), ") and ", name, " type (", t->device(),
                ") should be the same");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "Input type (", x.scalar_type(), ") and ", name, " type (",
                t->scalar_type(), ") should be the same");
  }
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "reflect_conv2d: expected a floating-point input, got ",
              x.scalar_type());
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, "non-positive stride is not supported");
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "negative padding is not supported");
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, "dilation should be greater than zero");
  TORCH_CHECK(groups > 0, "non-positive groups is not supported");
  TORCH_CHECK(w.size(0) % groups == 0, "Given groups=", groups, ", expected weight to be divisible by ", groups,
              " at dimension 0, but got weight of size ", w.sizes(), " instead");
  TORCH_CHECK(x.size(1) == w.size(1) * groups, "Given groups=", groups, ", weight of size ", w.sizes(),
              ", expected input", x.sizes(), " to have ", w.size(1) * groups, " channels, but got ", x.size(1),
              " channels instead");
  TORCH_CHECK(!has_b || (b->dim() == 1 && b->size(0) == w.size(0)), "Given weight of size ", w.sizes(),
              ", expected bias to be 1-dimensional with ", w.size(0), " elements, but got bias of size ",
              has_b ? b->sizes() : at::IntArrayRef{}, " instead");
  // torch checks the width (argument #4 of the pad) before the height (argument #6)
  for (const auto& [dim, arg, p] : {std::tuple<int64_t, int, int64_t>{3, 4, padding[1]}, {2, 6, padding[0]}})
    TORCH_CHECK(p < x.size(dim), "Argument #", arg, ": Padding size should be less than the corresponding input ",
                "dimension, but got: padding (", p, ", ", p, ") at dimension ", dim, " of input ", x.sizes());
  const int64_t eff_h = dilation[0] * (w.size(2) - 1) + 1, eff_w = dilation[1] * (w.size(3) - 1) + 1;
  const int64_t pad_h = x.size(2) + 2 * padding[0], pad_w = x.size(3) + 2 * padding[1];
  TORCH_CHECK(pad_h >= eff_h && pad_w >= eff_w, "Calculated padded input size per channel: (", pad_h, " x ", pad_w,
              "). Kernel size: (", eff_h, " x ", eff_w, "). Kernel size can't be greater than actual input size");
}

inline bool rconv_too_many_taps(const at::Tensor& w) { return w.size(2) * w.size(3) > rconv::kMaxTaps; }

inline at::Tensor rconv_pad(const at::Tensor& x, at::IntArrayRef padding) {
  return padding[0] || padding[1] ? at::reflection_pad2d(x, {padding[1], padding[1], padding[0], padding[0]}) : x;
}

template <typename Kernel>
at::Tensor reflect_conv2d_op(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             int64_t groups, Kernel kernel) {
  const at::Tensor out =
      rconv_too_many_taps(w)
          ? at::conv2d(rconv_pad(x, padding), w, b, stride, at::IntArrayRef{0, 0}, dilation, groups)
          : kernel(x, w, b, stride, padding, dilation, groups, rconv_algo_from_env());
  return out.contiguous(rconv_out_format(x, w));
}

template <typename Kernel>
Tensor3 reflect_conv2d_backward_op(const at::Tensor& go, const at::Tensor& x, const at::Tensor& w,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, std::array<bool, 3> mask, Kernel kernel) {
  at::Tensor gi, gw, gb;
  if (rconv_too_many_taps(w)) {
    const at::Tensor xp = rconv_pad(x, padding);
    std::tie(gi, gw, gb) = at::convolution_backward(go, xp, w, at::IntArrayRef{w.size(0)}, stride, {0, 0}, dilation,
                                                    false, {0, 0}, groups, mask);
    if (mask[0] && (padding[0] || padding[1]))
      gi = at::reflection_pad2d_backward(gi, x, {padding[1], padding[1], padding[0], padding[0]});
  } else {
    std::tie(gi, gw, gb) = kernel(go, x, w, stride, padding, dilation, groups, mask, rconv_algo_from_env());
  }
  const at::Tensor empty = x.new_empty({0});
  return {mask[0] ? gi.contiguous(rconv_out_format(x, w)) : empty,
          mask[1] ? gw.contiguous(rconv_channels_last(w) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous)
                  : empty.clone(),
          mask[2] ? gb.contiguous() : empty.clone()};
}

}  // namespace fastfuse
