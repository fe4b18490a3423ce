// batch_norm forward and backward on CPU in one call each: the four primitives plus the O(C) per-channel
// arithmetic between them, op for op as python/fastfuse/ops/batch_norm.py's _forward / _backward do it (same
// ATen ops in the same order, so the same bits). From Python those ~10 small ops cost ~5 us each, more than
// the kernels at (64, 1000) or (512, 16); here they cost about 1 us each.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "batch_norm.h"
#include "dropout.h"

namespace fastfuse {
namespace {

constexpr int64_t kDropOnceBytes = int64_t(2) << 20;  // see bn_backward_cpu

// _layout.to_strides: t with x's strides, a copy only when they differ
at::Tensor like_strides(const at::Tensor& t, const at::Tensor& x) {
  if (t.strides() == x.strides() || t.numel() <= 1) return t;
  return at::empty_strided(t.sizes(), x.strides(), t.options()).copy_(t);
}

// _layout.channel_dense: contiguous or channels-inner, else a contiguous copy
at::Tensor channel_dense(const at::Tensor& x) {
  if (x.is_contiguous() || x.dim() < 3) return x.contiguous();
  return bn_channels_inner(x) ? x : x.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_forward_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& residual, bool training, double eps, bool pre_relu, bool post_relu, double p,
    int64_t seed, int64_t offset) {
  const at::Tensor x = channel_dense(x_in);
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
  at::Tensor scale = at::rsqrt(var + eps);
  if (weight.has_value() && weight->defined()) scale = scale * weight->to(acc);
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->to(acc) : at::zeros({C}, x.options().dtype(acc));
  c10::optional<at::Tensor> res;
  if (residual.has_value() && residual->defined()) res = like_strides(*residual, x);
  at::Tensor out = bn_apply_cpu(x, mean, scale, b, res, pre_relu, post_relu, p, seed, offset);
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, const c10::optional<at::Tensor>& out_in, bool training,
    double eps, bool pre_relu, bool post_relu, double p, int64_t seed, int64_t offset, bool need_gi, bool need_gw,
    bool need_gb, bool need_gr) {
  const at::Tensor x = channel_dense(x_in);
  const at::Tensor grad_out = like_strides(grad_out_in, x);
  c10::optional<at::Tensor> out;
  if (out_in.has_value() && out_in->defined()) out = like_strides(*out_in, x);
  const auto acc = bn_acc_type(x);
  const int64_t C = x.size(1);
  const bool has_w = weight.has_value() && weight->defined();
  const auto wdt = has_w ? weight->scalar_type() : acc;
  const at::Tensor empty = x.new_empty({0});
  if (x.numel() == 0 || p >= 1) {  // the output was all zeros: nothing flows back
    auto z = [&](bool need, const at::Tensor& t) { return need ? at::zeros_like(t) : empty; };
    return {z(need_gi, x), z(need_gw, mean).to(wdt), z(need_gb, mean).to(wdt), z(need_gr, x)};
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
  const at::Tensor invstd = at::rsqrt(var + eps);
  at::Tensor sum_g, sum_gxmu;
  if (need_gw || need_gb || (training && need_gi))
    std::tie(sum_g, sum_gxmu) = bn_grad_reduce_cpu(g, x, out, mean, pre_relu, post_relu, pk, seed, offset);
  at::Tensor gi = empty, gr = empty;
  if (need_gi || need_gr) {
    const at::Tensor k1 = has_w ? invstd * weight->to(acc) : invstd;  // Python multiplies by ones
    at::Tensor k2, k3;
    if (training && need_gi) {  // d/dx of the batch statistics: grad_x = k1 * (g - mean(g) - xhat * mean(g * xhat))
      const int64_t n = x.numel() / C;
      k2 = -k1 * invstd * invstd * sum_gxmu / n;
      k3 = -k1 * sum_g / n;
    } else {
      k2 = at::zeros_like(k1);
      k3 = at::zeros_like(k1);
    }
    std::tie(gi, gr) = bn_grad_apply_cpu(g, x, out, mean, k1, k2, k3, pre_relu, post_relu, pk, seed, offset,
                                         need_gi, need_gr);
  }
  at::Tensor gw = need_gw ? (sum_gxmu * invstd).to(wdt) : empty.to(wdt);
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
