// Backward on CPU of designs (a) and (b) (reflect_conv2d.h): (b) is oneDNN's zero-padded backward plus the
// frame's outer products (grad_weight) and the frame's gradient folded back onto its reflected sources
// (grad_input); (a) is the same over the whole output with every tap, from zeros. (c) and "fold" have (b)'s.
#include <ATen/Dispatch.h>

#include "cpu/reflect_conv2d_cpu.h"

namespace fastfuse {
namespace rconv_cpu {
namespace {

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

// Backward works on chunks of whole images, each covering every region: a chunk's grad_input fold then only
// touches its own images, so it runs inside the chunk and the whole backward is ONE parallel region (a
// second region for the fold cost a scheduler slice on shared cores). About kChunkRows frame rows (and at
// most about kTaskElems gathered elements) a chunk: bigger chunks make fewer, longer GEMMs (per-image
// chunks made 54-row GEMMs at 56x56, at half MKL's speed, and ~250 at:: calls a backward).
// grad_weight partials: the chunks are split into kSlots fixed runs, each summed in chunk order by one
// thread (per region), then the runs are added in order: the bits do not depend on the thread count.
constexpr int64_t kSlots = 8;
constexpr int64_t kChunkRows = 1024;

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& go, const at::Tensor& x,
                                                            const at::Tensor& w, at::IntArrayRef stride,
                                                            at::IntArrayRef padding, at::IntArrayRef dilation,
                                                            int64_t groups, std::array<bool, 3> mask, int64_t algo) {
  const Geom g = rconv::geometry(x, w, stride, padding, dilation, groups);
  const bool gemm = rconv::pick_gemm(g, algo, true, true, rconv::conv_format(x, w) == at::MemoryFormat::ChannelsLast);
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

}  // namespace rconv_cpu
}  // namespace fastfuse
