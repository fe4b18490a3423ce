// fastfuse_C::lin_bn_drop and its backward on CPU (cpu/lin_bn_drop_kernel.cpp), for their C++ autograd node
// (cpu/lin_bn_drop_autograd.cpp).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace fastfuse {

void check_lin_bn_drop(const at::Tensor& x, const at::Tensor& weight);

// (out, y, mean, var); seed and offset None: drawn as _rng.new_seed() would (cpu/seed.h) when p > 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lin_bn_drop_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bn_weight,
    const c10::optional<at::Tensor>& bn_bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& num_batches_tracked,
    bool batch_stats, bool update, c10::optional<double> momentum, double eps, bool pre_relu, double p,
    c10::optional<int64_t> seed, c10::optional<int64_t> offset);

// (grad_x, grad_weight, grad_bn_weight, grad_bn_bias), empty where not asked for
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lin_bn_drop_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& y,
    const c10::optional<at::Tensor>& bn_weight, const at::Tensor& mean, const at::Tensor& var, bool batch_stats,
    double eps, bool pre_relu, double p, int64_t seed, int64_t offset, bool need_gx, bool need_gw, bool need_gbw,
    bool need_gbb);

}  // namespace fastfuse
