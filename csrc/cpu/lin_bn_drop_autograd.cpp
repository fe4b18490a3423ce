// Autograd of fastfuse_C::lin_bn_drop (fastai's LinBnDrop block on CPU in eager mode) in C++. As a Python
// autograd.Function the node and its Python cost ~80 us per block per training step at batch 64, ~4% of the
// step. torch.compile does not come here: it traces the block's modules (python/fastfuse/nn/lin_bn_drop.py).
#include <torch/autograd.h>
#include <torch/library.h>

#include "cpu/lin_bn_drop.h"
#include "cpu/seed.h"

namespace fastfuse {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

// The op's non-differentiable arguments, in one value so that autograd does not take the running statistics
// (updated in place, never differentiated) for inputs.
struct LinBnDropArgs {
  OptTensor running_mean, running_var, num_batches_tracked;
  bool batch_stats, update;
  c10::optional<double> momentum;
  double eps;
  bool pre_relu;
  double p;
  int64_t seed, offset;  // drawn already where the caller gave none
};

struct LinBnDropFunction : torch::autograd::Function<LinBnDropFunction> {
  // Inputs as autograd counts them: x, weight, bn_weight, bn_bias, args (one gradient, or undefined, for each).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bn_weight, const OptTensor& bn_bias, const LinBnDropArgs& a) {
    auto [out, y, mean, var] =
        lin_bn_drop_cpu(x, weight, bn_weight, bn_bias, a.running_mean, a.running_var, a.num_batches_tracked,
                        a.batch_stats, a.update, a.momentum, a.eps, a.pre_relu, a.p, a.seed, a.offset);
    ctx->mark_non_differentiable({y, mean, var});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, weight, y, bn_weight.has_value() ? *bn_weight : at::Tensor(), mean, var});
    ctx->saved_data["batch_stats"] = a.batch_stats;
    ctx->saved_data["eps"] = a.eps;
    ctx->saved_data["pre_relu"] = a.pre_relu;
    ctx->saved_data["p"] = a.p;
    ctx->saved_data["seed"] = a.seed;
    ctx->saved_data["offset"] = a.offset;
    ctx->saved_data["has_w"] = bn_weight.has_value();
    ctx->saved_data["bias"] = bn_bias.has_value() ? c10::IValue(bn_bias->scalar_type()) : c10::IValue();
    return {out, y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const bool has_w = ctx->saved_data["has_w"].toBool();
    const c10::IValue bias = ctx->saved_data["bias"];
    // edges: x, weight, then bn_weight and bn_bias where given
    const bool need_gx = ctx->needs_input_grad(0), need_gw = ctx->needs_input_grad(1);
    const bool need_gbw = has_w && ctx->needs_input_grad(2);
    const bool need_gbb = !bias.isNone() && ctx->needs_input_grad(has_w ? 3 : 2);
    variable_list res(5);  // x, weight, bn_weight, bn_bias, args
    if (!grads[0].defined()) return res;  // the output was not used
    auto [gx, gw, gbw, gbb] = lin_bn_drop_backward_cpu(
        grads[0], s[0], s[1], s[2], has_w ? OptTensor(s[3]) : OptTensor(), s[4], s[5],
        ctx->saved_data["batch_stats"].toBool(), ctx->saved_data["eps"].toDouble(),
        ctx->saved_data["pre_relu"].toBool(), ctx->saved_data["p"].toDouble(), ctx->saved_data["seed"].toInt(),
        ctx->saved_data["offset"].toInt(), need_gx, need_gw, need_gbw, need_gbb);
    if (need_gx) res[0] = gx;
    if (need_gw) res[1] = gw;
    if (need_gbw) res[2] = gbw;
    if (need_gbb) res[3] = gbb.to(bias.toScalarType());
    return res;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lin_bn_drop_autograd(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bn_weight, const OptTensor& bn_bias,
    const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& num_batches_tracked,
    bool batch_stats, bool update, c10::optional<double> momentum, double eps, bool pre_relu, double p,
    c10::optional<int64_t> seed, c10::optional<int64_t> offset) {
  check_lin_bn_drop(x, weight);  // before the seed is drawn: a bad call leaves the generator as it was
  // no seed given: drawn here, before the forward, so that the node keeps it for the backward's masks
  const auto [key, off] = seed_or_draw(seed, offset, p);
  const LinBnDropArgs args{present(running_mean), present(running_var), present(num_batches_tracked),
                           batch_stats,           update,               momentum,
                           eps,                   pre_relu,             p,
                           key,                   off};
  auto r = LinBnDropFunction::apply(x, weight, present(bn_weight), present(bn_bias), args);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfuse_C, Autograd, m) { m.impl("lin_bn_drop", &lin_bn_drop_autograd); }

}  // namespace fastfuse
