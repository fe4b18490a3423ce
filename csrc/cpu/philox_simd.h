// Philox words for 64 (AVX-512) or 16 (AVX2) consecutive dropout groups at once. The rounds are the
// template in philox.h; this file only supplies the vector word type and the 4x4 interleave that puts
// word `lane` of group g at position 4g + lane (GCC does not vectorise the scalar code as well).
#pragma once
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTFUSE_X86_SIMD 1
#include <immintrin.h>

#include "philox.h"

namespace fastfuse {
namespace simd {

#define FF_AVX512 __attribute__((target("avx512f"))) inline
#define FF_AVX2 __attribute__((target("avx2"))) inline

// kN independent vectors per step: a Philox round is a chain of dependent multiplies, so interleaving
// several chains keeps the multipliers busy.
constexpr int kN = 4;
struct V16 { __m512i v[kN]; };
FF_AVX512 V16 operator^(V16 a, V16 b) {
  for (int i = 0; i < kN; ++i) a.v[i] = _mm512_xor_si512(a.v[i], b.v[i]);
  return a;
}
FF_AVX512 V16 operator+(V16 a, uint32_t b) {
  for (int i = 0; i < kN; ++i) a.v[i] = _mm512_add_epi32(a.v[i], _mm512_set1_epi32(static_cast<int>(b)));
  return a;
}
// The word moves are pair swaps (vpshufd, merged under a mask: one instruction each) rather than 64-bit shifts
// and blends: 5 instructions instead of 7, and the swaps run on the port the shifts would share with the multiplies.
FF_AVX512 V16 mulhilo32(uint32_t a, V16 b, V16* hi) {
  const __m512i A = _mm512_set1_epi32(static_cast<int>(a));
  V16 lo;
  for (int i = 0; i < kN; ++i) {
    const __m512i even = _mm512_mul_epu32(A, b.v[i]);  // 64-bit products of lanes 0,2,..
    const __m512i odd = _mm512_mul_epu32(A, _mm512_shuffle_epi32(b.v[i], _MM_PERM_CDAB));  // and of lanes 1,3,..
    hi->v[i] = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_CDAB);  // even lanes: even's high words
    lo.v[i] = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CDAB);   // odd lanes: odd's low words
  }
  return lo;
}
FF_AVX512 V16 splat16(uint32_t x) {
  V16 r;
  for (int i = 0; i < kN; ++i) r.v[i] = _mm512_set1_epi32(static_cast<int>(x));
  return r;
}

// words[0 .. 64 kN) for groups g .. g + 16 kN - 1 (caller guarantees hi32 is the same for all of them)
__attribute__((flatten)) FF_AVX512 void philox_words16(uint32_t* words, uint64_t g, uint32_t o0, uint32_t o1,
                                                       uint32_t k0, uint32_t k1) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  V16 c0, c1 = splat16(static_cast<uint32_t>(g >> 32)), c2 = splat16(o0), c3 = splat16(o1);
  for (int i = 0; i < kN; ++i)
    c0.v[i] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g) + 16 * i)), iota);
  philox4x32_10_rounds(c0, c1, c2, c3, splat16(k0), splat16(k1));
  for (int i = 0; i < kN; ++i) {
    uint32_t* w = words + 64 * i;
    // 4x4 transpose of words within each 128-bit lane, then of the 128-bit lanes
    const __m512i t0 = _mm512_unpacklo_epi32(c0.v[i], c1.v[i]), t1 = _mm512_unpackhi_epi32(c0.v[i], c1.v[i]);
    const __m512i t2 = _mm512_unpacklo_epi32(c2.v[i], c3.v[i]), t3 = _mm512_unpackhi_epi32(c2.v[i], c3.v[i]);
    const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);  // groups 0,4,8,12 | 1,5,..
    const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);  // groups 2,6,.. | 3,7,..
    const __m512i v0 = _mm512_shuffle_i32x4(u0, u1, 0x44), v1 = _mm512_shuffle_i32x4(u2, u3, 0x44);
    const __m512i v2 = _mm512_shuffle_i32x4(u0, u1, 0xEE), v3 = _mm512_shuffle_i32x4(u2, u3, 0xEE);
    _mm512_storeu_si512(w + 0, _mm512_shuffle_i32x4(v0, v1, 0x88));
    _mm512_storeu_si512(w + 16, _mm512_shuffle_i32x4(v0, v1, 0xDD));
    _mm512_storeu_si512(w + 32, _mm512_shuffle_i32x4(v2, v3, 0x88));
    _mm512_storeu_si512(w + 48, _mm512_shuffle_i32x4(v2, v3, 0xDD));
  }
}

constexpr int kN8 = 2;  // AVX2 has 16 registers: two chains fit without spilling
struct V8 { __m256i v[kN8]; };
FF_AVX2 V8 operator^(V8 a, V8 b) {
  for (int i = 0; i < kN8; ++i) a.v[i] = _mm256_xor_si256(a.v[i], b.v[i]);
  return a;
}
FF_AVX2 V8 operator+(V8 a, uint32_t b) {
  for (int i = 0; i < kN8; ++i) a.v[i] = _mm256_add_epi32(a.v[i], _mm256_set1_epi32(static_cast<int>(b)));
  return a;
}
FF_AVX2 V8 mulhilo32(uint32_t a, V8 b, V8* hi) {
  const __m256i A = _mm256_set1_epi32(static_cast<int>(a));
  V8 lo;
  for (int i = 0; i < kN8; ++i) {
    const __m256i even = _mm256_mul_epu32(A, b.v[i]);
    const __m256i odd = _mm256_mul_epu32(A, _mm256_srli_epi64(b.v[i], 32));
    hi->v[i] = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    lo.v[i] = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  }
  return lo;
}
FF_AVX2 V8 splat8(uint32_t x) {
  V8 r;
  for (int i = 0; i < kN8; ++i) r.v[i] = _mm256_set1_epi32(static_cast<int>(x));
  return r;
}

// words[0 .. 32 kN8) for groups g .. g + 8 kN8 - 1 (caller guarantees hi32 is the same for all of them)
__attribute__((flatten)) FF_AVX2 void philox_words8(uint32_t* words, uint64_t g, uint32_t o0, uint32_t o1,
                                                    uint32_t k0, uint32_t k1) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  V8 c0, c1 = splat8(static_cast<uint32_t>(g >> 32)), c2 = splat8(o0), c3 = splat8(o1);
  for (int i = 0; i < kN8; ++i)
    c0.v[i] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g) + 8 * i)), iota);
  philox4x32_10_rounds(c0, c1, c2, c3, splat8(k0), splat8(k1));
  for (int i = 0; i < kN8; ++i) {
    auto* w = reinterpret_cast<__m256i*>(words + 32 * i);
    const __m256i t0 = _mm256_unpacklo_epi32(c0.v[i], c1.v[i]), t1 = _mm256_unpackhi_epi32(c0.v[i], c1.v[i]);
    const __m256i t2 = _mm256_unpacklo_epi32(c2.v[i], c3.v[i]), t3 = _mm256_unpackhi_epi32(c2.v[i], c3.v[i]);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);  // groups 0,4 | 1,5
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);  // groups 2,6 | 3,7
    _mm256_storeu_si256(w + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
    _mm256_storeu_si256(w + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
    _mm256_storeu_si256(w + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
    _mm256_storeu_si256(w + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
  }
}

constexpr int64_t kAvx512Groups = 16 * kN;  // groups per philox_words16 call
constexpr int64_t kAvx2Groups = 8 * kN8;     // groups per philox_words8 call

#undef FF_AVX512
#undef FF_AVX2

}  // namespace simd
}  // namespace fastfuse
#endif
