// Reflection-padded conv2d on CPU, shared by the design files: both designs of reflect_conv2d.h
// (reflect_conv2d_frame.cpp: (b) oneDNN's zero-padded convolution plus the frame correction;
// reflect_conv2d_gemm.cpp: (a) a reflected im2col GEMM, and the gathered correction (b) falls back to;
// reflect_conv2d_backward.cpp: the backward of both, and the backward's pick) and two CPU-only ones
// (reflect_conv2d_split.cpp and reflect_conv2d_split_backward.cpp: (c) oneDNN's unpadded convolution on the
// interior plus a folded-tap GEMM on the frame, and "fold", that GEMM everywhere; reflect_conv2d_direct.cpp: (d) our
// own AVX-512 kernel, forward and grad_input; reflect_conv2d_direct_wgrad.cpp its grad_weight).
// reflect_conv2d_kernel.cpp picks the forward's per shape and registers the ops.
//
// The work is cut into fixed tasks (about kTaskRows GEMM rows of one region; whole images for (a)), run in
// ONE parallel region (gather, small GEMM and write-back all inside a task; nested at:: ops run serially
// there). Many short parallel regions cost a scheduler slice each when the cores are shared, which made
// the correction cost more than the convolution. Threads take tasks from a shared counter, largest first,
// so a thread that the shared machine preempts does not hold up the others; the task split never depends
// on the thread count, each task's result does not depend on the thread that runs it, and grad_weight
// partials are summed in fixed runs of tasks in a fixed order, so the bits are the same on every run.
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

// The designs, as the algo argument names them (reflect_conv2d.h; 0 = pick per shape): (b) frame, (a) gemm, (c)
// split, and (c) without the block, "fold" (every pixel by the folded GEMM).
constexpr int kFrame = 1, kGemm = 2, kSplit = 3, kFold = 4, kDirect = 5;

constexpr int64_t kTaskRows = 512;
// Images per task of (c)'s convolution (see forward_split)
constexpr int64_t kConvImages = 8;
// Whether the tasks of one parallel region (count() of them) keep the intra-op threads busy. The picks were measured
// on 2 threads; with more, a design that runs as our tasks (MKL single-threaded inside each: (a), "fold") is only
// picked with a task per thread, else (b): the vendor's convolution uses every thread. Up to 2 threads this changes
// nothing, and count(), which builds the design's task list, is not called. Only the automatic picks read it, so
// which design runs depends on the thread count too; for a given thread count every run still gives the same bits.
template <typename Count>
bool tasks_fill_threads(const Count& count) {
  const int64_t t = at::get_num_threads();
  return t <= 2 || count() >= t;
}

// Whether design (c)'s tasks of kConvImages images (its forward's convolution, all of "fold"'s and (c)'s backward
// frame work) keep the threads busy: two tasks at least (with one the other thread idles), and one per thread (at
// batch 16 a 16-thread CPU would run those designs on two threads).
inline bool chunks_fill_threads(int64_t N) {
  const int64_t chunks = (N + kConvImages - 1) / kConvImages;
  return chunks >= 2 && tasks_fill_threads([&] { return chunks; });
}

// Gathered elements per task / chunk at most (4 MB of fp32): keeps (a)'s im2col, whose rows are Cg*KH*KW
// long, about cache-sized.
constexpr int64_t kTaskElems = int64_t(1) << 20;

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
// (group_rows: rows of A per group when A holds more than these rows; default p1 - p0)
template <typename scalar_t, typename acc_t>
void gather_x(const scalar_t* xp, at::IntArrayRef st, acc_t* A, const Geom& g, const Region& reg, int64_t p0,
              int64_t p1, int64_t group_rows = -1) {
  const int64_t T = reg.taps.n, K = T * g.Cg, rows = group_rows < 0 ? p1 - p0 : group_rows;
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

// out[n, gi*OCg + oc, r, c] = corr[gi, p - p0, oc] + bias[gi*OCg + oc] (bias may be null)
template <typename scalar_t, typename acc_t>
inline void write_run(scalar_t* dst, int64_t st, const acc_t* src, const acc_t* bias, int64_t n) {
  if (bias)
    for (int64_t i = 0; i < n; ++i) dst[i * st] = static_cast<scalar_t>(src[i] + bias[i]);
  else if (st == 1)
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  else
    for (int64_t i = 0; i < n; ++i) dst[i * st] = static_cast<scalar_t>(src[i]);
}

// out[n, gi*OCg + oc, r, c] += corr[gi, p - p0, oc] (design (c): = corr + bias): every output pixel belongs to
// one task
template <typename scalar_t, typename acc_t>
void add_out(scalar_t* op, at::IntArrayRef st, const acc_t* corr, const Geom& g, const Region& reg, int64_t p0,
             int64_t p1, bool write = false, const acc_t* bias = nullptr, int64_t group_rows = -1) {
  const int64_t rows = group_rows < 0 ? p1 - p0 : group_rows;
  for (int64_t p = p0; p < p1; ++p) {
    const RowCoord rc = coord(reg, p);
    scalar_t* dst = op + rc.n * st[0] + rc.r * st[2] + rc.c * st[3];
    for (int64_t gi = 0; gi < g.G; ++gi) {
      const acc_t* src = corr + (gi * rows + p - p0) * g.OCg;
      if (write)
        write_run(dst + gi * g.OCg * st[1], st[1], src, bias ? bias + gi * g.OCg : nullptr, g.OCg);
      else
        add_run(dst + gi * g.OCg * st[1], st[1], src, g.OCg);
    }
  }
}

// Gr[gi, p - p0, oc] = go[n, gi*OCg + oc, r, c] (group_rows as in gather_x)
template <typename scalar_t, typename acc_t>
void gather_grad(const scalar_t* gp, at::IntArrayRef st, acc_t* Gr, const Geom& g, const Region& reg, int64_t p0,
                 int64_t p1, int64_t group_rows = -1) {
  const int64_t rows = group_rows < 0 ? p1 - p0 : group_rows;
  for (int64_t p = p0; p < p1; ++p) {
    const RowCoord rc = coord(reg, p);
    const scalar_t* src = gp + rc.n * st[0] + rc.r * st[2] + rc.c * st[3];
    for (int64_t gi = 0; gi < g.G; ++gi)
      load_run(Gr + (gi * rows + p - p0) * g.OCg, src + gi * g.OCg * st[1], g.OCg, st[1]);
  }
}

// gin[n, gi*Cg + cg, reflect(ih), reflect(iw)] += B[gi, p - p0, t*Cg + cg] for the rows of image n only
// (group_rows as in gather_x)
template <typename scalar_t, typename acc_t>
void fold_image(scalar_t* gp, at::IntArrayRef st, const acc_t* B, const Geom& g, const Region& reg, int64_t p0,
                int64_t p1, int64_t n, int64_t group_rows = -1) {
  const int64_t RC = reg.rows() * reg.cols(), T = reg.taps.n, K = T * g.Cg;
  const int64_t rows = group_rows < 0 ? p1 - p0 : group_rows;
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
// a copy into the output cache (a fresh 9 MB copy page-faults for longer than it copies).
inline at::Tensor tap_major(const at::Tensor& w, const Geom& g) {
  const auto acc = rconv::acc_type(w.scalar_type());
  const at::Tensor p = w.permute({0, 2, 3, 1});
  if (w.scalar_type() == acc && p.is_contiguous()) return p.reshape({g.OC, g.KH * g.KW, g.Cg});
  return empty_cached({g.OC, g.KH * g.KW, g.Cg}, acc).copy_(p.reshape({g.OC, g.KH * g.KW, g.Cg}));
}

// Weight columns per region, [G, OCg, T*Cg] in the accumulation dtype (tap-major like the gathers): one
// tap-major copy of the weight and, for the frame regions, one index_select of all their taps; each region's
// matrix is a view into it (row stride = all taps). A copy plus an index tensor and an index_select per
// region cost as much as a third of the forward's correction at 28x28.
inline std::vector<at::Tensor> region_columns(const at::Tensor& w, const Geom& g,
                                              const std::vector<Region>& regions) {
  const at::Tensor w_tap = tap_major(w, g);
  std::vector<at::Tensor> cols;
  if (regions.size() == 1 && regions[0].taps.n == g.KH * g.KW) {  // (a): every tap, in order
    cols.push_back(w_tap.reshape({g.G, g.OCg, -1}));
    return cols;
  }
  std::vector<int64_t> idx;
  for (const Region& r : regions)
    for (int t = 0; t < r.taps.n; ++t) idx.push_back(r.taps.kh[t] * g.KW + r.taps.kw[t]);
  at::Tensor all = empty_cached({g.OC, (int64_t)idx.size(), g.Cg}, w_tap.scalar_type());  // [OC, sum of T, Cg]
  at::index_select_out(all, w_tap, 1, at::tensor(idx, at::kLong));
  int64_t off = 0;
  for (const Region& r : regions) {
    cols.push_back(all.narrow(1, off, r.taps.n).view({g.G, g.OCg, r.taps.n * g.Cg}));
    off += r.taps.n;
  }
  return cols;
}

inline std::vector<Region> regions_for(const Geom& g, bool gemm) {
  return gemm ? std::vector<Region>{rconv::whole(g)} : rconv::plan(g);
}

// With one group and a channels_last output of the compute dtype, the GEMM rows of design (a) are the
// output's NHWC pixels: row-major [N*OH*OW, OC] views let the GEMMs read grad_output and write the output
// in place instead of going through gathered copies.
inline bool direct_rows(const Geom& g, bool gemm, const at::Tensor& t, at::ScalarType acc) {
  return gemm && g.G == 1 && t.scalar_type() == acc && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// A [d0, d1, d2] view of the start of a scratch buffer.
inline at::Tensor scratch(const at::Tensor& buf, int64_t d0, int64_t d1, int64_t d2) {
  return buf.narrow(0, 0, d0 * d1 * d2).view({d0, d1, d2});
}

// An [N, C, H, W] tensor in the given layout (contiguous or channels_last) from the output cache (cpu/alloc.h).
// Outputs, gradients, scratch and weight re-layouts all come from there: fresh, a few MB page-fault on every call
// (a 2 MB index_select of the weight's frame taps cost ~0.3 ms of a batch-1 forward that way).
inline at::Tensor empty_cached_4d(at::IntArrayRef s, at::ScalarType dtype, at::MemoryFormat fmt) {
  if (fmt != at::MemoryFormat::ChannelsLast) return empty_cached(s, dtype);
  return empty_cached({s[0], s[2], s[3], s[1]}, dtype).permute({0, 3, 1, 2});
}

// The forward's output [N, OC, OH, OW] in torch's layout for (x, w)
inline at::Tensor empty_out(const Geom& g, const at::Tensor& x, const at::Tensor& w) {
  return empty_cached_4d({g.N, g.OC, g.OH, g.OW}, x.scalar_type(), rconv::conv_format(x, w));
}

inline at::Tensor pixel_rows(const at::Tensor& t) { return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}); }

// The designs (algo values of reflect_conv2d.h: frame 1, gemm 2, split 3, fold 4). bias may be undefined.
at::Tensor forward_frame(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                         const Geom& g, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                         int64_t groups);
at::Tensor forward_gemm(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                        const Geom& g);
// Tasks of forward_gemm and of "fold"'s forward (for the picks: tasks_fill_threads)
int64_t gemm_tasks(const Geom& g);
int64_t fold_tasks(const Geom& g);
// (a) on NCHW input (reflect_conv2d_columns.cpp): whether it applies (contiguous x and w), its task count, and
// out (NCHW, holding the bias or zeros) += the convolution
bool columns_apply(const at::Tensor& x, const at::Tensor& w);
int64_t columns_task_count(const Geom& g);
void add_columns(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, const Geom& g);
// out += the gathered GEMM over (a)'s whole output (gemm) or (b)'s frame regions, as tasks
void add_gathered(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, at::Tensor& out,
                  const Geom& g, bool gemm);
// (d) "direct" (reflect_conv2d_direct.cpp): fp32, one group, AVX-512 only (direct_applies); it reads channels_last,
// taking NCHW input through cpu/relayout.h, and writes either layout. Its gradients (direct_grads_apply: grad_output
// fp32 too), grad_input there and grad_weight in reflect_conv2d_direct_wgrad.cpp ([OC, C, KH, KW] with
// channels_last strides), any stride and dilation, read channels_last tensors (channels_last_fp32): backward_cpu
// relayouts.
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
// Where `auto` takes the direct design by the frame's share of the work (rconv::correction_share), forward
// (reflect_conv2d_kernel.cpp) and both gradients (reflect_conv2d_backward.cpp): stride 1 or 2, dilation 1, outputs
// over 8x8, and a share between 3% and 12%, or up to 3% where the caller's thin_ok holds (its measured limits there)
inline bool direct_share_band(const Geom& g, bool thin_ok) {
  const bool s12 = (g.sh == 1 && g.sw == 1) || (g.sh == 2 && g.sw == 2);
  if (!s12 || g.dh != 1 || g.dw != 1 || g.OH * g.OW <= 64) return false;
  const double share = rconv::correction_share(g);
  return share <= 0.12 && (share > 0.03 || (share > 0 && thin_ok));
}
at::Tensor forward_split(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                         const Geom& g, at::IntArrayRef stride, at::IntArrayRef dilation, bool use_block);
// (c)'s backward (use_block) and "fold"'s (reflect_conv2d_split_backward.cpp)
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_split(const at::Tensor& go, const at::Tensor& x,
                                                              const at::Tensor& w, const Geom& g,
                                                              at::IntArrayRef stride, at::IntArrayRef dilation,
                                                              std::array<bool, 3> mask, bool use_block);
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& go, const at::Tensor& x,
                                                            const at::Tensor& w, at::IntArrayRef stride,
                                                            at::IntArrayRef padding, at::IntArrayRef dilation,
                                                            int64_t groups, std::array<bool, 3> mask, int64_t algo);

}  // namespace rconv_cpu
}  // namespace fastfuse
