// Fused dropout on CUDA: one thread per Philox group of 8 elements, 128-bit loads/stores when x and y are 16-byte
// aligned (a group is 32 bytes in fp32, 16 in fp16/bf16, 64 in fp64: 2, 1 and 4 accesses), 64-bit indexing,
// grid-stride loop on the current stream.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "backend.h"
#include "dropout.h"
#include "philox.h"

namespace fastfuse {
namespace {

// 16 bytes of elements: one 128-bit access.
template <typename T>
struct alignas(16) Vec128 {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t drop_one(scalar_t v, uint32_t key, uint32_t threshold, acc_t scale) {
  return static_cast<scalar_t>(static_cast<acc_t>(v) * (key >= threshold ? scale : acc_t(0)));  // NaN * 0 = NaN
}

template <typename scalar_t, bool kAligned>
__global__ void dropout_cuda_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n,
                                    int64_t ngroups, uint32_t threshold, at::opmath_type<scalar_t> scale,
                                    uint64_t seed, uint64_t offset) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < ngroups; g += stride) {
    const DropKeys keys = dropout_group_keys(seed, offset, static_cast<uint64_t>(g));
    const int64_t i0 = kKeysPerGroup * g;
    if (kAligned && i0 + kKeysPerGroup <= n) {  // the group's 8 elements as aligned 16-byte vectors
      using V = Vec128<scalar_t>;
      constexpr int kPer = kKeysPerGroup / V::kN;
#pragma unroll
      for (int h = 0; h < kPer; ++h) {
        V in = reinterpret_cast<const V*>(x)[kPer * g + h], out;
#pragma unroll
        for (int l = 0; l < V::kN; ++l) out.v[l] = drop_one(in.v[l], keys[V::kN * h + l], threshold, scale);
        reinterpret_cast<V*>(y)[kPer * g + h] = out;
      }
    } else {
#pragma unroll
      for (int l = 0; l < kKeysPerGroup; ++l)
        if (i0 + l < n) y[i0 + l] = drop_one(x[i0 + l], keys[l], threshold, scale);
    }
  }
}

}  // namespace

at::Tensor dropout_cuda(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  TORCH_CHECK(x.is_cuda(), "fastfuse dropout_cuda: expected a CUDA tensor, got ", x.device());
  check_dropout_input(x);
  const uint32_t threshold = dropout_threshold(p);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const int64_t ngroups = (n + kKeysPerGroup - 1) / kKeysPerGroup;
  constexpr int kThreads = 256;
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  const int blocks = static_cast<int>(std::min((ngroups + kThreads - 1) / kThreads, max_blocks));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastfuse_dropout_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const bool aligned = reinterpret_cast<uintptr_t>(xp) % 16 == 0 && reinterpret_cast<uintptr_t>(yp) % 16 == 0;
    const acc_t scale = static_cast<acc_t>(dropout_scale(p));
    if (aligned)
      dropout_cuda_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(xp, yp, n, ngroups, threshold, scale,
                                                                            seed, offset);
    else
      dropout_cuda_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(xp, yp, n, ngroups, threshold, scale,
                                                                             seed, offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

namespace {

at::Tensor dropout_kernel(const at::Tensor& x, double p, const at::Tensor& seed) {
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CUDA, "dropout", dropout_kernel, x, p, seed);
  return dropout_op(x, p, seed, dropout_cuda);
}

at::Tensor dropout_backward_kernel(const at::Tensor& g, double p, const at::Tensor& seed) {
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CUDA, "dropout_backward", dropout_backward_kernel, g, p, seed);
  return dropout_op(g, p, seed, dropout_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfuse, CUDA, m) {
  m.impl("dropout", &dropout_kernel);
  m.impl("dropout_backward", &dropout_backward_kernel);
}

}  // namespace fastfuse
