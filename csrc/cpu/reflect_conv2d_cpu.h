// Reflection-padded conv2d on CPU: the two designs and what they share.
//   "frame" (reflect_conv2d_frame.cpp, backward in reflect_conv2d_backward.cpp): oneDNN's convolution with zero
//     padding, then the correction over the output frame of reflect_conv2d.h. Any dtype, groups, stride, dilation
//     and layout: the portable design.
//   "direct" (reflect_conv2d_direct.cpp, its grad_weight in reflect_conv2d_direct_wgrad.cpp): our own AVX-512 kernel
//     on every pixel with the reflected taps folded; fp32, one group, NCHW (through cpu/relayout.h) or
//     channels_last.
// reflect_conv2d_kernel.cpp picks one per direction and registers the ops.
//
// The frame work is cut into fixed tasks (about kTaskRows GEMM rows of one region), run in ONE parallel region
// (gather, small GEMM and write-back all inside a task; nested at:: ops run serially there): many short parallel
// regions cost a scheduler slice each when the cores are shared. Threads take tasks from a shared counter, largest
// first, so a preempted thread does not hold up the others; the task split never depends on the thread count, each
// task's result does not depend on the thread that runs it, and grad_weight partials are summed in fixed runs of
// tasks in a fixed order, so the bits are the same on every run.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/alloc.h"
#include "reflect_conv2d.h"

namespace fastfuse {
namespace rconv_cpu {

using rconv::Geom;
using rconv::reflect;
using rconv::Region;

// The designs, as the algo argument names them (reflect_conv2d.h; 0 = pick per shape)
constexpr int kFrame = 1, kDirect = 2;

constexpr int64_t kTaskRows = 512;
// Gathered elements per task at most (4 MB of fp32): keeps a task's gathered rows about cache-sized.
constexpr int64_t kTaskElems = int64_t(1) << 20;

// Whether ATen runs its AVX-512 kernels here (ATEN_CPU_CAPABILITY can lower it): a property of the machine, so a
// pick that reads it still gives the same bits on every run.
inline bool cpu_avx512() {
  static const bool v = at::get_cpu_capability() == "AVX512";
  return v;
}

// The layout torch's convolution computes in for (x, w): channels_last when either is
inline at::MemoryFormat conv_format(const at::Tensor& x, const at::Tensor& w) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                 w.suggest_memory_format() == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// Runs body(i) for i in [0, n) on the intra-op threads, each thread taking the next i from a shared counter
// (dynamic scheduling: on shared cores a preempted thread does not hold up the others). init() runs once
// per thread first (scratch buffers). Results must not depend on which thread runs an i.
template <typename Init, typename Body>
void for_each_task(int64_t n, const Init& init, const Body& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // worker threads do not inherit the caller's below-autograd dispatch state; the in-place GEMMs on
    // output views would otherwise go through autograd's view checks
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto state = init();
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) body(state, i);
  });
}

// Channel runs: stride 1 (channels_last) gets its own loop so the compiler vectorises it.
template <typename scalar_t, typename acc_t>
inline void load_run(acc_t* dst, const scalar_t* src, int64_t n, int64_t st) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (st == 1) {  // a plain copy (the compiler cannot assume the two runs do not overlap)
      std::memcpy(dst, src, n * sizeof(acc_t));
      return;
    }
  }
  if (st == 1)
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
  else
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i * st]);
}
template <typename scalar_t, typename acc_t>
inline void add_run(scalar_t* dst, int64_t st, const acc_t* src, int64_t n) {
  if (st == 1)
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(static_cast<acc_t>(dst[i]) + src[i]);
  else
    for (int64_t i = 0; i < n; ++i)
      dst[i * st] = static_cast<scalar_t>(static_cast<acc_t>(dst[i * st]) + src[i]);
}

// Decodes GEMM row p of a region into (n, r, c) of the output.
struct RowCoord {
  int64_t n, r, c;
};
inline RowCoord coord(const Region& reg, int64_t p) {
  const int64_t R = reg.rows(), Cc = reg.cols();
  return {p / (R * Cc), reg.r0 + p / Cc % R, reg.c0 + p % Cc};
}

// A[gi, p - p0, t*Cg + cg] = x[n, gi*Cg + cg, reflect(ih), reflect(iw)]
template <typename scalar_t, typename acc_t>
void gather_x(const scalar_t* xp, at::IntArrayRef st, acc_t* A, const Geom& g, const Region& reg, int64_t p0,
              int64_t p1) {
  const int64_t T = reg.taps.n, K = T * g.Cg, rows = p1 - p0;
  for (int64_t p = p0; p < p1; ++p) {
    const RowCoord rc = coord(reg, p);
    for (int t = 0; t < T; ++t) {
      const int64_t ih = reflect(rc.r * g.sh - g.ph + reg.taps.kh[t] * g.dh, g.H);
      const int64_t iw = reflect(rc.c * g.sw - g.pw + reg.taps.kw[t] * g.dw, g.W);
      const scalar_t* src = xp + rc.n * st[0] + ih * st[2] + iw * st[3];
      for (int64_t gi = 0; gi < g.G; ++gi)
        load_run(A + (gi * rows + p - p0) * K + t * g.Cg, src + gi * g.Cg * st[1], g.Cg, st[1]);
    }
  }
}

// out[n, gi*OCg + oc, r, c] += corr[gi, p - p0, oc]: every output pixel belongs to one task
template <typename scalar_t, typename acc_t>
void add_out(scalar_t* op, at::IntArrayRef st, const acc_t* corr, const Geom& g, const Region& reg, int64_t p0,
             int64_t p1) {
  const int64_t rows = p1 - p0;
  for (int64_t p = p0; p < p1; ++p) {
    const RowCoord rc = coord(reg, p);
    scalar_t* dst = op + rc.n * st[0] + rc.r * st[2] + rc.c * st[3];
    for (int64_t gi = 0; gi < g.G; ++gi)
      add_run(dst + gi * g.OCg * st[1], st[1], corr + (gi * rows + p - p0) * g.OCg, g.OCg);
  }
}

// Gr[gi, p - p0, oc] = go[n, gi*OCg + oc, r, c]
template <typename scalar_t, typename acc_t>
void gather_grad(const scalar_t* gp, at::IntArrayRef st, acc_t* Gr, const Geom& g, const Region& reg, int64_t p0,
                 int64_t p1) {
  const int64_t rows = p1 - p0;
  for (int64_t p = p0; p < p1; ++p) {
    const RowCoord rc = coord(reg, p);
    const scalar_t* src = gp + rc.n * st[0] + rc.r * st[2] + rc.c * st[3];
    for (int64_t gi = 0; gi < g.G; ++gi)
      load_run(Gr + (gi * rows + p - p0) * g.OCg, src + gi * g.OCg * st[1], g.OCg, st[1]);
  }
}

// gin[n, gi*Cg + cg, reflect(ih), reflect(iw)] += B[gi, p - p0, t*Cg + cg] for the rows of image n only
template <typename scalar_t, typename acc_t>
void fold_image(scalar_t* gp, at::IntArrayRef st, const acc_t* B, const Geom& g, const Region& reg, int64_t p0,
                int64_t p1, int64_t n) {
  const int64_t RC = reg.rows() * reg.cols(), T = reg.taps.n, K = T * g.Cg, rows = p1 - p0;
  const int64_t b = std::max(p0, n * RC), e = std::min(p1, (n + 1) * RC);
  for (int64_t p = b; p < e; ++p) {
    const RowCoord rc = coord(reg, p);
    for (int t = 0; t < T; ++t) {
      const int64_t ih = reflect(rc.r * g.sh - g.ph + reg.taps.kh[t] * g.dh, g.H);
      const int64_t iw = reflect(rc.c * g.sw - g.pw + reg.taps.kw[t] * g.dw, g.W);
      scalar_t* dst = gp + n * st[0] + ih * st[2] + iw * st[3];
      for (int64_t gi = 0; gi < g.G; ++gi)
        add_run(dst + gi * g.Cg * st[1], st[1], B + (gi * rows + p - p0) * K + t * g.Cg, g.Cg);
    }
  }
}

// The weight as [OC, KH*KW, Cg] in the accumulation dtype: a view of a channels_last weight of that dtype, else
// a copy into the output cache (a fresh multi-MB copy page-faults for longer than it copies).
inline at::Tensor tap_major(const at::Tensor& w, const Geom& g) {
  const auto acc = rconv::acc_type(w.scalar_type());
  const at::Tensor p = w.permute({0, 2, 3, 1});
  if (w.scalar_type() == acc && p.is_contiguous()) return p.reshape({g.OC, g.KH * g.KW, g.Cg});
  return empty_cached({g.OC, g.KH * g.KW, g.Cg}, acc).copy_(p.reshape({g.OC, g.KH * g.KW, g.Cg}));
}

// Weight columns per frame region, [G, OCg, T*Cg] in the accumulation dtype (tap-major like the gathers): one
// index_select of all the regions' taps from the tap-major weight, each region's matrix a view into it (row stride
// = all taps), rather than an index tensor and an index_select per region.
inline std::vector<at::Tensor> region_columns(const at::Tensor& w, const Geom& g,
                                              const std::vector<Region>& regions) {
  const at::Tensor w_tap = tap_major(w, g);
  std::vector<int64_t> idx;
  for (const Region& r : regions)
    for (int t = 0; t < r.taps.n; ++t) idx.push_back(r.taps.kh[t] * g.KW + r.taps.kw[t]);
  at::Tensor all = empty_cached({g.OC, (int64_t)idx.size(), g.Cg}, w_tap.scalar_type());  // [OC, sum of T, Cg]
  at::index_select_out(all, w_tap, 1, at::tensor(idx, at::kLong));
  std::vector<at::Tensor> cols;
  int64_t off = 0;
  for (const Region& r : regions) {
    cols.push_back(all.narrow(1, off, r.taps.n).view({g.G, g.OCg, r.taps.n * g.Cg}));
    off += r.taps.n;
  }
  return cols;
}

// A [d0, d1, d2] view of the start of a scratch buffer.
inline at::Tensor scratch(const at::Tensor& buf, int64_t d0, int64_t d1, int64_t d2) {
  return buf.narrow(0, 0, d0 * d1 * d2).view({d0, d1, d2});
}

// An [N, C, H, W] tensor in the given layout (contiguous or channels_last) from the output cache (cpu/alloc.h):
// outputs, gradients, scratch and weight re-layouts all come from there, as fresh ones page-fault on every call.
inline at::Tensor empty_cached_4d(at::IntArrayRef s, at::ScalarType dtype, at::MemoryFormat fmt) {
  if (fmt != at::MemoryFormat::ChannelsLast) return empty_cached(s, dtype);
  return empty_cached({s[0], s[2], s[3], s[1]}, dtype).permute({0, 3, 1, 2});
}

// The forward's output [N, OC, OH, OW] in torch's layout for (x, w)
inline at::Tensor empty_out(const Geom& g, const at::Tensor& x, const at::Tensor& w) {
  return empty_cached_4d({g.N, g.OC, g.OH, g.OW}, x.scalar_type(), conv_format(x, w));
}

// "frame": forward (bias may be undefined) and backward
at::Tensor forward_frame(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                         const Geom& g, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                         int64_t groups);
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_frame(const at::Tensor& go, const at::Tensor& x,
                                                              const at::Tensor& w, const Geom& g,
                                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                                              at::IntArrayRef dilation, int64_t groups,
                                                              std::array<bool, 3> mask);

// "direct": fp32, one group, AVX-512 only (direct_applies); it reads channels_last, taking NCHW input through
// cpu/relayout.h, and writes either layout. Its gradients (direct_grads_apply: grad_output fp32 too), grad_input
// and grad_weight ([OC, C, KH, KW] with channels_last strides), any stride and dilation, read channels_last tensors
// (channels_last_fp32): the backward relayouts them first.
inline bool channels_last_fp32(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous(at::MemoryFormat::ChannelsLast) && t.stride(1) == 1;
}
bool direct_applies(const Geom& g, const at::Tensor& x, const at::Tensor& w);
bool direct_grads_apply(const Geom& g, const at::Tensor& go, const at::Tensor& x, const at::Tensor& w);
at::Tensor forward_direct(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                          const Geom& g);
at::Tensor dgrad_direct(const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, const Geom& g,
                        at::MemoryFormat fmt);  // grad_input's layout
at::Tensor wgrad_direct(const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, const Geom& g);

}  // namespace rconv_cpu
}  // namespace fastfuse
