// Reflection-padded conv2d on CPU, both designs of reflect_conv2d.h: (b) oneDNN's zero-padded convolution
// plus the frame correction, (a) a reflected im2col GEMM for small outputs.
//
// The correction work is cut into fixed tasks of at most kTaskRows GEMM rows of one region, run in ONE
// parallel region (gather, small GEMM and write-back all inside a task; nested at:: ops run serially
// there). Many short parallel regions cost a scheduler slice each when the cores are shared, which made
// the correction cost more than the convolution. The task split never depends on the thread count, and
// per-task grad_weight partials are added in task order, so the bits are the same on every run.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "reflect_conv2d.h"

namespace fastfuse {
namespace {

using rconv::Geom;
using rconv::reflect;
using rconv::Region;

constexpr int64_t kTaskRows = 256;

struct Task {
  int64_t region, p0, p1;  // GEMM rows [p0, p1) of regions[region]; row p = (n * R + r) * Cc + c
};

std::vector<Task> make_tasks(const Geom& g, const std::vector<Region>& regions) {
  std::vector<Task> tasks;
  for (int64_t i = 0; i < (int64_t)regions.size(); ++i) {
    const int64_t np = g.N * regions[i].rows() * regions[i].cols();
    for (int64_t p = 0; p < np; p += kTaskRows) tasks.push_back({i, p, std::min(np, p + kTaskRows)});
  }
  return tasks;
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
      for (int64_t gi = 0; gi < g.G; ++gi) {
        acc_t* dst = A + (gi * rows + p - p0) * K + t * g.Cg;
        const scalar_t* s = src + gi * g.Cg * st[1];
        for (int64_t cg = 0; cg < g.Cg; ++cg) dst[cg] = static_cast<acc_t>(s[cg * st[1]]);
      }
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
      for (int64_t oc = 0; oc < g.OCg; ++oc)
        Gr[(gi * rows + p - p0) * g.OCg + oc] = static_cast<acc_t>(src[(gi * g.OCg + oc) * st[1]]);
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
    for (int64_t gi = 0; gi < g.G; ++gi) {
      const acc_t* src = corr + (gi * rows + p - p0) * g.OCg;
      for (int64_t oc = 0; oc < g.OCg; ++oc) {
        scalar_t& o = dst[(gi * g.OCg + oc) * st[1]];
        o = static_cast<scalar_t>(static_cast<acc_t>(o) + src[oc]);
      }
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
      for (int64_t gi = 0; gi < g.G; ++gi) {
        const acc_t* src = B + (gi * rows + p - p0) * K + t * g.Cg;
        scalar_t* d = dst + gi * g.Cg * st[1];
        for (int64_t cg = 0; cg < g.Cg; ++cg) {
          scalar_t& o = d[cg * st[1]];
          o = static_cast<scalar_t>(static_cast<acc_t>(o) + src[cg]);
        }
      }
    }
  }
}

// Weight columns per region, [G, OCg, T*Cg] in the accumulation dtype (tap-major like the gathers).
std::vector<at::Tensor> region_columns(const at::Tensor& w, const Geom& g, const std::vector<Region>& regions) {
  const at::Tensor w_tap =
      w.to(rconv::acc_type(w.scalar_type())).reshape({g.OC, g.Cg, g.KH * g.KW}).transpose(1, 2).contiguous();
  std::vector<at::Tensor> cols;
  for (const Region& reg : regions)
    cols.push_back(rconv::weight_columns(w_tap, g, rconv::tap_index(g, reg.taps, w.device())));
  return cols;
}

std::vector<Region> regions_for(const Geom& g, bool gemm) {
  return gemm ? std::vector<Region>{rconv::whole(g)} : rconv::plan(g);
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       int64_t algo) {
  const Geom g = rconv::geometry(x, w, stride, padding, dilation, groups);
  const bool gemm = rconv::pick_gemm(g, algo, true);
  at::Tensor out;
  if (gemm) {
    out = at::empty({g.N, g.OC, g.OH, g.OW}, x.options().memory_format(rconv::conv_format(x, w)));
    if (bias.has_value() && bias->defined())
      out.copy_(bias->view({1, g.OC, 1, 1}).expand_as(out));
    else
      out.zero_();
  } else {
    out = at::convolution(x, w, bias, stride, padding, dilation, false, {0, 0}, groups);
  }
  if (out.numel() == 0) return out;
  const auto regions = regions_for(g, gemm);
  const auto tasks = make_tasks(g, regions);
  const auto cols = region_columns(w, g, regions);
  const auto acc = rconv::acc_type(x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "reflect_conv2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, (int64_t)tasks.size(), 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const Task& tk = tasks[i];
        const Region& reg = regions[tk.region];
        const int64_t rows = tk.p1 - tk.p0;
        at::Tensor A = at::empty({g.G, rows, reg.taps.n * g.Cg}, x.options().dtype(acc));
        gather_x<scalar_t, acc_t>(xp, x.strides(), A.mutable_data_ptr<acc_t>(), g, reg, tk.p0, tk.p1);
        const at::Tensor corr = at::bmm(A, cols[tk.region].transpose(1, 2)).contiguous();
        add_out<scalar_t, acc_t>(op, out.strides(), corr.const_data_ptr<acc_t>(), g, reg, tk.p0, tk.p1);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& go_in, const at::Tensor& x,
                                                            const at::Tensor& w, at::IntArrayRef stride,
                                                            at::IntArrayRef padding, at::IntArrayRef dilation,
                                                            int64_t groups, std::array<bool, 3> mask, int64_t algo) {
  const Geom g = rconv::geometry(x, w, stride, padding, dilation, groups);
  const bool gemm = rconv::pick_gemm(g, algo, true);
  const auto acc = rconv::acc_type(x.scalar_type());
  const at::Tensor& go = go_in;
  at::Tensor gi, gw, gb;
  if (gemm) {
    if (mask[2]) gb = go.sum({0, 2, 3}, false, acc).to(go.scalar_type());
    if (mask[0]) gi = at::zeros_like(x, x.options().memory_format(rconv::conv_format(x, w)));
    if (mask[1]) gw = at::zeros_like(w, w.options().memory_format(at::MemoryFormat::Contiguous));
  } else {
    std::vector<int64_t> bias_sizes{g.OC};
    std::tie(gi, gw, gb) = at::convolution_backward(go, x, w, bias_sizes, stride, padding, dilation, false, {0, 0},
                                                    groups, mask);
  }
  if ((!mask[0] && !mask[1]) || go.numel() == 0 || x.numel() == 0) return {gi, gw, gb};
  const auto regions = regions_for(g, gemm);
  const auto tasks = make_tasks(g, regions);
  const auto cols = region_columns(w, g, regions);
  std::vector<at::Tensor> gw_parts(tasks.size()), folds(tasks.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "reflect_conv2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    // phase 1: per task, grad_weight partial and the gradient of the gathered pad reads
    at::parallel_for(0, (int64_t)tasks.size(), 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const Task& tk = tasks[i];
        const Region& reg = regions[tk.region];
        const int64_t rows = tk.p1 - tk.p0;
        at::Tensor Gr = at::empty({g.G, rows, g.OCg}, x.options().dtype(acc));
        gather_grad<scalar_t, acc_t>(gp, go.strides(), Gr.mutable_data_ptr<acc_t>(), g, reg, tk.p0, tk.p1);
        if (mask[1]) {
          at::Tensor A = at::empty({g.G, rows, reg.taps.n * g.Cg}, x.options().dtype(acc));
          gather_x<scalar_t, acc_t>(xp, x.strides(), A.mutable_data_ptr<acc_t>(), g, reg, tk.p0, tk.p1);
          gw_parts[i] = at::bmm(Gr.transpose(1, 2), A);  // [G, OCg, T*Cg]
        }
        if (mask[0]) folds[i] = at::bmm(Gr, cols[tk.region]).contiguous();  // [G, rows, T*Cg]
      }
    });
    // phase 2: fold onto the reflected sources, one thread per image, tasks in order
    if (mask[0]) {
      scalar_t* gip = gi.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, g.N, 1, [&](int64_t nb, int64_t ne) {
        for (int64_t n = nb; n < ne; ++n)
          for (size_t i = 0; i < tasks.size(); ++i)
            fold_image<scalar_t, acc_t>(gip, gi.strides(), folds[i].const_data_ptr<acc_t>(), g,
                                        regions[tasks[i].region], tasks[i].p0, tasks[i].p1, n);
      });
    }
  });
  if (mask[1]) {
    // partials summed per region in task order, then scattered onto the region's taps
    at::Tensor gw_tap = gw.to(acc).contiguous().view({g.OC, g.Cg, g.KH * g.KW}).transpose(1, 2);
    for (size_t r = 0; r < regions.size(); ++r) {
      at::Tensor sum;
      for (size_t i = 0; i < tasks.size(); ++i)
        if (tasks[i].region == (int64_t)r) sum = sum.defined() ? sum.add_(gw_parts[i]) : gw_parts[i];
      if (!sum.defined()) continue;
      const at::Tensor part = sum.view({g.OC, regions[r].taps.n, g.Cg});
      for (int t = 0; t < regions[r].taps.n; ++t)
        gw_tap.select(1, regions[r].taps.kh[t] * g.KW + regions[r].taps.kw[t]).add_(part.select(1, t));
    }
    gw = gw_tap.transpose(1, 2).reshape(w.sizes()).to(w.scalar_type());
  }
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
