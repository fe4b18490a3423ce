// The frame design's backward on CPU: oneDNN's zero-padded backward, plus the frame's outer products (grad_weight)
// and the frame's gradient folded back onto the reflected sources it read (grad_input), over the regions of
// reflect_conv2d.h.
#include <ATen/Dispatch.h>

#include "cpu/reflect_conv2d_cpu.h"

namespace fastfuse {
namespace rconv_cpu {
namespace {

// Backward works on chunks of whole images, each covering every region: a chunk's grad_input fold then only
// touches its own images, so it runs inside the chunk and the whole backward is ONE parallel region (a
// second region for the fold costs a scheduler slice on shared cores). About kChunkRows frame rows (and at
// most about kTaskElems gathered elements) a chunk: bigger chunks make fewer, longer GEMMs (per-image
// chunks make short GEMMs at MKL's lower speed, and hundreds of at:: calls a backward).
// grad_weight partials: the chunks are split into kSlots fixed runs, each summed in chunk order by one
// thread (per region), then the runs are added in order: the bits do not depend on the thread count.
constexpr int64_t kSlots = 8;
constexpr int64_t kChunkRows = 1024;

// Chunks of the backward over these regions: an even count, evenly cut, so two threads get equal shares
// (the cut must not follow the thread count).
int64_t backward_chunks(const Geom& g, const std::vector<Region>& regions) {
  int64_t frame = 0, max_k = 0;
  for (const Region& r : regions) {
    frame += r.rows() * r.cols();
    max_k = std::max<int64_t>(max_k, r.taps.n * g.Cg);
  }
  int64_t chunks = std::max<int64_t>({1, (g.N * frame + kChunkRows - 1) / kChunkRows,
                                       (g.N * frame * max_k * g.G + kTaskElems - 1) / kTaskElems});
  chunks = std::min(g.N, chunks);
  chunks = (g.N + g.N / chunks - 1) / (g.N / chunks);  // whole images alike: 16 images in 16 or 8, not 14
  return std::min(g.N, chunks + chunks % 2);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_frame(const at::Tensor& go, const at::Tensor& x,
                                                              const at::Tensor& w, const Geom& g,
                                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                                              at::IntArrayRef dilation, int64_t groups,
                                                              std::array<bool, 3> mask) {
  const auto acc = rconv::acc_type(x.scalar_type());
  std::vector<int64_t> bias_sizes{g.OC};
  at::Tensor gi, gw, gb;
  std::tie(gi, gw, gb) =
      at::convolution_backward(go, x, w, bias_sizes, stride, padding, dilation, false, {0, 0}, groups, mask);
  if (mask[1] && gw.scalar_type() != acc) gw = gw.to(acc);  // else corrected in place, in its own layout
  if ((!mask[0] && !mask[1]) || go.numel() == 0 || x.numel() == 0) {
    if (mask[1]) gw = gw.to(w.scalar_type());
    return {gi, gw, gb};
  }
  const auto regions = rconv::plan(g);
  const auto cols = region_columns(w, g, regions);
  int64_t max_img = 0, max_k = 0;  // per image: largest region, widest region
  for (const Region& r : regions) {
    max_img = std::max(max_img, r.rows() * r.cols());
    max_k = std::max<int64_t>(max_k, r.taps.n * g.Cg);
  }
  const int64_t chunks = backward_chunks(g, regions);
  const int64_t per = (g.N + chunks - 1) / chunks;  // most images in one chunk
  const int64_t slots = std::min(kSlots, chunks);
  std::vector<std::vector<at::Tensor>> gw_parts(slots, std::vector<at::Tensor>(regions.size()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "reflect_conv2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    scalar_t* gip = mask[0] ? gi.mutable_data_ptr<scalar_t>() : nullptr;
    struct Scratch {
      at::Tensor A, B, G;
    };
    for_each_task(
        slots,
        [&] {
          return Scratch{mask[1] ? empty_cached({g.G * per * max_img * max_k}, acc) : at::Tensor(),
                         mask[0] ? empty_cached({g.G * per * max_img * max_k}, acc) : at::Tensor(),
                         empty_cached({per * max_img * g.OC}, acc)};
        },
        [&](Scratch& sc, int64_t s) {
          for (int64_t c = s * chunks / slots; c < (s + 1) * chunks / slots; ++c) {
            const int64_t n0 = c * g.N / chunks, n1 = (c + 1) * g.N / chunks;
            for (size_t r = 0; r < regions.size(); ++r) {
              const Region& reg = regions[r];
              const int64_t img = reg.rows() * reg.cols(), p0 = n0 * img, p1 = n1 * img, rows = p1 - p0;
              const int64_t K = reg.taps.n * g.Cg;
              if (rows == 0) continue;
              at::Tensor Gr = scratch(sc.G, g.G, rows, g.OCg);
              gather_grad<scalar_t, acc_t>(gp, go.strides(), Gr.mutable_data_ptr<acc_t>(), g, reg, p0, p1);
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
      // cores every one of them waits a scheduler slice.
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

}  // namespace rconv_cpu
}  // namespace fastfuse
