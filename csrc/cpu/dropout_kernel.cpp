// Fused dropout on CPU: Philox words for a cache-sized chunk of groups, then one pass of compare-select-scale.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dropout.h"
#include "philox.h"
#include "cpu/philox_simd.h"

namespace fastfuse {
namespace {

constexpr int64_t kChunkGroups = 256;  // 1024 words = 4 KB: stays in L1 between generation and use

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa detect_isa() {
#ifdef FASTFUSE_X86_SIMD
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

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

template <typename scalar_t>
void dropout_range(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n, int64_t g_begin,
                   int64_t g_end, uint32_t threshold, double scale_d, uint64_t seed, uint64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(scale_d);
  alignas(64) uint32_t words[4 * kChunkGroups];
  for (int64_t g = g_begin; g < g_end; g += kChunkGroups) {
    const int64_t ng = std::min(kChunkGroups, g_end - g);
    philox_words(words, static_cast<uint64_t>(g), ng, seed, offset);
    const int64_t i0 = 4 * g;
    const int64_t m = std::min(4 * ng, n - i0);
    const scalar_t* xs = x + i0;
    scalar_t* ys = y + i0;
    for (int64_t k = 0; k < m; ++k) {
      const acc_t v = static_cast<acc_t>(xs[k]) * scale;
      ys[k] = words[k] >= threshold ? static_cast<scalar_t>(v) : static_cast<scalar_t>(0);
    }
  }
}

}  // namespace

at::Tensor dropout_cpu(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  TORCH_CHECK(x.device().is_cpu(), "fastfuse dropout_cpu: expected a CPU tensor, got ", x.device());
  check_dropout_input(x);
  const uint32_t threshold = dropout_threshold(p);
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const int64_t ngroups = (n + 3) / 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastfuse_dropout_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, ngroups, 4 * kChunkGroups, [&](int64_t g0, int64_t g1) {
      dropout_range<scalar_t>(xp, yp, n, g0, g1, threshold, dropout_scale(p), static_cast<uint64_t>(seed),
                              static_cast<uint64_t>(offset));
    });
  });
  return y;
}

TORCH_LIBRARY_IMPL(fastfuse_C, CPU, m) { m.impl("dropout", &dropout_cpu); }

}  // namespace fastfuse
