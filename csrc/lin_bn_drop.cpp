// fastfuse::lin_bn_drop: the schemas and the one autograd definition (the kernel is lin_bn_drop_kernel.cpp).
// As fastfuse::batch_norm: the op updates the running statistics itself, its ADInplaceOrView kernel bumps their
// versions, y, mean and var are outputs without gradients, and second derivatives (create_graph=True)
// differentiate the reference composition (x W^T, then batch_norm's) in ATen ops with the forward's mask.
#include <torch/autograd.h>
#include <torch/library.h>

#include "backend.h"
#include "batch_norm.h"
#include "double_backward.h"
#include "lin_bn_drop.h"

namespace fastfuse {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using BackwardSig = Tensor4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const OptTensor&, const at::Tensor&, const at::Tensor&, bool, double, bool, double,
                            const at::Tensor&, std::array<bool, 4>);

c10::TypedOperatorHandle<decltype(lin_bn_drop_kernel)> forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastfuse::lin_bn_drop", "")
                       .typed<decltype(lin_bn_drop_kernel)>();
  return op;
}

struct LinBnDropFunction : torch::autograd::Function<LinBnDropFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
                               const OptTensor& running_var, const OptTensor& num_batches_tracked, bool training,
                               c10::optional<double> momentum, double eps, bool pre_relu, double p,
                               const at::Tensor& seed) {
    at::AutoDispatchBelowAutograd below;  // through the ADInplaceOrView kernel, which bumps the statistics' versions
    auto [out, y, mean, var] = forward_op().call(x, weight, bn_weight, bn_bias, running_mean, running_var,
                                                 num_batches_tracked, training, momentum, eps, pre_relu, p, seed);
    ctx->mark_non_differentiable({y, mean, var});
    ctx->set_materialize_grads(false);  // no zero-filled gradients for the outputs without one
    ctx->save_for_backward({x, weight, y, bn_weight.value_or(at::Tensor()), mean, var, seed});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["pre_relu"] = pre_relu;
    ctx->saved_data["p"] = p;
    ctx->saved_data["backend"] = static_cast<int64_t>(current_backend());
    // needs_input_grad counts the tensor inputs that are present: the edges of bn_weight and bn_bias
    int64_t edge = 2;
    ctx->saved_data["bn_weight_edge"] = present(bn_weight) ? edge++ : int64_t(-1);
    ctx->saved_data["bn_bias_edge"] = present(bn_bias) ? edge : int64_t(-1);
    return {out, y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("fastfuse::lin_bn_drop_backward", "").typed<BackwardSig>();
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &weight = s[1], &y = s[2], &bn_weight = s[3], &mean = s[4], &var = s[5], &seed = s[6];
    auto needs = [&](const char* edge) {
      const int64_t e = ctx->saved_data[edge].toInt();
      return e >= 0 && ctx->needs_input_grad(e);
    };
    const std::array<bool, 4> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), needs("bn_weight_edge"),
                                   needs("bn_bias_edge")};
    variable_list res(13);
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2] || mask[3])) return res;
    const bool training = ctx->saved_data["training"].toBool(), pre_relu = ctx->saved_data["pre_relu"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble(), p = ctx->saved_data["p"].toDouble();
    BackendGuard backend(static_cast<Backend>(ctx->saved_data["backend"].toInt()));
    at::Tensor gx, gw, gbw, gbb;
    if (double_backward_wanted() && x.size(0) > 0 && p < 1) {
      static auto dropout = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("fastfuse::dropout", "")
                                .typed<at::Tensor(const at::Tensor&, double, const at::Tensor&)>();
      const at::Tensor ones = at::ones_like(y, y.options().dtype(bn_acc_type(y)));
      const at::Tensor factor = p > 0 ? dropout.call(ones, p, seed) : ones;
      auto forward = [&](const std::vector<at::Tensor>& in) {
        return bn_reference_output(at::mm(in[0], in[1].t()), in[2], in[3], at::Tensor(), mean, var, factor, training,
                                   eps, pre_relu);
      };
      const at::Tensor b = mask[3] ? at::zeros_like(mean) : at::Tensor();  // the bias only shifts the output
      const auto g = reference_grads(forward, {x, weight, bn_weight, b}, grads[0], {mask[0], mask[1], mask[2],
                                                                                    mask[3]});
      gx = g[0], gw = g[1], gbw = g[2], gbb = g[3];
    } else {
      std::tie(gx, gw, gbw, gbb) = op.call(grads[0], x, weight, y,
                                           bn_weight.defined() ? OptTensor(bn_weight) : c10::nullopt, mean, var,
                                           training, eps, pre_relu, p, seed, mask);
    }
    if (mask[0]) res[0] = gx;
    if (mask[1]) res[1] = gw;
    if (mask[2]) res[2] = gbw;
    if (mask[3]) res[3] = gbb;
    return res;
  }
};

Tensor4 lin_bn_drop_autograd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bn_weight,
                             const OptTensor& bn_bias, const OptTensor& running_mean, const OptTensor& running_var,
                             const OptTensor& num_batches_tracked, bool training, c10::optional<double> momentum,
                             double eps, bool pre_relu, double p, const at::Tensor& seed) {
  const auto r = LinBnDropFunction::apply(x, weight, bn_weight, bn_bias, running_mean, running_var,
                                          num_batches_tracked, training, momentum, eps, pre_relu, p, seed);
  return {r[0], r[1], r[2], r[3]};
}

Tensor4 lin_bn_drop_inplace_or_view(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bn_weight,
                                    const OptTensor& bn_bias, const OptTensor& running_mean,
                                    const OptTensor& running_var, const OptTensor& num_batches_tracked, bool training,
                                    c10::optional<double> momentum, double eps, bool pre_relu, double p,
                                    const at::Tensor& seed) {
  Tensor4 r;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    r = forward_op().call(x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training,
                          momentum, eps, pre_relu, p, seed);
  }
  for (const OptTensor* t : {&running_mean, &running_var, &num_batches_tracked})
    if (present(*t)) torch::autograd::impl::bump_version(**t);
  return r;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastfuse, m) {
  // Linear(bias=False) -> [ReLU] -> BatchNorm1d -> [Dropout] on (B, in): returns (output, y = x W^T, mean, var);
  // the running statistics as fastfuse::batch_norm updates them
  m.def("lin_bn_drop(Tensor input, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool training, float? momentum, float eps, "
        "bool pre_relu, float p, Tensor seed) -> (Tensor, Tensor, Tensor, Tensor)");
  // (grad_input, grad_weight, grad_bn_weight, grad_bn_bias); entries not asked for come back empty
  m.def("lin_bn_drop_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor y, Tensor? bn_weight, "
        "Tensor mean, Tensor var, bool training, float eps, bool pre_relu, float p, Tensor seed, "
        "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastfuse, Autograd, m) { m.impl("lin_bn_drop", &lin_bn_drop_autograd); }
TORCH_LIBRARY_IMPL(fastfuse, ADInplaceOrView, m) { m.impl("lin_bn_drop", &lin_bn_drop_inplace_or_view); }

}  // namespace fastfuse
