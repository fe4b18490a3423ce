// Design (d) on CPU, "direct": the whole forward by our own AVX-512 micro-kernel, fp32 channels_last, one
// group. The vendor's convolution cannot read through the reflection, so (b) repeats the reflected taps and (c)
// splits the output between oneDNN's unpadded convolution (90% of its zero-padded efficiency at 14x14) and
// MKL GEMMs on a gathered frame (half of it): both stay 1.1x over the zero-padded conv at ResNet's 14x14. Here
// every output pixel is computed once, with the frame's taps folded as in (c) (reflect_conv2d_split.cpp), by
// one kernel that reads x in place: an output line of up to kMaxM pixels times a 32-channel tile of the
// weight, accumulated in registers over every tap and input channel, each tap's source a pointer plus a
// fixed pixel stride. On 2 Xeon cores it runs the unpadded interior at the zero-padded conv's own rate.
#include <immintrin.h>

#include <array>
#include <atomic>
#include <thread>
#include <utility>

#include "cpu/reflect_conv2d_split.h"

namespace fastfuse {
namespace rconv_cpu {
namespace {

constexpr int kMaxM = 14;  // output pixels per kernel call: 2 x kMaxM accumulators of the 32 zmm registers
constexpr int64_t kTile = 32;

// A tap's weight: the sum of n packed [C, 32] matrices (a folded class: the taps that read one pixel), summed in
// the kernel as it streams them (2 adds per 2 x kMaxM FMAs on the frame) rather than packed per call: at 7x7 with
// 512 channels the folded sums were 19 MB of pack against 9 for the taps.
constexpr int kMaxFold = 9;  // a pixel is read unreflected and reflected off either edge: 3 taps per axis at most
struct TapWeight {
  int n;
  const float* p[kMaxFold];
};

// o[j * os + lane] (+ bias) for j < M: the sum over taps t and channels c of a[t][j * as + c] * w_t[c][lane]. NV
// vectors of 16 output channels; mask: the lanes of the last one that exist.
// acc[j] += a[j * as] * bv for j < M: one input channel of one tap
template <int M, int NV>
__attribute__((target("avx512f"), always_inline)) inline void fma_rows(__m512 (&acc)[M][NV], const __m512 (&bv)[NV],
                                                                       const float* a, int64_t as) {
#pragma GCC unroll 16
  for (int j = 0; j < M; ++j) {
    const __m512 av = _mm512_set1_ps(a[j * as]);
    for (int v = 0; v < NV; ++v) acc[j][v] = _mm512_fmadd_ps(av, bv[v], acc[j][v]);
  }
}

template <int M, int NV>
__attribute__((target("avx512f"))) void micro(const float* const* a, const TapWeight* b, int nt, int64_t as,
                                               int64_t C, float* o, int64_t os, const float* bias, __mmask16 mask) {
  __m512 acc[M][NV];
  for (int j = 0; j < M; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = _mm512_setzero_ps();
  __m512 bv[NV];
  int t = 0;
  for (; t < nt && b[t].n == 1; ++t) {  // the plan puts single taps first: their loop has no per-channel branch
    const float* at = a[t];
    const float* bt = b[t].p[0];
    for (int64_t c = 0; c < C; ++c) {
      for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(bt + c * kTile + 16 * v);
      fma_rows<M, NV>(acc, bv, at + c, as);
    }
  }
  for (; t < nt; ++t) {
    const float* at = a[t];
    const TapWeight& tw = b[t];
    for (int64_t c = 0; c < C; ++c) {
      for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(tw.p[0] + c * kTile + 16 * v);
      for (int k = 1; k < tw.n; ++k)
        for (int v = 0; v < NV; ++v) bv[v] = _mm512_add_ps(bv[v], _mm512_loadu_ps(tw.p[k] + c * kTile + 16 * v));
      fma_rows<M, NV>(acc, bv, at + c, as);
    }
  }
  for (int j = 0; j < M; ++j)
    for (int v = 0; v < NV; ++v) {
      __m512 r = acc[j][v];
      if (bias) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(v == NV - 1 ? mask : 0xffff, bias + 16 * v));
      _mm512_mask_storeu_ps(o + j * os + 16 * v, v == NV - 1 ? mask : 0xffff, r);
    }
}

using Micro = void (*)(const float* const*, const TapWeight*, int, int64_t, int64_t, float*, int64_t, const float*,
                       __mmask16);

template <int NV, int... Ms>
constexpr std::array<Micro, sizeof...(Ms) + 1> micro_table(std::integer_sequence<int, Ms...>) {
  return {nullptr, &micro<Ms + 1, NV>...};
}
const auto kMicro1 = micro_table<1>(std::make_integer_sequence<int, kMaxM>());
const auto kMicro2 = micro_table<2>(std::make_integer_sequence<int, kMaxM>());

// One tile of the pack: ATen's copy of the permuted slice (AVX-512 gathers, ~4x slower here, were tried).
void pack_tile(const at::Tensor& w, int64_t tile, float* d) {
  const int64_t C = w.size(1), oc0 = tile * kTile;
  const int64_t n = std::min(kTile, w.size(0) - oc0);
  at::Tensor dst = at::from_blob(d, {w.size(2), w.size(3), C, kTile}, at::kFloat);
  dst.narrow(3, 0, n).copy_(w.narrow(0, oc0, n).permute({2, 3, 1, 0}));
  if (n < kTile) dst.narrow(3, n, kTile - n).zero_();
}

// The weight packed per 32-channel tile, [tiles, KH*KW, C, 32] (lanes past OC zero): one tile is one sequential
// stream for the kernel, cache-sized at ResNet's widths (9 x 256 x 32 floats: 288 KB). Packing is memory-bound
// (~0.5 ms for 256 channels on the 2-core Xeon VM, 5% of the convolution as a pass of its own), so each tile is
// packed by the first task that needs it and the others overlap it with their FMAs; a task that finds its tile
// being packed waits for it (never for a tile nobody has claimed, so nothing deadlocks).
class Packed {
 public:
  Packed(const at::Tensor& w, const Geom& g)
      : w_(w), g_(g), tiles_((g.OC + kTile - 1) / kTile), buf_(empty_cached({tiles_, g.KH * g.KW, g.C, kTile},
                                                                            at::kFloat)),
        state_(tiles_) {
    for (auto& s : state_) s.store(0, std::memory_order_relaxed);
  }
  int64_t tiles() const { return tiles_; }
  // tap (kh, kw) of a tile, packing the tile first if no task has
  const float* tap(int64_t tile, int64_t kh, int64_t kw) {
    std::atomic<int>& st = state_[tile];
    if (st.load(std::memory_order_acquire) != 2) {
      int idle = 0;
      if (st.compare_exchange_strong(idle, 1, std::memory_order_acq_rel)) {
        pack_tile(w_, tile, base(tile));
        st.store(2, std::memory_order_release);
      } else {
        while (st.load(std::memory_order_acquire) != 2) std::this_thread::yield();
      }
    }
    return base(tile) + (kh * g_.KW + kw) * g_.C * kTile;
  }

 private:
  float* base(int64_t tile) { return buf_.mutable_data_ptr<float>() + tile * g_.KH * g_.KW * g_.C * kTile; }
  const at::Tensor& w_;
  const Geom& g_;
  int64_t tiles_;
  at::Tensor buf_;
  std::vector<std::atomic<int>> state_;  // 0 not packed, 1 being packed, 2 packed
};

// A region of the plan as lines: along the columns (axis 0), the rows (1) or across the images (2), whichever
// gives the kernel the most pixels per call among those along which every tap's source moves by one fixed
// stride (a reflected tap moves the other way, so only a region one pixel wide may have one along that axis).
int line_axis(const Geom& g, const Region& reg, const std::vector<std::pair<uint64_t, uint64_t>>& folds) {
  bool col_refl = false, row_refl = false;
  for (int t = 0; t < reg.taps.n; ++t) {
    for (int kh = 0; kh < g.KH; ++kh) {
      if (!(folds[t].first >> kh & 1)) continue;
      const int64_t ih = reg.r0 * g.sh - g.ph + kh * g.dh;
      row_refl |= ih < 0 || ih >= g.H;
    }
    for (int kw = 0; kw < g.KW; ++kw) {
      if (!(folds[t].second >> kw & 1)) continue;
      const int64_t iw = reg.c0 * g.sw - g.pw + kw * g.dw;
      col_refl |= iw < 0 || iw >= g.W;
    }
  }
  // pixels per kernel call of a line of n: even pieces of at most kMaxM
  const auto per_call = [](int64_t n) { return n / ((n + kMaxM - 1) / kMaxM); };
  int axis = 2;
  int64_t best = per_call(g.N);
  if ((reg.rows() == 1 || !row_refl) && per_call(reg.rows()) >= best) axis = 1, best = per_call(reg.rows());
  if ((reg.cols() == 1 || !col_refl) && per_call(reg.cols()) >= best) axis = 0;
  return axis;
}

struct Task {
  int64_t region;  // -1: every region of the images that runs inside an image; else one that runs across images
  int64_t n0, n1, tile0, tile1;  // images [n0, n1), tiles [tile0, tile1)
  int64_t cost;
};

}  // namespace

bool direct_applies(const Geom& g, const at::Tensor& x, const at::Tensor& w) {
  return rconv::cpu_avx512() && g.G == 1 && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast) && x.stride(1) == 1;
}

at::Tensor forward_direct(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                          const Geom& g) {
  TORCH_CHECK(direct_applies(g, x, w), "fastfuse reflect_conv2d: the direct design takes fp32 channels_last input "
              "with one group on an AVX-512 CPU");
  at::Tensor out = empty_cached_4d({g.N, g.OC, g.OH, g.OW}, at::kFloat, at::MemoryFormat::ChannelsLast);
  if (out.numel() == 0) return out;
  const SplitPlan sp = split_plan(g, false);
  Packed pk(w, g);
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bias_f = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  std::vector<int> axes;
  int64_t image_cost = 0;  // per tile, of one image's regions that run inside the image
  for (size_t i = 0; i < sp.regions.size(); ++i) {
    const Region& reg = sp.regions[i];
    axes.push_back(line_axis(g, reg, sp.folds[i]));
    if (axes.back() != 2) image_cost += reg.rows() * reg.cols() * reg.taps.n;
  }

  // Tasks: whole images, every region of them but those that run as lines across images (corners), which take
  // tasks of their own of up to kMaxM images. An image's frame is computed while its input is in cache: as tasks
  // of their own over the batch, the frame read x back from memory and ran at 2/3 of the interior's rate at 56x56.
  // Images per task: about 256 output pixels (14x14: one image); split further by tiles only when there are fewer
  // tasks than two per thread (a small batch). No result depends on the split.
  const int64_t tiles = pk.tiles();
  std::vector<Task> tasks;
  if (image_cost > 0) {
    const int64_t step = std::max<int64_t>(1, 256 / (g.OH * g.OW));
    for (int64_t n0 = 0; n0 < g.N; n0 += step) tasks.push_back({-1, n0, std::min(g.N, n0 + step), 0, tiles, 0});
  }
  const int64_t pieces = (g.N + kMaxM - 1) / kMaxM;  // even: 16 images as 8 + 8, not 14 + 2
  for (int64_t i = 0; i < (int64_t)sp.regions.size(); ++i)
    if (axes[i] == 2)
      for (int64_t k = 0; k < pieces; ++k) tasks.push_back({i, k * g.N / pieces, (k + 1) * g.N / pieces, 0, tiles, 0});
  const int64_t want = 2 * at::get_num_threads();
  if ((int64_t)tasks.size() < want && tiles > 1) {
    const int64_t split = std::min(tiles, (want + (int64_t)tasks.size() - 1) / (int64_t)tasks.size());
    std::vector<Task> more;
    for (const Task& t : tasks)
      for (int64_t k = 0; k < split; ++k)
        more.push_back({t.region, t.n0, t.n1, k * tiles / split, (k + 1) * tiles / split, 0});
    tasks.swap(more);
  }
  for (Task& t : tasks) {
    const Region* reg = t.region < 0 ? nullptr : &sp.regions[t.region];
    t.cost = (t.n1 - t.n0) * (t.tile1 - t.tile0) * (reg ? reg->rows() * reg->cols() * reg->taps.n : image_cost);
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });

  const float* xp = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const float* bp = has_bias ? bias_f.const_data_ptr<float>() : nullptr;
  const int64_t xsN = x.stride(0), xsH = x.stride(2), xsW = x.stride(3);
  const int64_t osN = out.stride(0), osH = out.stride(2), osW = out.stride(3);
  // region i of images [n0, n1), one tile
  const auto run_region = [&](int64_t i, int64_t tile, int64_t n0, int64_t n1) {
    const Region& reg = sp.regions[i];
    const int nt = reg.taps.n;
    const auto& fold = sp.folds[i];
    TapWeight b[rconv::kMaxTaps];
    for (int t = 0; t < nt; ++t) {  // the taps of each folded class, in tap order
      b[t].n = 0;
      for (int kh = 0; kh < g.KH; ++kh)
        for (int kw = 0; kw < g.KW; ++kw)
          if ((fold[t].first >> kh & 1) && (fold[t].second >> kw & 1)) b[t].p[b[t].n++] = pk.tap(tile, kh, kw);
    }
    const int64_t n_oc = std::min(kTile, g.OC - tile * kTile);
    const __mmask16 mask = __mmask16((1u << (n_oc > 16 ? n_oc - 16 : n_oc)) - 1);
    const auto& table = n_oc > 16 ? kMicro2 : kMicro1;
    const float* bt = bp ? bp + tile * kTile : nullptr;
    // one line of M pixels from output (n, r, c), pixel steps xs in x and os in out, in even pieces of at most kMaxM
    const auto line = [&](int64_t n, int64_t r, int64_t c, int64_t M, int64_t xs, int64_t os) {
      const float* a[rconv::kMaxTaps];
      for (int t = 0; t < nt; ++t) {
        const int64_t ih = reflect(r * g.sh - g.ph + reg.taps.kh[t] * g.dh, g.H);
        const int64_t iw = reflect(c * g.sw - g.pw + reg.taps.kw[t] * g.dw, g.W);
        a[t] = xp + n * xsN + ih * xsH + iw * xsW;
      }
      const int64_t chunks = (M + kMaxM - 1) / kMaxM;
      for (int64_t k = 0; k < chunks; ++k) {
        const int64_t j0 = k * M / chunks, j1 = (k + 1) * M / chunks;
        const float* ak[rconv::kMaxTaps];
        for (int t = 0; t < nt; ++t) ak[t] = a[t] + j0 * xs;
        table[j1 - j0](ak, b, nt, xs, g.C, op + n * osN + r * osH + c * osW + j0 * os + tile * kTile, os, bt, mask);
      }
    };
    if (axes[i] == 2) {
      for (int64_t r = reg.r0; r < reg.r1; ++r)
        for (int64_t c = reg.c0; c < reg.c1; ++c) line(n0, r, c, n1 - n0, xsN, osN);
      return;
    }
    for (int64_t n = n0; n < n1; ++n) {
      if (axes[i] == 0)
        for (int64_t r = reg.r0; r < reg.r1; ++r) line(n, r, reg.c0, reg.cols(), g.sw * xsW, osW);
      else
        for (int64_t c = reg.c0; c < reg.c1; ++c) line(n, reg.r0, c, reg.rows(), g.sh * xsH, osH);
    }
  };
  for_each_task(
      (int64_t)tasks.size(), [] { return 0; },
      [&](int&, int64_t ti) {
        const Task& tk = tasks[ti];
        // tasks start at different tiles (the order of the tiles changes no result), so that threads starting
        // together pack different tiles at once instead of each waiting for the other's
        const int64_t ntile = tk.tile1 - tk.tile0;
        for (int64_t k = 0; k < ntile; ++k) {
          const int64_t tile = tk.tile0 + (k + ti) % ntile;
          if (tk.region >= 0) {
            run_region(tk.region, tile, tk.n0, tk.n1);
            continue;
          }
          for (int64_t n = tk.n0; n < tk.n1; ++n)
            for (int64_t i = 0; i < (int64_t)sp.regions.size(); ++i)
              if (axes[i] != 2) run_region(i, tile, n, n + 1);
        }
      });
  return out;
}

}  // namespace rconv_cpu
}  // namespace fastfuse
