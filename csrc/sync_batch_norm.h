// fastfuse::sync_batch_norm: batch norm in training with statistics over every rank of a process group, fused with
// the same neighbours as fastfuse::batch_norm (pre-ReLU, residual add, post-ReLU, dropout). Composed on any device
// of batch norm's primitives (the fastfuse_C bn_* ops) and torch's functional collectives, one all_reduce per
// direction (sync_batch_norm_kernel.cpp); docs/sync_batch_norm.md has the design.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <string>

#include "batch_norm.h"

namespace fastfuse {

// (out, mean, var, count): the global per-channel mean and biased variance the output was normalised with, and the
// global count of values per channel (a 0-d tensor of the accumulation type, on the input's device).
Tensor4 sync_batch_norm_kernel(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& running_mean, const OptTensor& running_var,
                               const OptTensor& num_batches_tracked, const OptTensor& residual,
                               c10::optional<double> momentum, double eps, bool pre_relu, bool post_relu, double p,
                               const at::Tensor& seed, c10::string_view group_name);

// (grad_input, grad_weight, grad_bias, grad_residual); grad_weight and grad_bias are this rank's own share (as
// torch's SyncBatchNorm gives them: DDP's gradient all_reduce adds the shares).
Tensor4 sync_batch_norm_backward_kernel(const at::Tensor& grad_out, const at::Tensor& x, const OptTensor& weight,
                                        const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count,
                                        const OptTensor& out, double eps, bool pre_relu, bool post_relu, double p,
                                        const at::Tensor& seed, c10::string_view group_name,
                                        std::array<bool, 4> mask);

}  // namespace fastfuse
