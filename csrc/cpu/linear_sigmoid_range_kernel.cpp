// The end of fastai's tabular head, its last LinBnDrop (a bare Linear) and SigmoidRange, as one C++ call each way on
// CPU (python/fastfuse/models/tabular.py, eager mode): out = sigmoid(x W^T + b) * (high - low) + low.
// At fastai's sizes (batch 64, 500 features in, one out) torch runs it as four autograd nodes and four MKL or
// elementwise calls: dropping the two modules took ~180 us off a ~2.6 ms Rossmann training step here, far more
// than their arithmetic (the rank-1 GEMM of grad_input alone took 35-60 us inside the step, 4 us on its own). As
// this one node the step is 90-130 us faster. With few outputs (up to kSmallOut) the products are plain loops over
// rows; more outputs take ATen's GEMMs. Its autograd is C++ (cpu/linear_sigmoid_range_autograd.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/linear_sigmoid_range.h"

namespace fastfuse {
namespace {

constexpr int64_t kSmallOut = 8;
constexpr int64_t kRowGrain = 256;  // rows per task: batch 64 stays on one thread

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += a[k] * b[k];
  return acc;
}

// gx[i] = sum_o gz[i, o] W[o] and gW[o] = sum_i gz[i, o] x[i] (rows in order, so the same bits on every run and
// thread count), each where defined (gw zeroed).
template <typename T>
void small_out_grads(const at::Tensor& gz, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& gx,
                     const at::Tensor& gw) {
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0);
  const T *xp = x.const_data_ptr<T>(), *wp = weight.const_data_ptr<T>(), *zp = gz.const_data_ptr<T>();
  if (gx.defined() && gx.numel() > 0) {
    T* gxp = gx.mutable_data_ptr<T>();
    at::parallel_for(0, B, kRowGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        T* row = gxp + i * K;
        const T g0 = zp[i * N];
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) row[k] = g0 * wp[k];
        for (int64_t o = 1; o < N; ++o) {
          const T g = zp[i * N + o];
          const T* w = wp + o * K;
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) row[k] += g * w[k];
        }
      }
    });
  }
  if (gw.defined() && gw.numel() > 0) {
    T* gwp = gw.mutable_data_ptr<T>();
    at::parallel_for(0, K, 4096, [&](int64_t k0, int64_t k1) {
      for (int64_t i = 0; i < B; ++i)
        for (int64_t o = 0; o < N; ++o) {
          const T g = zp[i * N + o];
          const T* xr = xp + i * K;
          T* w = gwp + o * K;
#pragma omp simd
          for (int64_t k = k0; k < k1; ++k) w[k] += g * xr[k];
        }
    });
  }
}

void check_linear_sigmoid_range(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "linear_sigmoid_range: expected x (B, in) and weight (out, in), got ", x.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && at::isFloatingType(x.scalar_type()),
              "linear_sigmoid_range: expected x and weight of one floating dtype, got ", x.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(x.device() == weight.device(), "linear_sigmoid_range: x and weight are on different devices");
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == x.scalar_type(),
                "linear_sigmoid_range: expected a bias of shape (", weight.size(0), ") and dtype ", x.scalar_type(),
                ", got ", bias->sizes(), " ", bias->scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_sigmoid_range_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                            const OptTensor& bias_in, double low, double high) {
  check_linear_sigmoid_range(x_in, weight_in, bias_in);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const bool has_b = bias_in.has_value() && bias_in->defined();
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor z;  // x W^T + b, turned into sigmoid(.) in place below
  if (N > kSmallOut) {
    z = has_b ? at::addmm(*bias_in, x, weight.t()) : at::mm(x, weight.t());
  } else {
    z = at::empty({B, N}, x.options());
  }
  at::Tensor out = at::empty({B, N}, x.options());
  const at::Tensor bias = has_b ? bias_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_sigmoid_range", [&] {
    using T = scalar_t;
    const T *xp = x.const_data_ptr<T>(), *wp = weight.const_data_ptr<T>();
    const T* bp = has_b ? bias.const_data_ptr<T>() : nullptr;
    T *zp = z.mutable_data_ptr<T>(), *op = out.mutable_data_ptr<T>();
    const T range = static_cast<T>(high - low), lo = static_cast<T>(low);
    const bool small = N <= kSmallOut;
    at::parallel_for(0, B, kRowGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t o = 0; o < N; ++o) {
          T v = zp[i * N + o];
          if (small) v = dot(xp + i * K, wp + o * K, K) + (bp ? bp[o] : T(0));
          const T s = T(1) / (T(1) + std::exp(-v));
          zp[i * N + o] = s;
          op[i * N + o] = s * range + lo;
        }
    });
  });
  return {out, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_sigmoid_range_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& s, double low,
    double high, bool need_gx, bool need_gw, bool need_gb) {
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0);
  // gz = grad * (high - low) * (1 - s) * s, the gradient at the Linear's output, in the order of torch's mul and
  // sigmoid backward
  at::Tensor gz = at::empty({B, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_sigmoid_range_backward", [&] {
    using T = scalar_t;
    const T *gp = grad.const_data_ptr<T>(), *sp = s.const_data_ptr<T>();
    T* zp = gz.mutable_data_ptr<T>();
    const T range = static_cast<T>(high - low);
    for (int64_t j = 0; j < B * N; ++j) zp[j] = gp[j] * range * (T(1) - sp[j]) * sp[j];
  });
  const at::Tensor empty = x.new_empty({0});
  at::Tensor gb = need_gb ? gz.sum(0) : empty;
  if (N > kSmallOut) {
    return {need_gx ? at::mm(gz, weight) : empty, need_gw ? at::mm(gz.t(), x) : empty, gb};
  }
  at::Tensor gx = need_gx ? at::empty({B, K}, x.options()) : empty;
  at::Tensor gw = need_gw ? at::zeros({N, K}, x.options()) : empty;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_sigmoid_range_backward", [&] {
    small_out_grads<scalar_t>(gz, x, weight, gx, gw);
  });
  return {gx, gw, gb};
}

TORCH_LIBRARY_FRAGMENT(fastfuse_C, m) {
  m.def("linear_sigmoid_range(Tensor x, Tensor weight, Tensor? bias, float low, float high) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastfuse_C, CPU, m) { m.impl("linear_sigmoid_range", &linear_sigmoid_range_cpu); }

}  // namespace fastfuse
