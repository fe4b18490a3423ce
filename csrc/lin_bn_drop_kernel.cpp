// fastfuse::lin_bn_drop's kernel (every device; see lin_bn_drop.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "batch_norm.h"
#include "cpu/alloc.h"
#include "lin_bn_drop.h"

namespace fastfuse {
namespace {

constexpr int64_t kSplitRows = 128;

using BnSig = Tensor3(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                      const OptTensor&, const OptTensor&, bool, c10::optional<double>, double, bool, bool, double,
                      const at::Tensor&);
using BnBackwardSig = Tensor4(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                              const at::Tensor&, const OptTensor&, bool, double, bool, bool, double, const at::Tensor&,
                              std::array<bool, 4>);

at::Tensor empty_output(at::IntArrayRef sizes, const at::Tensor& like) {
  return like.is_cpu() ? empty_cached(sizes, like.scalar_type()) : at::empty(sizes, like.options());
}

// Runs fn(0) and fn(1) side by side on two threads where they are both needed, one after the other otherwise. Worker
// threads inherit neither the caller's grad mode nor its inference mode: the GEMMs run below autograd.
template <typename Fn>
void two_tasks(bool both, const Fn& fn) {
  at::parallel_for(0, 2, both ? 1 : 2, [&](int64_t i0, int64_t i1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = i0; i < i1; ++i) fn(i);
  });
}

}  // namespace

Tensor4 lin_bn_drop_kernel(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bn_weight,
                           const OptTensor& bn_bias, const OptTensor& running_mean, const OptTensor& running_var,
                           const OptTensor& num_batches_tracked, bool training, c10::optional<double> momentum,
                           double eps, bool pre_relu, double p, const at::Tensor& seed) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) &&
                  x.scalar_type() == weight.scalar_type() && x.device() == weight.device(),
              "lin_bn_drop: expected x (B, in) and weight (out, in) of one dtype and device, got ", x.sizes(), " ",
              x.scalar_type(), " on ", x.device(), " and ", weight.sizes(), " ", weight.scalar_type(), " on ",
              weight.device());
  static auto bn = c10::Dispatcher::singleton().findSchemaOrThrow("fastfuse::batch_norm", "").typed<BnSig>();
  const int64_t out_features = weight.size(0), half = out_features / 2;
  at::Tensor y = empty_output({x.size(0), out_features}, x);
  if (x.is_cpu() && x.size(0) <= kSplitRows && half > 0) {
    two_tasks(true, [&](int64_t i) {
      at::Tensor yi = y.narrow(1, i ? half : 0, i ? out_features - half : half);
      at::mm_out(yi, x, weight.narrow(0, i ? half : 0, yi.size(1)).t());
    });
  } else {
    at::mm_out(y, x, weight.t());
  }
  auto [out, mean, var] = bn.call(y, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, c10::nullopt,
                                  training, momentum, eps, pre_relu, false, p, seed);
  return {out, y, mean, var};
}

Tensor4 lin_bn_drop_backward_kernel(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& y, const OptTensor& bn_weight, const at::Tensor& mean,
                                    const at::Tensor& var, bool training, double eps, bool pre_relu, double p,
                                    const at::Tensor& seed, std::array<bool, 4> mask) {
  static auto bn_backward = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("fastfuse::batch_norm_backward", "")
                                .typed<BnBackwardSig>();
  const auto [need_gx, need_gw, need_gbw, need_gbb] = mask;
  auto [gy, gbw, gbb, gr] = bn_backward.call(grad_out, y, bn_weight, mean, var, c10::nullopt, training, eps, pre_relu,
                                             false, p, seed, {need_gx || need_gw, need_gbw, need_gbb, false});
  const at::Tensor empty = x.new_empty({0});
  at::Tensor gw = need_gw ? empty_output(weight.sizes(), weight) : empty;
  at::Tensor gx = need_gx ? empty_output(x.sizes(), x) : empty;
  auto gemm = [&](int64_t i) {
    if (i == 0 && need_gw) at::mm_out(gw, gy.t(), x);
    if (i == 1 && need_gx) at::mm_out(gx, gy, weight);
  };
  if (x.is_cpu() && x.size(0) <= kSplitRows) {
    two_tasks(need_gw && need_gx, gemm);
  } else {
    gemm(0);
    gemm(1);
  }
  return {gx, gw, need_gbw ? gbw : empty, need_gbb ? gbb : empty};
}

TORCH_LIBRARY_IMPL(fastfuse, CompositeExplicitAutograd, m) {
  m.impl("lin_bn_drop", &lin_bn_drop_kernel);
  m.impl("lin_bn_drop_backward", &lin_bn_drop_backward_kernel);
}

}  // namespace fastfuse
