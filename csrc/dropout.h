// Host-side pieces of dropout shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>

namespace fastfuse {

// keep <=> 16-bit key >= threshold (csrc/philox.h): P(keep) = 1 - floor(p * 2^16) / 2^16.
// p == 1 cannot be expressed this way; the Python router returns zeros for it without a kernel.
inline uint32_t dropout_threshold(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fastfuse dropout kernel: p must be in [0, 1), got ", p);
  return static_cast<uint32_t>(std::floor(p * 65536.0));
}

inline double dropout_scale(double p) { return 1.0 / (1.0 - p); }

inline void check_dropout_input(const at::Tensor& x) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fastfuse dropout: expected a floating-point tensor, got ",
              x.scalar_type());
  TORCH_CHECK(x.is_non_overlapping_and_dense(),
              "fastfuse dropout kernel: expected a dense tensor (the Python router makes it so)");
}

// Kernels: y = keep(i) ? x * scale : 0 over the dense storage of x; y has x's strides.
at::Tensor dropout_cpu(const at::Tensor& x, double p, int64_t seed, int64_t offset);
#ifdef FASTFUSE_WITH_CUDA
at::Tensor dropout_cuda(const at::Tensor& x, double p, int64_t seed, int64_t offset);
#endif

}  // namespace fastfuse
