// batch_norm forward and backward on CPU in one call each: the four primitives plus the O(C) per-channel
// arithmetic between them, as python/fastfuse/ops/batch_norm.py's _forward / _backward do it. That arithmetic is
// one scalar loop per direction (channel_coeffs below) doing the Python's ATen ops element by element in the same
// order, so the same bits: as ~12 ATen ops it cost 30-60 us, more than the kernels at (512, 16) or (64, 1000).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "batch_norm.h"
#include "dropout.h"
#include "layout.h"

namespace fastfuse {
namespace {

constexpr int64_t kDropOnceBytes = int64_t(2) << 20;  // see bn_backward_cpu

// The per-channel vectors of both directions, computed as the ATen expressions in the comments compute them on
// CPU: a scalar operand is first rounded to the tensor's dtype, rsqrt is 1 / sqrt (correctly rounded, as
// ATen's vectorised rsqrt divides by sqrt), and no step is fused (no multiply-add pattern to contract).
// var, weight (or undefined), sum_g, sum_gxmu: contiguous vectors of the accumulation type.
struct ChannelCoeffs {
  at::Tensor scale;       // forward:  rsqrt(var + eps) * weight
  at::Tensor k1, k2, k3;  // backward: k1 = rsqrt(var + eps) * weight, k2 = -k1 * invstd * invstd * sum_gxmu / n,
                          //           k3 = -k1 * sum_g / n (k2 = k3 = 0 without batch statistics)
  at::Tensor gw;          // backward: sum_gxmu * invstd
};

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_forward_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& residual, bool training, double eps, bool pre_relu, bool post_relu, double p,
    int64_t seed, int64_t offset) {
  const at::Tensor x = bn_channel_dense(x_in);
  const auto acc = bn_acc_type(x);
  const int64_t C = x.size(1);
  at::Tensor mean, var;
  if (training) {
    std::tie(mean, var) = bn_stats_cpu(x, pre_relu);
  } else {  // copies: an op's outputs must not alias its inputs
    mean = running_mean->to(acc, /*non_blocking=*/false, /*copy=*/true);
    var = running_var->to(acc, false, true);
  }
  if (x.numel() == 0 || p >= 1) return {at::zeros_like(x), mean, var};
  const at::Tensor scale = channel_coeffs(var, weight, eps, {}, {}, 0, false, false, false, false).scale;
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->to(acc) : at::zeros({C}, x.options().dtype(acc));
  c10::optional<at::Tensor> res;
  if (residual.has_value() && residual->defined()) res = to_strides(*residual, x.strides());
  at::Tensor out = bn_apply_cpu(x, mean, scale, b, res, pre_relu, post_relu, p, seed, offset);
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, const c10::optional<at::Tensor>& out_in, bool training,
    double eps, bool pre_relu, bool post_relu, double p, int64_t seed, int64_t offset, bool need_gi, bool need_gw,
    bool need_gb, bool need_gr) {
  const at::Tensor x = bn_channel_dense(x_in);
  const at::Tensor grad_out = to_strides(grad_out_in, x.strides());
  c10::optional<at::Tensor> out;
  if (out_in.has_value() && out_in->defined()) out = to_strides(*out_in, x.strides());
  const auto acc = bn_acc_type(x);
  const int64_t C = x.size(1);
  const bool has_w = weight.has_value() && weight->defined();
  const auto wdt = has_w ? weight->scalar_type() : acc;
  const at::Tensor empty = x.new_empty({0});
  if (x.numel() == 0 || p >= 1) {  // the output was all zeros: nothing flows back
    auto z = [&](bool need, const at::Tensor& t) { return need ? at::zeros_like(t) : empty; };
    return {z(need_gi, x), z(need_gw, mean).to(wdt), z(need_gb, mean).to(wdt), z(need_gr, x)};
  }
  // few rows (a tabular model's hidden layer): one parallel region, a block of channels per task
  if (training && need_gi && p < 1 && bn_rows_route_cpu(x, bn_rows_backward_bytes(x, post_relu, p))) {
    auto [gi, gw, gb, gr] =
        bn_train_rows_backward_cpu(grad_out, x, out, bn_acc_vector(weight, acc),
                                   mean.contiguous(), var.contiguous(), eps, pre_relu, post_relu, p, seed, offset,
                                   need_gw, need_gb, need_gr);
    return {gi, gw.to(wdt), gb.to(wdt), need_gr ? gr : empty};
  }
  // Dropout without a post-ReLU: both passes below would regenerate the mask's Philox keys (the costly part at
  // cache-sized shapes); drop out grad_out once instead and run them mask-free. The same bits where grad_out
  // holds the accumulation type (dropped-out values are not rounded in between). Cache-sized only (up to 2 MB): a
  // bigger temporary streams through memory once more, which costs more than the keys. (The temporary comes from
  // the output cache, cpu/alloc.h; fresh from malloc its page faults cost 3.8 ms against 0.4 ms at (512, 1000).)
  at::Tensor g = grad_out;
  double pk = p;
  if (p > 0 && !post_relu && x.scalar_type() == acc && x.nbytes() <= kDropOnceBytes) {
    g = dropout_cpu(grad_out, p, seed, offset);
    pk = 0;
  }
  at::Tensor sum_g, sum_gxmu;
  if (need_gw || need_gb || (training && need_gi))
    std::tie(sum_g, sum_gxmu) = bn_grad_reduce_cpu(g, x, out, mean, pre_relu, post_relu, pk, seed, offset);
  // d/dx of the batch statistics (training): grad_x = k1 * (g - mean(g) - xhat * mean(g * xhat))
  const bool need_k = need_gi || need_gr, batch_grad = training && need_gi;
  const ChannelCoeffs k =
      channel_coeffs(var, weight, eps, sum_g, sum_gxmu, x.numel() / C, true, need_k, batch_grad, need_gw);
  at::Tensor gi = empty, gr = empty;
  if (need_k)
    std::tie(gi, gr) = bn_grad_apply_cpu(g, x, out, mean, k.k1, k.k2, k.k3, pre_relu, post_relu, pk, seed, offset,
                                         need_gi, need_gr);
  at::Tensor gw = need_gw ? k.gw.to(wdt) : empty.to(wdt);
  at::Tensor gb = need_gb ? sum_g.to(wdt) : empty.to(wdt);
  return {gi, gw, gb, gr};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastfuse_C, m) {
  m.def("bn_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
        "Tensor? residual, bool training, float eps, bool pre_relu, bool post_relu, float p, int seed, int offset) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("bn_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor var, Tensor? out, "
        "bool training, float eps, bool pre_relu, bool post_relu, float p, int seed, int offset, bool need_gi, "
        "bool need_gw, bool need_gb, bool need_gr) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastfuse_C, CPU, m) {
  m.impl("bn_forward", &bn_forward_cpu);
  m.impl("bn_backward", &bn_backward_cpu);
}

}  // namespace fastfuse
