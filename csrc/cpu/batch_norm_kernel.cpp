// fastfuse::batch_norm on CPU: the composite of csrc/batch_norm.h with the per-channel arithmetic in one scalar
// loop (as ~12 ATen ops it cost more than the kernels at (512, 16) or (64, 1000)), plus three CPU routes:
// - training on a contiguous (N, C, *) tensor with planes of more than one element: the one-read kernels
//   (bn_train_planes*), which reduce and apply one channel while it is in cache (memory is read once, not twice);
// - a training backward of a rows tensor with few rows: one parallel region, a block of channels per task;
// - dropout without a post-ReLU in a cache-sized backward: grad_out dropped out once, and both passes mask-free.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "backend.h"
#include "batch_norm.h"
#include "dropout.h"
#include "layout.h"

namespace fastfuse {
namespace {

constexpr int64_t kDropOnceBytes = int64_t(2) << 20;  // see batch_norm_backward_kernel

// The per-channel vectors (ChannelCoeffs, csrc/batch_norm.h) as the ATen expressions in its comments compute
// them on CPU: a scalar operand is first rounded to the tensor's dtype, rsqrt is 1 / sqrt (correctly rounded, as
// ATen's vectorised rsqrt divides by sqrt), and no step is fused (no multiply-add pattern to contract).
// var, weight (or undefined), sum_g, sum_gxmu: contiguous vectors of the accumulation type.
// forward: only scale. backward (sums defined): k1, k2, k3 if need_k (k2, k3 from the sums when batch_grad), gw
// if need_gw.
ChannelCoeffs channel_coeffs(const at::Tensor& var_in, const c10::optional<at::Tensor>& weight, double eps,
                             const at::Tensor& sum_g_in, const at::Tensor& sum_gxmu_in, int64_t n, bool backward,
                             bool need_k, bool batch_grad, bool need_gw) {
  const auto acc = var_in.scalar_type();
  const int64_t C = var_in.numel();
  const at::Tensor var = var_in.contiguous();
  const at::Tensor w = bn_acc_vector(weight, acc);
  const at::Tensor sum_g = batch_grad ? sum_g_in.contiguous() : at::Tensor();
  const at::Tensor sum_gxmu = backward && (batch_grad || need_gw) ? sum_gxmu_in.contiguous() : at::Tensor();
  ChannelCoeffs r;
  auto make = [&](bool need) { return need ? at::empty({C}, var.options()) : at::Tensor(); };
  r.scale = make(!backward);
  r.k1 = make(backward && need_k), r.k2 = make(backward && need_k), r.k3 = make(backward && need_k);
  r.gw = make(backward && need_gw);
  AT_DISPATCH_FLOATING_TYPES(acc, "bn_channel_coeffs", [&] {
    using T = scalar_t;
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    const T *v = ptr(var), *wp = ptr(w), *sg = ptr(sum_g), *sgx = ptr(sum_gxmu);
    T *scale = ptr(r.scale), *k1 = ptr(r.k1), *k2 = ptr(r.k2), *k3 = ptr(r.k3), *gw = ptr(r.gw);
    const T e = static_cast<T>(eps), nn = static_cast<T>(n);
    for (int64_t c = 0; c < C; ++c) {
      const BnGradCoeffs<T> q = bn_grad_coeffs(v[c], wp ? wp + c : nullptr, e, sg ? sg[c] : T(0),
                                               sgx ? sgx[c] : T(0), nn);
      if (scale) scale[c] = q.k1;  // the forward's scale is the backward's k1 (its k2, k3 go unused)
      if (k1) {
        k1[c] = q.k1;
        k2[c] = batch_grad ? q.k2 : T(0);
        k3[c] = batch_grad ? q.k3 : T(0);
      }
      if (gw) gw[c] = sgx[c] * q.invstd;
    }
  });
  return r;
}

struct CpuPrims {
  static constexpr auto stats = bn_stats_cpu;
  static constexpr auto apply = bn_apply_cpu;
  static constexpr auto grad_reduce = bn_grad_reduce_cpu;
  static constexpr auto grad_apply = bn_grad_apply_cpu;
  static constexpr auto coeffs = channel_coeffs;
};

// The one-read kernels take non-empty contiguous (N, C, *) tensors with planes of more than one element.
bool one_read(const at::Tensor& x) { return x.dim() > 2 && x.is_contiguous() && x.numel() > x.size(0) * x.size(1); }

// A per-channel vector in the accumulation dtype, or `fill` where there is none
at::Tensor acc_vec(const OptTensor& t, const at::Tensor& x, double fill) {
  const auto acc = bn_acc_type(x);
  if (!present(t)) return at::full({x.size(1)}, fill, x.options().dtype(acc));
  return t->scalar_type() == acc ? *t : t->to(acc);
}

Tensor3 forward_cpu(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                    const OptTensor& running_var, const OptTensor& residual, bool training, double eps, bool pre_relu,
                    bool post_relu, double p, int64_t key, int64_t offset) {
  if (training && p < 1 && one_read(x)) {
    OptTensor res;
    if (present(residual)) res = to_strides(*residual, x.strides());
    return bn_train_planes_cpu(x, acc_vec(weight, x, 1.0), acc_vec(bias, x, 0.0), res, eps, pre_relu, post_relu, p,
                               key, offset);
  }
  return bn_forward_composite<CpuPrims>(x, weight, bias, running_mean, running_var, residual, training, eps, pre_relu,
                                        post_relu, p, key, offset);
}

Tensor3 batch_norm_kernel(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                          const OptTensor& running_mean, const OptTensor& running_var,
                          const OptTensor& num_batches_tracked, const OptTensor& residual, bool training,
                          c10::optional<double> momentum, double eps, bool pre_relu, bool post_relu, double p,
                          const at::Tensor& seed) {
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CPU, "batch_norm", batch_norm_kernel, x, weight, bias, running_mean,
                          running_var, num_batches_tracked, residual, training, momentum, eps, pre_relu, post_relu, p,
                          seed);
  return batch_norm_op(x, weight, bias, running_mean, running_var, num_batches_tracked, residual, training, momentum,
                       eps, pre_relu, post_relu, p, seed, forward_cpu);
}

// The backward's CPU routes (see the top of this file), on x and the gradient laid out by batch_norm_backward_op
Tensor4 backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const OptTensor& weight, const at::Tensor& mean,
                     const at::Tensor& var, const OptTensor& out, bool training, double eps, bool pre_relu,
                     bool post_relu, double p, int64_t key, int64_t offset, std::array<bool, 4> mask) {
  const auto [need_gi, need_gw, need_gb, need_gr] = mask;
  const auto acc = bn_acc_type(x);
  const auto wdt = present(weight) ? weight->scalar_type() : acc;
  const at::Tensor empty = x.new_empty({0});
  if (training && need_gi && one_read(x)) {
    auto [gi, gr, sum_g, sum_gxmu] = bn_train_planes_backward_cpu(grad_out, x, out, acc_vec(weight, x, 1.0), mean,
                                                                  var, eps, pre_relu, post_relu, p, key, offset,
                                                                  need_gr);
    const at::Tensor gw =
        need_gw ? channel_coeffs(var.contiguous(), c10::nullopt, eps, {}, sum_gxmu.contiguous(), 1, true, false,
                                 false, true).gw.to(wdt)
                : empty.to(wdt);
    return {gi, gw, need_gb ? sum_g.to(wdt) : empty.to(wdt), need_gr ? gr : empty};
  }
  if (training && need_gi && bn_rows_route_cpu(x, bn_rows_backward_bytes(x, post_relu, p))) {
    auto [gi, gw, gb, gr] = bn_train_rows_backward_cpu(grad_out, x, out, bn_acc_vector(weight, acc), mean.contiguous(),
                                                       var.contiguous(), eps, pre_relu, post_relu, p, key, offset,
                                                       need_gw, need_gb, need_gr);
    return {gi, gw.to(wdt), gb.to(wdt), need_gr ? gr : empty};
  }
  // Dropout without a post-ReLU: both passes would regenerate the mask's Philox keys (the costly part at
  // cache-sized shapes); drop out grad_out once instead and run them mask-free. The same bits where grad_out holds
  // the accumulation type. Cache-sized only: a bigger temporary streams through memory once more, which costs more
  // than the keys.
  if (p > 0 && !post_relu && x.scalar_type() == acc && x.nbytes() <= kDropOnceBytes)
    return bn_backward_composite<CpuPrims>(dropout_cpu(grad_out, p, key, offset), x, weight, mean, var, out, training,
                                           eps, pre_relu, post_relu, 0.0, key, offset, mask);
  return bn_backward_composite<CpuPrims>(grad_out, x, weight, mean, var, out, training, eps, pre_relu, post_relu, p,
                                         key, offset, mask);
}

Tensor4 batch_norm_backward_kernel(const at::Tensor& grad_out, const at::Tensor& x, const OptTensor& weight,
                                   const at::Tensor& mean, const at::Tensor& var, const OptTensor& out, bool training,
                                   double eps, bool pre_relu, bool post_relu, double p, const at::Tensor& seed,
                                   std::array<bool, 4> mask) {
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CPU, "batch_norm_backward", batch_norm_backward_kernel, grad_out, x,
                          weight, mean, var, out, training, eps, pre_relu, post_relu, p, seed, mask);
  return batch_norm_backward_op(grad_out, x, weight, mean, var, out, training, eps, pre_relu, post_relu, p, seed, mask,
                                backward_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfuse, CPU, m) {
  m.impl("batch_norm", &batch_norm_kernel);
  m.impl("batch_norm_backward", &batch_norm_backward_kernel);
}

}  // namespace fastfuse
