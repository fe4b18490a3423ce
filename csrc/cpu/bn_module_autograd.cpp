// Autograd of fastfuse_C::bn_module (the BatchNorm modules' eager CPU path) in C++: one node, no Python between
// the forward and the backward kernels. torch.compile does not come here: it traces fastfuse::batch_norm
// (python/fastfuse/nn/batch_norm.py).
#include <torch/autograd.h>
#include <torch/library.h>

#include "batch_norm.h"
#include "cpu/bn_module.h"
#include "cpu/bn_node.h"
#include "cpu/double_backward.h"
#include "cpu/seed.h"

namespace fastfuse {
namespace {

// The op's non-differentiable arguments, in one value (see BnModuleArgs)
struct BnArgs {
  BnModuleArgs bn;
  bool pre_relu, post_relu;
  double p;
  int64_t seed, offset;  // drawn already where the caller gave none
};

struct BnModuleFunction : torch::autograd::Function<BnModuleFunction> {
  // Inputs as autograd counts them: x, weight, bias, residual, args (one gradient, or undefined, for each).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual, const BnArgs& a) {
    auto [out, mean, var] = bn_module_cpu(x, weight, bias, a.bn.running_mean, a.bn.running_var,
                                          a.bn.num_batches_tracked, residual, a.bn.batch_stats, a.bn.update,
                                          a.bn.momentum, a.bn.eps, a.pre_relu, a.post_relu, a.p, a.seed, a.offset);
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);
    // the post-ReLU's mask is out > 0; without a post-ReLU the output is not needed
    ctx->save_for_backward({x, weight.has_value() ? *weight : at::Tensor(), mean, var,
                            a.post_relu ? out : at::Tensor()});
    ctx->saved_data["batch_stats"] = a.bn.batch_stats;
    ctx->saved_data["eps"] = a.bn.eps;
    ctx->saved_data["pre_relu"] = a.pre_relu;
    ctx->saved_data["post_relu"] = a.post_relu;
    ctx->saved_data["p"] = a.p;
    ctx->saved_data["seed"] = a.seed;
    ctx->saved_data["offset"] = a.offset;
    ctx->saved_data["residual"] = residual.has_value();
    save_bn_params(ctx, weight, bias);
    return {out, mean, var};
  }

  // create_graph=True (cpu/double_backward.h): dropout(post(bn(pre(x)) + residual)) again in ATen ops, as
  // ops/batch_norm.py's _reference_grads; the bias and the residual only shift the output, so zeros stand in for
  // them. The post-ReLU's and the dropout's masks are the forward's (its output, its seed).
  static std::vector<at::Tensor> reference_grads(AutogradContext* ctx, const at::Tensor& grad, const variable_list& s,
                                                 const BnParamGrads& bn, bool need_gi, bool need_gr) {
    const at::Tensor &x = s[0], &mean = s[2], &var = s[3], &out = s[4];
    const bool pre_relu = ctx->saved_data["pre_relu"].toBool(), batch_stats = ctx->saved_data["batch_stats"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble(), p = ctx->saved_data["p"].toDouble();
    const auto acc = mean.scalar_type();
    at::Tensor factor;
    if (out.defined()) {
      factor = (out > 0).to(acc) * (p > 0 ? 1.0 / (1.0 - p) : 1.0);
    } else if (p > 0) {
      // the mask follows the memory order of the layout the kernels ran in
      factor = dropout_cpu(at::ones_like(bn_channel_dense(x), x.options().dtype(acc)), p,
                           ctx->saved_data["seed"].toInt(), ctx->saved_data["offset"].toInt());
    }
    std::vector<int64_t> dims{0}, shape{1, x.size(1)};
    for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d), shape.push_back(1);
    auto forward = [&](const std::vector<at::Tensor>& in) {  // x, weight, bias, residual
      at::Tensor xa = in[0].to(acc);
      if (pre_relu) xa = xa.clamp_min(0);
      const at::Tensor mu = batch_stats ? xa.mean(dims) : mean;
      const at::Tensor s2 = batch_stats ? xa.var(dims, /*correction=*/0) : var;
      at::Tensor z = (xa - mu.view(shape)) * at::rsqrt(s2 + eps).view(shape);
      if (in[1].defined()) z = z * in[1].to(acc).view(shape);
      if (in[2].defined()) z = z + in[2].view(shape);
      if (in[3].defined()) z = z + in[3];
      return (factor.defined() ? z * factor : z).to(in[0].scalar_type());
    };
    const at::Tensor bias = bn.need_b ? at::zeros_like(mean) : at::Tensor();
    const at::Tensor res = need_gr ? at::zeros_like(x, x.options().dtype(acc)) : at::Tensor();
    return fastfuse::reference_grads(forward, {x, bn.has_w ? s[1] : at::Tensor(), bias, res}, grad,
                                     {need_gi, bn.need_w, bn.need_b, need_gr});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    // edges: x, then weight and bias where given, then the residual where given
    const bool need_gi = ctx->needs_input_grad(0);
    const BnParamGrads bn = bn_param_grads(ctx, 1);
    const bool need_gr = ctx->saved_data["residual"].toBool() && ctx->needs_input_grad(bn.next_edge);
    variable_list res(5);  // x, weight, bias, residual, args
    if (!grads[0].defined() || !(need_gi || bn.need_w || bn.need_b || need_gr)) return res;
    const double p = ctx->saved_data["p"].toDouble();
    std::vector<at::Tensor> g(4);
    // (an empty input or p >= 1 made the output constant: bn_backward's zeros, as in ops/batch_norm.py)
    if (double_backward_wanted() && s[0].numel() > 0 && p < 1) {
      g = reference_grads(ctx, grads[0], s, bn, need_gi, need_gr);
    } else {
      std::tie(g[0], g[1], g[2], g[3]) = bn_module_backward_cpu(
          grads[0], s[0], bn.has_w ? OptTensor(s[1]) : OptTensor(), s[2], s[3],
          s[4].defined() ? OptTensor(s[4]) : OptTensor(), ctx->saved_data["batch_stats"].toBool(),
          ctx->saved_data["eps"].toDouble(), ctx->saved_data["pre_relu"].toBool(),
          ctx->saved_data["post_relu"].toBool(), p, ctx->saved_data["seed"].toInt(),
          ctx->saved_data["offset"].toInt(), need_gi, bn.need_w, bn.need_b, need_gr);
    }
    if (need_gi) res[0] = g[0];
    if (bn.need_w) res[1] = g[1];
    if (bn.need_b) res[2] = g[2].to(bn.bias.toScalarType());
    if (need_gr) res[3] = g[3];
    return res;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_module_autograd(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& num_batches_tracked, const OptTensor& residual, bool batch_stats,
    bool update, c10::optional<double> momentum, double eps, bool pre_relu, bool post_relu, double p,
    c10::optional<int64_t> seed, c10::optional<int64_t> offset) {
  // no seed given: drawn here, before the forward, so that the node keeps it for the backward's mask
  const auto [key, off] = seed_or_draw(seed, offset, p);
  const BnArgs args{{present(running_mean), present(running_var), present(num_batches_tracked), batch_stats, update,
                     momentum, eps},
                    pre_relu, post_relu, p, key, off};
  auto r = BnModuleFunction::apply(x, present(weight), present(bias), present(residual), args);
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfuse_C, Autograd, m) { m.impl("bn_module", &bn_module_autograd); }

}  // namespace fastfuse
