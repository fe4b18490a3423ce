// Second derivatives for the C++ autograd nodes (cpu/*_autograd.cpp), as python/fastfuse/_double_backward.py
// does for the torch.library ops: the fused backward kernels are not differentiable, so a backward that runs with
// create_graph=True (grad mode on inside it) takes its gradients from autograd through the same computation in
// ATen ops (the same masks: the dropout factor is the dropout kernel applied to ones).
#pragma once
#include <torch/autograd.h>

#include <vector>

#include "dropout.h"

namespace fastfuse {

inline bool double_backward_wanted() { return at::GradMode::is_enabled(); }

// Gradients of forward(inputs) against grad, as differentiable tensors: one per input, undefined where need is
// false. Inputs that need a gradient but do not require one (stand-ins) are made leaves.
template <typename F>
std::vector<at::Tensor> reference_grads(const F& forward, std::vector<at::Tensor> inputs, const at::Tensor& grad,
                                        const std::vector<bool>& need) {
  at::AutoGradMode on(true);
  std::vector<at::Tensor> wrt;
  for (size_t i = 0; i < inputs.size(); ++i)
    if (need[i]) {
      if (!inputs[i].requires_grad()) inputs[i] = inputs[i].detach().requires_grad_();
      wrt.push_back(inputs[i]);
    }
  const at::Tensor out = forward(inputs);
  const auto g = torch::autograd::grad({out}, wrt, {grad.to(out.scalar_type())}, /*retain_graph=*/true,
                                       /*create_graph=*/true, /*allow_unused=*/true);
  std::vector<at::Tensor> res(inputs.size());
  for (size_t i = 0, k = 0; i < inputs.size(); ++i)
    if (need[i]) res[i] = g[k++];
  return res;
}

// keep ? 1/(1-p) : 0 over a dense (B, C) block in the accumulation dtype (undefined when p == 0)
inline at::Tensor dropout_factor(int64_t B, int64_t C, at::ScalarType acc, double p, int64_t seed, int64_t offset) {
  if (p <= 0) return at::Tensor();
  return dropout_cpu(at::ones({B, C}, at::TensorOptions().dtype(acc)), p, seed, offset);
}

// Batch norm of a (B, C) tensor in ATen ops, in the accumulation dtype: batch statistics, or the given ones
inline at::Tensor bn_rows_reference(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                                    const at::Tensor& mean, const at::Tensor& var, bool batch_stats, double eps) {
  const at::Tensor ha = h.to(h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const at::Tensor mu = batch_stats ? ha.mean(0) : mean;
  const at::Tensor s2 = batch_stats ? (ha - mu).square().mean(0) : var;
  at::Tensor z = (ha - mu) * at::rsqrt(s2 + eps);
  if (weight.defined()) z = z * weight.to(z.scalar_type());
  return bias.defined() ? z + bias : z;
}

}  // namespace fastfuse
