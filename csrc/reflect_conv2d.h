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
#include <ATen/Version.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
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

inline at::Tensor tap_index(const Geom& g, const Taps& taps, const at::Device& device) {
  std::vector<int64_t> idx(taps.n);
  for (int t = 0; t < taps.n; ++t) idx[t] = taps.kh[t] * g.KW + taps.kw[t];
  return at::tensor(idx, at::kLong).to(device);
}

// Columns are tap-major (t * Cg + cg): for channels_last inputs the gather then reads and writes
// contiguous channel runs. w_tap is the weight as [OC, KH*KW, Cg] in the accumulation dtype.
inline at::Tensor weight_columns(const at::Tensor& w_tap, const Geom& g, const at::Tensor& index) {
  return w_tap.index_select(1, index).view({g.G, g.OCg, index.numel() * g.Cg});
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
//   gather(x, A, g, reg): A[gi, np, t*Cg + cg] = x[n, gi*Cg + cg, reflect(ih), reflect(iw)] for tap t
//   add(out, corr, g, reg): out[n, gi*OCg + oc, r, c] += corr[gi, np, oc]
//   fold(gin, B, g, reg):  gin[n, gi*Cg + cg, reflect(ih), reflect(iw)] += B[gi, np, t*Cg + cg], one writer each
template <typename Dev>
at::Tensor forward_gemm(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                        const Geom& g);
template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_gemm(const at::Tensor& go, const at::Tensor& x,
                                                             const at::Tensor& w, const Geom& g,
                                                             std::array<bool, 3> mask);
// (defined below; channels_last: the input's layout as the convolution takes it)
inline bool pick_gemm(const Geom& g, int64_t algo, bool cpu, bool backward, bool channels_last = true);

template <typename Dev>
at::Tensor forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                   int64_t algo) {
  const Geom g = geometry(x, w, stride, padding, dilation, groups);
  if (pick_gemm(g, algo, x.device().is_cpu(), false)) return forward_gemm<Dev>(x, w, bias, g);
  at::Tensor out = at::convolution(x, w, bias, stride, padding, dilation, false, {0, 0}, groups);
  if (out.numel() == 0) return out;
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor w_tap = w.to(acc).reshape({g.OC, g.Cg, g.KH * g.KW}).transpose(1, 2).contiguous();
  for (const Region& reg : plan(g)) {
    const int64_t np = g.N * reg.rows() * reg.cols();
    at::Tensor A = at::empty({g.G, np, g.Cg * reg.taps.n}, x.options().dtype(acc));
    Dev::gather(x, A, g, reg);
    const at::Tensor cols = weight_columns(w_tap, g, tap_index(g, reg.taps, x.device()));
    Dev::add(out, at::bmm(A, cols.transpose(1, 2)), g, reg);
  }
  return out;
}

template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& go, const at::Tensor& x,
                                                        const at::Tensor& w, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                                        int64_t groups, std::array<bool, 3> mask,
                                                        int64_t algo) {
  const Geom g = geometry(x, w, stride, padding, dilation, groups);
  if (pick_gemm(g, algo, x.device().is_cpu(), true)) return backward_gemm<Dev>(go, x, w, g, mask);
  std::vector<int64_t> bias_sizes{g.OC};
  auto [gi, gw, gb] = at::convolution_backward(go, x, w, bias_sizes, stride, padding, dilation, false, {0, 0},
                                               groups, mask);
  if (!mask[0] && !mask[1]) return {gi, gw, gb};
  if (go.numel() == 0) return {gi, gw, gb};
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor w_tap = w.to(acc).reshape({g.OC, g.Cg, g.KH * g.KW}).transpose(1, 2).contiguous();
  at::Tensor gw_tap;  // [OC, KH*KW, Cg] view of the fp32/fp64 grad_weight being corrected
  if (mask[1]) gw_tap = gw.to(acc).contiguous().view({g.OC, g.Cg, g.KH * g.KW}).transpose(1, 2);
  for (const Region& reg : plan(g)) {
    const at::Tensor Gr = grad_rows(go, g, reg);  // [G, NP, OCg]
    const at::Tensor index = tap_index(g, reg.taps, x.device());
    if (mask[1]) {
      at::Tensor A = at::empty({g.G, Gr.size(1), reg.taps.n * g.Cg}, x.options().dtype(acc));
      Dev::gather(x, A, g, reg);
      const at::Tensor part = at::bmm(Gr.transpose(1, 2), A).view({g.OC, reg.taps.n, g.Cg});
      // tap by tap rather than index_add_, which uses atomics on CUDA (and fails deterministic mode)
      for (int t = 0; t < reg.taps.n; ++t)
        gw_tap.select(1, reg.taps.kh[t] * g.KW + reg.taps.kw[t]).add_(part.select(1, t));
    }
    if (mask[0]) Dev::fold(gi, at::bmm(Gr, weight_columns(w_tap, g, index)), g, reg);
  }
  if (mask[1]) gw = gw_tap.transpose(1, 2).reshape(w.sizes()).to(w.scalar_type());
  return {gi, gw, gb};
}

// Design (a) on the host: the whole output is one region with every tap, so the gather is a reflected
// im2col of a chunk of images (about kChunkRows GEMM rows, to stay cache-sized) and one batched GEMM per
// chunk gives the output; no vendor convolution. Faster than (b) where the frame is a large part of a small
// output (the correction work of (b) grows with the frame's share).
constexpr int64_t kChunkRows = 512;

inline Region whole(const Geom& g) {
  Region reg{0, g.OH, 0, g.OW, {}};
  for (int kh = 0; kh < g.KH; ++kh)
    for (int kw = 0; kw < g.KW; ++kw) {
      reg.taps.kh[reg.taps.n] = kh;
      reg.taps.kw[reg.taps.n] = kw;
      ++reg.taps.n;
    }
  return reg;
}

inline at::MemoryFormat conv_format(const at::Tensor& x, const at::Tensor& w) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                 w.suggest_memory_format() == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

inline int64_t chunk_images(const Geom& g) {
  return std::max<int64_t>(1, kChunkRows / std::max<int64_t>(1, g.OH * g.OW));
}

template <typename Dev>
at::Tensor forward_gemm(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                        const Geom& g) {
  at::Tensor out = at::empty({g.N, g.OC, g.OH, g.OW}, x.options().memory_format(conv_format(x, w)));
  if (bias.has_value() && bias->defined())
    out.copy_(bias->view({1, g.OC, 1, 1}).expand_as(out));
  else
    out.zero_();
  if (out.numel() == 0) return out;
  const auto acc = acc_type(x.scalar_type());
  const Region reg = whole(g);
  const at::Tensor w_tap = w.to(acc).reshape({g.OC, g.Cg, g.KH * g.KW}).transpose(1, 2).contiguous();
  const at::Tensor cols_t = w_tap.view({g.G, g.OCg, -1}).transpose(1, 2);
  const int64_t step = chunk_images(g);
  for (int64_t n0 = 0; n0 < g.N; n0 += step) {
    Geom gc = g;
    gc.N = std::min(step, g.N - n0);
    at::Tensor A = at::empty({g.G, gc.N * g.OH * g.OW, reg.taps.n * g.Cg}, x.options().dtype(acc));
    Dev::gather(x.narrow(0, n0, gc.N), A, gc, reg);
    at::Tensor o = out.narrow(0, n0, gc.N);
    Dev::add(o, at::bmm(A, cols_t), gc, reg);
  }
  return out;
}

template <typename Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_gemm(const at::Tensor& go, const at::Tensor& x,
                                                             const at::Tensor& w, const Geom& g,
                                                             std::array<bool, 3> mask) {
  const auto acc = acc_type(x.scalar_type());
  at::Tensor gi, gw, gb;
  if (mask[2]) gb = go.sum({0, 2, 3}, false, acc).to(go.scalar_type());
  if (!mask[0] && !mask[1]) return {gi, gw, gb};
  if (mask[0]) gi = at::zeros_like(x, x.options().memory_format(conv_format(x, w)));
  at::Tensor gw_tap;
  if (mask[1]) gw_tap = at::zeros({g.G, g.OCg, g.KH * g.KW * g.Cg}, x.options().dtype(acc));
  const Region reg = whole(g);
  const at::Tensor w_tap = w.to(acc).reshape({g.OC, g.Cg, g.KH * g.KW}).transpose(1, 2).contiguous();
  const at::Tensor cols = w_tap.view({g.G, g.OCg, -1});
  const int64_t step = chunk_images(g);
  for (int64_t n0 = 0; go.numel() && n0 < g.N; n0 += step) {
    Geom gc = g;
    gc.N = std::min(step, g.N - n0);
    const at::Tensor Gr = grad_rows(go.narrow(0, n0, gc.N), gc, reg);
    if (mask[1]) {
      at::Tensor A = at::empty({g.G, Gr.size(1), reg.taps.n * g.Cg}, x.options().dtype(acc));
      Dev::gather(x.narrow(0, n0, gc.N), A, gc, reg);
      gw_tap.baddbmm_(Gr.transpose(1, 2), A);
    }
    if (mask[0]) {
      at::Tensor gin = gi.narrow(0, n0, gc.N);
      Dev::fold(gin, at::bmm(Gr, cols), gc, reg);
    }
  }
  if (mask[1])
    gw = gw_tap.view({g.OC, g.KH * g.KW, g.Cg}).transpose(1, 2).reshape(w.sizes()).to(w.scalar_type());
  return {gi, gw, gb};
}

// Share of the convolution's multiply-adds that design (b) adds as its frame correction: frame pixels times
// their pad taps, over all pixels times all taps.
inline double correction_share(const Geom& g) {
  double taps = 0;
  for (const Region& r : plan(g)) taps += double(r.rows()) * r.cols() * r.taps.n;
  return taps / (double(g.OH) * g.OW * g.KH * g.KW);
}

// algo: 0 = pick per shape, 1 = vendor convolution + frame correction (b), 2 = reflected im2col GEMM (a);
// 3 and 4 are CPU designs (cpu/reflect_conv2d_split*.cpp; pick_forward in cpu/reflect_conv2d_kernel.cpp and
// pick_backward in cpu/reflect_conv2d_backward.cpp make the CPU's automatic choices); on CUDA they run (b).
// Forward and backward choose independently (each is a complete computation of its own outputs; the choice
// is a function of the shape and, on CPU, of the thread count where a design runs as our tasks
// (rconv_cpu::chunks_fill_threads, tasks_fill_threads), so the bits still do not depend on the run).
// CPU backward, measured on ResNet-34's shapes (2 threads of a shared AVX2 EPYC, oneDNN 3.x, MKL; see README;
// AVX-512 below):
// oneDNN's backward is slower than MKL GEMMs on an im2col here, so (a) wins wherever the im2col rows are long
// enough (Cg*KH*KW >= 256) except where (b)'s correction is tiny (<= 3%, the 56x56 stride-1 case), and (b)
// keeps the stem (3 input channels: K = 147 makes poor GEMMs).
// Beyond ResNet-34's batch-16 channels_last shapes (measured below 1.0x of oneDNN there), (a)'s im2col gathers
// decide: in NCHW every gathered element is a strided read, and (a) ran 1.1-4.4x (b)'s time at stride 1 on 16x16
// to 32x32 planes ((4-16, 32-128, H, H) inputs) but 0.6-0.7x on 8x8 planes; in channels_last, K = Cg*KH*KW = 288 lost
// to (b) (0.91-0.97 against 0.75-0.83 of the zero-padded fwd+bwd) while K >= 576 mostly won. channels_last: the
// input's layout as the convolution takes it (conv_format).
// Small problems (a few hundred output pixels in all, at most ~33M multiply-adds) take (a) in both directions: its
// GEMMs on the whole output have fewer fixed costs than the vendor call plus a correction (a 6-layer ConvLayer net
// at batch 4 on 32x32 images: forward 0.55-0.95x and backward 0.5-1.0x of (b)'s time per layer); beyond, NCHW's
// strided gathers lose again, and ResNet-34's 7x7 outputs at batch 16 (784 pixels, 1.8G multiply-adds) keep the
// designs measured for them.
inline bool small_conv(const Geom& g, bool channels_last, bool backward) {
  const int64_t pixels = g.N * g.OH * g.OW;
  const int64_t macs = pixels * g.Cg * g.KH * g.KW * g.OC;
  return pixels <= (backward && !channels_last ? 256 : 1024) && macs <= (int64_t(1) << 25);
}

// Whether ATen runs its AVX-512 kernels here (ATEN_CPU_CAPABILITY can lower it): a property of the machine, so
// a pick that reads it still gives the same bits on every run.
inline bool cpu_avx512() {
  static const bool v = at::get_cpu_capability() == "AVX512";
  return v;
}

// On AVX-512 CPUs, forward (pick_forward in cpu/reflect_conv2d_kernel.cpp) and backward keep (b) up to this
// correction share in channels_last: oneDNN runs near the cores' peak there, and the other designs' GEMMs lose.
constexpr double kAvx512FrameShare = 0.07;

inline bool pick_gemm(const Geom& g, int64_t algo, bool cpu, bool backward, bool channels_last) {
  if (algo != 0) return algo == 2;
  if (!cpu || !backward) return false;
  if (small_conv(g, channels_last, true)) return true;
  const int64_t K = g.Cg * g.KH * g.KW;
  if (K < 256) return false;
  const bool strided = g.sh * g.sw > 1, avx512_cl = cpu_avx512() && channels_last;
  if (strided && !avx512_cl) return channels_last || K >= 512;
  const double share = correction_share(g);
  if (share <= 0.03) return false;
  // Strided on AVX-512 in channels_last, (b) below 3% as at stride 1: the 56x56 stride-2 input (2.3%) took
  // 1.02-1.07x the zero-padded backward against (a)'s 1.08-1.09x in three runs; at 28x28 (4.6%) (a) kept its lead
  // (1.05-1.09x against 1.11-1.12x).
  if (strided) return true;
  // On an AVX-512 Xeon (2 cores of an Emerald Rapids VM) oneDNN's backward gains on MKL's GEMMs: at 28x28 stride 1
  // (share 4.7%) (b) took 1.09-1.14x the zero-padded backward against (a)'s 1.15-1.27x in three runs; at 14x14
  // (9.3%) and 7x7, (a) still won.
  if (cpu_avx512() && share <= kAvx512FrameShare) return false;
  return channels_last ? K >= 512 : g.OH * g.OW <= 64;
}

}  // namespace rconv

#define FASTFUSE_RCONV_DECLARE(dev)                                                                            \
  at::Tensor reflect_conv2d_##dev(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, \
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,       \
                                  int64_t groups, int64_t algo);                                                   \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> reflect_conv2d_backward_##dev(                                   \
      const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,                     \
      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> mask, int64_t algo);

FASTFUSE_RCONV_DECLARE(cpu)
// The design the CPU forward runs for these arguments ("frame", "gemm", "split", "fold" or "direct"; tests, benchmarks)
std::string reflect_conv2d_cpu_design(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t algo);
#ifdef FASTFUSE_WITH_CUDA
FASTFUSE_RCONV_DECLARE(cuda)
#endif

}  // namespace fastfuse
