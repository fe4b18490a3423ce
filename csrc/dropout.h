// fastfuse::dropout: y = keep(i) ? x * scale : 0 over the dense storage of x, keep(i) from Philox (csrc/philox.h).
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>
#include <utility>

#include "layout.h"

namespace fastfuse {

// keep <=> 16-bit key >= threshold (csrc/philox.h): P(keep) = 1 - floor(p * 2^16) / 2^16.
// p == 1 cannot be expressed this way; the op returns x * 0 for it without a kernel.
inline uint32_t dropout_threshold(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fastfuse dropout kernel: p must be in [0, 1), got ", p);
  return static_cast<uint32_t>(std::floor(p * 65536.0));
}

inline double dropout_scale(double p) { return 1.0 / (1.0 - p); }

inline void check_dropout_input(const at::Tensor& x) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fastfuse dropout: expected a floating-point tensor, got ",
              x.scalar_type());
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "fastfuse dropout kernel: expected a dense tensor");
}

// The op's seed argument, a CPU int64 tensor [key, offset] (drawn by fastfuse::seed), as two integers; {0, 0}
// without dropout (p == 0: no random stream is read, and callers pass a placeholder).
inline std::pair<int64_t, int64_t> seed_words(const at::Tensor& seed, double p) {
  if (p <= 0) return {0, 0};
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 2 && seed.is_cpu(),
              "fastfuse: seed must be a CPU int64 tensor [key, offset], got ", seed.scalar_type(), " of shape ",
              seed.sizes(), " on ", seed.device());
  const at::Tensor s = seed.contiguous();
  return {s.data_ptr<int64_t>()[0], s.data_ptr<int64_t>()[1]};
}

// The masked multiply over dense x's storage; the kernels of each device.
at::Tensor dropout_cpu(const at::Tensor& x, double p, int64_t key, int64_t offset);
#ifdef FASTFUSE_WITH_CUDA
at::Tensor dropout_cuda(const at::Tensor& x, double p, int64_t key, int64_t offset);
#endif

// fastfuse::dropout and fastfuse::dropout_backward on one device (both multiply by the same mask): the layout and
// p == 1 rules around the device's masked multiply.
template <typename Kernel>
at::Tensor dropout_op(const at::Tensor& x_in, double p, const at::Tensor& seed, Kernel kernel) {
  const at::Tensor x = dense(x_in);
  if (p >= 1) return at::mul(x, 0);  // as torch: NaN and inf stay NaN, negatives give -0
  const auto [key, offset] = seed_words(seed, p);
  return kernel(x, p, key, offset);
}

}  // namespace fastfuse
