// A 16x16 fp32 transpose in AVX-512 registers, shared by the relayout (relayout.cpp) and the direct conv kernel's
// NCHW store (reflect_conv2d_direct_kernel.h).
#pragma once
#include <immintrin.h>

// GCC 12's unpack and shuffle intrinsics start from _mm512_undefined_ps(), which it reports as used uninitialized
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace fastfuse {

// r[i][j] becomes r[j][i]: pairs of rows interleaved, then pairs of pairs (r[4k + m]'s 128-bit lane L then holds
// column 4L + m of rows 4k..4k+3), then the 128-bit lanes (column 4L + m is lane L of r[m], r[4 + m], r[8 + m],
// r[12 + m])
__attribute__((target("avx512f"), always_inline)) inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512d a = _mm512_castps_pd(t[4 * k]), b = _mm512_castps_pd(t[4 * k + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * k + 2]), d = _mm512_castps_pd(t[4 * k + 3]);
    r[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int m = 0; m < 4; ++m) {
    const __m512 lo01 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x44), hi01 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xEE);
    const __m512 lo23 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x44);
    const __m512 hi23 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xEE);
    t[m] = _mm512_shuffle_f32x4(lo01, lo23, 0x88);
    t[4 + m] = _mm512_shuffle_f32x4(lo01, lo23, 0xDD);
    t[8 + m] = _mm512_shuffle_f32x4(hi01, hi23, 0x88);
    t[12 + m] = _mm512_shuffle_f32x4(hi01, hi23, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

}  // namespace fastfuse

#pragma GCC diagnostic pop
