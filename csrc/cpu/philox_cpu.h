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

// ys[k] = xs[k] * (keys[k] >= threshold ? scale : 0) for k < m: times (scale or 0), as torch multiplies by its
// mask, so a dropped NaN stays NaN and a dropped -1 gives -0. ys may be xs (in place).
template <typename scalar_t, typename acc_t>
inline void apply_keys(const scalar_t* xs, scalar_t* ys, const uint16_t* keys, int64_t m, uint32_t threshold,
                       acc_t scale) {
  for (int64_t k = 0; k < m; ++k)
    ys[k] = static_cast<scalar_t>(static_cast<acc_t>(xs[k]) * (keys[k] >= threshold ? scale : acc_t(0)));
}

// float: the same loop, built for AVX2 where the CPU has it (8 lanes a step instead of SSE2's 4; the loop is
// ~40% of dropout where Philox and the data run from cache, 512 x 1000).
void apply_keys(const float* xs, float* ys, const uint16_t* keys, int64_t m, uint32_t threshold, float scale);

}  // namespace fastfuse
