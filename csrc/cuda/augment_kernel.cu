// fastfuse::augment on CUDA: one thread per output pixel (all its channels), 64-bit indexing, a grid-stride loop
// on the current stream, no host sync. The taps' coordinates use csrc/augment.h's arithmetic with every product
// rounded on its own (aug_mul), so they are the C++ CPU kernel's bits; the blend too. The lighting uses logf and
// expf (the CPU kernel has its own vectorisable log and exp): lit outputs agree to a few ulps.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "augment.h"
#include "backend.h"

namespace fastfuse {
namespace {

struct AugmentArgs {
  const float *matrix, *bright, *contrast, *mean, *std;
  int64_t B, C, H, W, h, w;
  int64_t sxb, sxc, sxh, sxw, syb, syc, syh, syw;  // element strides of input and output
  int pad;
};

template <typename scalar_t, typename out_t>
__global__ void augment_cuda_kernel(const scalar_t* __restrict__ x, out_t* __restrict__ y, AugmentArgs a) {
  const int64_t n = a.B * a.h * a.w;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t ox = i % a.w, oy = (i / a.w) % a.h, b = i / (a.w * a.h);
    float pm[9];
    augment_pixel_matrix(a.matrix + 9 * b, a.H, a.W, a.h, a.w, pm);
    const float fx = static_cast<float>(ox), fy = static_cast<float>(oy);
    const float ax = aug_mul(pm[1], fy) + pm[2], ay = aug_mul(pm[4], fy) + pm[5], aw = aug_mul(pm[7], fy) + pm[8];
    const float den = aug_mul(pm[6], fx) + aw;
    const float n1x = static_cast<float>(a.W - 1), n1y = static_cast<float>(a.H - 1);
    const float cx = augment_fold((aug_mul(pm[0], fx) + ax) / den, n1x, a.pad);
    const float cy = augment_fold((aug_mul(pm[3], fx) + ay) / den, n1y, a.pad);
    const float x0f = floorf(cx), y0f = floorf(cy);
    const float wx0 = (x0f + 1.f) - cx, wx1 = cx - x0f, wy0 = (y0f + 1.f) - cy, wy1 = cy - y0f;
    const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f), x1 = x0 + 1, y1 = y0 + 1;
    const bool vx0 = x0 >= 0 && x0 < a.W, vx1 = x1 >= 0 && x1 < a.W, vy0 = y0 >= 0 && y0 < a.H, vy1 = y1 >= 0 && y1 < a.H;
    const int64_t ox0 = (x0 < 0 ? 0 : (x0 >= a.W ? a.W - 1 : x0)) * a.sxw;
    const int64_t ox1 = (x1 < 0 ? 0 : (x1 >= a.W ? a.W - 1 : x1)) * a.sxw;
    const int64_t oy0 = (y0 < 0 ? 0 : (y0 >= a.H ? a.H - 1 : y0)) * a.sxh;
    const int64_t oy1 = (y1 < 0 ? 0 : (y1 >= a.H ? a.H - 1 : y1)) * a.sxh;
    const float w00 = (vx0 && vy0) ? wx0 * wy0 : 0.f, w01 = (vx1 && vy0) ? wx1 * wy0 : 0.f;
    const float w10 = (vx0 && vy1) ? wx0 * wy1 : 0.f, w11 = (vx1 && vy1) ? wx1 * wy1 : 0.f;
    float lb = 0.f, con = 1.f;
    if (a.bright) {
      const float v = fminf(fmaxf(a.bright[b], 1e-7f), 1.f - 1e-7f);
      lb = -logf(1.f / v - 1.f);
      con = a.contrast[b];
    }
    const scalar_t* xb = x + b * a.sxb;
    out_t* yb = y + b * a.syb + oy * a.syh + ox * a.syw;
    for (int64_t c = 0; c < a.C; ++c) {
      const scalar_t* xc = xb + c * a.sxc;
      const float v00 = static_cast<float>(xc[oy0 + ox0]), v01 = static_cast<float>(xc[oy0 + ox1]);
      const float v10 = static_cast<float>(xc[oy1 + ox0]), v11 = static_cast<float>(xc[oy1 + ox1]);
      float v = ((aug_mul(w00, v00) + aug_mul(w01, v01)) + aug_mul(w10, v10)) + aug_mul(w11, v11);
      if (std::is_same<scalar_t, uint8_t>::value) v = v / 255.f;
      if (a.bright) {
        v = fminf(fmaxf(v, 1e-7f), 1.f - 1e-7f);
        v = 1.f / (1.f + expf(-(con * (logf(v / (1.f - v)) + lb))));
      }
      if (a.mean) v = (v - a.mean[c]) / a.std[c];
      yb[c * a.syc] = static_cast<out_t>(v);
    }
  }
}

template <typename scalar_t, typename out_t>
void launch(const AugmentParams& p, const AugmentArgs& a) {
  const int64_t n = a.B * a.h * a.w;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20);
  augment_cuda_kernel<scalar_t, out_t><<<static_cast<unsigned>(blocks), kThreads, 0,
                                         at::cuda::getCurrentCUDAStream()>>>(
      p.x.const_data_ptr<scalar_t>(), p.out.mutable_data_ptr<out_t>(), a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void augment_cuda(const AugmentParams& p) {
  TORCH_CHECK(p.x.is_cuda(), "fastfuse augment_cuda: expected CUDA tensors, got ", p.x.device());
  const c10::cuda::CUDAGuard guard(p.x.device());
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; };
  AugmentArgs a{ptr(p.matrix), ptr(p.brightness), ptr(p.contrast), ptr(p.mean), ptr(p.std),
                p.x.size(0), p.x.size(1), p.x.size(2), p.x.size(3), p.out.size(2), p.out.size(3),
                p.x.stride(0), p.x.stride(1), p.x.stride(2), p.x.stride(3),
                p.out.stride(0), p.out.stride(1), p.out.stride(2), p.out.stride(3), p.pad};
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, p.x.scalar_type(), "fastfuse_augment_cuda", [&] {
    using in_t = scalar_t;
    switch (p.out.scalar_type()) {
      case at::kFloat: launch<in_t, float>(p, a); break;
      case at::kBFloat16: launch<in_t, at::BFloat16>(p, a); break;
      case at::kHalf: launch<in_t, at::Half>(p, a); break;
      default: TORCH_CHECK(false, "fastfuse augment: unsupported out_dtype ", p.out.scalar_type());
    }
  });
}

namespace {

at::Tensor augment_kernel(const at::Tensor& x, const at::Tensor& matrix, at::IntArrayRef size,
                          const c10::optional<at::Tensor>& brightness, const c10::optional<at::Tensor>& contrast,
                          const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& std,
                          c10::string_view pad_mode, at::ScalarType out_dtype, bool channels_last) {
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CUDA, "augment", augment_kernel, x, matrix, size, brightness, contrast,
                          mean, std, pad_mode, out_dtype, channels_last);
  auto alloc = [&](at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype) {
    return at::empty_strided(sizes, strides, x.options().dtype(dtype));
  };
  return augment_op(x, matrix, size, brightness, contrast, mean, std, pad_mode, out_dtype, channels_last, alloc,
                    augment_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfuse, CUDA, m) { m.impl("augment", &augment_kernel); }

}  // namespace fastfuse
