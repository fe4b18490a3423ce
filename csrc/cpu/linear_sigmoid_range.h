// fastfuse_C::linear_sigmoid_range and its backward on CPU (cpu/linear_sigmoid_range_kernel.cpp), for its C++
// autograd node (cpu/linear_sigmoid_range_autograd.cpp).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace fastfuse {

using OptTensor = c10::optional<at::Tensor>;

// (out, s): out = s * (high - low) + low, s = sigmoid(x W^T + b) (kept for the backward); checks its arguments
std::tuple<at::Tensor, at::Tensor> linear_sigmoid_range_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                            const OptTensor& bias, double low, double high);

// (grad_x, grad_weight, grad_bias), empty where not asked for
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_sigmoid_range_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& s, double low,
    double high, bool need_gx, bool need_gw, bool need_gb);

}  // namespace fastfuse
