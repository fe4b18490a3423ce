// Philox words for a run of consecutive dropout groups on CPU (AVX-512 / AVX2 / scalar, same bits):
// words[4j + lane] = dropout_group_words(seed, offset, g0 + j)[lane]. The same loop as in
// dropout_kernel.cpp, shared here so that kernels other than dropout can draw the identical stream.
#pragma once
#include <cstdint>

#include "philox.h"
#include "cpu/philox_simd.h"

namespace fastfuse {
namespace cpu {

inline int philox_isa() {  // 2: AVX-512, 1: AVX2, 0: scalar
#ifdef FASTFUSE_X86_SIMD
  static const int isa = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
  return isa;
#else
  return 0;
#endif
}

inline void philox_words(uint32_t* words, uint64_t g0, int64_t ngroups, uint64_t seed, uint64_t offset) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t o0 = static_cast<uint32_t>(offset), o1 = static_cast<uint32_t>(offset >> 32);
  int64_t j = 0;
#ifdef FASTFUSE_X86_SIMD
  const int isa = philox_isa();
  const int64_t width = isa == 2 ? simd::kAvx512Groups : isa == 1 ? simd::kAvx2Groups : 0;
  for (; width && j + width <= ngroups; j += width) {
    const uint64_t g = g0 + static_cast<uint64_t>(j);
    if ((g >> 32) != ((g + width - 1) >> 32)) break;  // counter word 1 changes inside the vector: go scalar
    if (isa == 2)
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

}  // namespace cpu
}  // namespace fastfuse
