// Design (a) for NCHW input on CPU: the reflected im2col as columns, B[(c, kh, kw), pixel], so that
// out[n] [OC, OH*OW] = W [OC, Cg*KH*KW] x B: the weight is read in its own layout (no tap-major copy), the output
// is written in place, and the gather reads runs along an input row instead of one strided element per channel.
// The pixel-rows im2col of reflect_conv2d_gemm.cpp gathers with strided reads in NCHW, and its weight copy is a
// fixed cost that small batches feel most.
#include <ATen/Dispatch.h>

#include "cpu/reflect_conv2d_cpu.h"

namespace fastfuse {
namespace rconv_cpu {
namespace {

struct ColumnTask {
  int64_t n0, n1, p0, p1;  // output pixels [p0, p1) (row-major over OH x OW) of images [n0, n1)
  int64_t rows() const { return (n1 - n0) * (p1 - p0); }
};

// About kTaskRows pixels per task, and at most kTaskElems gathered elements: whole images where they are smaller
// (a GEMM as wide as one 7x7 image ran at a fraction of MKL's speed), even pieces of one image where they are
// larger; two tasks at least (one would leave the second thread idle). A function of the shape only, so the GEMMs'
// shapes, and with them the bits, never depend on the thread count.
std::vector<ColumnTask> column_tasks(const Geom& g) {
  const int64_t P = g.OH * g.OW, K = g.Cg * g.KH * g.KW;
  const int64_t max_px = std::max<int64_t>(1, std::min(kTaskRows, kTaskElems / K));
  std::vector<ColumnTask> tasks;
  if (P <= max_px && g.N > 1) {
    int64_t ntask = (g.N + max_px / P - 1) / (max_px / P);
    ntask = std::max<int64_t>(ntask, 2);
    for (int64_t k = 0; k < ntask; ++k) tasks.push_back({k * g.N / ntask, (k + 1) * g.N / ntask, 0, P});
    return tasks;
  }
  int64_t pieces = (P + max_px - 1) / max_px;
  if (g.N * pieces < 2) pieces = std::min<int64_t>(2, P);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t k = 0; k < pieces; ++k) tasks.push_back({n, n + 1, k * P / pieces, (k + 1) * P / pieces});
  return tasks;
}

// B[(c*KH + kh)*KW + kw, p - p0] = x[n, gi*Cg + c, reflect(r*sh - ph + kh*dh), reflect(q*sw - pw + kw*dw)] for the
// task's pixels p = r*OW + q; ix[kw*OW + q] is the reflected input column of output column q.
template <typename scalar_t, typename acc_t>
void gather_columns(const scalar_t* xp, at::IntArrayRef st, acc_t* B, const Geom& g, int64_t gi,
                    const ColumnTask& tk, const std::vector<int64_t>& ix) {
  const int64_t rows = tk.rows(), span = tk.p1 - tk.p0;
  for (int64_t c = 0; c < g.Cg; ++c)
    for (int64_t kh = 0; kh < g.KH; ++kh)
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t* cols = ix.data() + kw * g.OW;
        for (int64_t n = tk.n0; n < tk.n1; ++n) {
          const scalar_t* xc = xp + n * st[0] + (gi * g.Cg + c) * st[1];
          acc_t* __restrict__ dst = B + ((c * g.KH + kh) * g.KW + kw) * rows + (n - tk.n0) * span;
          for (int64_t p = tk.p0; p < tk.p1;) {  // one output row's share at a time
            const int64_t r = p / g.OW, q0 = p % g.OW, q1 = std::min(g.OW, q0 + tk.p1 - p);
            const scalar_t* src = xc + reflect(r * g.sh - g.ph + kh * g.dh, g.H) * st[2];
            acc_t* __restrict__ d = dst + (p - tk.p0) - q0;
            for (int64_t q = q0; q < q1; ++q) d[q] = static_cast<acc_t>(src[cols[q] * st[3]]);
            p += q1 - q0;
          }
        }
      }
}

}  // namespace

bool columns_apply(const at::Tensor& x, const at::Tensor& w) {
  return rconv::conv_format(x, w) == at::MemoryFormat::Contiguous && x.is_contiguous() && w.is_contiguous();
}

int64_t columns_task_count(const Geom& g) { return (int64_t)column_tasks(g).size(); }

// out (NCHW, filled with the bias or zeros) += W x B per task, group by group.
void add_columns(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, const Geom& g) {
  const auto acc = rconv::acc_type(x.scalar_type());
  const int64_t P = g.OH * g.OW, K = g.Cg * g.KH * g.KW;
  const auto tasks = column_tasks(g);
  int64_t max_rows = 0;
  bool one_image = true;  // every task one image's pixels: the GEMMs write the output in place
  for (const ColumnTask& t : tasks) max_rows = std::max(max_rows, t.rows()), one_image &= t.n1 - t.n0 == 1;
  const at::Tensor wk = w.to(acc).reshape({g.G, g.OCg, K});  // a view for fp32 / fp64
  const bool in_place = one_image && out.scalar_type() == acc;  // else through a result buffer
  std::vector<int64_t> ix(g.KW * g.OW);
  for (int64_t kw = 0; kw < g.KW; ++kw)
    for (int64_t q = 0; q < g.OW; ++q) ix[kw * g.OW + q] = reflect(q * g.sw - g.pw + kw * g.dw, g.W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "reflect_conv2d_columns_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    struct Scratch {
      at::Tensor B, C;
    };
    for_each_task(
        (int64_t)tasks.size(),
        [&] {
          return Scratch{empty_cached({K * max_rows}, acc),
                         in_place ? at::Tensor() : empty_cached({g.OCg * max_rows}, acc)};
        },
        [&](Scratch& sc, int64_t i) {
          const ColumnTask& tk = tasks[i];
          const int64_t rows = tk.rows(), span = tk.p1 - tk.p0;
          const at::Tensor B = sc.B.narrow(0, 0, K * rows).view({K, rows});
          for (int64_t gi = 0; gi < g.G; ++gi) {
            gather_columns<scalar_t, acc_t>(xp, x.strides(), B.mutable_data_ptr<acc_t>(), g, gi, tk, ix);
            const auto image_out = [&](int64_t n) {  // [OCg, span] of image n, group gi
              return out.select(0, n).narrow(0, gi * g.OCg, g.OCg).view({g.OCg, P}).narrow(1, tk.p0, span);
            };
            if (in_place) {
              image_out(tk.n0).addmm_(wk.select(0, gi), B);
              continue;
            }
            at::Tensor res = sc.C.narrow(0, 0, g.OCg * rows).view({g.OCg, rows});
            at::mm_out(res, wk.select(0, gi), B);
            for (int64_t n = tk.n0; n < tk.n1; ++n) image_out(n).add_(res.narrow(1, (n - tk.n0) * span, span));
          }
        });
  });
}

}  // namespace rconv_cpu
}  // namespace fastfuse
