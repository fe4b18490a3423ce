// Reflection-padded conv2d without a padded copy, shared host logic of the CPU and CUDA kernels.
//
// Design: the vendor convolution (oneDNN / cuDNN) with implicit zero padding does the interior, then a
// correction over the output frame adds what the reflected pixels contribute (zero padding contributed 0).
// The frame is cut into rectangular regions whose output pixels all read the pad through the same set of
// taps; per region the out-of-bounds taps are gathered (reflected index computed at the read) into a small
// [groups, pixels, Cg * taps] matrix and multiplied with the matching weight columns (one batched GEMM).
// Backward reuses the same regions: grad_weight adds the frame's outer products, grad_input folds the
// frame's gradient back onto the source pixels the reflection read. No atomics anywhere: the fold gives
// each (batch) slice of grad_input to one thread, so every run gives the same bits.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#ifdef __CUDACC__
#define FASTFUSE_HD __host__ __device__
#else
#define FASTFUSE_HD
#endif

namespace fastfuse {
namespace rconv {

constexpr int kMaxTaps = 64;  // kernels up to 8x8; the Python router sends larger ones to the reference

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

// The weight columns of a region's taps: [G, OCg, Cg * T] in the accumulation dtype.
inline at::Tensor weight_columns(const at::Tensor& w_acc, const Geom& g, const Taps& taps) {
  std::vector<int64_t> idx(taps.n);
  for (int t = 0; t < taps.n; ++t) idx[t] = taps.kh[t] * g.KW + taps.kw[t];
  auto index = at::tensor(idx, at::kLong).to(w_acc.device());
  return w_acc.view({g.OC, g.Cg, g.KH * g.KW}).index_select(2, index).view({g.G, g.OCg, g.Cg * taps.n});
}

// grad_output over a region as [G, NP, OCg] (NP = N * rows * cols, row-major over n, r, c).
inline at::Tensor grad_rows(const at::Tensor& go, const Geom& g, const Region& reg) {
  return go.slice(2, reg.r0, reg.r1)
      .slice(3, reg.c0, reg.c1)
      .permute({0, 2, 3, 1})
      .reshape({-1, g.G, g.OCg})
      .permute({1, 0, 2})
      .to(acc_type(go.scalar_type()))
      .contiguous();
}

// Dev provides the device loops:
//   gather(x, A, g, reg): A[gi, np, cg*T + t] = x[n, gi*Cg + cg, reflect(ih), reflect(iw)] for tap t
//   add(out, corr, g, reg): out[n, gi*OCg + oc, r, c] += corr[gi, np, oc]
//   fold(gin, B, g, reg):  gin[n, gi*Cg + cg, reflect(ih), reflect(iw)] += B[gi, np, cg*T + t], one writer each
template <typename Dev>
at::Tensor forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Geom g = geometry(x, w, stride, padding, dilation, groups);
  at::Tensor out = at::convolution(x, w, bias, stride, padding, dilation, false, {0, 0}, groups);
  if (out.numel() == 0) return out;
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor w_acc = w.to(acc).contiguous();
  for (const Region& reg : plan(g)) {
    const int64_t np = g.N * reg.rows() * reg.cols();
    at::Tensor A = at::empty({g.G, np, g.Cg * reg.taps.n}, x.options().dtype(acc));
    Dev::gather(x, A, g, reg);
    Dev::add(out, at::bmm(A, weight_columns(w_acc, g, reg.taps).transpose(1, 2)), g, reg);
  }
  return out;
}

template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& go, const at::Tensor& x,
                                                        const at::Tensor& w, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                                        int64_t groups, std::array<bool, 3> mask) {
  const Geom g = geometry(x, w, stride, padding, dilation, groups);
  std::vector<int64_t> bias_sizes{g.OC};
  auto [gi, gw, gb] = at::convolution_backward(go, x, w, bias_sizes, stride, padding, dilation, false, {0, 0},
                                               groups, mask);
  if (!mask[0] && !mask[1]) return {gi, gw, gb};
  if (go.numel() == 0) return {gi, gw, gb};
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor w_acc = w.to(acc).contiguous();
  at::Tensor gw_acc;
  if (mask[1]) gw_acc = gw.to(acc).contiguous().view({g.OC, g.Cg, g.KH * g.KW});
  for (const Region& reg : plan(g)) {
    const at::Tensor Gr = grad_rows(go, g, reg);  // [G, NP, OCg]
    if (mask[1]) {
      at::Tensor A = at::empty({g.G, Gr.size(1), g.Cg * reg.taps.n}, x.options().dtype(acc));
      Dev::gather(x, A, g, reg);
      std::vector<int64_t> idx(reg.taps.n);
      for (int t = 0; t < reg.taps.n; ++t) idx[t] = reg.taps.kh[t] * g.KW + reg.taps.kw[t];
      at::Tensor part = at::bmm(Gr.transpose(1, 2), A).view({g.OC, g.Cg, reg.taps.n});
      gw_acc.index_add_(2, at::tensor(idx, at::kLong).to(x.device()), part);
    }
    if (mask[0]) Dev::fold(gi, at::bmm(Gr, weight_columns(w_acc, g, reg.taps)), g, reg);
  }
  if (mask[1]) gw = gw_acc.view(w.sizes()).to(w.scalar_type());
  return {gi, gw, gb};
}

}  // namespace rconv

at::Tensor reflect_conv2d_cpu(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups);
std::tuple<at::Tensor, at::Tensor, at::Tensor> reflect_conv2d_backward_cpu(
    const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> mask);

}  // namespace fastfuse
