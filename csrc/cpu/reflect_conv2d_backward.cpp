// Backward on CPU: the pick per shape, and designs (a) and (b) (reflect_conv2d.h): (b) is oneDNN's zero-padded
// backward plus the frame's outer products (grad_weight) and the frame's gradient folded back onto its reflected
// sources (grad_input); (a) is the same over the whole output with every tap, from zeros. (c) and "fold" have their
// own (reflect_conv2d_split_backward.cpp).
#include <ATen/Dispatch.h>

#include "cpu/reflect_conv2d_cpu.h"
#include "cpu/relayout.h"

namespace fastfuse {
namespace rconv_cpu {
namespace {

// Backward works on chunks of whole images, each covering every region: a chunk's grad_input fold then only
// touches its own images, so it runs inside the chunk and the whole backward is ONE parallel region (a
// second region for the fold cost a scheduler slice on shared cores). About kChunkRows frame rows (and at
// most about kTaskElems gathered elements) a chunk: bigger chunks make fewer, longer GEMMs (per-image
// chunks made 54-row GEMMs at 56x56, at half MKL's speed, and ~250 at:: calls a backward).
// grad_weight partials: the chunks are split into kSlots fixed runs, each summed in chunk order by one
// thread (per region), then the runs are added in order: the bits do not depend on the thread count.
constexpr int64_t kSlots = 8;
constexpr int64_t kChunkRows = 1024;

// Chunks of the backward of (a) or (b) over these regions: an even count, evenly cut, so two threads get equal shares
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

// algo 0: rconv::pick_gemm's choice between (a) and (b), except on AVX-512 CPUs (rconv::cpu_avx512;
// measured on 2 cores of an Emerald Rapids Xeon VM, ResNet-34's channels_last shapes at batch 16, the whole backward
// against oneDNN's zero-padded one): there oneDNN's backward runs near the cores' peak and the designs that repeat the
// reflected taps ((a): 10% more multiply-adds at 14x14, 22% at 7x7; (b): its correction on top) lose to the folded
// ones, which have the zero-padded convolution's in-bounds multiply-adds and no more. Past the 7% correction share that
// keeps (b) (28x28 and 56x56), (c) up to 12% (14x14: 1.15-1.25x against (a)'s 1.39-1.47x and (b)'s 1.33-1.50x, four
// runs) and "fold" beyond (7x7, where the block is half the output: 1.01-1.19x against (a)'s 1.14-1.46x and (c)'s
// 1.30-1.42x). Stride 2 kept the old picks ((c) and "fold" measured 1.02-1.38x there, against 0.93-1.15x) until
// fold's grad_weight became one GEMM over the whole batch (reflect_conv2d_split_backward.cpp): at outputs of up to 8x8
// oneDNN's backward is far from the cores' peak and "fold" is picked at any stride (stride 2, 14x14 input, 256
// channels: 0.69-0.74x of the zero-padded backward against (a)'s 0.78-0.86x; at 28x28 the two tie at 1.07-1.11x).
int pick_backward(const Geom& g, int64_t algo, bool channels_last) {
  if (algo == kDirect) algo = 0;  // backward_cpu takes direct's gradients where they apply; elsewhere as auto
  if (algo != 0) return algo == kSplit || algo == kFold ? int(algo) : (algo == kGemm ? kGemm : kFrame);
  if (rconv::cpu_avx512() && g.dh == 1 && g.dw == 1 && g.Cg * g.KH * g.KW >= 256 &&
      !rconv::small_conv(g, channels_last, true) && chunks_fill_threads(g.N)) {
    if (g.OH * g.OW <= 64) return kFold;
    // other strides: the 8x8 rule above, else (a) or (b) below
    const double share = g.sh == 1 && g.sw == 1 ? rconv::correction_share(g) : 0.0;
    if (share > 0.12) return kFold;
    // NCHW with short rows keeps (b): at 16x16 (8.3%) with 32 and 64 channels (K = 288, 576) (b)'s backward took
    // 1.34-1.63x oneDNN's zero-padded one against (c)'s 1.42-1.79x (five runs at 64 channels, three at 32); 128
    // channels tied, 256 at 14x14 went (c)'s way.
    if (share > rconv::kAvx512FrameShare && (channels_last || g.Cg * g.KH * g.KW >= 1152)) return kSplit;
  }
  if (!rconv::pick_gemm(g, algo, true, true, channels_last)) return kFrame;
  // (a) runs as at most kSlots tasks: with more threads than that, (b) (tasks_fill_threads)
  return tasks_fill_threads([&] { return std::min(kSlots, backward_chunks(g, {rconv::whole(g)})); }) ? kGemm : kFrame;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& go, const at::Tensor& x,
                                                            const at::Tensor& w, at::IntArrayRef stride,
                                                            at::IntArrayRef padding, at::IntArrayRef dilation,
                                                            int64_t groups, std::array<bool, 3> mask, int64_t algo) {
  const Geom g = rconv::geometry(x, w, stride, padding, dilation, groups);
  // Both gradients by the direct design where it applies and, automatically, where the frame holds 3-12% of the
  // work at stride 1 or 2 over 8x8 outputs (ResNet's 28x28 and 14x14, stride-2 28x28). Against oneDNN's
  // zero-padded backward on the Xeon (batch 16, channels_last): grad_input (session 24) 1.02x at 28x28 and 1.07x at
  // 14x14 against the picked designs' 1.11x and 1.13x, but 1.11x against 1.08x at 56x56 and 1.26x against 1.03x at
  // 7x7; at stride 2 (session 25) 0.94x at 28x28 against 1.10-1.17x. grad_weight (reflect_conv2d_direct_wgrad.cpp,
  // session 25) 1.03x at 28x28 and at 14x14 and 0.86-0.99x at stride-2 28x28, against the old picks' 1.12x, 1.10x
  // and 0.99-1.02x; at outputs of up to 8x8 "fold" stays (0.72-0.83x). At 56x56 (2.4%) each gradient alone tied
  // with (b)'s, but the whole forward+backward, timed interleaved in one process against auto's (b), took 0.96-0.98x
  // the zero-padded conv's against 1.06-1.11x (three runs, batch 16), 0.86x against 1.03x at batch 4, and with
  // grad_weight summed in bands of rows, 1.005x against 1.10x at 112x112 (batch 4) and 0.80x against 1.05x with 32
  // channels at 56x56; stride-2 56x56 1.00-1.01x against 1.06x (two runs).
  // Below 3% from 32 channels (56x56 at either stride, 112x112); and only with input channels in whole 16-lane
  // vectors: direct grad_weight reads a partial tile with a masked load, on which GCC spills its accumulators (3 and
  // 40 channels at 28x28: the backward took 2.97x and 1.35x the zero-padded one against (b)'s 1.44x and 1.14x; 16
  // channels 1.05x against 1.51x).
  const bool cl = rconv::conv_format(x, w) == at::MemoryFormat::ChannelsLast;
  const bool pick = algo == 0 && g.Cg % 16 == 0 && direct_share_band(g, !cl || (g.Cg >= 32 && g.OCg >= 32));
  if ((mask[0] || mask[1]) && (algo == kDirect || pick) && direct_grads_apply(g, go, x, w)) {
    // NCHW tensors relayout to channels_last, each once (views where they are; grad_input is written in its layout)
    const at::Tensor go_cl = relayout(go, at::MemoryFormat::ChannelsLast);
    const at::Tensor x_cl = relayout(x, at::MemoryFormat::ChannelsLast);
    const at::Tensor gi = mask[0] ? dgrad_direct(go_cl, x_cl, w, g, cl ? at::MemoryFormat::ChannelsLast
                                                                       : at::MemoryFormat::Contiguous)
                                  : at::Tensor();
    const at::Tensor gw = mask[1] ? wgrad_direct(go_cl, x_cl, w, g) : at::Tensor();
    at::Tensor gb;  // the bias's gradient from the automatic pick
    if (mask[2]) std::tie(std::ignore, std::ignore, gb) =
        backward_cpu(go, x, w, stride, padding, dilation, groups, {false, false, true}, 0);
    return {gi, gw, gb};
  }
  const int design = pick_backward(g, algo, rconv::conv_format(x, w) == at::MemoryFormat::ChannelsLast);
  if (design == kSplit || design == kFold) return backward_split(go, x, w, g, stride, dilation, mask, design == kSplit);
  const bool gemm = design == kGemm;
  const auto acc = rconv::acc_type(x.scalar_type());
  at::Tensor gi, gw, gb;
  if (gemm) {
    if (mask[2]) gb = go.sum({0, 2, 3}, false, acc).to(go.scalar_type());
    if (mask[0]) gi = empty_cached_4d(x.sizes(), x.scalar_type(), rconv::conv_format(x, w)).zero_();
    if (mask[1]) gw = empty_cached({g.OC, g.Cg, g.KH, g.KW}, acc).zero_();
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
  int64_t max_img = 0, max_k = 0;  // per image: largest region, widest region
  for (const Region& r : regions) {
    max_img = std::max(max_img, r.rows() * r.cols());
    max_k = std::max<int64_t>(max_k, r.taps.n * g.Cg);
  }
  const int64_t chunks = backward_chunks(g, regions);
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
    for_each_task(
        slots,
        [&] {
          return Scratch{mask[1] ? empty_cached({g.G * per * max_img * max_k}, acc) : at::Tensor(),
                         mask[0] ? empty_cached({g.G * per * max_img * max_k}, acc) : at::Tensor(),
                         direct ? at::Tensor() : empty_cached({per * max_img * g.OC}, acc)};
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
