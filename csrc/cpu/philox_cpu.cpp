// Dropout keys on the CPU: AVX-512 / AVX2 when the CPU has them (chosen once at run time), scalar otherwise.
#include "cpu/philox_cpu.h"

#include <cstring>

#include "philox.h"
#include "cpu/philox_simd.h"

namespace fastfuse {
namespace {

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa detect_isa() {
#ifdef FASTFUSE_X86_SIMD
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

#ifdef FASTFUSE_X86_SIMD
__attribute__((target("avx2"))) void apply_keys_avx2(const float* xs, float* ys, const uint16_t* keys, int64_t m,
                                                     uint32_t threshold, float scale) {
  apply_keys<float, float>(xs, ys, keys, m, threshold, scale);
}
#endif

}  // namespace

void apply_keys(const float* xs, float* ys, const uint16_t* keys, int64_t m, uint32_t threshold, float scale) {
#ifdef FASTFUSE_X86_SIMD
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return apply_keys_avx2(xs, ys, keys, m, threshold, scale);
#endif
  apply_keys<float, float>(xs, ys, keys, m, threshold, scale);
}

// Philox is the compute-bound half of dropout; the SIMD paths give the same keys (tests check it). They
// store the four words of a group in order, which on x86 (little-endian) puts 16-bit key l at keys[8j + l].
void philox_keys(uint16_t* keys, uint64_t g0, int64_t ngroups, uint64_t seed, uint64_t offset) {
  static const Isa isa = detect_isa();
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t o0 = static_cast<uint32_t>(offset), o1 = static_cast<uint32_t>(offset >> 32);
  int64_t j = 0;
#ifdef FASTFUSE_X86_SIMD
  uint32_t* words = reinterpret_cast<uint32_t*>(keys);  // written only by SIMD stores, which may alias
  const int64_t width = isa == Isa::kAvx512 ? simd::kAvx512Groups : isa == Isa::kAvx2 ? simd::kAvx2Groups : 0;
  auto step = [&](uint32_t* dst, uint64_t g) {  // the words of groups g .. g + width - 1
    if (isa == Isa::kAvx512)
      simd::philox_words16(dst, g, o0, o1, k0, k1);
    else
      simd::philox_words8(dst, g, o0, o1, k0, k1);
  };
  for (; width && j < ngroups; j += width) {
    const uint64_t g = g0 + static_cast<uint64_t>(j);
    if ((g >> 32) != ((g + width - 1) >> 32)) break;  // counter word 1 changes inside the vector: go scalar
    if (j + width <= ngroups) {
      step(words + 4 * j, g);
    } else {  // a short tail: one more step into scratch (scalar Philox costs ~3x a group)
      alignas(64) uint32_t tmp[4 * simd::kAvx512Groups];
      step(tmp, g);
      std::memcpy(keys + kKeysPerGroup * j, tmp, static_cast<size_t>(ngroups - j) * kKeysPerGroup * sizeof(uint16_t));
    }
  }
#endif
  for (; j < ngroups; ++j) {
    const DropKeys r = dropout_group_keys(seed, offset, g0 + static_cast<uint64_t>(j));
    for (int l = 0; l < kKeysPerGroup; ++l) keys[kKeysPerGroup * j + l] = static_cast<uint16_t>(r[l]);
  }
}

}  // namespace fastfuse
