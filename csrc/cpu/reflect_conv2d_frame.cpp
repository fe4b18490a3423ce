// The frame design's forward on CPU: oneDNN's zero-padded convolution, then the frame correction adds what the
// reflected pixels contribute (reflect_conv2d.h). fp32 channels_last with one group and up to 256 output channels
// corrects straight from x into the output (correct_in_place); other cases gather each region's reflected taps and
// add one GEMM per task (add_gathered).
#include <ATen/Dispatch.h>
#include <ATen/native/CPUBlas.h>

#include "cpu/reflect_conv2d_cpu.h"

namespace fastfuse {
namespace rconv_cpu {
namespace {

// The forward correction straight from x into out, for fp32 channels_last input and output with one group: per line
// of a region's pixels and per pad tap, one raw GEMM out_line += x_line [M, C] * W_tap [C, OC]
// (at::native::cpublas::brgemm: oneDNN's micro-kernel where there is one, else BLAS; no dispatcher, no packing of
// A). K = C, read in place with a row stride: no gathered copy, no correction buffer and no write-back pass, which
// together cost about as much as the GEMMs. A line is a run of pixels along which every pad tap's source moves by
// one fixed positive stride: along the columns (a row of the region) when no tap is reflected in the columns or the
// region is one column wide, along the rows likewise, or across the images at one pixel (corners). Each task owns
// its pixels and adds the taps in a fixed order.
// Up to 256 output channels: wider, the micro-kernel runs at about half its speed, and the gathered path with one
// MKL GEMM per task is faster.
bool in_place(const Geom& g, const at::Tensor& x, const at::Tensor& out) {
  return g.G == 1 && g.OC <= 256 && x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast) && out.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         x.stride(1) == 1 && out.stride(1) == 1;
}

struct FrameTask {
  int64_t region, n0, n1;
  int axis;  // 0: lines along the columns, 1: along the rows, 2: across the images
};

void correct_in_place(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, const Geom& g,
                      const std::vector<Region>& regions) {
  // W as [KH, KW, C, OC]: tap t's [C, OC] matrix at t * C * OC
  const at::Tensor wt = empty_cached({g.KH, g.KW, g.C, g.OC}, at::kFloat).copy_(w.permute({2, 3, 1, 0}));
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
    const int64_t pieces =
        axis == 2 ? 1 : std::min<int64_t>(g.N, std::max<int64_t>(1, (px + kTaskRows - 1) / kTaskRows));
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

struct Task {
  int64_t region, p0, p1;  // GEMM rows [p0, p1) of regions[region]; row p = (n * R + r) * Cc + c
};

// Tasks, largest first: rows of one region in even pieces of at most kTaskRows (and kTaskElems gathered elements).
std::vector<Task> make_tasks(const Geom& g, const std::vector<Region>& regions) {
  std::vector<Task> tasks;
  for (int64_t i = 0; i < (int64_t)regions.size(); ++i) {
    const int64_t np = g.N * regions[i].rows() * regions[i].cols();
    const int64_t max_rows = std::max<int64_t>(1, std::min(kTaskRows, kTaskElems / (regions[i].taps.n * g.Cg * g.G)));
    const int64_t ntask = std::max<int64_t>(1, (np + max_rows - 1) / max_rows);
    const int64_t step = (np + ntask - 1) / ntask;
    for (int64_t p = 0; p < np; p += step) tasks.push_back({i, p, std::min(np, p + step)});
  }
  std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& b) {
    return (a.p1 - a.p0) * regions[a.region].taps.n > (b.p1 - b.p0) * regions[b.region].taps.n;
  });
  return tasks;
}

// out += the gathered GEMM over the frame regions, as tasks. Each thread allocates its scratch once, at the largest
// task's size, and reuses it (a fresh multi-MB buffer per task is a fresh mmap, whose page faults cost more).
void add_gathered(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, const Geom& g) {
  const auto acc = rconv::acc_type(x.scalar_type());
  const auto regions = rconv::plan(g);
  const auto tasks = make_tasks(g, regions);
  const auto cols = region_columns(w, g, regions);
  int64_t gather_max = 0, rows_max = 0;
  for (const Task& t : tasks) {
    gather_max = std::max(gather_max, g.G * (t.p1 - t.p0) * regions[t.region].taps.n * g.Cg);
    rows_max = std::max(rows_max, t.p1 - t.p0);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "reflect_conv2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    struct Scratch {
      at::Tensor A, C;
    };
    for_each_task(
        (int64_t)tasks.size(),
        [&] { return Scratch{empty_cached({gather_max}, acc), empty_cached({g.OC * rows_max}, acc)}; },
        [&](Scratch& sc, int64_t i) {
          const Task& tk = tasks[i];
          const Region& reg = regions[tk.region];
          const int64_t rows = tk.p1 - tk.p0;
          at::Tensor A = scratch(sc.A, g.G, rows, reg.taps.n * g.Cg);
          gather_x<scalar_t, acc_t>(xp, x.strides(), A.mutable_data_ptr<acc_t>(), g, reg, tk.p0, tk.p1);
          at::Tensor corr = scratch(sc.C, g.G, rows, g.OCg);
          at::bmm_out(corr, A, cols[tk.region].transpose(1, 2));
          add_out<scalar_t, acc_t>(op, out.strides(), corr.const_data_ptr<acc_t>(), g, reg, tk.p0, tk.p1);
        });
  });
}

}  // namespace

at::Tensor forward_frame(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                         const Geom& g, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                         int64_t groups) {
  at::Tensor out = at::convolution(x, w, bias, stride, padding, dilation, false, {0, 0}, groups);
  if (out.numel() == 0) return out;
  if (in_place(g, x, out))
    correct_in_place(x, w, out, g, rconv::plan(g));
  else
    add_gathered(x, w, out, g);
  return out;
}

}  // namespace rconv_cpu
}  // namespace fastfuse
