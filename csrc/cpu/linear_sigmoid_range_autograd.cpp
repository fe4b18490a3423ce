// Autograd of fastfuse_C::linear_sigmoid_range (the last Linear and SigmoidRange of fastai's tabular head, CPU,
// eager mode) in C++: one node where torch has four. torch.compile does not come here: it traces the modules
// (python/fastfuse/models/tabular.py).
#include <torch/autograd.h>
#include <torch/library.h>

#include "cpu/double_backward.h"
#include "cpu/linear_sigmoid_range.h"
#include "cpu/seed.h"

namespace fastfuse {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct LinearSigmoidRangeFunction : torch::autograd::Function<LinearSigmoidRangeFunction> {
  // Inputs as autograd counts them: x, weight, bias (an edge only where given), low, high.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bias, double low, double high) {
    auto [out, s] = linear_sigmoid_range_cpu(x, weight, bias, low, high);
    ctx->mark_non_differentiable({s});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, weight, s, bias.has_value() ? *bias : at::Tensor()});
    ctx->saved_data["has_b"] = bias.has_value();
    ctx->saved_data["low"] = low;
    ctx->saved_data["high"] = high;
    return {out, s};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto v = ctx->get_saved_variables();
    const bool has_b = ctx->saved_data["has_b"].toBool();
    const bool need_gx = ctx->needs_input_grad(0), need_gw = ctx->needs_input_grad(1),
               need_gb = has_b && ctx->needs_input_grad(2);
    const double low = ctx->saved_data["low"].toDouble(), high = ctx->saved_data["high"].toDouble();
    variable_list res(5);  // x, weight, bias, low, high
    if (!grads[0].defined()) return res;  // the output was not used
    if (double_backward_wanted()) {  // create_graph=True: the same function in ATen ops (cpu/double_backward.h)
      auto forward = [&](const std::vector<at::Tensor>& in) {
        return at::sigmoid(at::linear(in[0], in[1], in[2])) * (high - low) + low;
      };
      auto g = reference_grads(forward, {v[0], v[1], v[3]}, grads[0], {need_gx, need_gw, need_gb});
      res[0] = g[0], res[1] = g[1], res[2] = g[2];
      return res;
    }
    auto [gx, gw, gb] =
        linear_sigmoid_range_backward_cpu(grads[0], v[0], v[1], v[2], low, high, need_gx, need_gw, need_gb);
    if (need_gx) res[0] = gx;
    if (need_gw) res[1] = gw;
    if (need_gb) res[2] = gb;
    return res;
  }
};

std::tuple<at::Tensor, at::Tensor> linear_sigmoid_range_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                                 const OptTensor& bias, double low, double high) {
  auto r = LinearSigmoidRangeFunction::apply(x, weight, present(bias), low, high);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfuse_C, Autograd, m) { m.impl("linear_sigmoid_range", &linear_sigmoid_range_autograd); }

}  // namespace fastfuse
