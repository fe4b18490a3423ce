// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"), the one RNG of fastfuse.
// Written once for host and device so that the CPU and CUDA kernels draw the same bits; the Triton kernels
// (triton_kernels/philox.py) and the pure-PyTorch reference (fastfuse/reference.py) match it bit for bit.
//
// Dropout's element-to-random mapping (every backend uses exactly this): one Philox call serves 8 elements,
// each taking a 16-bit half of one of its four words.
//   element i of the tensor's dense storage order -> group g = i / 8, lane l = i % 8
//   counter = (lo32(g), hi32(g), lo32(offset), hi32(offset)), key = (lo32(seed), hi32(seed))
//   key16 = (philox(counter, key)[l / 2] >> (16 * (l % 2))) & 0xFFFF
//   keep  <=>  key16 >= threshold,  threshold = floor(p * 2^16)
// So the mask is a pure function of (seed, offset, i): independent of grid, threads and device. 16 bits
// (p in steps of 2^-16 ~ 1.5e-5; FlashAttention's dropout uses 8) halve the Philox work of 32-bit words,
// and Philox is what bounds dropout on a CPU.
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FF_HOST_DEVICE inline
#endif

namespace fastfuse {

struct Philox4 {
  uint32_t w[4];
};

FF_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t prod = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(prod >> 32);
  return static_cast<uint32_t>(prod);
}

// The ten rounds, written once for any word type U: uint32_t here and on the GPU, or a SIMD vector of
// words (csrc/cpu/philox_simd.h) that provides mulhilo32(uint32_t, U, U*), U ^ U and U + uint32_t.
template <typename U>
FF_HOST_DEVICE void philox4x32_10_rounds(U& c0, U& c1, U& c2, U& c3, U k0, U k1) {
#if defined(__CUDACC__) || defined(__HIPCC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    U hi0, hi1;
    const U lo0 = mulhilo32(0xD2511F53u, c0, &hi0);
    const U lo1 = mulhilo32(0xCD9E8D57u, c2, &hi1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 = k0 + 0x9E3779B9u;
    k1 = k1 + 0xBB67AE85u;
  }
}

FF_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                     uint32_t k1) {
  philox4x32_10_rounds(c0, c1, c2, c3, k0, k1);
  return Philox4{{c0, c1, c2, c3}};
}

// The four random words of dropout group g (elements 8g .. 8g+7).
FF_HOST_DEVICE Philox4 dropout_group_words(uint64_t seed, uint64_t offset, uint64_t g) {
  return philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32),
                       static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

constexpr int kKeysPerGroup = 8;

// The 16-bit keys of dropout group g: keys[l] belongs to element 8g + l.
struct DropKeys {
  uint32_t w[4];
  FF_HOST_DEVICE uint32_t operator[](int l) const { return (w[l >> 1] >> ((l & 1) * 16)) & 0xFFFFu; }
};

FF_HOST_DEVICE DropKeys dropout_group_keys(uint64_t seed, uint64_t offset, uint64_t g) {
  const Philox4 r = dropout_group_words(seed, offset, g);
  return DropKeys{{r.w[0], r.w[1], r.w[2], r.w[3]}};
}

FF_HOST_DEVICE uint32_t dropout_element_key(uint64_t seed, uint64_t offset, uint64_t i) {
  return dropout_group_keys(seed, offset, i / kKeysPerGroup)[static_cast<int>(i % kKeysPerGroup)];
}

}  // namespace fastfuse
