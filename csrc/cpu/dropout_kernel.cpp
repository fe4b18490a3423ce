// Fused dropout on CPU: dropout keys for a cache-sized chunk of groups, then one pass of compare-select-scale.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "backend.h"
#include "dropout.h"
#include "philox.h"
#include "cpu/alloc.h"
#include "cpu/philox_cpu.h"

namespace fastfuse {
namespace {

constexpr int64_t kChunkGroups = 256;  // 2048 16-bit keys = 4 KB: stays in L1 between generation and use

template <typename scalar_t>
void dropout_range(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n, int64_t g_begin,
                   int64_t g_end, uint32_t threshold, double scale_d, uint64_t seed, uint64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(scale_d);
  alignas(64) uint16_t keys[kKeysPerGroup * kChunkGroups];
  for (int64_t g = g_begin; g < g_end; g += kChunkGroups) {
    const int64_t ng = std::min(kChunkGroups, g_end - g);
    philox_keys(keys, static_cast<uint64_t>(g), ng, seed, offset);
    const int64_t i0 = kKeysPerGroup * g;
    const int64_t m = std::min(kKeysPerGroup * ng, n - i0);
    apply_keys(x + i0, y + i0, keys, m, threshold, scale);
  }
}

}  // namespace

at::Tensor dropout_cpu(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  TORCH_CHECK(x.device().is_cpu(), "fastfuse dropout_cpu: expected a CPU tensor, got ", x.device());
  check_dropout_input(x);
  const uint32_t threshold = dropout_threshold(p);
  at::Tensor y = empty_like_output(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const int64_t ngroups = (n + kKeysPerGroup - 1) / kKeysPerGroup;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastfuse_dropout_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, ngroups, 2 * kChunkGroups, [&](int64_t g0, int64_t g1) {
      dropout_range<scalar_t>(xp, yp, n, g0, g1, threshold, dropout_scale(p), static_cast<uint64_t>(seed),
                              static_cast<uint64_t>(offset));
    });
  });
  return y;
}

namespace {

at::Tensor dropout_kernel(const at::Tensor& x, double p, const at::Tensor& seed) {
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CPU, "dropout", dropout_kernel, x, p, seed);
  return dropout_op(x, p, seed, dropout_cpu);
}

at::Tensor dropout_backward_kernel(const at::Tensor& g, double p, const at::Tensor& seed) {
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CPU, "dropout_backward", dropout_backward_kernel, g, p, seed);
  return dropout_op(g, p, seed, dropout_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfuse, CPU, m) {
  m.impl("dropout", &dropout_kernel);
  m.impl("dropout_backward", &dropout_backward_kernel);
}

}  // namespace fastfuse
