// A BatchNorm module's forward and backward from C++ (the fused CPU paths of the tabular layers): the batch norm
// runs through fastfuse_C::bn_forward / bn_backward (cpu/batch_norm_composite.cpp, the kernels that
// fastfuse.batch_norm's cpp backend calls), and the running statistics are updated with the ATen ops that
// python/fastfuse/ops/batch_norm.py's batch_norm() uses, so a fused path gives the unfused path's bits.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

namespace fastfuse {

using OptTensor = c10::optional<at::Tensor>;

// fastfuse_C::bn_forward(x, weight, bias, running_mean, running_var, residual, training, eps, pre_relu, post_relu,
// p, seed, offset) -> (out, mean, var)
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> call_bn_forward(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, bool training, double eps, bool pre_relu, double p, int64_t seed, int64_t offset,
    const OptTensor& residual = c10::nullopt, bool post_relu = false) {
  using Fn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&, const OptTensor&,
                                                              const OptTensor&, const OptTensor&, const OptTensor&,
                                                              bool, double, bool, bool, double, int64_t, int64_t);
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastfuse_C::bn_forward", "").typed<Fn>();
  return op.call(x, weight, bias, running_mean, running_var, residual, training, eps, pre_relu, post_relu, p, seed,
                 offset);
}

// fastfuse_C::bn_backward(...) -> (grad_input, grad_weight, grad_bias, grad_residual); out: the forward's output,
// needed with a post-ReLU only
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_bn_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const OptTensor& weight, const at::Tensor& mean,
    const at::Tensor& var, bool training, double eps, bool pre_relu, double p, int64_t seed, int64_t offset,
    bool need_gi, bool need_gw, bool need_gb, const OptTensor& out = c10::nullopt, bool post_relu = false,
    bool need_gr = false) {
  using Fn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
      bool, double, bool, bool, double, int64_t, int64_t, bool, bool, bool, bool);
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastfuse_C::bn_backward", "").typed<Fn>();
  return op.call(grad_out, x, weight, mean, var, out, training, eps, pre_relu, post_relu, p, seed, offset, need_gi,
                 need_gw, need_gb, need_gr);
}

// batch_norm()'s running-statistics update (python/fastfuse/ops/batch_norm.py), op for op. n: values per channel.
inline void update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var, const OptTensor& nbt,
                                 c10::optional<double> momentum, const at::Tensor& mean, const at::Tensor& var,
                                 int64_t n) {
  TORCH_CHECK(running_mean.scalar_type() == mean.scalar_type() && running_var.scalar_type() == var.scalar_type(),
              "fastfuse: running statistics must have the batch statistics' dtype here");
  const bool has_nbt = nbt.has_value() && nbt->defined();
  TORCH_CHECK(momentum.has_value() || has_nbt, "fastfuse: momentum=None needs num_batches_tracked");
  if (has_nbt) nbt->add_(1);
  const at::Tensor unbiased = var * (static_cast<double>(n) / static_cast<double>(n - 1));
  if (momentum.has_value()) {
    running_mean.lerp_(mean, *momentum);
    running_var.lerp_(unbiased, *momentum);
  } else {  // cumulative average: 1.0 / num_batches_tracked (Python's 1.0 / t is t.reciprocal() * 1.0)
    const at::Tensor factor = at::reciprocal(nbt->to(mean.scalar_type()));
    running_mean.lerp_(mean, factor);
    running_var.lerp_(unbiased, factor);
  }
}

// fastfuse_C::bn_module (cpu/bn_module_kernel.cpp): a BatchNorm module's whole forward on CPU, with the neighbours
// fastfuse.batch_norm fuses (pre-ReLU, residual, post-ReLU, dropout), in one call: the kernels that
// ops/batch_norm.py's _forward picks for the cpp backend, then the running statistics as batch_norm() updates them.
// (out, mean, var). Its C++ autograd node is cpu/bn_module_autograd.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_module_cpu(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& num_batches_tracked, const OptTensor& residual, bool batch_stats,
    bool update, c10::optional<double> momentum, double eps, bool pre_relu, bool post_relu, double p, int64_t seed,
    int64_t offset);

// Its backward, the kernels ops/batch_norm.py's _backward picks: (grad_input, grad_weight, grad_bias,
// grad_residual), each undefined or empty where not asked for. out: the forward's output (post-ReLU only).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_module_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const OptTensor& weight, const at::Tensor& mean,
    const at::Tensor& var, const OptTensor& out, bool batch_stats, double eps, bool pre_relu, bool post_relu,
    double p, int64_t seed, int64_t offset, bool need_gi, bool need_gw, bool need_gb, bool need_gr);

}  // namespace fastfuse
