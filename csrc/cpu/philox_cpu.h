// Dropout keys on the CPU, shared by every CPU kernel that drops out (dropout, batch_norm, ...).
#pragma once
#include <cstdint>

#include "philox.h"

namespace fastfuse {

// keys[8*j + l] = 16-bit key l of group g0 + j of stream (seed, offset), for j < ngroups (csrc/philox.h).
// SIMD where available.
void philox_keys(uint16_t* keys, uint64_t g0, int64_t ngroups, uint64_t seed, uint64_t offset);

constexpr int64_t kKeyPad = 16;  // element_keys fills up to 14 keys beyond the n asked for

// The key of each element i0 .. i0+n-1 (element i is lane i%8 of group i/8). buf holds n + kKeyPad keys;
// the returned pointer is where element i0's key sits inside it.
inline const uint16_t* element_keys(uint16_t* buf, int64_t i0, int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t g0 = i0 >> 3, g1 = (i0 + n + 7) >> 3;
  philox_keys(buf, static_cast<uint64_t>(g0), g1 - g0, seed, offset);
  return buf + (i0 & 7);
}

}  // namespace fastfuse
