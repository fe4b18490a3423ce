// Design (c)'s backward on CPU ("split"; without the block, "fold"): the vendor's backward of the convolution
// without padding on the block, and the folded-tap GEMMs on the frame (reflect_conv2d_split.h). Like (c)'s
// forward it has exactly the zero-padded convolution's in-bounds multiply-adds, where (a) adds the reflected
// taps (10% more at 14x14) and (b) adds them again as a correction on top of oneDNN's zero-padded backward.
// grad_weight of a folded class goes to every tap of the class; grad_input of a class goes to its one source
// pixel.
//
// oneDNN's backward runs on the whole batch first, with its own threads: inside our parallel region (nested,
// single-threaded) its weight gradient deadlocked at 2 threads, waiting on a barrier for a second thread that never
// came. Then one parallel region of tasks of kConvImages whole images (a function of the shape only) gathers the
// frame's rows and adds its grad_input (each task owns its images), and a second one of slices of the output
// channels computes the frame's grad_weight over the whole batch (each task owns its slice; big batches run in
// blocks of images, block_images).
#include <ATen/Dispatch.h>

#include <cstdlib>

#include "cpu/reflect_conv2d_split.h"

namespace fastfuse {
namespace rconv_cpu {
namespace {

// acc[o, kh*KW + kw, :] += part[o, t*Cg : (t+1)*Cg] for every tap (kh, kw) of the region tap t's folded class,
// for `rows` output channels o (acc tap-major [rows, KH*KW, Cg], part [rows, T*Cg], both contiguous).
template <typename acc_t>
void unfold_add(acc_t* acc, const acc_t* part, int64_t rows, const Geom& g,
                const std::vector<std::pair<uint64_t, uint64_t>>& fold) {
  const int64_t K = (int64_t)fold.size() * g.Cg, KK = g.KH * g.KW;
  for (int64_t oc = 0; oc < rows; ++oc)
    for (size_t t = 0; t < fold.size(); ++t)
      for (int kh = 0; kh < g.KH; ++kh)
        for (int kw = 0; kw < g.KW; ++kw) {
          if (!(fold[t].first >> kh & 1) || !(fold[t].second >> kw & 1)) continue;
          const acc_t* __restrict__ src = part + oc * K + t * g.Cg;
          acc_t* __restrict__ dst = acc + (oc * KK + kh * g.KW + kw) * g.Cg;
          for (int64_t cg = 0; cg < g.Cg; ++cg) dst[cg] += src[cg];
        }
}

// grad_weight's tasks: output channels [oc0, oc1) of groups [g0, g1), over the whole batch. One group: slices of
// the output channels, about 4 of them (16 channels at least); several: runs of whole groups. Each task owns its
// rows of grad_weight, so nothing is summed across tasks, and the slices depend on the shape only. Every task
// reads the whole gathered x (29 MB at 14x14 with 256 channels): 8 slices measured 1.32x oneDNN's zero-padded
// weight gradient there against 1.13-1.16x for 4 (2 slices: 1.05-1.14x, but 0.74-0.76x at 7x7 against 0.48-0.55x).
// Slices of the input channels instead, which read it once in all, measured slower (7x7: 0.59-0.62x).
struct WeightTask {
  int64_t g0, g1, oc0, oc1;
};
std::vector<WeightTask> weight_tasks(const Geom& g) {
  std::vector<WeightTask> tasks;
  if (g.G == 1) {
    const int64_t step = std::max<int64_t>(16, (g.OC / 4 + 15) / 16 * 16);
    for (int64_t oc = 0; oc < g.OC; oc += step) tasks.push_back({0, 1, oc, std::min(g.OC, oc + step)});
  } else {
    const int64_t step = std::max<int64_t>(1, 64 / g.OCg);
    for (int64_t gi = 0; gi < g.G; gi += step) tasks.push_back({gi, std::min(g.G, gi + step), 0, g.OCg});
  }
  return tasks;
}

// Images per block of the backward when grad_weight is wanted: the whole batch's gathered rows (x and grad_output,
// per_image bytes an image) would grow with the batch (at 7x7 with 512 channels, 0.9 MB an image: ~1 GB at batch
// 1024), so a bigger batch runs in blocks of whole tasks of at most kWeightBlockBytes, each adding its grad_weight
// on. The blocks depend on the shape only. FASTFUSE_REFLECT_CONV2D_BLOCK_BYTES overrides the bound (the tests make
// small shapes take several blocks).
constexpr int64_t kWeightBlockBytes = int64_t(64) << 20;
int64_t block_images(const Geom& g, int64_t per_image) {
  const char* env = std::getenv("FASTFUSE_REFLECT_CONV2D_BLOCK_BYTES");
  const int64_t cap = env ? std::max<int64_t>(1, std::atoll(env)) : kWeightBlockBytes;
  const int64_t n = cap / std::max<int64_t>(1, per_image) / kConvImages * kConvImages;
  return std::min(g.N, std::max(kConvImages, n));
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
  if (mask[0] && !whole) gi = empty_cached_4d(x.sizes(), x.scalar_type(), fmt).zero_();
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
  // per group: GEMM rows of one image (its regions' pixels) and the gathered row's width (its taps' channels)
  std::vector<int64_t> img_rows(groups.size(), 0), group_k(groups.size());
  int64_t rows_max = 0, k_max = 0, per_image = 0;  // per-thread scratch: one group's rows for one task's images
  for (size_t q = 0; q < groups.size(); ++q) {
    for (int r : groups[q]) img_rows[q] += sp.regions[r].rows() * sp.regions[r].cols();
    group_k[q] = sp.regions[groups[q][0]].taps.n * g.Cg;
    rows_max = std::max(rows_max, img_rows[q] * std::min(kConvImages, g.N));  // a task has at most kConvImages
    k_max = std::max(k_max, group_k[q]);
    per_image += img_rows[q] * g.G * (group_k[q] + g.OCg) * c10::elementSize(acc);
  }
  // grad_weight takes a block's rows in one GEMM per group (task c's rows start at image n0's), kept from the
  // gathers of the first parallel region: per-task partials of [OC, T*Cg] (K = a task's pixels, 80 rows at 7x7)
  // were written, unfolded, zeroed and summed at a cost near the GEMMs' own.
  const int64_t block = mask[1] ? block_images(g, per_image) : g.N;
  std::vector<at::Tensor> gr_all(groups.size()), a_all(groups.size());
  const at::Tensor gw_tap = mask[1] ? empty_cached({g.OC, g.KH * g.KW, g.Cg}, acc) : at::Tensor();
  const auto wtasks = mask[1] ? weight_tasks(g) : std::vector<WeightTask>{};
  int64_t part_max = 0;
  for (const WeightTask& t : wtasks) part_max = std::max(part_max, (t.g1 - t.g0) * (t.oc1 - t.oc0) * k_max);
  if (mask[1])
    for (size_t q = 0; q < groups.size(); ++q) {
      gr_all[q] = empty_cached({g.G, block * img_rows[q], g.OCg}, acc);
      a_all[q] = empty_cached({g.G, block * img_rows[q], group_k[q]}, acc);
    }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "reflect_conv2d_split_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SplitWeights sw = mask[0] ? split_weights<acc_t>(w, g, sp) : SplitWeights{};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gop = go.const_data_ptr<scalar_t>();
    scalar_t* gip = mask[0] ? gi.mutable_data_ptr<scalar_t>() : nullptr;
    struct Scratch {
      at::Tensor B, G;
    };
    for (int64_t b0 = 0; b0 < g.N; b0 += block) {
      const int64_t nb = std::min(block, g.N - b0), bchunks = (nb + kConvImages - 1) / kConvImages;
      for_each_task(
          bchunks,
          [&] {
            return Scratch{mask[0] ? empty_cached({g.G * rows_max * k_max}, acc) : at::Tensor(),
                           mask[1] ? at::Tensor() : empty_cached({rows_max * g.OC}, acc)};
          },
          [&](Scratch& sc, int64_t c) {
            const int64_t n0 = b0 + c * nb / bchunks, n1 = b0 + (c + 1) * nb / bchunks, n = n1 - n0;
            for (size_t q = 0; q < groups.size(); ++q) {
              const auto& grp = groups[q];
              const int64_t K = group_k[q], rows = n * img_rows[q];
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
              // grad_output's rows: in the block's buffer (grad_weight) or in scratch
              const at::Tensor Gr =
                  mask[1] ? gr_all[q].narrow(1, (n0 - b0) * img_rows[q], rows) : scratch(sc.G, g.G, rows, g.OCg);
              acc_t* gr_ptr = Gr.mutable_data_ptr<acc_t>();
              const int64_t gr_rows = Gr.stride(0) / g.OCg;
              pieces([&](const Region& reg, int64_t p0, int64_t p1, int64_t row) {
                gather_grad<scalar_t, acc_t>(gop, go.strides(), gr_ptr + row * g.OCg, g, reg, p0, p1, gr_rows);
              });
              if (mask[1]) {
                acc_t* ap = a_all[q].narrow(1, (n0 - b0) * img_rows[q], rows).mutable_data_ptr<acc_t>();
                const int64_t a_rows = a_all[q].size(1);
                pieces([&](const Region& reg, int64_t p0, int64_t p1, int64_t row) {
                  gather_x<scalar_t, acc_t>(xp, x.strides(), ap + row * K, g, reg, p0, p1, a_rows);
                });
              }
              if (mask[0]) {  // B: the gradient of the gathered reads, folded back onto their sources
                at::Tensor B = scratch(sc.B, g.G, rows, K);
                for (const WeightRun& run : sw.runs[grp[0]]) {
                  at::Tensor b = B.narrow(2, run.t0 * g.Cg, run.nt * g.Cg);
                  at::bmm_out(b, Gr, run_weight(sw, g, run));
                }
                const acc_t* bp = B.const_data_ptr<acc_t>();
                pieces([&](const Region& reg, int64_t p0, int64_t p1, int64_t row) {
                  for (int64_t i = n0; i < n1; ++i)
                    fold_image<scalar_t, acc_t>(gip, gi.strides(), bp + row * K, g, reg, p0, p1, i, rows);
                });
              }
            }
          });
      if (!mask[1]) continue;
      // the frame's grad_weight, tap-major [OC, KH*KW, Cg]: per task, one GEMM per group over the block, unfolded
      // onto the taps in group order, blocks in order
      acc_t* gwp = gw_tap.mutable_data_ptr<acc_t>();
      for_each_task(
          (int64_t)wtasks.size(), [&] { return empty_cached({part_max}, acc); },
          [&](at::Tensor& part_buf, int64_t i) {
            const WeightTask& t = wtasks[i];
            const int64_t gs = t.g1 - t.g0, ocs = t.oc1 - t.oc0;
            // the task's rows of gw_tap are contiguous: one group's slice, or whole groups
            acc_t* dst = gwp + (t.g0 * g.OCg + t.oc0) * g.KH * g.KW * g.Cg;
            if (b0 == 0) std::fill(dst, dst + gs * ocs * g.KH * g.KW * g.Cg, acc_t(0));
            for (size_t q = 0; q < groups.size(); ++q) {
              const int64_t rows = nb * img_rows[q];
              at::Tensor part = scratch(part_buf, gs, ocs, group_k[q]);
              at::bmm_out(part, gr_all[q].narrow(0, t.g0, gs).narrow(1, 0, rows).narrow(2, t.oc0, ocs).transpose(1, 2),
                          a_all[q].narrow(0, t.g0, gs).narrow(1, 0, rows));
              unfold_add<acc_t>(dst, part.const_data_ptr<acc_t>(), gs * ocs, g, sp.folds[groups[q][0]]);
            }
          });
    }
    if (!mask[1]) return;
    const at::Tensor frame = gw_tap.view({g.OC, g.KH, g.KW, g.Cg}).permute({0, 3, 1, 2});
    if (gw.defined())
      gw.add_(frame);  // the block's, then the frame's: fixed bits
    else
      gw = frame;
  });
  if (mask[1]) gw = gw.to(w.scalar_type());
  return {gi, gw, gb};
}

}  // namespace rconv_cpu
}  // namespace fastfuse
