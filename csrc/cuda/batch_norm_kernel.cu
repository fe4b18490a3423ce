// Batch norm on CUDA: the same four primitives as csrc/cpu/batch_norm_kernel.cpp.
//   reductions: per-(partition, channel) partial sums reduced inside a block in a fixed tree order, then added
//               over partitions by at::sum in float64: no atomics, the same bits on every run;
//   elementwise: one thread per Philox group of 8 elements (one Philox call serves 8 elements), grid-stride.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "backend.h"
#include "batch_norm.h"
#include "dropout.h"
#include "philox.h"

namespace fastfuse {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsX = 32, kRowsY = 8;  // rows reduction block: 32 channels x 8 rows

struct DropArgs {
  uint32_t threshold;
  float ds;  // 1 / (1 - p), or 1
  uint64_t seed, offset;
};

__device__ __forceinline__ float relu_f(float v) { return v < 0.f ? 0.f : v; }

__device__ __forceinline__ uint32_t element_key(const DropArgs& d, int64_t i) {
  return dropout_element_key(d.seed, d.offset, static_cast<uint64_t>(i));
}

__device__ __forceinline__ int64_t channel_of(int64_t i, int64_t C, int64_t S, bool rows) {
  return rows ? i % C : (i / S) % C;
}

// g = dL/d(bn + residual) at element i (see fastfuse/reference.py: _bn_grad).
template <typename scalar_t, int kMask>
__device__ __forceinline__ float grad_at(const scalar_t* go, const scalar_t* out, int64_t i, const DropArgs& d,
                                         uint32_t key) {
  const float v = static_cast<float>(go[i]) * d.ds;
  if (kMask == kMaskPost) return static_cast<float>(out[i]) > 0.f ? v : 0.f;
  if (kMask == kMaskDrop) return v * (key >= d.threshold ? 1.f : 0.f);  // NaN * 0 = NaN, as torch
  return v;
}

// The two summands of element i: (x' - ref, (x' - ref)^2) for stats, (g, g (x' - ref)) for gradients.
template <typename scalar_t, bool kGrad, int kMask>
__device__ __forceinline__ void summands(const scalar_t* x, const scalar_t* go, const scalar_t* out, float ref,
                                         bool pre, const DropArgs& d, int64_t i, float& a, float& b) {
  float v = static_cast<float>(x[i]);
  const float dx = (pre ? relu_f(v) : v) - ref;
  if (kGrad) {
    const float g = grad_at<scalar_t, kMask>(go, out, i, d, kMask == kMaskDrop ? element_key(d, i) : 0u);
    a += g;
    b += g * dx;
  } else {
    a += dx;
    b += dx * dx;
  }
}

template <typename scalar_t, bool kGrad, int kMask>
__global__ void reduce_planes_kernel(const scalar_t* x, const scalar_t* go, const scalar_t* out, const float* ref,
                                     float* partial, int64_t C, int64_t S, int64_t A, int64_t per, bool pre,
                                     DropArgs d) {
  __shared__ float sh[2][kThreads];
  const int64_t c = blockIdx.x, part = blockIdx.y;
  const float r = ref[c];
  float a = 0.f, b = 0.f;
  const int64_t a_end = min(A, (part + 1) * per);
  for (int64_t n = part * per; n < a_end; ++n)
    for (int64_t s = threadIdx.x; s < S; s += kThreads)
      summands<scalar_t, kGrad, kMask>(x, go, out, r, pre, d, (n * C + c) * S + s, a, b);
  sh[0][threadIdx.x] = a;
  sh[1][threadIdx.x] = b;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {  // fixed tree: deterministic
    if (threadIdx.x < w) {
      sh[0][threadIdx.x] += sh[0][threadIdx.x + w];
      sh[1][threadIdx.x] += sh[1][threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    partial[(part * C + c) * 2] = sh[0][0];
    partial[(part * C + c) * 2 + 1] = sh[1][0];
  }
}

template <typename scalar_t, bool kGrad, int kMask>
__global__ void reduce_rows_kernel(const scalar_t* x, const scalar_t* go, const scalar_t* out, const float* ref,
                                   float* partial, int64_t C, int64_t R, int64_t per, bool pre, DropArgs d) {
  __shared__ float sh[2][kRowsY][kRowsX];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kRowsX + threadIdx.x, part = blockIdx.y;
  float a = 0.f, b = 0.f;
  if (c < C) {
    const float r = ref[c];
    const int64_t r_end = min(R, (part + 1) * per);
    for (int64_t row = part * per + threadIdx.y; row < r_end; row += kRowsY)
      summands<scalar_t, kGrad, kMask>(x, go, out, r, pre, d, row * C + c, a, b);
  }
  sh[0][threadIdx.y][threadIdx.x] = a;
  sh[1][threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float s1 = 0.f, s2 = 0.f;
    for (int y = 0; y < kRowsY; ++y) s1 += sh[0][y][threadIdx.x], s2 += sh[1][y][threadIdx.x];
    partial[(part * C + c) * 2] = s1;
    partial[(part * C + c) * 2 + 1] = s2;
  }
}

// Per-channel float64 sums (C, 2) of the summands.
template <typename scalar_t, bool kGrad, int kMask>
at::Tensor channel_sums(const at::Tensor& x, const at::Tensor& go, const at::Tensor& out, const at::Tensor& ref,
                        bool pre, const DropArgs& d) {
  const BnGeom g = bn_geometry(x);
  // no elements: zero sums, without dividing by C below or launching an empty grid
  if (g.numel == 0) return at::zeros({g.C, 2}, x.options().dtype(at::kDouble));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = go.defined() ? go.const_data_ptr<scalar_t>() : xp;
  const scalar_t* op = out.defined() ? out.const_data_ptr<scalar_t>() : xp;
  const at::Tensor reff = ref.to(at::kFloat).contiguous();
  at::Tensor partial;
  if (g.rows) {
    const int64_t R = g.numel / g.C;
    const int64_t parts = std::min<int64_t>((R + 255) / 256, 1024);  // depends on the shape only
    const int64_t per = (R + parts - 1) / parts;
    partial = at::empty({parts, g.C, 2}, x.options().dtype(at::kFloat));
    const dim3 grid(static_cast<unsigned>((g.C + kRowsX - 1) / kRowsX), static_cast<unsigned>(parts));
    reduce_rows_kernel<scalar_t, kGrad, kMask><<<grid, dim3(kRowsX, kRowsY), 0, stream>>>(
        xp, gp, op, reff.const_data_ptr<float>(), partial.mutable_data_ptr<float>(), g.C, R, per, pre, d);
  } else {
    const int64_t A = g.numel / (g.C * g.S);
    const int64_t parts = std::min<int64_t>(A, std::max<int64_t>(1, 8192 / g.C));
    const int64_t per = (A + parts - 1) / parts;
    partial = at::empty({parts, g.C, 2}, x.options().dtype(at::kFloat));
    const dim3 grid(static_cast<unsigned>(g.C), static_cast<unsigned>(parts));
    reduce_planes_kernel<scalar_t, kGrad, kMask><<<grid, kThreads, 0, stream>>>(
        xp, gp, op, reff.const_data_ptr<float>(), partial.mutable_data_ptr<float>(), g.C, g.S, A, per, pre, d);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.to(at::kDouble).sum(0);
}

int blocks_for(int64_t groups) {
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min((groups + kThreads - 1) / kThreads, max_blocks)));
}

template <typename scalar_t, bool kRes, bool kDrop>
__global__ void apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                             scalar_t* __restrict__ y, const float* __restrict__ mean,
                             const float* __restrict__ scale, const float* __restrict__ bias, int64_t n, int64_t C,
                             int64_t S, bool rows, bool pre, bool post, DropArgs d) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; kKeysPerGroup * g < n;
       g += stride) {
    DropKeys keys{};
    if (kDrop) keys = dropout_group_keys(d.seed, d.offset, static_cast<uint64_t>(g));
#pragma unroll
    for (int l = 0; l < kKeysPerGroup; ++l) {
      const int64_t i = kKeysPerGroup * g + l;
      if (i >= n) break;
      const int64_t c = channel_of(i, C, S, rows);
      const float v = static_cast<float>(x[i]);
      float z = ((pre ? relu_f(v) : v) - mean[c]) * scale[c] + bias[c];
      if (kRes) z += static_cast<float>(res[i]);
      if (post) z = relu_f(z);
      if (kDrop) z *= keys[l] >= d.threshold ? d.ds : 0.f;
      y[i] = static_cast<scalar_t>(z);
    }
  }
}

template <typename scalar_t, int kMask>
__global__ void grad_apply_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                                  const scalar_t* __restrict__ out, scalar_t* __restrict__ gi,
                                  scalar_t* __restrict__ gout, const float* __restrict__ mean,
                                  const float* __restrict__ k1, const float* __restrict__ k2,
                                  const float* __restrict__ k3, int64_t n, int64_t C, int64_t S, bool rows, bool pre,
                                  DropArgs d) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; kKeysPerGroup * g < n;
       g += stride) {
    DropKeys keys{};
    if (kMask == kMaskDrop) keys = dropout_group_keys(d.seed, d.offset, static_cast<uint64_t>(g));
#pragma unroll
    for (int l = 0; l < kKeysPerGroup; ++l) {
      const int64_t i = kKeysPerGroup * g + l;
      if (i >= n) break;
      const float gv = grad_at<scalar_t, kMask>(go, out, i, d, keys[l]);
      if (gout) gout[i] = static_cast<scalar_t>(gv);
      if (gi) {
        const int64_t c = channel_of(i, C, S, rows);
        const float v = static_cast<float>(x[i]);
        const float r = k1[c] * gv + k2[c] * ((pre ? relu_f(v) : v) - mean[c]) + k3[c];
        gi[i] = static_cast<scalar_t>(pre && !(v > 0.f) ? 0.f : r);
      }
    }
  }
}

void check_cuda_input(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "fastfuse batch_norm CUDA kernel: expected CUDA tensors, got ", x.device());
  TORCH_CHECK(x.scalar_type() != at::kDouble,
              "fastfuse batch_norm CUDA kernel: float64 is CPU-only (for gradcheck); use float32");
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

DropArgs drop_args(double p, int64_t seed, int64_t offset, bool use_keys) {
  return DropArgs{use_keys && p > 0 ? dropout_threshold(p) : 0u,
                  static_cast<float>(p > 0 ? dropout_scale(p) : 1.0), static_cast<uint64_t>(seed),
                  static_cast<uint64_t>(offset)};
}

}  // namespace

Tensor2 bn_stats_cuda(const at::Tensor& x, bool pre_relu) {
  check_cuda_input(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const BnGeom g = bn_geometry(x);
  TORCH_CHECK(g.numel > 0, "fastfuse bn_stats: empty input");
  // shift each channel's sums by its first element, for stability with a large mean
  std::vector<at::indexing::TensorIndex> first{0, at::indexing::Slice()};
  for (int64_t k = 2; k < x.dim(); ++k) first.emplace_back(0);
  at::Tensor shift = x.index(first).to(at::kFloat);
  if (pre_relu) shift = shift.clamp_min(0);
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastfuse_bn_stats_cuda", [&] {
    sums = channel_sums<scalar_t, false, kMaskNone>(x, at::Tensor(), at::Tensor(), shift, pre_relu,
                                                    drop_args(0, 0, 0, false));
  });
  const double n = static_cast<double>(g.numel / g.C);
  at::Tensor m = sums.select(1, 0) / n;
  at::Tensor mean = (shift.to(at::kDouble) + m).to(at::kFloat);
  at::Tensor var = (sums.select(1, 1) / n - m * m).clamp_min(0).to(at::kFloat);
  return {mean, var};
}

at::Tensor bn_apply_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& bias,
                         const c10::optional<at::Tensor>& residual, bool pre_relu, bool post_relu, double p,
                         int64_t seed, int64_t offset) {
  check_cuda_input(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const BnGeom g = bn_geometry(x);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) bn_check_like(*residual, x, "residual");
  at::Tensor y = at::empty_like(x);
  if (g.numel == 0) return y;
  const at::Tensor m = f32(mean), s = f32(scale), b = f32(bias);
  const DropArgs d = drop_args(p, seed, offset, true);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int blocks = blocks_for((g.numel + kKeysPerGroup - 1) / kKeysPerGroup);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastfuse_bn_apply_cuda", [&] {
    auto launch = [&](auto res_c, auto drop_c) {
      apply_kernel<scalar_t, decltype(res_c)::value, decltype(drop_c)::value><<<blocks, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), has_res ? residual->const_data_ptr<scalar_t>() : nullptr,
          y.mutable_data_ptr<scalar_t>(), m.const_data_ptr<float>(), s.const_data_ptr<float>(),
          b.const_data_ptr<float>(), g.numel, g.C, g.S, g.rows, pre_relu, post_relu, d);
    };
    if (has_res)
      p > 0 ? launch(std::true_type(), std::true_type()) : launch(std::true_type(), std::false_type());
    else
      p > 0 ? launch(std::false_type(), std::true_type()) : launch(std::false_type(), std::false_type());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

Tensor2 bn_grad_reduce_cuda(const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& out,
                            const at::Tensor& mean, bool pre_relu, bool post_relu, double p, int64_t seed,
                            int64_t offset) {
  check_cuda_input(x);
  bn_check_like(grad_out, x, "grad_out");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor o = out.has_value() ? *out : at::Tensor();
  if (post_relu) bn_check_like(o, x, "output");
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastfuse_bn_grad_reduce_cuda", [&] {
    with_mask_kind(post_relu, p, [&](auto mask_c) {
      sums = channel_sums<scalar_t, true, decltype(mask_c)::value>(x, grad_out, o, mean, pre_relu,
                                                                  drop_args(p, seed, offset, true));
    });
  });
  return {sums.select(1, 0).to(at::kFloat), sums.select(1, 1).to(at::kFloat)};
}

Tensor2 bn_grad_apply_cuda(const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& out,
                           const at::Tensor& mean, const at::Tensor& k1, const at::Tensor& k2, const at::Tensor& k3,
                           bool pre_relu, bool post_relu, double p, int64_t seed, int64_t offset, bool need_gi,
                           bool need_g) {
  check_cuda_input(x);
  bn_check_like(grad_out, x, "grad_out");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor o = out.has_value() ? *out : at::Tensor();
  if (post_relu) bn_check_like(o, x, "output");
  const BnGeom g = bn_geometry(x);
  at::Tensor gi = need_gi ? at::empty_like(x) : x.new_empty({0});
  at::Tensor gout = need_g ? at::empty_like(x) : x.new_empty({0});
  if (g.numel == 0 || !(need_gi || need_g)) return {gi, gout};
  const at::Tensor m = f32(mean), a = f32(k1), b = f32(k2), c = f32(k3);
  const DropArgs d = drop_args(p, seed, offset, true);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int blocks = blocks_for((g.numel + kKeysPerGroup - 1) / kKeysPerGroup);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastfuse_bn_grad_apply_cuda", [&] {
    with_mask_kind(post_relu, p, [&](auto mask_c) {
      grad_apply_kernel<scalar_t, decltype(mask_c)::value><<<blocks, kThreads, 0, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
          o.defined() ? o.const_data_ptr<scalar_t>() : nullptr, need_gi ? gi.mutable_data_ptr<scalar_t>() : nullptr,
          need_g ? gout.mutable_data_ptr<scalar_t>() : nullptr, m.const_data_ptr<float>(), a.const_data_ptr<float>(),
          b.const_data_ptr<float>(), c.const_data_ptr<float>(), g.numel, g.C, g.S, g.rows, pre_relu, d);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gi, gout};
}

namespace {

struct CudaPrims {
  static constexpr auto stats = bn_stats_cuda;
  static constexpr auto apply = bn_apply_cuda;
  static constexpr auto grad_reduce = bn_grad_reduce_cuda;
  static constexpr auto grad_apply = bn_grad_apply_cuda;
  static constexpr auto coeffs = channel_coeffs_aten;
};

Tensor3 batch_norm_kernel(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                          const OptTensor& running_mean, const OptTensor& running_var,
                          const OptTensor& num_batches_tracked, const OptTensor& residual, bool training,
                          c10::optional<double> momentum, double eps, bool pre_relu, bool post_relu, double p,
                          const at::Tensor& seed) {
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CUDA, "batch_norm", batch_norm_kernel, x, weight, bias, running_mean,
                          running_var, num_batches_tracked, residual, training, momentum, eps, pre_relu, post_relu, p,
                          seed);
  return batch_norm_op(x, weight, bias, running_mean, running_var, num_batches_tracked, residual, training, momentum,
                       eps, pre_relu, post_relu, p, seed, bn_forward_composite<CudaPrims>);
}

Tensor4 batch_norm_backward_kernel(const at::Tensor& grad_out, const at::Tensor& x, const OptTensor& weight,
                                   const at::Tensor& mean, const at::Tensor& var, const OptTensor& out, bool training,
                                   double eps, bool pre_relu, bool post_relu, double p, const at::Tensor& seed,
                                   std::array<bool, 4> mask) {
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CUDA, "batch_norm_backward", batch_norm_backward_kernel, grad_out, x,
                          weight, mean, var, out, training, eps, pre_relu, post_relu, p, seed, mask);
  return batch_norm_backward_op(grad_out, x, weight, mean, var, out, training, eps, pre_relu, post_relu, p, seed, mask,
                                bn_backward_composite<CudaPrims>);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfuse, CUDA, m) {
  m.impl("batch_norm", &batch_norm_kernel);
  m.impl("batch_norm_backward", &batch_norm_backward_kernel);
}

TORCH_LIBRARY_IMPL(fastfuse_C, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_apply", &bn_apply_cuda);
  m.impl("bn_grad_reduce", &bn_grad_reduce_cuda);
  m.impl("bn_grad_apply", &bn_grad_apply_cuda);
}

}  // namespace fastfuse
