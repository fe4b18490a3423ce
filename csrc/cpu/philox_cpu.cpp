// Philox words on the CPU: AVX-512 / AVX2 when the CPU has them (chosen once at run time), scalar otherwise.
#include "cpu/philox_cpu.h"

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

}  // namespace

// Philox is the compute-bound half of dropout; the SIMD paths give the same words (tests check it).
void philox_words(uint32_t* words, uint64_t g0, int64_t ngroups, uint64_t seed, uint64_t offset) {
  static const Isa isa = detect_isa();
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t o0 = static_cast<uint32_t>(offset), o1 = static_cast<uint32_t>(offset >> 32);
  int64_t j = 0;
#ifdef FASTFUSE_X86_SIMD
  const int64_t width = isa == Isa::kAvx512 ? simd::kAvx512Groups : isa == Isa::kAvx2 ? simd::kAvx2Groups : 0;
  for (; width && j + width <= ngroups; j += width) {
    const uint64_t g = g0 + static_cast<uint64_t>(j);
    if ((g >> 32) != ((g + width - 1) >> 32)) break;  // counter word 1 changes inside the vector: go scalar
    if (isa == Isa::kAvx512)
      simd::philox_words16(words + 4 * j, g, o0, o1, k0, k1);
    else
      simd::philox_words8(words + 4 * j, g, o0, o1, k0, k1);
  }
#endif
  for (; j < ngroups; ++j) {
    const Philox4 r = dropout_group_words(seed, offset, g0 + static_cast<uint64_t>(j));
    for (int l = 0; l < 4; ++l) words[4 * j + l] = r.w[l];
  }
}

}  // namespace fastfuse
