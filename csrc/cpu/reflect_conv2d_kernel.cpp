// Reflection-padded conv2d on CPU: both designs of reflect_conv2d.h ((b) oneDNN's zero-padded convolution
// plus the frame correction, (a) a reflected im2col GEMM), and two forward-only ones below: (c) oneDNN's
// unpadded convolution on the interior plus a folded-tap GEMM on the frame, and that GEMM everywhere.
//
// The work is cut into fixed tasks (about kTaskRows GEMM rows of one region; whole images for (a)), run in
// ONE parallel region (gather, small GEMM and write-back all inside a task; nested at:: ops run serially
// there). Many short parallel regions cost a scheduler slice each when the cores are shared, which made
// the correction cost more than the convolution. Threads take tasks from a shared counter, largest first,
// so a thread that the shared machine preempts does not hold up the others; the task split never depends
// on the thread count, each task's result does not depend on the thread that runs it, and grad_weight
// partials are summed in fixed runs of tasks in a fixed order, so the bits are the same on every run.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <numeric>
#include <type_traits>

#include "cpu/alloc.h"
#include "reflect_conv2d.h"

namespace fastfuse {
namespace {

using rconv::Geom;
using rconv::reflect;
using rconv::Region;

constexpr int64_t kTaskRows = 512;
// Gathered elements per task / chunk at most (4 MB of fp32): keeps (a)'s im2col, whose rows are Cg*KH*KW
// long, about cache-sized.
constexpr int64_t kTaskElems = int64_t(1) << 20;

struct Task {
  int64_t region, p0, p1;  // GEMM rows [p0, p1) of regions[region]; row p = (n * R + r) * Cc + c
};

// Forward tasks, largest first. Design (b): rows of one region in even pieces of at most kTaskRows (and
// kTaskElems). Design (a): whole images, evenly split the same way.
std::vector<Task> make_tasks(const Geom& g, const std::vector<Region>& regions, bool gemm) {
  std::vector<Task> tasks;
  for (int64_t i = 0; i < (int64_t)regions.size(); ++i) {
    const int64_t img = regions[i].rows() * regions[i].cols(), np = g.N * img;
    const int64_t max_rows = std::max<int64_t>(1, std::min(kTaskRows, kTaskElems / (regions[i].taps.n * g.Cg * g.G)));
    int64_t step;
    if (gemm) {  // whole images: as many as fit, then spread evenly (16 images: 8 x 2, not 5 x 3 + 1)
      const int64_t ntask = (g.N + std::max<int64_t>(1, max_rows / img) - 1) / std::max<int64_t>(1, max_rows / img);
      step = (g.N + ntask - 1) / ntask * img;
    } else {
      const int64_t ntask = std::max<int64_t>(1, (np + max_rows - 1) / max_rows);
      step = (np + ntask - 1) / ntask;
    }
    for (int64_t p = 0; p < np; p += step) tasks.push_back({i, p, std::min(np, p + step)});
  }
  std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& b) {
    return (a.p1 - a.p0) * regions[a.region].taps.n > (b.p1 - b.p0) * regions[b.region].taps.n;
  });
  return tasks;
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
// (group_rows: rows of A per group when A holds more than these rows; default p1 - p0)
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

// Weight columns per region, [G, OCg, T*Cg] in the accumulation dtype (tap-major like the gathers): one
// tap-major copy of the weight and, for the frame regions, one index_select of all their taps; each region's
// matrix is a view into it (row stride = all taps). A copy plus an index tensor and an index_select per
// region cost as much as a third of the forward's correction at 28x28.
// The weight as [OC, KH*KW, Cg] in the accumulation dtype: a view of a channels_last weight of that dtype, else
// a copy into the output cache (a fresh 9 MB copy page-faults for longer than it copies).
at::Tensor tap_major(const at::Tensor& w, const Geom& g) {
  const auto acc = rconv::acc_type(w.scalar_type());
  const at::Tensor p = w.permute({0, 2, 3, 1});
  if (w.scalar_type() == acc && p.is_contiguous()) return p.reshape({g.OC, g.KH * g.KW, g.Cg});
  return empty_cached({g.OC, g.KH * g.KW, g.Cg}, acc).copy_(p.reshape({g.OC, g.KH * g.KW, g.Cg}));
}

std::vector<at::Tensor> region_columns(const at::Tensor& w, const Geom& g, const std::vector<Region>& regions) {
  const at::Tensor w_tap = tap_major(w, g);
  std::vector<at::Tensor> cols;
  if (regions.size() == 1 && regions[0].taps.n == g.KH * g.KW) {  // (a): every tap, in order
    cols.push_back(w_tap.reshape({g.G, g.OCg, -1}));
    return cols;
  }
  std::vector<int64_t> idx;
  for (const Region& r : regions)
    for (int t = 0; t < r.taps.n; ++t) idx.push_back(r.taps.kh[t] * g.KW + r.taps.kw[t]);
  const at::Tensor all = w_tap.index_select(1, at::tensor(idx, at::kLong));  // [OC, sum of T, Cg]
  int64_t off = 0;
  for (const Region& r : regions) {
    cols.push_back(all.narrow(1, off, r.taps.n).view({g.G, g.OCg, r.taps.n * g.Cg}));
    off += r.taps.n;
  }
  return cols;
}

std::vector<Region> regions_for(const Geom& g, bool gemm) {
  return gemm ? std::vector<Region>{rconv::whole(g)} : rconv::plan(g);
}

// With one group and a channels_last output of the compute dtype, the GEMM rows of design (a) are the
// output's NHWC pixels: row-major [N*OH*OW, OC] views let the GEMMs read grad_output and write the output
// in place instead of going through gathered copies.
bool direct_rows(const Geom& g, bool gemm, const at::Tensor& t, at::ScalarType acc) {
  return gemm && g.G == 1 && t.scalar_type() == acc && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Largest gathered matrix of any task, in elements: each thread allocates its scratch once and reuses it
// (a fresh multi-MB buffer per task is a fresh mmap, whose page faults showed up in profiles).
int64_t max_gather(const Geom& g, const std::vector<Region>& regions, const std::vector<Task>& tasks) {
  int64_t m = 0;
  for (const Task& t : tasks) m = std::max(m, g.G * (t.p1 - t.p0) * regions[t.region].taps.n * g.Cg);
  return m;
}

int64_t max_rows(const std::vector<Task>& tasks) {
  int64_t m = 0;
  for (const Task& t : tasks) m = std::max(m, t.p1 - t.p0);
  return m;
}

// A [d0, d1, d2] view of the start of a scratch buffer.
at::Tensor scratch(const at::Tensor& buf, int64_t d0, int64_t d1, int64_t d2) {
  return buf.narrow(0, 0, d0 * d1 * d2).view({d0, d1, d2});
}

// The forward's output [N, OC, OH, OW] in torch's layout for (x, w), and per-thread scratch, from the output
// cache (cpu/alloc.h): fresh, a few MB page-fault on every call.
at::Tensor empty_out(const Geom& g, const at::Tensor& x, const at::Tensor& w) {
  const bool cl = rconv::conv_format(x, w) == at::MemoryFormat::ChannelsLast;
  const at::Tensor o = empty_cached({g.N, cl ? g.OH : g.OC, cl ? g.OW : g.OH, cl ? g.OC : g.OW}, x.scalar_type());
  return cl ? o.permute({0, 3, 1, 2}) : o;
}

at::Tensor pixel_rows(const at::Tensor& t) { return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}); }

// Design (b)'s forward correction straight from x into out, for fp32 channels_last input and output with one
// group: per line of a region's pixels and per pad tap, one raw GEMM out_line += x_line [M, C] * W_tap [C, OC]
// (at::native::cpublas::brgemm: oneDNN's micro-kernel where there is one, else BLAS; no dispatcher, no
// packing of A). K = C, read in place with a row stride: no gathered copy, no correction buffer and no
// write-back pass, which together cost about as much as the GEMMs. A line is a run of pixels along which
// every pad tap's source moves by one fixed positive stride: along the columns (a row of the region) when
// no tap is reflected in the columns or the region is one column wide, along the rows likewise, or across
// the images at one pixel (corners). Each task owns its pixels and adds the taps in a fixed order.
// Up to 256 output channels: wider, the micro-kernel ran at half speed here (measured 47-76 GFLOP/s against
// ~90-95 up to 256), and the gathered path with one MKL GEMM per task is faster.
bool direct_frame(const Geom& g, bool gemm, const at::Tensor& x, const at::Tensor& out) {
  return !gemm && g.G == 1 && g.OC <= 256 && x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast) && out.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         x.stride(1) == 1 && out.stride(1) == 1;
}

struct FrameTask {
  int64_t region, n0, n1;
  int axis;  // 0: lines along the columns, 1: along the rows, 2: across the images
};

void correct_frame_direct(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, const Geom& g,
                          const std::vector<Region>& regions) {
  // W as [KH, KW, C, OC]: tap t's [C, OC] matrix at t * C * OC
  const at::Tensor wt = w.to(at::kFloat).permute({2, 3, 1, 0}).contiguous();
  std::vector<FrameTask> tasks;
  for (int64_t i = 0; i < (int64_t)regions.size(); ++i) {
    const Region& reg = regions[i];
    bool cols_ok = reg.cols() == 1, rows_ok = reg.rows() == 1;
    if (!cols_ok || !rows_ok) {
      bool col_refl = false, row_refl = false;
      for (int t = 0; t < reg.taps.n; ++t) {
        const int64_t ic = reg.c0 * g.sw - g.pw + reg.taps.kw[t] * g.dw;
        const int64_t ih = reg.r0 * g.sh - g.ph + reg.taps.kh[t] * g.dh;
        col_refl |= ic < 0 || ic >= g.W;
        row_refl |= ih < 0 || ih >= g.H;
      }
      cols_ok |= !col_refl;
      rows_ok |= !row_refl;
    }
    int axis = 2;
    int64_t len = g.N;
    if (cols_ok && reg.cols() > len) axis = 0, len = reg.cols();
    if (rows_ok && reg.rows() > len) axis = 1, len = reg.rows();
    // images split into even pieces of about kTaskRows pixels (never by thread count)
    const int64_t px = g.N * reg.rows() * reg.cols();
    const int64_t pieces = axis == 2 ? 1 : std::min<int64_t>(g.N, std::max<int64_t>(1, (px + kTaskRows - 1) / kTaskRows));
    for (int64_t k = 0; k < pieces; ++k) tasks.push_back({i, k * g.N / pieces, (k + 1) * g.N / pieces, axis});
  }
  std::stable_sort(tasks.begin(), tasks.end(), [&](const FrameTask& a, const FrameTask& b) {
    const Region &ra = regions[a.region], &rb = regions[b.region];
    return (a.n1 - a.n0) * ra.rows() * ra.cols() * ra.taps.n > (b.n1 - b.n0) * rb.rows() * rb.cols() * rb.taps.n;
  });
  const float* xp = x.const_data_ptr<float>();
  const float* wp = wt.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t xsN = x.stride(0), xsH = x.stride(2), xsW = x.stride(3);
  const int64_t osN = out.stride(0), osH = out.stride(2), osW = out.stride(3);
  const int64_t C = g.C, OC = g.OC;
  for_each_task(
      (int64_t)tasks.size(), [] { return 0; },
      [&](int&, int64_t i) {
        const FrameTask& tk = tasks[i];
        const Region& reg = regions[tk.region];
        // one line: M pixels starting at output (n, r, c); steps of the line in x and in out
        auto line = [&](int64_t n, int64_t r, int64_t c, int64_t M, int64_t xstep, int64_t ostep) {
          float* dst = op + n * osN + r * osH + c * osW;
          for (int t = 0; t < reg.taps.n; ++t) {
            const int64_t ih = reflect(r * g.sh - g.ph + reg.taps.kh[t] * g.dh, g.H);
            const int64_t iw = reflect(c * g.sw - g.pw + reg.taps.kw[t] * g.dw, g.W);
            const float* src = xp + n * xsN + ih * xsH + iw * xsW;
            const float* b = wp + (reg.taps.kh[t] * g.KW + reg.taps.kw[t]) * C * OC;
            at::native::cpublas::brgemm(M, OC, C, M == 1 ? C : xstep, OC, M == 1 ? OC : ostep, true, src, b, dst,
                                        false);
          }
        };
        if (tk.axis == 0) {
          for (int64_t n = tk.n0; n < tk.n1; ++n)
            for (int64_t r = reg.r0; r < reg.r1; ++r) line(n, r, reg.c0, reg.cols(), g.sw * xsW, osW);
        } else if (tk.axis == 1) {
          for (int64_t n = tk.n0; n < tk.n1; ++n)
            for (int64_t c = reg.c0; c < reg.c1; ++c) line(n, reg.r0, c, reg.rows(), g.sh * xsH, osH);
        } else {
          for (int64_t r = reg.r0; r < reg.r1; ++r)
            for (int64_t c = reg.c0; c < reg.c1; ++c) line(tk.n0, r, c, tk.n1 - tk.n0, xsN, osN);
        }
        at::native::cpublas::brgemm_release(false);
      });
}

// ---- Design (c): the vendor's convolution without padding on the block of the output it gets right, our GEMM
// with every tap on the rest. (b) pays the zero-padded conv plus the frame's reflected taps again (4.7% more
// multiply-adds at 28x28, 18% at 7x7); here each output pixel is computed once. On the frame, taps that the
// reflection sends to one input pixel are folded into one (3x3, top row: W0 x1 + W1 x0 + W2 x1 =
// W1 x0 + (W0 + W2) x1), so the frame has as many multiply-adds as the zero-padded conv's in-bounds taps.

// Along one axis, the kernel taps of output o grouped by the input pixel they read (bitmasks, in order of
// their first tap), and runs of outputs with the same grouping and the same block membership.
struct AxisRun {
  int64_t b, e;
  bool block;
  std::vector<uint64_t> classes;
};

std::vector<AxisRun> axis_runs(int64_t out, int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, int64_t b0,
                               int64_t b1) {
  std::vector<AxisRun> runs;
  for (int64_t o = 0; o < out; ++o) {
    std::vector<int64_t> src;
    std::vector<uint64_t> cls;
    for (int64_t t = 0; t < k; ++t) {
      const int64_t i = reflect(o * s - p + t * d, in);
      const auto it = std::find(src.begin(), src.end(), i);
      if (it == src.end()) {
        src.push_back(i);
        cls.push_back(uint64_t(1) << t);
      } else {
        cls[it - src.begin()] |= uint64_t(1) << t;
      }
    }
    const bool blk = o >= b0 && o < b1;
    if (!runs.empty() && runs.back().e == o && runs.back().block == blk && runs.back().classes == cls)
      runs.back().e = o + 1;
    else
      runs.push_back({o, o + 1, blk, std::move(cls)});
  }
  return runs;
}

// The outputs [b0, b1) along one axis that a convolution without padding of the whole input gives (output o
// reads o*s - p + t*d = o'*s + t*d with o' = o - p/s): only where s divides p; else none. (Narrowing the input
// to start the block elsewhere makes oneDNN copy it, and ran slower than the other designs at stride 2.)
std::pair<int64_t, int64_t> block_range(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  const int64_t span = d * (k - 1) + 1;
  if (p % s != 0 || in < span) return {0, 0};
  return {p / s, p / s + (in - span) / s + 1};
}

struct SplitPlan {
  int64_t r0 = 0, r1 = 0, c0 = 0, c1 = 0;  // the convolution's block of the output; empty: no convolution
  std::vector<Region> regions;             // the rest; taps = one representative per folded class
  std::vector<std::vector<std::pair<uint64_t, uint64_t>>> folds;  // per region tap: (kh mask, kw mask) summed
  bool has_block() const { return r1 > r0 && c1 > c0; }
};

SplitPlan split_plan(const Geom& g, bool use_block) {
  SplitPlan sp;
  if (use_block) {
    std::tie(sp.r0, sp.r1) = block_range(g.H, g.KH, g.sh, g.ph, g.dh);
    std::tie(sp.c0, sp.c1) = block_range(g.W, g.KW, g.sw, g.pw, g.dw);
    if (!sp.has_block()) sp.r0 = sp.r1 = sp.c0 = sp.c1 = 0;
  }
  const auto rows = axis_runs(g.OH, g.H, g.KH, g.sh, g.ph, g.dh, sp.r0, sp.r1);
  const auto cols = axis_runs(g.OW, g.W, g.KW, g.sw, g.pw, g.dw, sp.c0, sp.c1);
  for (const AxisRun& rr : rows)
    for (const AxisRun& cr : cols) {
      if (rr.block && cr.block) continue;
      Region reg{rr.b, rr.e, cr.b, cr.e, {}};
      std::vector<std::pair<uint64_t, uint64_t>> fold;
      for (int folded = 0; folded < 2; ++folded)  // unfolded taps first, in tap order: one run of the weight
        for (uint64_t mh : rr.classes)
          for (uint64_t mw : cr.classes) {
            if ((__builtin_popcountll(mh) * __builtin_popcountll(mw) > 1) != bool(folded)) continue;
            reg.taps.kh[reg.taps.n] = __builtin_ctzll(mh);
            reg.taps.kw[reg.taps.n] = __builtin_ctzll(mw);
            ++reg.taps.n;
            fold.emplace_back(mh, mw);
          }
      sp.regions.push_back(reg);
      sp.folds.push_back(std::move(fold));
    }
  return sp;
}

// Weight runs of the regions: taps [t0, t0 + nt) of a region multiply nt consecutive [OC, Cg] slices, at
// off in the tap-major weight [OC, KH*KW, Cg] (unfolded taps in tap order) or in the table of folded sums
// [OC, E, Cg]; one GEMM per run and group, accumulating. The table holds each distinct sequence of
// (kh mask, kw mask) taps once (top and bottom edges share theirs), so it costs a few weight-sized passes at
// most instead of one per region (at 7x7, 512 channels, per-region copies took longer than the GEMMs).
struct WeightRun {
  int t0, nt;
  bool table;
  int64_t off;  // in slices
};

struct SplitWeights {
  at::Tensor w_tap, table;
  std::vector<std::vector<WeightRun>> runs;  // per region
};

template <typename acc_t>
void fill_table(const at::Tensor& w_tap, at::Tensor& table, const Geom& g,
                const std::vector<std::pair<uint64_t, uint64_t>>& entries) {
  const int64_t KK = g.KH * g.KW, E = (int64_t)entries.size();
  const acc_t* src = w_tap.const_data_ptr<acc_t>();
  acc_t* dst = table.mutable_data_ptr<acc_t>();
  // in parallel: serial, the 11 MB table of 7x7 with 512 channels took ~0.6 ms, ~3% of a quiet forward
  at::parallel_for(0, g.OC, std::max<int64_t>(1, 65536 / (E * g.Cg)), [&](int64_t oc0, int64_t oc1) {
  for (int64_t oc = oc0; oc < oc1; ++oc)
    for (int64_t e = 0; e < E; ++e) {
      acc_t* __restrict__ d = dst + (oc * E + e) * g.Cg;
      bool first = true;
      for (int kh = 0; kh < g.KH; ++kh)
        for (int kw = 0; kw < g.KW; ++kw) {
          if (!(entries[e].first >> kh & 1) || !(entries[e].second >> kw & 1)) continue;
          const acc_t* __restrict__ s = src + (oc * KK + kh * g.KW + kw) * g.Cg;
          if (first)
            std::memcpy(d, s, g.Cg * sizeof(acc_t));
          else
            for (int64_t c = 0; c < g.Cg; ++c) d[c] += s[c];
          first = false;
        }
    }
  });
}

template <typename acc_t>
SplitWeights split_weights(const at::Tensor& w, const Geom& g, const SplitPlan& sp) {
  SplitWeights sw;
  sw.w_tap = tap_major(w, g);
  std::vector<std::pair<uint64_t, uint64_t>> entries;
  std::vector<std::pair<std::vector<std::pair<uint64_t, uint64_t>>, int64_t>> seqs;  // sequence -> its offset
  for (size_t i = 0; i < sp.regions.size(); ++i) {
    const auto& f = sp.folds[i];
    const int n = sp.regions[i].taps.n;
    int plain = 0;  // leading unfolded taps that are consecutive in the weight
    auto tap_of = [&](int t) { return __builtin_ctzll(f[t].first) * g.KW + __builtin_ctzll(f[t].second); };
    auto single = [&](int t) { return __builtin_popcountll(f[t].first) * __builtin_popcountll(f[t].second) == 1; };
    while (plain < n && single(plain) && (plain == 0 || tap_of(plain) == tap_of(plain - 1) + 1)) ++plain;
    std::vector<WeightRun> runs;
    if (plain) runs.push_back({0, plain, false, tap_of(0)});
    if (plain < n) {
      std::vector<std::pair<uint64_t, uint64_t>> seq(f.begin() + plain, f.end());
      auto it = std::find_if(seqs.begin(), seqs.end(), [&](const auto& q) { return q.first == seq; });
      int64_t off;
      if (it != seqs.end()) {
        off = it->second;
      } else {
        off = (int64_t)entries.size();
        entries.insert(entries.end(), seq.begin(), seq.end());
        seqs.emplace_back(std::move(seq), off);
      }
      runs.push_back({plain, n - plain, true, off});
    }
    sw.runs.push_back(std::move(runs));
  }
  if (!entries.empty()) {
    sw.table = empty_cached({g.OC, (int64_t)entries.size(), g.Cg}, sw.w_tap.scalar_type());
    fill_table<acc_t>(sw.w_tap, sw.table, g, entries);
  }
  return sw;
}

// res = A [G, rows, T*Cg] times the region's weight runs (group gi's [OCg, T*Cg]), as [G, rows, OCg]: one
// batched GEMM per run on strided views (no copies), the later ones accumulating.
void region_gemm(const at::Tensor& A, at::Tensor& res, const Geom& g, const SplitWeights& sw,
                 const std::vector<WeightRun>& runs) {
  for (size_t r = 0; r < runs.size(); ++r) {
    const WeightRun& run = runs[r];
    const at::Tensor& src = run.table ? sw.table : sw.w_tap;  // [OC, slices, Cg]
    const int64_t ld = src.size(1) * g.Cg;  // [G, OCg, nt*Cg] view of slices [off, off + nt)
    const at::Tensor b = src.as_strided({g.G, g.OCg, run.nt * g.Cg}, {g.OCg * ld, ld, 1},
                                        src.storage_offset() + run.off * g.Cg);
    const at::Tensor a = A.narrow(2, run.t0 * g.Cg, run.nt * g.Cg);
    if (r == 0)
      at::bmm_out(res, a, b.transpose(1, 2));
    else
      res.baddbmm_(a, b.transpose(1, 2));
  }
}

// Regions with the same folded taps (top and bottom edges, left and right, the four corners) share their
// weight runs, so their rows go through one GEMM: MKL packs the weight once per GEMM call, and at 7x7 with 512
// channels packing it per region and task took a sixth of the GEMM time.
std::vector<std::vector<int>> tap_groups(const SplitPlan& sp) {
  std::vector<std::vector<int>> groups;
  for (int i = 0; i < (int)sp.regions.size(); ++i) {
    const auto same = [&](const std::vector<int>& q) { return sp.folds[q[0]] == sp.folds[i]; };
    const auto it = std::find_if(groups.begin(), groups.end(), same);
    if (it == groups.end())
      groups.push_back({i});
    else
      it->push_back(i);
  }
  return groups;
}

// Images per task of (c)'s convolution (see forward_split).
constexpr int64_t kConvImages = 8;

struct GroupTask {
  int64_t group, q0, q1;  // rows [q0, q1) of the group's regions' GEMM rows, one region after the other
};

int64_t group_rows(const Geom& g, const SplitPlan& sp, const std::vector<int>& group) {
  int64_t n = 0;
  for (int r : group) n += g.N * sp.regions[r].rows() * sp.regions[r].cols();
  return n;
}

// Even pieces of at most kTaskRows rows (and kTaskElems gathered elements) per group, largest first.
std::vector<GroupTask> group_tasks(const Geom& g, const SplitPlan& sp, const std::vector<std::vector<int>>& groups) {
  std::vector<GroupTask> tasks;
  for (int64_t i = 0; i < (int64_t)groups.size(); ++i) {
    const int64_t np = group_rows(g, sp, groups[i]), k = sp.regions[groups[i][0]].taps.n * g.Cg * g.G;
    const int64_t max_rows = std::max<int64_t>(1, std::min(kTaskRows, kTaskElems / k));
    const int64_t ntask = std::max<int64_t>(1, (np + max_rows - 1) / max_rows), step = (np + ntask - 1) / ntask;
    for (int64_t q = 0; q < np; q += step) tasks.push_back({i, q, std::min(np, q + step)});
  }
  std::stable_sort(tasks.begin(), tasks.end(), [&](const GroupTask& a, const GroupTask& b) {
    return (a.q1 - a.q0) * sp.regions[groups[a.group][0]].taps.n >
           (b.q1 - b.q0) * sp.regions[groups[b.group][0]].taps.n;
  });
  return tasks;
}

// Calls fn(region, p0, p1, row) for each region's share [p0, p1) of the group rows [q0, q1), row = its first
// row in the task.
template <typename Fn>
void for_pieces(const Geom& g, const SplitPlan& sp, const std::vector<int>& group, int64_t q0, int64_t q1,
                const Fn& fn) {
  int64_t base = 0;
  for (int r : group) {
    const int64_t np = g.N * sp.regions[r].rows() * sp.regions[r].cols();
    const int64_t lo = std::max(q0, base), hi = std::min(q1, base + np);
    if (lo < hi) fn(sp.regions[r], lo - base, hi - base, lo - q0);
    base += np;
  }
}

// Design (c)'s forward: the block by the vendor's convolution without padding, copied into the output, and
// every other pixel by a gathered GEMM with the folded taps, written with the bias; all of it as tasks of one
// parallel region.
at::Tensor forward_split(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                         const Geom& g, at::IntArrayRef stride, at::IntArrayRef dilation, bool use_block) {
  const SplitPlan sp = split_plan(g, use_block);
  at::Tensor out = empty_out(g, x, w);
  if (out.numel() == 0) return out;
  // The block's convolution runs as tasks of whole images in the GEMMs' parallel region (oneDNN runs
  // single-threaded inside it), each copying its images into the output while they are in cache: with
  // oneDNN's own parallel region first, a thread that the shared machine preempted held up both regions,
  // and the GEMMs could not fill the other thread's wait. Chunks of kConvImages images (a function of the
  // shape only: oneDNN's results are not always the same bits for another batch size) cost the same per
  // image as one call here; single images cost 10-20% more.
  const at::Tensor inner = sp.has_block() ? out.slice(2, sp.r0, sp.r1).slice(3, sp.c0, sp.c1) : at::Tensor();
  const int64_t chunks = sp.has_block() ? (g.N + kConvImages - 1) / kConvImages : 0;
  const auto acc = rconv::acc_type(x.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bias_acc = has_bias ? bias->to(acc).contiguous() : at::Tensor();
  const auto groups = tap_groups(sp);
  const auto tasks = group_tasks(g, sp, groups);
  int64_t gather_max = 0, rows_max = 0;  // per-thread scratch, allocated once
  for (const GroupTask& t : tasks) {
    gather_max = std::max(gather_max, g.G * (t.q1 - t.q0) * sp.regions[groups[t.group][0]].taps.n * g.Cg);
    rows_max = std::max(rows_max, t.q1 - t.q0);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "reflect_conv2d_split_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SplitWeights sw = split_weights<acc_t>(w, g, sp);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t* bp = has_bias ? bias_acc.const_data_ptr<acc_t>() : nullptr;
    struct Scratch {
      at::Tensor A, C;
    };
    for_each_task(
        chunks + (int64_t)tasks.size(),
        [&] {
          return Scratch{empty_cached({gather_max}, acc), empty_cached({g.OC * rows_max}, acc)};
        },
        [&](Scratch& sc, int64_t i) {
          if (i < chunks) {  // the largest tasks first
            const int64_t n0 = i * g.N / chunks, n = (i + 1) * g.N / chunks - n0;
            inner.narrow(0, n0, n).copy_(
                at::convolution(x.narrow(0, n0, n), w, bias, stride, {0, 0}, dilation, false, {0, 0}, g.G));
            return;
          }
          const GroupTask& tk = tasks[i - chunks];
          const auto& group = groups[tk.group];
          const int64_t rows = tk.q1 - tk.q0, K = sp.regions[group[0]].taps.n * g.Cg;
          at::Tensor A = scratch(sc.A, g.G, rows, K);
          acc_t* ap = A.mutable_data_ptr<acc_t>();
          for_pieces(g, sp, group, tk.q0, tk.q1, [&](const Region& reg, int64_t p0, int64_t p1, int64_t row) {
            gather_x<scalar_t, acc_t>(xp, x.strides(), ap + row * K, g, reg, p0, p1, rows);
          });
          at::Tensor res = scratch(sc.C, g.G, rows, g.OCg);
          region_gemm(A, res, g, sw, sw.runs[group[0]]);
          const acc_t* rp = res.const_data_ptr<acc_t>();
          for_pieces(g, sp, group, tk.q0, tk.q1, [&](const Region& reg, int64_t p0, int64_t p1, int64_t row) {
            add_out<scalar_t, acc_t>(op, out.strides(), rp + row * g.OCg, g, reg, p0, p1, true, bp, rows);
          });
        });
  });
  return out;
}

// Forward designs (the algo values): (b) frame, (a) gemm, (c) split, and (c) without the block ("fold": every
// pixel by the folded GEMM, i.e. (a) with folded frame taps). Backward knows (a) and (b) only; the others run
// (b)'s backward.
constexpr int kFrame = 1, kGemm = 2, kSplit = 3, kFold = 4;

// algo 0 picks by shape alone (so the bits never depend on the run or the thread count). Measured on
// ResNet-34's shapes (README): (b) where its correction adds under 3% to the multiply-adds (56x56 stride 1,
// both 56x56 inputs, the stem) or the GEMM rows would be short (Cg*KH*KW < 32); (c) up to 12% where the
// stride divides the padding (28x28 and 14x14 stride 1: the valid conv runs at oneDNN's speed, only the
// frame at MKL's); past that, or at stride 2, the folded GEMM everywhere (7x7 outputs, where the frame is half
// the pixels; stride-2 28x28 and 14x14 inputs). (a) was not faster than "fold" (fewer MACs) on any of them.
// (c) at 56x56 stride 1 ran 1.11x the zero-padded conv on a quiet machine against (b)'s 1.04-1.08x (but 0.93x
// in a benchmark run with the cores shared, where (b) ran 1.12x in another: one parallel region against two).
int pick_forward(const Geom& g, int64_t algo) {
  if (algo == kGemm || algo == kSplit || algo == kFold) return int(algo);
  if (algo != 0) return kFrame;
  const double share = rconv::correction_share(g);
  if (g.Cg * g.KH * g.KW < 32 || share < 0.03) return kFrame;
  if (share <= 0.12 && g.ph % g.sh == 0 && g.pw % g.sw == 0) return kSplit;
  return kFold;
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       int64_t algo) {
  const Geom g = rconv::geometry(x, w, stride, padding, dilation, groups);
  const int design = pick_forward(g, algo);
  if (design >= kSplit) return forward_split(x, w, bias, g, stride, dilation, design == kSplit);
  const bool gemm = design == kGemm;
  const auto acc = rconv::acc_type(x.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor out;
  if (gemm) {
    out = empty_out(g, x, w);
  } else {
    out = at::convolution(x, w, bias, stride, padding, dilation, false, {0, 0}, groups);
  }
  const bool direct = direct_rows(g, gemm, out, acc);
  if (gemm && !direct) {
    if (has_bias)
      out.copy_(bias->view({1, g.OC, 1, 1}).expand_as(out));
    else
      out.zero_();
  }
  if (out.numel() == 0) return out;
  const auto regions = regions_for(g, gemm);
  if (direct_frame(g, gemm, x, out)) {
    correct_frame_direct(x, w, out, g, regions);
    return out;
  }
  const auto tasks = make_tasks(g, regions, gemm);
  const auto cols = region_columns(w, g, regions);
  const at::Tensor out_rows = direct ? pixel_rows(out) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "reflect_conv2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    struct Scratch {
      at::Tensor A, C;
    };
    const int64_t gather_max = max_gather(g, regions, tasks), rows_max = max_rows(tasks);
    for_each_task(
        (int64_t)tasks.size(),
        [&] {
          return Scratch{empty_cached({gather_max}, acc),
                         direct ? at::Tensor() : empty_cached({g.OC * rows_max}, acc)};
        },
        [&](Scratch& sc, int64_t i) {
          const Task& tk = tasks[i];
          const Region& reg = regions[tk.region];
          const int64_t rows = tk.p1 - tk.p0;
          at::Tensor A = scratch(sc.A, g.G, rows, reg.taps.n * g.Cg);
          gather_x<scalar_t, acc_t>(xp, x.strides(), A.mutable_data_ptr<acc_t>(), g, reg, tk.p0, tk.p1);
          if (direct) {
            at::Tensor o = out_rows.narrow(0, tk.p0, rows);
            const at::Tensor wt = cols[tk.region].select(0, 0).t();
            if (has_bias) {
              o.copy_(bias->view({1, g.OC}).expand_as(o));
              o.addmm_(A.select(0, 0), wt);
            } else {
              at::mm_out(o, A.select(0, 0), wt);
            }
            return;
          }
          at::Tensor corr = scratch(sc.C, g.G, rows, g.OCg);
          at::bmm_out(corr, A, cols[tk.region].transpose(1, 2));
          add_out<scalar_t, acc_t>(op, out.strides(), corr.const_data_ptr<acc_t>(), g, reg, tk.p0, tk.p1);
        });
  });
  return out;
}

// Backward works on chunks of whole images, each covering every region: a chunk's grad_input fold then only
// touches its own images, so it runs inside the chunk and the whole backward is ONE parallel region (a
// second region for the fold cost a scheduler slice on shared cores). About kChunkRows frame rows (and at
// most about kTaskElems gathered elements) a chunk: bigger chunks make fewer, longer GEMMs (per-image
// chunks made 54-row GEMMs at 56x56, at half MKL's speed, and ~250 at:: calls a backward).
// grad_weight partials: the chunks are split into kSlots fixed runs, each summed in chunk order by one
// thread (per region), then the runs are added in order: the bits do not depend on the thread count.
constexpr int64_t kSlots = 8;
constexpr int64_t kChunkRows = 1024;

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& go, const at::Tensor& x,
                                                            const at::Tensor& w, at::IntArrayRef stride,
                                                            at::IntArrayRef padding, at::IntArrayRef dilation,
                                                            int64_t groups, std::array<bool, 3> mask, int64_t algo) {
  const Geom g = rconv::geometry(x, w, stride, padding, dilation, groups);
  const bool gemm = rconv::pick_gemm(g, algo, true, true);
  const auto acc = rconv::acc_type(x.scalar_type());
  at::Tensor gi, gw, gb;
  if (gemm) {
    if (mask[2]) gb = go.sum({0, 2, 3}, false, acc).to(go.scalar_type());
    if (mask[0]) gi = at::zeros_like(x, x.options().memory_format(rconv::conv_format(x, w)));
    if (mask[1]) gw = at::zeros({g.OC, g.Cg, g.KH, g.KW}, w.options().dtype(acc));
  } else {
    std::vector<int64_t> bias_sizes{g.OC};
    std::tie(gi, gw, gb) = at::convolution_backward(go, x, w, bias_sizes, stride, padding, dilation, false, {0, 0},
                                                    groups, mask);
    if (mask[1] && gw.scalar_type() != acc) gw = gw.to(acc);  // else corrected in place, in its own layout
  }
  if ((!mask[0] && !mask[1]) || go.numel() == 0 || x.numel() == 0) {
    if (mask[1]) gw = gw.to(w.scalar_type());
    return {gi, gw, gb};
  }
  const auto regions = regions_for(g, gemm);
  const auto cols = region_columns(w, g, regions);
  int64_t frame = 0, max_img = 0, max_k = 0;  // per image: frame rows, largest region, widest region
  for (const Region& r : regions) {
    frame += r.rows() * r.cols();
    max_img = std::max(max_img, r.rows() * r.cols());
    max_k = std::max<int64_t>(max_k, r.taps.n * g.Cg);
  }
  // an even chunk count, evenly cut: two threads get equal shares (the cut must not follow the thread count)
  int64_t chunks = std::max<int64_t>({1, (g.N * frame + kChunkRows - 1) / kChunkRows,
                                       (g.N * frame * max_k * g.G + kTaskElems - 1) / kTaskElems});
  chunks = std::min(g.N, chunks);
  chunks = (g.N + g.N / chunks - 1) / (g.N / chunks);  // whole images alike: 16 images in 16 or 8, not 14
  chunks = std::min(g.N, chunks + chunks % 2);
  const int64_t per = (g.N + chunks - 1) / chunks;  // most images in one chunk
  const int64_t slots = std::min(kSlots, chunks);
  std::vector<std::vector<at::Tensor>> gw_parts(slots, std::vector<at::Tensor>(regions.size()));
  const bool direct = direct_rows(g, gemm, go, acc);
  const at::Tensor go_rows = direct ? pixel_rows(go) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "reflect_conv2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    scalar_t* gip = mask[0] ? gi.mutable_data_ptr<scalar_t>() : nullptr;
    struct Scratch {
      at::Tensor A, B, G;
    };
    const auto opt = x.options().dtype(acc);
    for_each_task(
        slots,
        [&] {
          return Scratch{mask[1] ? at::empty({g.G * per * max_img * max_k}, opt) : at::Tensor(),
                         mask[0] ? at::empty({g.G * per * max_img * max_k}, opt) : at::Tensor(),
                         direct ? at::Tensor() : at::empty({per * max_img * g.OC}, opt)};
        },
        [&](Scratch& sc, int64_t s) {
          for (int64_t c = s * chunks / slots; c < (s + 1) * chunks / slots; ++c) {
            const int64_t n0 = c * g.N / chunks, n1 = (c + 1) * g.N / chunks;
            for (size_t r = 0; r < regions.size(); ++r) {
              const Region& reg = regions[r];
              const int64_t img = reg.rows() * reg.cols(), p0 = n0 * img, p1 = n1 * img, rows = p1 - p0;
              const int64_t K = reg.taps.n * g.Cg;
              if (rows == 0) continue;
              at::Tensor Gr;
              if (direct) {
                Gr = go_rows.narrow(0, p0, rows).unsqueeze(0);
              } else {
                Gr = scratch(sc.G, g.G, rows, g.OCg);
                gather_grad<scalar_t, acc_t>(gp, go.strides(), Gr.mutable_data_ptr<acc_t>(), g, reg, p0, p1);
              }
              if (mask[1]) {
                at::Tensor A = scratch(sc.A, g.G, rows, K);
                gather_x<scalar_t, acc_t>(xp, x.strides(), A.mutable_data_ptr<acc_t>(), g, reg, p0, p1);
                at::Tensor& part = gw_parts[s][r];  // [G, OCg, T*Cg]
                if (part.defined())
                  part.baddbmm_(Gr.transpose(1, 2), A);
                else
                  part = at::bmm(Gr.transpose(1, 2), A);
              }
              if (mask[0]) {
                at::Tensor B = scratch(sc.B, g.G, rows, K);  // gradient of the gathered reads
                at::bmm_out(B, Gr, cols[r]);
                for (int64_t n = n0; n < n1; ++n)
                  fold_image<scalar_t, acc_t>(gip, gi.strides(), B.const_data_ptr<acc_t>(), g, reg, p0, p1, n);
              }
            }
          }
        });
    if (mask[1]) {
      // add each region's runs in order onto its taps of gw ([OC, Cg, KH, KW] in acc_t, any strides)
      acc_t* wp = gw.mutable_data_ptr<acc_t>();
      const auto ws = gw.strides();
      // Plain loops, not at:: add_: each add_ of a large partial opens a parallel region, and on shared
      // cores every one of them waited a scheduler slice (s1_28's grad_weight path ran 5x slower).
      for (size_t r = 0; r < regions.size(); ++r) {
        at::Tensor sum;
        for (int64_t s = 0; s < slots; ++s) {
          const at::Tensor& ps = gw_parts[s][r];
          if (!ps.defined()) continue;
          if (!sum.defined()) {
            sum = ps.contiguous();
            continue;
          }
          const at::Tensor pc = ps.contiguous();
          acc_t* d = sum.mutable_data_ptr<acc_t>();
          const acc_t* q = pc.const_data_ptr<acc_t>();
          for (int64_t i = 0, n = sum.numel(); i < n; ++i) d[i] += q[i];
        }
        if (!sum.defined()) continue;
        const acc_t* pp = sum.const_data_ptr<acc_t>();
        const Region& reg = regions[r];
        const int64_t T = reg.taps.n;
        for (int64_t oc = 0; oc < g.OC; ++oc)
          for (int64_t t = 0; t < T; ++t) {
            const acc_t* src = pp + (oc * T + t) * g.Cg;
            acc_t* dst = wp + oc * ws[0] + reg.taps.kh[t] * ws[2] + reg.taps.kw[t] * ws[3];
            for (int64_t cg = 0; cg < g.Cg; ++cg) dst[cg * ws[1]] += src[cg];
          }
      }
    }
  });
  if (mask[1]) gw = gw.to(w.scalar_type());
  return {gi, gw, gb};
}

}  // namespace

at::Tensor reflect_conv2d_cpu(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, int64_t algo) {
  TORCH_CHECK(x.device().is_cpu(), "fastfuse reflect_conv2d_cpu: expected CPU tensors, got ", x.device());
  return forward_cpu(x, w, bias, stride, padding, dilation, groups, algo);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reflect_conv2d_backward_cpu(
    const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> mask, int64_t algo) {
  TORCH_CHECK(x.device().is_cpu(), "fastfuse reflect_conv2d_backward_cpu: expected CPU tensors, got ", x.device());
  return backward_cpu(go, x, w, stride, padding, dilation, groups, mask, algo);
}

TORCH_LIBRARY_IMPL(fastfuse_C, CPU, m) {
  m.impl("reflect_conv2d", &reflect_conv2d_cpu);
  m.impl("reflect_conv2d_backward", &reflect_conv2d_backward_cpu);
}

}  // namespace fastfuse
