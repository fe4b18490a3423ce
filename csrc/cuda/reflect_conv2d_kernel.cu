// Reflection-padded conv2d on CUDA: cuDNN's zero-padded convolution (and its backward), then what the reflected
// pixels add, in one launch per gradient and no host sync (geometry by value, no tables, sizes from the shapes):
// - forward: frame_correction_kernel, every output pixel whose window reads the pad, in one launch;
// - grad_input: grad_input_fold_kernel, one thread per source pixel and channel summing the gradient of its mirror
//   positions in the pad in a fixed order;
// - grad_weight: grad_weight_frame_kernel (+ a reduce over image slices when the weight alone cannot fill the GPU).
// Each output element has one writer and a fixed summation order: the correction is deterministic. cuDNN's own
// backward is deterministic only with torch.backends.cudnn.deterministic = True (torch.use_deterministic_algorithms
// sets it). bf16/fp16 read and written in place, accumulated in fp32; the frame pixels are rounded twice (cuDNN's
// output, then the corrected value): docs/reflect_conv2d.md says what that costs. 64-bit indexing, strided access
// (contiguous and channels_last).
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

constexpr int kThreads = 256;

struct Strides {
  int64_t n, c, h, w;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

int blocks_for(int64_t n) {
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min((n + kThreads - 1) / kThreads, max_blocks)));
}

// The pixels of a frame of a rows x cols grid: rows [0, top) and [bottom, rows), and in the rows between, columns
// [0, left) and [right, cols) (top <= bottom, left <= right). Flat frame index -> (r, c), so that one launch
// covers the whole frame with no table of regions.
struct Frame {
  int64_t rows, cols, top, bottom, left, right;
  __host__ __device__ int64_t size() const {
    return (top + rows - bottom) * cols + (bottom - top) * (left + cols - right);
  }
  __device__ void pixel(int64_t i, int64_t& r, int64_t& c) const {
    const int64_t band = top * cols, side = left + cols - right, middle = (bottom - top) * side;
    if (i < band) {
      r = i / cols, c = i % cols;
    } else if (i < band + middle) {
      i -= band;
      r = top + i / side, c = i % side;
      if (c >= left) c += right - left;
    } else {
      i -= band + middle;
      r = bottom + i / cols, c = i % cols;
    }
  }
};

int64_t ceil_div_pos(int64_t a, int64_t b) { return a <= 0 ? 0 : (a + b - 1) / b; }

// Output pixels whose window reads the pad: the first rows (o * s - p < 0), the last rows
// (o * s - p + (k - 1) * d >= size), and the same for columns. Everything else is cuDNN's exact interior.
Frame output_frame(const Geom& g) {
  Frame f{g.OH, g.OW, 0, 0, 0, 0};
  f.top = std::min(g.OH, ceil_div_pos(g.ph, g.sh));
  f.bottom = std::clamp(ceil_div_pos(g.H + g.ph - (g.KH - 1) * g.dh, g.sh), f.top, g.OH);
  f.left = std::min(g.OW, ceil_div_pos(g.pw, g.sw));
  f.right = std::clamp(ceil_div_pos(g.W + g.pw - (g.KW - 1) * g.dw, g.sw), f.left, g.OW);
  return f;
}

// Source pixels that a reflected pad pixel reads: rows [0, p] and [size - 1 - p, size) (a superset: the edge row
// itself is no reflection's source, but its columns may be), the same for columns; no band where p == 0.
Frame source_frame(const Geom& g) {
  Frame f{g.H, g.W, 0, g.H, 0, g.W};
  if (g.ph) f.top = std::min(g.H, g.ph + 1), f.bottom = std::max(f.top, g.H - 1 - g.ph);
  if (g.pw) f.left = std::min(g.W, g.pw + 1), f.right = std::max(f.left, g.W - 1 - g.pw);
  return f;
}

// out[n, oc, r, c] += sum over the taps of (r, c) that land in the pad, and the group's channels cg, of
// w[oc, cg, kh, kw] * x[n, cg, reflect(ih), reflect(iw)]: what zero padding left out. One thread per
// (image, frame pixel, output channel), oc fastest: a warp reads one x value (a broadcast) and 32 consecutive
// weights of wt = w as [KH][KW][Cg][OC]. fp32 (fp64 for double) accumulation, one rounding into out.
template <typename scalar_t>
__global__ void frame_correction_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ wt, Strides so, Strides sx, Geom g, Frame f) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t F = f.size(), total = g.N * F * g.OC;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t oc = i % g.OC, q = i / g.OC, n = q / F, gi = oc / g.OCg;
    int64_t r, c;
    f.pixel(q % F, r, c);
    acc_t acc = 0;
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t ih = r * g.sh - g.ph + kh * g.dh;
      const bool pad_h = ih < 0 || ih >= g.H;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t iw = c * g.sw - g.pw + kw * g.dw;
        if (!pad_h && iw >= 0 && iw < g.W) continue;  // in bounds: cuDNN already added this tap
        const scalar_t* xp = x + n * sx.n + gi * g.Cg * sx.c + reflect(ih, g.H) * sx.h + reflect(iw, g.W) * sx.w;
        const scalar_t* wp = wt + (kh * g.KW + kw) * g.Cg * g.OC + oc;
        for (int64_t cg = 0; cg < g.Cg; ++cg)
          acc += static_cast<acc_t>(xp[cg * sx.c]) * static_cast<acc_t>(wp[cg * g.OC]);
      }
    }
    scalar_t& o = out[n * so.n + oc * so.c + r * so.h + c * so.w];
    o = static_cast<scalar_t>(static_cast<acc_t>(o) + acc);
  }
}

// gin[n, ch, r, c] += the gradient of every pad position that reflects onto (r, c): for each such position P
// (row -r or 2(H-1)-r with column c, -c or 2(W-1)-c, at least one of them in the pad), the sum over the outputs
// and taps that read P of go[n, oc, oh, ow] * w[oc, cg, kh, kw]. One thread per (image, source pixel, channel),
// channel fastest, that sums its positions, taps and output channels in a fixed order and writes once: no two
// threads write the same element, so the fold is deterministic and needs no atomics. wt = w as [KH][KW][OC][Cg].
template <typename scalar_t>
__global__ void grad_input_fold_kernel(scalar_t* __restrict__ gin, const scalar_t* __restrict__ go,
                                       const scalar_t* __restrict__ wt, Strides si, Strides sg, Geom g, Frame f) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t F = f.size(), total = g.N * F * g.C;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t ch = i % g.C, q = i / g.C, n = q / F, gi = ch / g.Cg, cg = ch % g.Cg;
    int64_t r, c;
    f.pixel(q % F, r, c);
    // padded coordinates that read source row r (column c): itself, and its mirrors in the pad
    int64_t ph[3] = {r, 0, 0}, pw[3] = {c, 0, 0};
    int nh = 1, nw = 1;
    if (r >= 1 && r <= g.ph) ph[nh++] = -r;
    if (r <= g.H - 2 && r >= g.H - 1 - g.ph) ph[nh++] = 2 * (g.H - 1) - r;
    if (c >= 1 && c <= g.pw) pw[nw++] = -c;
    if (c <= g.W - 2 && c >= g.W - 1 - g.pw) pw[nw++] = 2 * (g.W - 1) - c;
    acc_t acc = 0;
    for (int a = 0; a < nh; ++a)
      for (int b = 0; b < nw; ++b) {
        if (a == 0 && b == 0) continue;  // (r, c) itself: cuDNN's zero-padded gradient has it
        for (int64_t kh = 0; kh < g.KH; ++kh) {
          const int64_t nh_ = ph[a] + g.ph - kh * g.dh;  // oh * sh
          if (nh_ < 0 || nh_ % g.sh || nh_ / g.sh >= g.OH) continue;
          for (int64_t kw = 0; kw < g.KW; ++kw) {
            const int64_t nw_ = pw[b] + g.pw - kw * g.dw;
            if (nw_ < 0 || nw_ % g.sw || nw_ / g.sw >= g.OW) continue;
            const scalar_t* gp = go + n * sg.n + gi * g.OCg * sg.c + (nh_ / g.sh) * sg.h + (nw_ / g.sw) * sg.w;
            const scalar_t* wp = wt + ((kh * g.KW + kw) * g.OC + gi * g.OCg) * g.Cg + cg;
            for (int64_t j = 0; j < g.OCg; ++j)
              acc += static_cast<acc_t>(gp[j * sg.c]) * static_cast<acc_t>(wp[j * g.Cg]);
          }
        }
      }
    scalar_t& o = gin[n * si.n + ch * si.c + r * si.h + c * si.w];
    o = static_cast<scalar_t>(static_cast<acc_t>(o) + acc);
  }
}

// Output pixels whose tap (kh, kw) reads the pad: the frame of output_frame() for a 1x1 kernel at that tap's offset.
__device__ Frame tap_frame(const Geom& g, int64_t kh, int64_t kw) {
  // the first o with o * s >= base, clamped to [lo, hi]
  auto first = [](int64_t base, int64_t s, int64_t lo, int64_t hi) {
    const int64_t o = base <= 0 ? 0 : (base + s - 1) / s;
    return o < lo ? lo : (o > hi ? hi : o);
  };
  Frame f{g.OH, g.OW, 0, 0, 0, 0};
  f.top = first(g.ph - kh * g.dh, g.sh, 0, g.OH);
  f.bottom = first(g.H + g.ph - kh * g.dh, g.sh, f.top, g.OH);
  f.left = first(g.pw - kw * g.dw, g.sw, 0, g.OW);
  f.right = first(g.W + g.pw - kw * g.dw, g.sw, f.left, g.OW);
  return f;
}

// grad_weight[oc, cg, kh, kw] += what zero padding left out: the sum over images and over the output pixels whose
// tap (kh, kw) reads the pad, of go[n, oc, r, c] * x[n, gi*Cg + cg, reflect(ih), reflect(iw)]. One thread per
// (slice of the images, weight element), oc fastest (a warp reads 32 consecutive go values in channels_last and
// one x value); each sums its images and pixels in a fixed order. One slice: the thread adds into gw itself;
// several: partial[slice][element], summed in slice order by grad_weight_reduce_kernel. Deterministic, no atomics.
template <typename scalar_t>
__global__ void grad_weight_frame_kernel(scalar_t* __restrict__ gw, at::opmath_type<scalar_t>* __restrict__ partial,
                                         const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                                         Strides sw, Strides sg, Strides sx, Geom g, int64_t slices) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t elems = g.OC * g.Cg * g.KH * g.KW, total = slices * elems;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t e = i % elems, s = i / elems, oc = e % g.OC, cg = e / g.OC % g.Cg, k = e / (g.OC * g.Cg);
    const int64_t kh = k / g.KW, kw = k % g.KW, gi = oc / g.OCg;
    const Frame f = tap_frame(g, kh, kw);
    const int64_t F = f.size(), n0 = g.N * s / slices, n1 = g.N * (s + 1) / slices;
    acc_t acc = 0;
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t q = 0; q < F; ++q) {
        int64_t r, c;
        f.pixel(q, r, c);
        const int64_t ih = reflect(r * g.sh - g.ph + kh * g.dh, g.H), iw = reflect(c * g.sw - g.pw + kw * g.dw, g.W);
        acc += static_cast<acc_t>(go[n * sg.n + oc * sg.c + r * sg.h + c * sg.w]) *
               static_cast<acc_t>(x[n * sx.n + (gi * g.Cg + cg) * sx.c + ih * sx.h + iw * sx.w]);
      }
    if (slices > 1) {
      partial[s * elems + e] = acc;
    } else {
      scalar_t& o = gw[oc * sw.n + cg * sw.c + kh * sw.h + kw * sw.w];
      o = static_cast<scalar_t>(static_cast<acc_t>(o) + acc);
    }
  }
}

template <typename scalar_t>
__global__ void grad_weight_reduce_kernel(scalar_t* __restrict__ gw,
                                          const at::opmath_type<scalar_t>* __restrict__ partial, Strides sw, Geom g,
                                          int64_t slices) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t elems = g.OC * g.Cg * g.KH * g.KW;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < elems; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t oc = e % g.OC, cg = e / g.OC % g.Cg, k = e / (g.OC * g.Cg);
    acc_t acc = 0;
    for (int64_t s = 0; s < slices; ++s) acc += partial[s * elems + e];
    scalar_t& o = gw[oc * sw.n + cg * sw.c + (k / g.KW) * sw.h + (k % g.KW) * sw.w];
    o = static_cast<scalar_t>(static_cast<acc_t>(o) + acc);
  }
}

at::Tensor forward_frame(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Geom g = rconv::geometry(x, w, stride, padding, dilation, groups);
  at::Tensor out = at::convolution(x, w, bias, stride, padding, dilation, false, {0, 0}, groups);
  const Frame f = output_frame(g);
  const int64_t total = g.N * f.size() * g.OC;
  if (total == 0 || g.Cg == 0) return out;
  const at::Tensor wt = w.permute({2, 3, 1, 0}).contiguous();  // [KH][KW][Cg][OC]
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "reflect_conv2d_frame_cuda", [&] {
    frame_correction_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        out.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), wt.const_data_ptr<scalar_t>(),
        strides_of(out), strides_of(x), g, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void fold_grad_input(at::Tensor& gin, const at::Tensor& go, const at::Tensor& w, const Geom& g) {
  const Frame f = source_frame(g);
  const int64_t total = g.N * f.size() * g.C;
  if (total == 0 || g.OCg == 0 || (g.ph == 0 && g.pw == 0)) return;
  const at::Tensor wt = w.permute({2, 3, 0, 1}).contiguous();  // [KH][KW][OC][Cg]
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gin.scalar_type(), "reflect_conv2d_fold_cuda", [&] {
    grad_input_fold_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        gin.mutable_data_ptr<scalar_t>(), go.const_data_ptr<scalar_t>(), wt.const_data_ptr<scalar_t>(),
        strides_of(gin), strides_of(go), g, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Enough threads to fill the GPU (about 2048 per SM): the images are cut into that many slices, at most N.
void correct_grad_weight(at::Tensor& gw, const at::Tensor& go, const at::Tensor& x, const Geom& g) {
  const int64_t elems = g.OC * g.Cg * g.KH * g.KW;
  if (elems == 0 || (g.ph == 0 && g.pw == 0)) return;
  const int64_t want = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 2048;
  const int64_t slices = std::clamp<int64_t>(want / elems, 1, g.N);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gw.scalar_type(), "reflect_conv2d_wgrad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial;
    if (slices > 1) partial = at::empty({slices * elems}, go.options().dtype(at::toOpMathType(go.scalar_type())));
    grad_weight_frame_kernel<scalar_t><<<blocks_for(slices * elems), kThreads, 0, stream>>>(
        gw.mutable_data_ptr<scalar_t>(), slices > 1 ? partial.mutable_data_ptr<acc_t>() : nullptr,
        go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), strides_of(gw), strides_of(go), strides_of(x),
        g, slices);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (slices > 1) {
      grad_weight_reduce_kernel<scalar_t><<<blocks_for(elems), kThreads, 0, stream>>>(
          gw.mutable_data_ptr<scalar_t>(), partial.const_data_ptr<acc_t>(), strides_of(gw), g, slices);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_frame(const at::Tensor& go, const at::Tensor& x,
                                                              const at::Tensor& w, at::IntArrayRef stride,
                                                              at::IntArrayRef padding, at::IntArrayRef dilation,
                                                              int64_t groups, std::array<bool, 3> mask) {
  const Geom g = rconv::geometry(x, w, stride, padding, dilation, groups);
  std::vector<int64_t> bias_sizes{g.OC};
  auto [gi, gw, gb] = at::convolution_backward(go, x, w, bias_sizes, stride, padding, dilation, false, {0, 0},
                                               groups, mask);
  if (go.numel() == 0) return {gi, gw, gb};
  if (mask[0]) fold_grad_input(gi, go, w, g);
  if (mask[1]) correct_grad_weight(gw, go, x, g);
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
