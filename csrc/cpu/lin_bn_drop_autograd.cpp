// Autograd of fastfuse_C::lin_bn_drop (fastai's LinBnDrop block on CPU in eager mode) in C++. As a Python
// autograd.Function the node and its Python cost ~80 us per block per training step at batch 64, ~4% of the
// step. torch.compile does not come here: it traces the block's modules (python/fastfuse/nn/lin_bn_drop.py).
#include <torch/autograd.h>
#include <torch/library.h>

#include "cpu/bn_node.h"
#include "cpu/double_backward.h"
#include "cpu/lin_bn_drop.h"
#include "cpu/seed.h"

namespace fastfuse {
namespace {

// The op's non-differentiable arguments, in one value (see BnModuleArgs)
struct LinBnDropArgs {
  BnModuleArgs bn;
  bool pre_relu;
  double p;
  int64_t seed, offset;  // drawn already where the caller gave none
};

struct LinBnDropFunction : torch::autograd::Function<LinBnDropFunction> {
  // Inputs as autograd counts them: x, weight, bn_weight, bn_bias, args (one gradient, or undefined, for each).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bn_weight, const OptTensor& bn_bias, const LinBnDropArgs& a) {
    auto [out, y, mean, var] =
        lin_bn_drop_cpu(x, weight, bn_weight, bn_bias, a.bn.running_mean, a.bn.running_var,
                        a.bn.num_batches_tracked, a.bn.batch_stats, a.bn.update, a.bn.momentum, a.bn.eps, a.pre_relu,
                        a.p, a.seed, a.offset);
    ctx->mark_non_differentiable({y, mean, var});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, weight, y, bn_weight.has_value() ? *bn_weight : at::Tensor(), mean, var});
    ctx->saved_data["batch_stats"] = a.bn.batch_stats;
    ctx->saved_data["eps"] = a.bn.eps;
    ctx->saved_data["pre_relu"] = a.pre_relu;
    ctx->saved_data["p"] = a.p;
    ctx->saved_data["seed"] = a.seed;
    ctx->saved_data["offset"] = a.offset;
    save_bn_params(ctx, bn_weight, bn_bias);
    return {out, y, mean, var};
  }

  // create_graph=True (cpu/double_backward.h): drop(bn(pre(x W^T))) again in ATen ops; the BN bias only shifts the
  // output, so zeros stand in for it.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reference_grads(
      AutogradContext* ctx, const at::Tensor& grad, const variable_list& s, const BnParamGrads& bn, bool need_gx,
      bool need_gw) {
    const bool pre_relu = ctx->saved_data["pre_relu"].toBool(), batch_stats = ctx->saved_data["batch_stats"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    const at::Tensor factor = dropout_factor(
        grad.size(0), grad.size(1), s[4].scalar_type(), ctx->saved_data["p"].toDouble(),
        ctx->saved_data["seed"].toInt(), ctx->saved_data["offset"].toInt());
    const at::Tensor mean = s[4], var = s[5];
    auto forward = [&](const std::vector<at::Tensor>& in) {
      const at::Tensor h = at::linear(in[0], in[1]);
      const at::Tensor z = bn_rows_reference(pre_relu ? at::relu(h) : h, in[2], in[3], mean, var, batch_stats, eps);
      return (factor.defined() ? z * factor : z).to(in[0].scalar_type());
    };
    const at::Tensor bias = bn.need_b ? at::zeros_like(s[4]) : at::Tensor();
    auto g = fastfuse::reference_grads(forward, {s[0], s[1], bn.has_w ? s[3] : at::Tensor(), bias}, grad,
                                       {need_gx, need_gw, bn.need_w, bn.need_b});
    return {g[0], g[1], g[2], g[3]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    // edges: x, weight, then bn_weight and bn_bias where given
    const bool need_gx = ctx->needs_input_grad(0), need_gw = ctx->needs_input_grad(1);
    const BnParamGrads bn = bn_param_grads(ctx, 2);
    variable_list res(5);  // x, weight, bn_weight, bn_bias, args
    if (!grads[0].defined()) return res;  // the output was not used
    auto [gx, gw, gbw, gbb] =
        double_backward_wanted()
            ? reference_grads(ctx, grads[0], s, bn, need_gx, need_gw)
            : lin_bn_drop_backward_cpu(grads[0], s[0], s[1], s[2], bn.has_w ? OptTensor(s[3]) : OptTensor(), s[4],
                                       s[5], ctx->saved_data["batch_stats"].toBool(), ctx->saved_data["eps"].toDouble(),
                                       ctx->saved_data["pre_relu"].toBool(), ctx->saved_data["p"].toDouble(),
                                       ctx->saved_data["seed"].toInt(), ctx->saved_data["offset"].toInt(), need_gx,
                                       need_gw, bn.need_w, bn.need_b);
    if (need_gx) res[0] = gx;
    if (need_gw) res[1] = gw;
    if (bn.need_w) res[2] = gbw;
    if (bn.need_b) res[3] = gbb.to(bn.bias.toScalarType());
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
  const LinBnDropArgs args{{present(running_mean), present(running_var), present(num_batches_tracked), batch_stats,
                            update, momentum, eps},
                           pre_relu, p, key, off};
  auto r = LinBnDropFunction::apply(x, weight, present(bn_weight), present(bn_bias), args);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfuse_C, Autograd, m) { m.impl("lin_bn_drop", &lin_bn_drop_autograd); }

}  // namespace fastfuse
