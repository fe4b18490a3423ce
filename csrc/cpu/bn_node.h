// What the C++ autograd nodes of the fused CPU ops with a BatchNorm module inside (cpu/*_autograd.cpp:
// embedding_concat_dropout_bn, lin_bn_drop) share: the module's non-differentiable arguments, and the bookkeeping
// of its optional weight and bias, which take an input edge each only where given.
#pragma once
#include <torch/autograd.h>

#include <cstdint>

namespace fastfuse {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

// The module's arguments as python/fastfuse/ops/_bn_module.py's cpp_bn_args gives them, kept in one value so that
// autograd does not take the running statistics (updated in place, never differentiated) for inputs.
struct BnModuleArgs {
  OptTensor running_mean, running_var, num_batches_tracked;
  bool batch_stats, update;
  c10::optional<double> momentum;
  double eps;
};

// forward: which of weight and bias are given (the bias by its dtype, for its gradient's)
inline void save_bn_params(AutogradContext* ctx, const OptTensor& weight, const OptTensor& bias) {
  ctx->saved_data["has_w"] = weight.has_value();
  ctx->saved_data["bias"] = bias.has_value() ? c10::IValue(bias->scalar_type()) : c10::IValue();
}

// backward: the weight's edge is `first` where given, the bias's next; next_edge is the input after them
struct BnParamGrads {
  bool has_w, need_w, need_b;
  c10::IValue bias;  // its dtype, or None without one
  int64_t next_edge;
};

inline BnParamGrads bn_param_grads(AutogradContext* ctx, int64_t first) {
  BnParamGrads r;
  r.has_w = ctx->saved_data["has_w"].toBool();
  r.bias = ctx->saved_data["bias"];
  r.need_w = r.has_w && ctx->needs_input_grad(first);
  r.need_b = !r.bias.isNone() && ctx->needs_input_grad(first + r.has_w);
  r.next_edge = first + r.has_w + !r.bias.isNone();
  return r;
}

}  // namespace fastfuse
