// The direct design's micro-kernel and weight packing (reflect_conv2d_direct.cpp): AVX-512, fp32. A call computes
// a line of up to kMaxM output pixels times one tile of 32 output channels, accumulated in registers over every
// tap and reduction channel; each tap's input is a pointer plus a fixed pixel stride, and its weight a packed
// [K, 32] matrix, or the sum of a few (a folded class of taps).
#pragma once
#include <immintrin.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <thread>
#include <utility>
#include <vector>

#include "cpu/alloc.h"
#include "cpu/relayout.h"
#include "cpu/transpose16.h"

namespace fastfuse {
namespace rconv_direct {

constexpr int kMaxM = 14;  // output pixels per kernel call: 2 x kMaxM accumulators of the 32 zmm registers
constexpr int64_t kTile = 32;

// The lanes that exist of the last 16-lane vector of a tile of `lanes` (1 to kTile) channels
inline __mmask16 last_vector_mask(int64_t lanes) { return __mmask16((1u << (lanes > 16 ? lanes - 16 : lanes)) - 1); }

// A tap's weight: the sum of n packed [K, 32] matrices (a folded class: the taps that read one pixel), summed in
// the kernel as it streams them (2 adds per 2 x kMaxM FMAs on the frame) rather than packed per call: packed folded
// sums would be more weight to pack and stream than the taps themselves (about twice at 7x7).
constexpr int kMaxFold = 9;  // a pixel is read unreflected and reflected off either edge: 3 taps per axis at most
struct TapWeight {
  int n;
  int64_t k;  // channels reduced over: K, or for a run of single taps whose inputs follow on in memory, K per tap
  const float* p[kMaxFold];
};

// The M pixels' inputs of one tap at one channel: pixel j at row[j / 3] + (j % 3) * as. The compiler keeps kRows
// pointers and the stride in registers and reads each pixel with a base + scaled index address: with a pointer per
// pixel it runs out of general registers and reloads some from the stack at every step.
template <int M>
struct PixelRows {
  static constexpr int kRows = (M + 2) / 3;
  const char* row[kRows];
  int64_t as;  // bytes
  __attribute__((always_inline)) PixelRows(const float* a, int64_t stride) : as(stride * 4) {
    for (int q = 0; q < kRows; ++q) row[q] = reinterpret_cast<const char*>(a) + 3 * q * as;
  }
  __attribute__((always_inline)) float at(int j) const {
    return *reinterpret_cast<const float*>(row[j / 3] + (j % 3) * as);
  }
  __attribute__((always_inline)) void next() {  // the next channel
    for (int q = 0; q < kRows; ++q) row[q] += sizeof(float);
  }
};

// acc[j] += pixel j's input * bv for j < M: one reduction step (an input channel) of one tap
template <int M, int NV>
__attribute__((target("avx512f"), always_inline)) inline void fma_rows(__m512 (&acc)[M][NV], const __m512 (&bv)[NV],
                                                                       const PixelRows<M>& px) {
#pragma GCC unroll 16
  for (int j = 0; j < M; ++j) {
    const __m512 av = _mm512_set1_ps(px.at(j));
    for (int v = 0; v < NV; ++v) acc[j][v] = _mm512_fmadd_ps(av, bv[v], acc[j][v]);
  }
}

// o[j * os + lane * cs] (+ bias) for j < M: the sum over taps t and channels k < b[t].k of a[t][j * as + k] *
// w_t[k][lane]. NV vectors of 16 output channels; mask: the lanes of the last one that exist. Channels contiguous
// (cs == 1, channels_last: kPlanar false), or planes of cs (NCHW): each vector of the M pixels' sums transposed in
// registers and stored as a run of M pixels per channel (os == 1, lines along a row), else pixel by pixel.
template <int M, int NV, bool kPlanar>
__attribute__((target("avx512f"))) void micro(const float* const* a, const TapWeight* b, int nt, int64_t as,
                                               float* o, int64_t os, int64_t cs, const float* bias, __mmask16 mask) {
  __m512 acc[M][NV];
  for (int j = 0; j < M; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = _mm512_setzero_ps();
  __m512 bv[NV];
  int t = 0;
  for (; t < nt && b[t].n == 1; ++t) {  // the plan puts single taps first: their loop has no per-channel branch
    PixelRows<M> px(a[t], as);
    for (const float *bt = b[t].p[0], *be = bt + b[t].k * kTile; bt != be; bt += kTile) {
      for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(bt + 16 * v);
      fma_rows<M, NV>(acc, bv, px);
      px.next();
    }
  }
  for (; t < nt; ++t) {
    PixelRows<M> px(a[t], as);
    const TapWeight& tw = b[t];
    for (int64_t c = 0; c < tw.k; ++c) {
      for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(tw.p[0] + c * kTile + 16 * v);
      for (int k = 1; k < tw.n; ++k)
        for (int v = 0; v < NV; ++v) bv[v] = _mm512_add_ps(bv[v], _mm512_loadu_ps(tw.p[k] + c * kTile + 16 * v));
      fma_rows<M, NV>(acc, bv, px);
      px.next();
    }
  }
  if constexpr (!kPlanar) {
    for (int j = 0; j < M; ++j)
      for (int v = 0; v < NV; ++v) {
        __m512 r = acc[j][v];
        if (bias) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(v == NV - 1 ? mask : 0xffff, bias + 16 * v));
        _mm512_mask_storeu_ps(o + j * os + 16 * v, v == NV - 1 ? mask : 0xffff, r);
      }
  } else {
    for (int v = 0; v < NV; ++v) {
      const __mmask16 lanes = v == NV - 1 ? mask : 0xffff;
      const __m512 bv = bias ? _mm512_maskz_loadu_ps(lanes, bias + 16 * v) : _mm512_setzero_ps();
      __m512 r[16];
      for (int j = 0; j < 16; ++j) r[j] = j < M ? _mm512_add_ps(acc[j < M ? j : 0][v], bv) : _mm512_setzero_ps();
      transpose16(r);  // r[c]: channel 16v + c of the M pixels
      for (int c = 0; c < 16; ++c) {
        if (!((lanes >> c) & 1)) break;
        float* oc = o + (16 * v + c) * cs;
        if (os == 1) {
          _mm512_mask_storeu_ps(oc, __mmask16((1u << M) - 1), r[c]);
        } else {
          alignas(64) float px[16];
          _mm512_store_ps(px, r[c]);
          for (int j = 0; j < M; ++j) oc[j * os] = px[j];
        }
      }
    }
  }
}

using Micro = void (*)(const float* const*, const TapWeight*, int, int64_t, float*, int64_t, int64_t, const float*,
                       __mmask16);

template <int NV, bool kPlanar, int... Ms>
constexpr std::array<Micro, sizeof...(Ms) + 1> micro_table(std::integer_sequence<int, Ms...>) {
  return {nullptr, &micro<Ms + 1, NV, kPlanar>...};
}
// [planar][vectors - 1][M]
const std::array<Micro, kMaxM + 1> kMicro[2][2] = {
    {micro_table<1, false>(std::make_integer_sequence<int, kMaxM>()),
     micro_table<2, false>(std::make_integer_sequence<int, kMaxM>())},
    {micro_table<1, true>(std::make_integer_sequence<int, kMaxM>()),
     micro_table<2, true>(std::make_integer_sequence<int, kMaxM>())}};

// The weight packed per 32-lane tile, [tiles, KH, KW, K, 32] (lanes past `lanes` zero), from a [KH, KW, K, lanes]
// view of it: one tile is one sequential stream for the kernel, cache-sized at ResNet's widths (9 x 256 x 32
// floats: 288 KB). Packing is memory-bound (see pack()), so each tile is packed by the first task that needs it
// while the others run their FMAs; a task that finds its tile being packed waits for it (never for a tile nobody has
// claimed: nothing deadlocks).
class Packed {
 public:
  explicit Packed(at::Tensor view)  // [KH, KW, K, lanes]
      : v_(std::move(view)),
        tiles_((v_.size(3) + kTile - 1) / kTile),
        tile_elems_(v_.size(0) * v_.size(1) * v_.size(2) * kTile),
        buf_(empty_cached({tiles_ * tile_elems_}, at::kFloat)),
        state_(tiles_) {
    for (auto& s : state_) s.store(0, std::memory_order_relaxed);
  }
  int64_t tiles() const { return tiles_; }
  int64_t elems() const { return tiles_ * tile_elems_; }
  // tap (kh, kw) of a tile, packing the tile first if no task has
  const float* tap(int64_t tile, int64_t kh, int64_t kw) {
    std::atomic<int>& st = state_[tile];
    if (st.load(std::memory_order_acquire) != 2) {
      int idle = 0;
      if (st.compare_exchange_strong(idle, 1, std::memory_order_acq_rel)) {
        pack(tile);
        st.store(2, std::memory_order_release);
      } else {
        while (st.load(std::memory_order_acquire) != 2) std::this_thread::yield();
      }
    }
    return base(tile) + (kh * v_.size(1) + kw) * v_.size(2) * kTile;
  }

 private:
  float* base(int64_t tile) { return buf_.mutable_data_ptr<float>() + tile * tile_elems_; }
  // By the view's strides ([KH, KW, K, lanes]; the packed rows are (kh, kw, k), 32 lanes each):
  // - lanes contiguous (a channels_last weight's grad_input view): a 32-lane run per row;
  // - (kh, kw, k) contiguous (its forward view): one transpose of [lanes, KH*KW*K] (cpu/relayout.h);
  // - (kh, kw) contiguous (torch's OIHW weight, either view): per k a transpose of [lanes, KH*KW] onto its rows;
  // else ATen's copy of the permuted slice. The transposes run near a plain copy's rate, ATen's strided copy (or
  // AVX-512 gathers) several times slower, which shows most where the pack is a large part of the call (batch 1).
  void pack(int64_t tile) {
    const int64_t l0 = tile * kTile, n = std::min(kTile, v_.size(3) - l0);
    const int64_t B = v_.size(1), K = v_.size(2), T = v_.size(0) * B, R = T * K;
    const auto s = v_.strides();
    const float* src = v_.const_data_ptr<float>() + l0 * s[3];
    float* dst = base(tile);
    if (s[3] == 1) {
      for (int64_t t = 0; t < T; ++t)
        for (int64_t k = 0; k < K; ++k) {
          const float* run = src + t / B * s[0] + t % B * s[1] + k * s[2];
          std::copy(run, run + n, dst + (t * K + k) * kTile);
        }
    } else if (s[2] == 1 && s[1] == K && s[0] == B * K) {
      transpose_block(src, s[3], dst, kTile, n, R);
    } else if (s[1] == 1 && s[0] == B) {
      for (int64_t k = 0; k < K; ++k) transpose_block(src + k * s[2], s[3], dst + k * kTile, K * kTile, n, T);
    } else {
      at::Tensor d = at::from_blob(dst, {v_.size(0), B, K, kTile}, at::kFloat);
      d.narrow(3, 0, n).copy_(v_.narrow(3, l0, n));
    }
    if (n < kTile)
      for (int64_t r = 0; r < R; ++r) std::fill(dst + r * kTile + n, dst + (r + 1) * kTile, 0.f);
  }
  at::Tensor v_;
  int64_t tiles_, tile_elems_;
  at::Tensor buf_;
  std::vector<std::atomic<int>> state_;  // 0 not packed, 1 being packed, 2 packed
};

}  // namespace rconv_direct
}  // namespace fastfuse
