// Second derivatives: the fused backward kernels are not differentiable, so a backward that runs with
// create_graph=True (grad mode on inside it) takes its gradients from autograd through the op's reference
// composition in ATen ops, with the forward's masks.
#pragma once
#include <torch/autograd.h>

#include <vector>


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

}  // namespace fastfuse
