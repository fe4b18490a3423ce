// Philox words on the CPU, shared by every CPU kernel that drops out (dropout, batch_norm, ...).
#pragma once
#include <cstdint>

namespace fastfuse {

// words[4*j + l] = lane l of group g0 + j of stream (seed, offset), for j < ngroups. SIMD where available.
void philox_words(uint32_t* words, uint64_t g0, int64_t ngroups, uint64_t seed, uint64_t offset);

// The word of each element i0 .. i0+n-1 (element i is lane i%4 of group i/4). buf holds n + 8 words; the
// returned pointer is where element i0's word sits inside it.
inline const uint32_t* element_words(uint32_t* buf, int64_t i0, int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t g0 = i0 >> 2, g1 = (i0 + n + 3) >> 2;
  philox_words(buf, static_cast<uint64_t>(g0), g1 - g0, seed, offset);
  return buf + (i0 & 3);
}

}  // namespace fastfuse
