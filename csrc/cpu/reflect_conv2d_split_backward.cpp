// Design (c)'s backward on CPU ("split"; without the block, "fold"): the vendor's backward of the convolution
// without padding on the block, and the folded-tap GEMMs on the frame (reflect_conv2d_split.h). Like (c)'s
// forward it has exactly the zero-padded convolution's in-bounds multiply-adds, where (a) adds the reflected
// taps (10% more at 14x14) and (b) adds them again as a correction on top of oneDNN's zero-padded backward.
// grad_weight of a folded class goes to every tap of the class; grad_input of a class goes to its one source
// pixel.
//
// oneDNN's backward runs on the whole batch first, with its own threads: inside our parallel region (nested,
// single-threaded) its weight gradient deadlocked at 2 threads, waiting on a barrier for a second thread that never
// came. Then one parallel region of tasks of kConvImages whole images (a function of the shape only) adds the
// frame's grad_input (each task owns its images) and grad_weight partials, summed in task order afterwards.
#include <ATen/Dispatch.h>

#include "cpu/reflect_conv2d_split.h"

namespace fastfuse {
namespace rconv_cpu {
namespace {

// acc[oc, kh*KW + kw, :] += part[oc, t*Cg : (t+1)*Cg] for every tap (kh, kw) of the region tap t's folded class
// (acc tap-major [OC, KH*KW, Cg], part [OC, T*Cg], both contiguous).
template <typename acc_t>
void unfold_add(acc_t* acc, const acc_t* part, const Geom& g, const std::vector<std::pair<uint64_t, uint64_t>>& fold) {
  const int64_t K = (int64_t)fold.size() * g.Cg, KK = g.KH * g.KW;
  for (int64_t oc = 0; oc < g.OC; ++oc)
    for (size_t t = 0; t < fold.size(); ++t)
      for (int kh = 0; kh < g.KH; ++kh)
        for (int kw = 0; kw < g.KW; ++kw) {
          if (!(fold[t].first >> kh & 1) || !(fold[t].second >> kw & 1)) continue;
          const acc_t* __restrict__ src = part + oc * K + t * g.Cg;
          acc_t* __restrict__ dst = acc + (oc * KK + kh * g.KW + kw) * g.Cg;
          for (int64_t cg = 0; cg < g.Cg; ++cg) dst[cg] += src[cg];
        }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_split(const at::Tensor& go, const at::Tensor& x,
                                                              const at::Tensor& w, const Geom& g,
                                                              at::IntArrayRef stride, at::IntArrayRef dilation,
                                                              std::array<bool, 3> mask, bool use_block) {
  const SplitPlan sp = split_plan(g, use_block);
  const auto acc = rconv::acc_type(x.scalar_type());
  at::Tensor gi, gw, gb;
  if (mask[2]) gb = go.sum({0, 2, 3}, false, acc).to(go.scalar_type());
  if (!mask[0] && !mask[1]) return {gi, gw, gb};
  const auto fmt = rconv::conv_format(x, w);
  // the block's backward writes grad_input from (ri, ci) on; the rest starts at zero
  const bool whole = sp.has_block() && sp.ri == 0 && sp.ci == 0;
  if (mask[0] && !whole) gi = at::zeros_like(x, x.options().memory_format(fmt));
  const int64_t chunks = (g.N + kConvImages - 1) / kConvImages;
  std::vector<at::Tensor> gw_parts(chunks);  // per task: the frame's, tap-major in the accumulation dtype
  if (go.numel() == 0 || x.numel() == 0) {
    if (mask[0] && !gi.defined()) gi = at::zeros_like(x, x.options().memory_format(fmt));
    if (mask[1]) gw = at::zeros_like(w);
    return {gi, gw, gb};
  }
  if (sp.has_block()) {  // the block: oneDNN's backward without padding, from (ri, ci) on in x
    auto [gi_b, gw_b, gb_b] = at::convolution_backward(
        go.slice(2, sp.r0, sp.r1).slice(3, sp.c0, sp.c1), x.narrow(2, sp.ri, g.H - sp.ri).narrow(3, sp.ci, g.W - sp.ci),
        w, c10::nullopt, stride, {0, 0}, dilation, false, {0, 0}, g.G, {mask[0], mask[1], false});
    if (mask[0]) {
      if (whole)
        gi = gi_b;
      else
        gi.narrow(2, sp.ri, g.H - sp.ri).narrow(3, sp.ci, g.W - sp.ci).copy_(gi_b);
    }
    if (mask[1]) gw = gw_b.scalar_type() == acc ? gw_b : gw_b.to(acc);
  }
  const auto groups = tap_groups(sp);
  int64_t rows_max = 0, k_max = 0;  // per-thread scratch: one group's rows for one task's images
  for (const auto& grp : groups) {
    int64_t rows = 0;
    for (int r : grp) rows += sp.regions[r].rows() * sp.regions[r].cols();
    rows_max = std::max(rows_max, rows * ((g.N + chunks - 1) / chunks));
    k_max = std::max<int64_t>(k_max, sp.regions[grp[0]].taps.n * g.Cg);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "reflect_conv2d_split_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SplitWeights sw = mask[0] ? split_weights<acc_t>(w, g, sp) : SplitWeights{};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gop = go.const_data_ptr<scalar_t>();
    scalar_t* gip = mask[0] ? gi.mutable_data_ptr<scalar_t>() : nullptr;
    struct Scratch {
      at::Tensor A, G;
    };
    for_each_task(
        chunks,
        [&] { return Scratch{empty_cached({g.G * rows_max * k_max}, acc), empty_cached({rows_max * g.OC}, acc)}; },
        [&](Scratch& sc, int64_t c) {
          const int64_t n0 = c * g.N / chunks, n1 = (c + 1) * g.N / chunks, n = n1 - n0;
          if (mask[1]) gw_parts[c] = empty_cached({g.OC, g.KH * g.KW, g.Cg}, acc).zero_();  // tap-major
          for (size_t q = 0; q < groups.size(); ++q) {
            const auto& grp = groups[q];
            const int64_t K = sp.regions[grp[0]].taps.n * g.Cg;
            int64_t rows = 0;
            for (int r : grp) rows += n * sp.regions[r].rows() * sp.regions[r].cols();
            // this task's rows of each region of the group, one region after the other
            auto pieces = [&](const auto& fn) {
              int64_t row = 0;
              for (int r : grp) {
                const Region& reg = sp.regions[r];
                const int64_t img = reg.rows() * reg.cols();
                fn(reg, n0 * img, n1 * img, row);
                row += n * img;
              }
            };
            at::Tensor Gr = scratch(sc.G, g.G, rows, g.OCg);
            acc_t* gr_ptr = Gr.mutable_data_ptr<acc_t>();
            pieces([&](const Region& reg, int64_t p0, int64_t p1, int64_t row) {
              gather_grad<scalar_t, acc_t>(gop, go.strides(), gr_ptr + row * g.OCg, g, reg, p0, p1, rows);
            });
            at::Tensor A = scratch(sc.A, g.G, rows, K);
            acc_t* ap = A.mutable_data_ptr<acc_t>();
            if (mask[1]) {
              pieces([&](const Region& reg, int64_t p0, int64_t p1, int64_t row) {
                gather_x<scalar_t, acc_t>(xp, x.strides(), ap + row * K, g, reg, p0, p1, rows);
              });
              const at::Tensor part = at::bmm(Gr.transpose(1, 2), A);  // [G, OCg, K]
              unfold_add<acc_t>(gw_parts[c].mutable_data_ptr<acc_t>(), part.const_data_ptr<acc_t>(), g,
                                sp.folds[grp[0]]);
            }
            if (mask[0]) {  // A becomes the gradient of the gathered reads
              for (const WeightRun& run : sw.runs[grp[0]]) {
                at::Tensor a = A.narrow(2, run.t0 * g.Cg, run.nt * g.Cg);
                at::bmm_out(a, Gr, run_weight(sw, g, run));
              }
              pieces([&](const Region& reg, int64_t p0, int64_t p1, int64_t row) {
                for (int64_t i = n0; i < n1; ++i)
                  fold_image<scalar_t, acc_t>(gip, gi.strides(), ap + row * K, g, reg, p0, p1, i, rows);
              });
            }
          }
        });
  });
  if (mask[1]) {  // the block's, then the tasks' in task order: fixed bits
    if (!gw.defined())
      gw = at::zeros({g.OC, g.Cg, g.KH, g.KW}, w.options().dtype(acc).memory_format(at::MemoryFormat::ChannelsLast));
    for (int64_t c = 0; c < chunks; ++c) gw.add_(gw_parts[c].view({g.OC, g.KH, g.KW, g.Cg}).permute({0, 3, 1, 2}));
    gw = gw.to(w.scalar_type());
  }
  return {gi, gw, gb};
}

}  // namespace rconv_cpu
}  // namespace fastfuse
