// Reflection-padded conv2d on CUDA: the frame design of reflect_conv2d.h for every shape and algo, cuDNN's
// zero-padded convolution plus the frame correction. Per region of the frame the out-of-bounds taps are gathered
// (reflected index computed at the read) into a small [groups, pixels, Cg * taps] matrix and multiplied with the
// matching weight columns (one batched GEMM); backward reuses the regions: grad_weight adds the frame's outer
// products, grad_input folds the frame's gradient back onto the source pixels the reflection read. The three loops
// of the frame (gather, add, fold) are small kernels on the current stream with 64-bit indexing and strided access
// (contiguous and channels_last). The fold gives each (image, channel) plane to one thread, so grad_input is summed
// in a fixed order with no atomics: the correction is deterministic. cuDNN's own backward is deterministic only with
// torch.backends.cudnn.deterministic = True (torch.use_deterministic_algorithms sets it).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "backend.h"
#include "reflect_conv2d.h"

namespace fastfuse {
namespace {

using rconv::Geom;
using rconv::reflect;
using rconv::Region;
using rconv::Taps;
using rconv::acc_type;

constexpr int kThreads = 256;

struct Strides {
  int64_t n, c, h, w;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

int blocks_for(int64_t n) {
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min((n + kThreads - 1) / kThreads, max_blocks)));
}

// A[gi, p, t*Cg + cg] = x[n, gi*Cg + cg, reflect(ih), reflect(iw)]; cg fastest (coalesced for channels_last)
template <typename scalar_t, typename acc_t>
__global__ void gather_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ A, Strides sx, Geom g, int64_t r0,
                              int64_t R, int64_t c0, int64_t Cc, Taps taps) {
  const int64_t NP = g.N * R * Cc, T = taps.n, total = g.G * NP * T * g.Cg;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t cg = i % g.Cg, t = i / g.Cg % T, p = i / (g.Cg * T) % NP, gi = i / (g.Cg * T * NP);
    const int64_t n = p / (R * Cc), r = r0 + p / Cc % R, c = c0 + p % Cc;
    const int64_t ih = reflect(r * g.sh - g.ph + taps.kh[t] * g.dh, g.H);
    const int64_t iw = reflect(c * g.sw - g.pw + taps.kw[t] * g.dw, g.W);
    A[i] = static_cast<acc_t>(x[n * sx.n + (gi * g.Cg + cg) * sx.c + ih * sx.h + iw * sx.w]);
  }
}

// out[n, gi*OCg + oc, r, c] += corr[gi, p, oc]: one thread per output element
template <typename scalar_t, typename acc_t>
__global__ void add_kernel(scalar_t* __restrict__ out, const acc_t* __restrict__ corr, Strides so, Geom g,
                           int64_t r0, int64_t R, int64_t c0, int64_t Cc) {
  const int64_t NP = g.N * R * Cc, total = g.G * NP * g.OCg;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t oc = i % g.OCg, p = i / g.OCg % NP, gi = i / (g.OCg * NP);
    const int64_t n = p / (R * Cc), r = r0 + p / Cc % R, c = c0 + p % Cc;
    scalar_t& o = out[n * so.n + (gi * g.OCg + oc) * so.c + r * so.h + c * so.w];
    o = static_cast<scalar_t>(static_cast<acc_t>(o) + corr[i]);
  }
}

// gin[n, ch, reflect(ih), reflect(iw)] += B[gi, p, t*Cg + cg]: one thread per (image, channel) plane, which
// walks the region's pixels and taps in a fixed order (reflected sources coincide, so no parallel writers)
template <typename scalar_t, typename acc_t>
__global__ void fold_kernel(scalar_t* __restrict__ gin, const acc_t* __restrict__ B, Strides si, Geom g, int64_t r0,
                            int64_t R, int64_t c0, int64_t Cc, Taps taps) {
  const int64_t NP = g.N * R * Cc, T = taps.n, K = T * g.Cg, planes = g.N * g.C;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < planes; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t ch = i % g.C, n = i / g.C, gi = ch / g.Cg, cg = ch % g.Cg;
    scalar_t* plane = gin + n * si.n + ch * si.c;
    for (int64_t q = 0; q < R * Cc; ++q) {
      const int64_t p = n * R * Cc + q, r = r0 + q / Cc, c = c0 + q % Cc;
      const acc_t* src = B + (gi * NP + p) * K + cg;
      for (int t = 0; t < T; ++t) {
        const int64_t ih = reflect(r * g.sh - g.ph + taps.kh[t] * g.dh, g.H);
        const int64_t iw = reflect(c * g.sw - g.pw + taps.kw[t] * g.dw, g.W);
        scalar_t& o = plane[ih * si.h + iw * si.w];
        o = static_cast<scalar_t>(static_cast<acc_t>(o) + src[t * g.Cg]);
      }
    }
  }
}

// A[gi, np, t*Cg + cg] = x[n, gi*Cg + cg, reflect(ih), reflect(iw)] for tap t of the region
void gather(const at::Tensor& x, at::Tensor& A, const Geom& g, const Region& reg) {
  const int64_t total = A.numel();
  if (total == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "reflect_conv2d_gather_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gather_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), A.mutable_data_ptr<acc_t>(), strides_of(x), g, reg.r0, reg.rows(), reg.c0,
        reg.cols(), reg.taps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// out[n, gi*OCg + oc, r, c] += corr[gi, np, oc]
void add(at::Tensor& out, const at::Tensor& corr_in, const Geom& g, const Region& reg) {
  const at::Tensor corr = corr_in.contiguous();
  const int64_t total = corr.numel();
  if (total == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "reflect_conv2d_add_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    add_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        out.mutable_data_ptr<scalar_t>(), corr.const_data_ptr<acc_t>(), strides_of(out), g, reg.r0, reg.rows(),
        reg.c0, reg.cols());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// gin[n, gi*Cg + cg, reflect(ih), reflect(iw)] += B[gi, np, t*Cg + cg], one writer per plane
void fold(at::Tensor& gin, const at::Tensor& B_in, const Geom& g, const Region& reg) {
  const at::Tensor B = B_in.contiguous();
  const int64_t planes = g.N * g.C;
  if (planes == 0 || B.numel() == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gin.scalar_type(), "reflect_conv2d_fold_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fold_kernel<scalar_t, acc_t><<<blocks_for(planes), kThreads, 0, stream>>>(
        gin.mutable_data_ptr<scalar_t>(), B.const_data_ptr<acc_t>(), strides_of(gin), g, reg.r0, reg.rows(),
        reg.c0, reg.cols(), reg.taps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor tap_index(const Geom& g, const Taps& taps, const at::Device& device) {
  std::vector<int64_t> idx(taps.n);
  for (int t = 0; t < taps.n; ++t) idx[t] = taps.kh[t] * g.KW + taps.kw[t];
  return at::tensor(idx, at::kLong).to(device);
}

// Columns are tap-major (t * Cg + cg): for channels_last inputs the gather then reads and writes contiguous channel
// runs. w_tap is the weight as [OC, KH*KW, Cg] in the accumulation dtype.
at::Tensor weight_columns(const at::Tensor& w_tap, const Geom& g, const at::Tensor& index) {
  return w_tap.index_select(1, index).view({g.G, g.OCg, index.numel() * g.Cg});
}

// grad_output over a region as [G, NP, OCg] (NP = N * rows * cols, row-major over n, r, c).
at::Tensor grad_rows(const at::Tensor& go, const Geom& g, const Region& reg) {
  return go.slice(2, reg.r0, reg.r1)
      .slice(3, reg.c0, reg.c1)
      .permute({0, 2, 3, 1})
      .reshape({-1, g.G, g.OCg})
      .permute({1, 0, 2})
      .to(acc_type(go.scalar_type()))
      .contiguous();
}

at::Tensor forward_frame(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Geom g = rconv::geometry(x, w, stride, padding, dilation, groups);
  at::Tensor out = at::convolution(x, w, bias, stride, padding, dilation, false, {0, 0}, groups);
  if (out.numel() == 0) return out;
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor w_tap = w.to(acc).reshape({g.OC, g.Cg, g.KH * g.KW}).transpose(1, 2).contiguous();
  for (const Region& reg : rconv::plan(g)) {
    const int64_t np = g.N * reg.rows() * reg.cols();
    at::Tensor A = at::empty({g.G, np, g.Cg * reg.taps.n}, x.options().dtype(acc));
    gather(x, A, g, reg);
    const at::Tensor cols = weight_columns(w_tap, g, tap_index(g, reg.taps, x.device()));
    add(out, at::bmm(A, cols.transpose(1, 2)), g, reg);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_frame(const at::Tensor& go, const at::Tensor& x,
                                                              const at::Tensor& w, at::IntArrayRef stride,
                                                              at::IntArrayRef padding, at::IntArrayRef dilation,
                                                              int64_t groups, std::array<bool, 3> mask) {
  const Geom g = rconv::geometry(x, w, stride, padding, dilation, groups);
  std::vector<int64_t> bias_sizes{g.OC};
  auto [gi, gw, gb] = at::convolution_backward(go, x, w, bias_sizes, stride, padding, dilation, false, {0, 0},
                                               groups, mask);
  if (!mask[0] && !mask[1]) return {gi, gw, gb};
  if (go.numel() == 0) return {gi, gw, gb};
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor w_tap = w.to(acc).reshape({g.OC, g.Cg, g.KH * g.KW}).transpose(1, 2).contiguous();
  at::Tensor gw_tap;  // [OC, KH*KW, Cg] view of the fp32/fp64 grad_weight being corrected
  if (mask[1]) gw_tap = gw.to(acc).contiguous().view({g.OC, g.Cg, g.KH * g.KW}).transpose(1, 2);
  for (const Region& reg : rconv::plan(g)) {
    const at::Tensor Gr = grad_rows(go, g, reg);  // [G, NP, OCg]
    const at::Tensor index = tap_index(g, reg.taps, x.device());
    if (mask[1]) {
      at::Tensor A = at::empty({g.G, Gr.size(1), reg.taps.n * g.Cg}, x.options().dtype(acc));
      gather(x, A, g, reg);
      const at::Tensor part = at::bmm(Gr.transpose(1, 2), A).view({g.OC, reg.taps.n, g.Cg});
      // tap by tap rather than index_add_, which uses atomics on CUDA (and fails deterministic mode)
      for (int t = 0; t < reg.taps.n; ++t)
        gw_tap.select(1, reg.taps.kh[t] * g.KW + reg.taps.kw[t]).add_(part.select(1, t));
    }
    if (mask[0]) fold(gi, at::bmm(Gr, weight_columns(w_tap, g, index)), g, reg);
  }
  if (mask[1]) gw = gw_tap.transpose(1, 2).reshape(w.sizes()).to(w.scalar_type());
  return {gi, gw, gb};
}

}  // namespace

at::Tensor reflect_conv2d_cuda(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, int64_t /*algo: every value runs the frame design*/) {
  TORCH_CHECK(x.is_cuda(), "fastfuse reflect_conv2d_cuda: expected CUDA tensors, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return forward_frame(x, w, bias, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reflect_conv2d_backward_cuda(
    const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> mask, int64_t /*algo*/) {
  TORCH_CHECK(x.is_cuda(), "fastfuse reflect_conv2d_backward_cuda: expected CUDA tensors, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return backward_frame(go, x, w, stride, padding, dilation, groups, mask);
}

namespace {

using OptTensor = c10::optional<at::Tensor>;

at::Tensor reflect_conv2d_kernel(const at::Tensor& x, const at::Tensor& w, const OptTensor& b, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_reflect_conv2d_args(x, w, b, stride, padding, dilation, groups);
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CUDA, "reflect_conv2d", reflect_conv2d_kernel, x, w, b, stride, padding,
                          dilation, groups);
  return reflect_conv2d_op(x, w, b, stride, padding, dilation, groups, reflect_conv2d_cuda);
}

Tensor3 reflect_conv2d_backward_kernel(const at::Tensor& go, const at::Tensor& x, const at::Tensor& w,
                                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t groups, std::array<bool, 3> mask) {
  check_reflect_conv2d_args(x, w, c10::nullopt, stride, padding, dilation, groups);
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CUDA, "reflect_conv2d_backward", reflect_conv2d_backward_kernel, go, x, w,
                          stride, padding, dilation, groups, mask);
  return reflect_conv2d_backward_op(go, x, w, stride, padding, dilation, groups, mask, reflect_conv2d_backward_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfuse, CUDA, m) {
  m.impl("reflect_conv2d", &reflect_conv2d_kernel);
  m.impl("reflect_conv2d_backward", &reflect_conv2d_backward_kernel);
}

TORCH_LIBRARY_IMPL(fastfuse_C, CUDA, m) {
  m.impl("reflect_conv2d", &reflect_conv2d_cuda);
  m.impl("reflect_conv2d_backward", &reflect_conv2d_backward_cuda);
}

}  // namespace fastfuse
