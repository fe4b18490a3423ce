// fastfuse::lin_bn_drop: fastai's LinBnDrop(lin_first=True) block with its bias-free Linear, [ReLU], BatchNorm1d and
// [Dropout]: y = x W^T, then fastfuse::batch_norm's dropout(bn(relu?(y))) with its running statistics. Backward:
// fastfuse::batch_norm_backward to gy, then gW = gy^T x and gx = gy W.
//
// One kernel serves every device: the two GEMMs are ATen's, and the batch norm calls fastfuse::batch_norm and its
// backward through the dispatcher (so the backend override reaches them). On CPU:
// - y, gW and gx come from the output cache (cpu/alloc.h): a training step asks for the same sizes every time,
//   and fresh, a weight gradient's page faults cost about as much as the GEMM that writes it;
// - up to kSplitRows rows, the forward's GEMM runs as two single-threaded GEMMs over the halves of the output
//   features side by side, and the backward's two GEMMs (same multiply-add count at small batch) side by side:
//   small GEMMs use two threads poorly. The split depends on the shape only, so the bits do not depend on the
//   thread count (they differ from nn.Linear's single GEMM by rounding).
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace fastfuse {

using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (out, y, mean, var)
Tensor4 lin_bn_drop_kernel(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bn_weight,
                           const c10::optional<at::Tensor>& bn_bias, const c10::optional<at::Tensor>& running_mean,
                           const c10::optional<at::Tensor>& running_var,
                           const c10::optional<at::Tensor>& num_batches_tracked, bool training,
                           c10::optional<double> momentum, double eps, bool pre_relu, double p, const at::Tensor& seed);

// (grad_input, grad_weight, grad_bn_weight, grad_bn_bias), empty where output_mask says so
Tensor4 lin_bn_drop_backward_kernel(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& y, const c10::optional<at::Tensor>& bn_weight,
                                    const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
                                    bool pre_relu, double p, const at::Tensor& seed, std::array<bool, 4> output_mask);

}  // namespace fastfuse
