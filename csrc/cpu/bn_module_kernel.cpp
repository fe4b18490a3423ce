// fastfuse_C::bn_module: a BatchNorm module's forward (and its backward) on CPU in one C++ call each way, for the
// modules' eager path (python/fastfuse/nn/batch_norm.py). Through fastfuse.batch_norm the Python between the
// kernels (checks, the autograd.Function, backend choice, the running-statistics ops) cost ~100 us forward and
// ~110 us backward per call: 4x the kernels at (4, 64, 8, 8), and a small ResNet's training step at batch 4 ran
// 10% slower than torch's. The kernels, the route between them and the running-statistics ops are those of
// ops/batch_norm.py (_forward, _backward, batch_norm()), so the bits are the same as through fastfuse.batch_norm.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "batch_norm.h"
#include "layout.h"
#include "cpu/bn_module.h"
#include "cpu/seed.h"

namespace fastfuse {
namespace {

// ops/batch_norm.py's _one_read: the one-read planes kernels take non-empty contiguous (N, C, *) tensors with
// planes of more than one element
bool one_read(const at::Tensor& x) {
  return x.dim() > 2 && x.is_contiguous() && x.numel() > x.size(0) * x.size(1);
}

// _acc_vec: a per-channel vector in the accumulation dtype, or `fill` where the module has none
at::Tensor acc_vec(const OptTensor& t, const at::Tensor& x, double fill) {
  const auto acc = bn_acc_type(x);
  if (!t.has_value() || !t->defined()) return at::full({x.size(1)}, fill, x.options().dtype(acc));
  return t->scalar_type() == acc ? *t : t->to(acc);  // (a no-op .to still costs a dispatch)
}

// _train_planes_backward's grad_weight, sum_gxmu * rsqrt(var + eps), in one loop: rsqrt as bn_grad_coeffs computes
// it, which is ATen's (1 / sqrt), so the same bits as the three ATen ops
at::Tensor planes_grad_weight(const at::Tensor& sum_gxmu, const at::Tensor& var, double eps) {
  const at::Tensor s = sum_gxmu.contiguous(), v = var.contiguous();
  at::Tensor gw = at::empty_like(s);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "bn_module_grad_weight", [&] {
    const scalar_t *sp = s.const_data_ptr<scalar_t>(), *vp = v.const_data_ptr<scalar_t>();
    scalar_t* gp = gw.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < s.numel(); ++c)
      gp[c] = sp[c] * bn_grad_coeffs<scalar_t>(vp[c], nullptr, static_cast<scalar_t>(eps), 0, 0, 1).invstd;
  });
  return gw;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_module_cpu(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& num_batches_tracked, const OptTensor& residual, bool batch_stats,
    bool update, c10::optional<double> momentum, double eps, bool pre_relu, bool post_relu, double p, int64_t seed,
    int64_t offset) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2, "fastfuse bn_module: expected a CPU tensor (N, C, *), got ",
              x.sizes(), " on ", x.device());
  at::Tensor out, mean, var;
  if (batch_stats && p < 1 && one_read(x)) {
    OptTensor res;
    if (residual.has_value() && residual->defined()) res = to_strides(*residual, x.strides());
    std::tie(out, mean, var) = bn_train_planes_cpu(x, acc_vec(weight, x, 1.0), acc_vec(bias, x, 0.0), res, eps,
                                                   pre_relu, post_relu, p, seed, offset);
  } else {
    std::tie(out, mean, var) = call_bn_forward(x, weight, bias, running_mean, running_var, batch_stats, eps, pre_relu,
                                               p, seed, offset, residual, post_relu);
  }
  if (update && running_mean.has_value() && running_mean->defined())
    update_running_stats(*running_mean, *running_var, num_batches_tracked, momentum, mean, var,
                         x.numel() / x.size(1));
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_module_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const OptTensor& weight, const at::Tensor& mean,
    const at::Tensor& var, const OptTensor& out, bool batch_stats, double eps, bool pre_relu, bool post_relu,
    double p, int64_t seed, int64_t offset, bool need_gi, bool need_gw, bool need_gb, bool need_gr) {
  if (!(batch_stats && need_gi && p < 1 && one_read(x)))
    return call_bn_backward(grad_out, x, weight, mean, var, batch_stats, eps, pre_relu, p, seed, offset, need_gi,
                            need_gw, need_gb, out, post_relu, need_gr);
  OptTensor o;
  if (out.has_value() && out->defined()) o = to_strides(*out, x.strides());
  auto [gi, gr, sum_g, sum_gxmu] =
      bn_train_planes_backward_cpu(to_strides(grad_out, x.strides()), x, o, acc_vec(weight, x, 1.0), mean, var, eps,
                                   pre_relu, post_relu, p, seed, offset, need_gr);
  const auto wdt = weight.has_value() && weight->defined() ? weight->scalar_type() : bn_acc_type(x);
  const at::Tensor gw = need_gw ? planes_grad_weight(sum_gxmu, var, eps).to(wdt) : at::Tensor();
  const at::Tensor gb = need_gb ? sum_g.to(wdt) : at::Tensor();
  return {gi, gw, gb, gr};
}

namespace {

// The op without autograd (its gradient comes from the node in cpu/bn_module_autograd.cpp); seed None: drawn as
// _rng.new_seed() would (cpu/seed.h) when p > 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_module_op_cpu(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& num_batches_tracked, const OptTensor& residual, bool batch_stats,
    bool update, c10::optional<double> momentum, double eps, bool pre_relu, bool post_relu, double p,
    c10::optional<int64_t> seed, c10::optional<int64_t> offset) {
  const auto [key, off] = seed_or_draw(seed, offset, p);
  return bn_module_cpu(x, weight, bias, running_mean, running_var, num_batches_tracked, residual, batch_stats, update,
                       momentum, eps, pre_relu, post_relu, p, key, off);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastfuse_C, m) {
  m.def("bn_module(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "Tensor(c!)? num_batches_tracked, Tensor? residual, bool batch_stats, bool update, float? momentum, "
        "float eps, bool pre_relu, bool post_relu, float p, int? seed, int? offset) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastfuse_C, CPU, m) { m.impl("bn_module", &bn_module_op_cpu); }

}  // namespace fastfuse
