// The "direct" design on CPU: fp32, one group, AVX-512; reads channels_last (NCHW input through cpu/relayout.h),
// writes either layout. The vendor's convolution cannot read through the reflection, so the frame design repeats the
// reflected taps on top of the whole zero-padded convolution. Here our own micro-kernel
// (reflect_conv2d_direct_kernel.h) computes every pixel once, reading its input in place, with the taps that read
// one pixel folded into one; on the interior it runs at about oneDNN's own rate.
//
// The same machinery gives grad_input: each input pixel gathers grad_output through the reflection (the pairs (output
// pixel, tap) that read it, those of one output pixel folded), so no pixel is written twice and nothing is atomic.
#include "cpu/reflect_conv2d_direct_kernel.h"
#include "cpu/reflect_conv2d_direct_plan.h"
#include "cpu/reflect_conv2d_cpu.h"
#include "cpu/relayout.h"

namespace fastfuse {
namespace rconv_cpu {
namespace {

using namespace rconv_direct;

// One direct convolution: dst[n, r, c, :] (+ bias) = sum over a region's taps and k < K of
// src[n, tap row, tap column, k] * weight[tap][k, :]; strides in floats, src's channels contiguous, dst's channels
// contiguous (channels_last) or planes dC apart (NCHW: the kernel transposes its sums as it stores them).
struct Problem {
  const float* src;
  int64_t sN, sH, sW;
  float* dst;
  int64_t dN, dH, dW, dC;
  int64_t N, K, lanes;
  const float* bias;
};

struct Task {
  int64_t region;  // -1: every region of the images that runs inside an image; -2: every region; else one that runs
                   // across images
  int64_t n0, n1, tile0, tile1;  // images [n0, n1), tiles [tile0, tile1)
  int64_t cost;
  int64_t h0 = 0, h1 = INT64_MAX;  // the rows it computes (a band of a whole-image task's images)
};

// Tiles per line: each line's calls run for kGroup tiles in turn, the line's input still in L1 for the second (two
// halve the line's reads from L2; four gain nothing more). Tasks of one tile over the batch (weight-bound) keep one
// tile.
constexpr int kGroup = 2;

void run_direct(const Problem& pr, const std::vector<DRegion>& regions, Packed& pk) {
  int64_t image_cost = 0, all_cost = 0, image_px = 0;  // per tile and image: of its regions that run inside an
  int64_t out_rows = 0;                                 // image, of all
  for (const DRegion& reg : regions) {
    out_rows = std::max(out_rows, reg.r1);
    image_px += reg.rows() * reg.cols();
    all_cost += reg.rows() * reg.cols() * (int64_t)reg.taps.size();
    if (reg.axis != 2) image_cost += reg.rows() * reg.cols() * (int64_t)reg.taps.size();
  }
  // Where the packed weight outweighs the activations a pass over the output reads (ResNet's 7x7 stage: 9.4 MB
  // against 1.6 MB at batch 16), a task is one tile over the whole batch, its weight kept in cache, rather than
  // images that each stream every tile. Elsewhere tasks of images keep each image's input in cache instead.
  const bool weight_bound = pk.elems() > pr.N * image_px * pr.K;
  // Tasks: whole images, every region of them but those that run as lines across images (corners), which take
  // tasks of their own over even pieces of at most kMaxM images. An image's frame is computed while its input is
  // in cache: as tasks of their own over the batch, the frame would read x back from memory. Images per task: about
  // 256 pixels (14x14: one image); split further by tiles when there are fewer tasks than two per thread (a small
  // batch). No result depends on the split.
  const int64_t tiles = pk.tiles();
  std::vector<Task> tasks;
  // images of the k-th of even pieces of at most kMaxM, for lines across images: 16 images as 8 + 8, not 14 + 2
  const int64_t pieces = (pr.N + kMaxM - 1) / kMaxM;
  const auto piece = [&](int64_t k) { return std::make_pair(k * pr.N / pieces, (k + 1) * pr.N / pieces); };
  if (weight_bound && tiles >= 2 * at::get_num_threads()) {
    for (int64_t t = 0; t < tiles; ++t) tasks.push_back({-2, 0, pr.N, t, t + 1, 0});
  } else {
    if (image_cost > 0) {
      const int64_t step = std::max<int64_t>(1, 256 / std::max<int64_t>(1, image_px));
      for (int64_t n0 = 0; n0 < pr.N; n0 += step) tasks.push_back({-1, n0, std::min(pr.N, n0 + step), 0, tiles, 0});
    }
    for (int64_t i = 0; i < (int64_t)regions.size(); ++i)
      if (regions[i].axis == 2)
        for (int64_t k = 0; k < pieces; ++k) tasks.push_back({i, piece(k).first, piece(k).second, 0, tiles, 0});
    const int64_t want = 2 * at::get_num_threads();
    if (!tasks.empty() && (int64_t)tasks.size() < want && tiles > 1) {
      const int64_t split = std::min(tiles, (want + (int64_t)tasks.size() - 1) / (int64_t)tasks.size());
      std::vector<Task> more;
      for (const Task& t : tasks)
        for (int64_t k = 0; k < split; ++k)
          more.push_back({t.region, t.n0, t.n1, k * tiles / split, (k + 1) * tiles / split, 0});
      tasks.swap(more);
    }
    // and still too few (a large image, one tile: batch-1 inference), whole-image tasks by bands of rows, so that
    // every thread works. Every pixel is one kernel call's whatever the split, so no result depends on it.
    const int64_t bands = std::min(out_rows, (want + (int64_t)tasks.size() - 1) / std::max<int64_t>(1, tasks.size()));
    if (!tasks.empty() && bands > 1) {
      std::vector<Task> more;
      for (const Task& t : tasks)
        for (int64_t k = 0; k < (t.region == -1 ? bands : 1); ++k) {
          more.push_back(t);
          if (t.region == -1) more.back().h0 = k * out_rows / bands, more.back().h1 = (k + 1) * out_rows / bands;
        }
      tasks.swap(more);
    }
  }
  for (Task& t : tasks) {
    const DRegion* reg = t.region < 0 ? nullptr : &regions[t.region];
    t.cost = (t.n1 - t.n0) * (t.tile1 - t.tile0) *
             (reg ? reg->rows() * reg->cols() * (int64_t)reg->taps.size() : t.region == -1 ? image_cost : all_cost);
    if (t.h1 != INT64_MAX) t.cost = t.cost * (t.h1 - t.h0) / out_rows;
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });

  // region i of images [n0, n1), its rows in [h0, h1), for tiles tl[0..ng): each line's calls for every tile in
  // turn, its input still in L1
  const auto run_region = [&](int64_t i, const int64_t* tl, int ng, int64_t n0, int64_t n1, int64_t h0 = 0,
                              int64_t h1 = INT64_MAX) {
    const DRegion& reg = regions[i];
    const int64_t r0 = std::max(reg.r0, h0), r1 = std::min(reg.r1, h1);
    if (r0 >= r1) return;
    // Single taps (kh, kw), (kh, kw + 1), ... whose inputs lie one pixel apart, channels contiguous (channels_last,
    // dilation 1, unreflected), run as one tap over their channels in turn, as their packed weights follow on too:
    // the stem's 49 taps of 3 channels become 7 of 21. tap[m]: the first of run m, of run[m] taps.
    int tap[rconv::kMaxTaps], run[rconv::kMaxTaps], nt = 0;
    for (int t = 0; t < (int)reg.taps.size(); ++t) {
      const LineTap& u = reg.taps[t];
      if (nt > 0) {
        const LineTap& v = reg.taps[tap[nt - 1] + run[nt - 1] - 1];
        if (pr.sW == pr.K && u.single() && v.single() && u.mh == v.mh && u.mw == v.mw << 1 && u.r == v.r &&
            u.sr == v.sr && u.sc == v.sc && u.c == v.c + 1) {
          ++run[nt - 1];
          continue;
        }
      }
      tap[nt] = t, run[nt] = 1, ++nt;
    }
    TapWeight b[kGroup][rconv::kMaxTaps];
    for (int q = 0; q < ng; ++q)
      for (int m = 0; m < nt; ++m) {  // the taps of each folded class, in tap order
        const LineTap& lt = reg.taps[tap[m]];
        b[q][m].n = 0;
        b[q][m].k = run[m] * pr.K;
        for (uint64_t mh = lt.mh; mh; mh &= mh - 1)
          for (uint64_t mw = lt.mw; mw; mw &= mw - 1)
            b[q][m].p[b[q][m].n++] = pk.tap(tl[q], __builtin_ctzll(mh), __builtin_ctzll(mw));
      }
    // one line of M pixels from (n, r, c), pixel steps xs in src and os in dst, in even pieces of at most kMaxM
    const auto line = [&](int64_t n, int64_t r, int64_t c, int64_t M, int64_t xs, int64_t os) {
      const float* a[rconv::kMaxTaps];
      for (int t = 0; t < nt; ++t) {
        const LineTap& lt = reg.taps[tap[t]];
        a[t] = pr.src + n * pr.sN + (lt.r + lt.sr * (r - reg.r0)) * pr.sH + (lt.c + lt.sc * (c - reg.c0)) * pr.sW;
      }
      const int64_t chunks = (M + kMaxM - 1) / kMaxM;
      for (int64_t k = 0; k < chunks; ++k) {
        const int64_t j0 = k * M / chunks, j1 = (k + 1) * M / chunks;
        const float* ak[rconv::kMaxTaps];
        for (int t = 0; t < nt; ++t) ak[t] = a[t] + j0 * xs;
        for (int q = 0; q < ng; ++q) {
          const int64_t tile = tl[q], n_oc = std::min(kTile, pr.lanes - tile * kTile);
          kMicro[pr.dC != 1][n_oc > 16][j1 - j0](
              ak, b[q], nt, xs, pr.dst + n * pr.dN + r * pr.dH + c * pr.dW + j0 * os + tile * kTile * pr.dC, os,
              pr.dC, pr.bias ? pr.bias + tile * kTile : nullptr, last_vector_mask(n_oc));
        }
      }
    };
    if (reg.axis == 2) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = reg.c0; c < reg.c1; ++c) line(n0, r, c, n1 - n0, pr.sN, pr.dN);
      return;
    }
    // every tap's step along the line (a one-pixel-wide region's is never used; no taps: the kernel writes zeros)
    const int64_t sr = nt ? reg.taps[0].sr : 0, sc = nt ? reg.taps[0].sc : 0;
    for (int64_t n = n0; n < n1; ++n) {
      if (reg.axis == 0)
        for (int64_t r = r0; r < r1; ++r) line(n, r, reg.c0, reg.cols(), sc * pr.sW, pr.dW);
      else
        for (int64_t c = reg.c0; c < reg.c1; ++c) line(n, r0, c, r1 - r0, sr * pr.sH, pr.dH);
    }
  };
  for_each_task(
      (int64_t)tasks.size(), [] { return 0; },
      [&](int&, int64_t ti) {
        const Task& tk = tasks[ti];
        // tasks start at different tiles (the order of the tiles changes no result), so that threads starting
        // together pack different tiles at once instead of each waiting for the other's
        const int64_t ntile = tk.tile1 - tk.tile0;
        const int64_t group = tk.region == -2 ? 1 : kGroup;
        for (int64_t k = 0; k < ntile; k += group) {
          int64_t tl[kGroup];
          const int ng = (int)std::min(group, ntile - k);
          for (int q = 0; q < ng; ++q) tl[q] = tk.tile0 + (k + q + ti) % ntile;
          if (tk.region >= 0) {
            run_region(tk.region, tl, ng, tk.n0, tk.n1);
            continue;
          }
          if (tk.region == -2) {  // every region of the batch
            for (int64_t i = 0; i < (int64_t)regions.size(); ++i)
              if (regions[i].axis == 2)
                for (int64_t q = 0; q < pieces; ++q) run_region(i, tl, ng, piece(q).first, piece(q).second);
              else
                run_region(i, tl, ng, tk.n0, tk.n1);
            continue;
          }
          for (int64_t n = tk.n0; n < tk.n1; ++n)
            for (int64_t i = 0; i < (int64_t)regions.size(); ++i)
              if (regions[i].axis != 2) run_region(i, tl, ng, n, n + 1, tk.h0, tk.h1);
        }
      });
}

}  // namespace

bool direct_applies(const Geom& g, const at::Tensor& x, const at::Tensor& w) {
  return cpu_avx512() && g.G == 1 && w.scalar_type() == at::kFloat && relayout_applies(x);
}

bool direct_grads_apply(const Geom& g, const at::Tensor& go, const at::Tensor& x, const at::Tensor& w) {
  return direct_applies(g, x, w) && relayout_applies(go);
}

at::Tensor forward_direct(const at::Tensor& x_any, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                          const Geom& g) {
  TORCH_CHECK(direct_applies(g, x_any, w), "fastfuse reflect_conv2d: the direct design takes fp32 input, "
              "channels_last or NCHW, with one group on an AVX-512 CPU");
  const at::Tensor x = relayout(x_any, at::MemoryFormat::ChannelsLast);  // a view where x_any is channels_last
  at::Tensor out = empty_out(g, x_any, w);  // NCHW written by the kernel's transposing store
  if (out.numel() == 0) return out;
  const auto regions = direct_plan(forward_axis(g.OH, g.H, g.KH, g.sh, g.ph, g.dh),
                                   forward_axis(g.OW, g.W, g.KW, g.sw, g.pw, g.dw), g.N);
  Packed pk(w.permute({2, 3, 1, 0}));  // [KH, KW, C, OC]
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bias_f = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const Problem pr{x.const_data_ptr<float>(), x.stride(0), x.stride(2), x.stride(3),
                   out.mutable_data_ptr<float>(), out.stride(0), out.stride(2), out.stride(3), out.stride(1),
                   g.N, g.C, g.OC, has_bias ? bias_f.const_data_ptr<float>() : nullptr};
  run_direct(pr, regions, pk);
  return out;
}

at::Tensor dgrad_direct(const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, const Geom& g,
                        at::MemoryFormat fmt) {
  TORCH_CHECK(direct_grads_apply(g, go, x, w) && channels_last_fp32(go) && channels_last_fp32(x),
              "fastfuse reflect_conv2d: the direct grad_input takes fp32 channels_last tensors with one group on an "
              "AVX-512 CPU");
  at::Tensor gi = empty_cached_4d({g.N, g.C, g.H, g.W}, at::kFloat, fmt);
  if (gi.numel() == 0) return gi;
  if (go.numel() == 0) return gi.zero_();
  Packed pk(w.permute({2, 3, 0, 1}));  // [KH, KW, OC, C]
  // one problem per residue of the stride (rh, rw): the input pixels (rh + sh*m, rw + sw*n), each a plain direct
  // convolution of grad_output (at stride 1 the one residue is the whole input)
  for (int64_t rh = 0; rh < std::min(g.sh, g.H); ++rh)
    for (int64_t rw = 0; rw < std::min(g.sw, g.W); ++rw) {
      const auto regions = direct_plan(dgrad_axis(g.H, g.OH, g.KH, g.sh, rh, g.ph, g.dh),
                                       dgrad_axis(g.W, g.OW, g.KW, g.sw, rw, g.pw, g.dw), g.N);
      const Problem pr{go.const_data_ptr<float>(), go.stride(0), go.stride(2), go.stride(3),
                       gi.mutable_data_ptr<float>() + rh * gi.stride(2) + rw * gi.stride(3), gi.stride(0),
                       g.sh * gi.stride(2), g.sw * gi.stride(3), gi.stride(1), g.N, g.OC, g.C, nullptr};
      run_direct(pr, regions, pk);
    }
  return gi;
}

}  // namespace rconv_cpu
}  // namespace fastfuse
