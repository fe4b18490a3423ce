// fastfuse::sync_batch_norm: the schemas and the one autograd definition (the kernels are sync_batch_norm_kernel.cpp).
// As fastfuse::batch_norm: the op updates the running statistics itself (mutable arguments), its ADInplaceOrView
// kernel bumps their versions, and mean, var and count are outputs without gradients. The op always uses batch
// statistics: eval mode, and training without a process group of more than one rank, are fastfuse::batch_norm
// (python/fastfuse/ops/sync_batch_norm.py picks). Second derivatives are not supported: the reference composition
// would need a differentiable all_reduce of its own.
#include <torch/autograd.h>
#include <torch/library.h>

#include "backend.h"
#include "double_backward.h"
#include "sync_batch_norm.h"

namespace fastfuse {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::TypedOperatorHandle<decltype(sync_batch_norm_kernel)> forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastfuse::sync_batch_norm", "")
                       .typed<decltype(sync_batch_norm_kernel)>();
  return op;
}

struct SyncBatchNormFunction : torch::autograd::Function<SyncBatchNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                               const OptTensor& num_batches_tracked, const OptTensor& residual,
                               c10::optional<double> momentum, double eps, bool pre_relu, bool post_relu, double p,
                               const at::Tensor& seed, c10::string_view group_name) {
    at::AutoDispatchBelowAutograd below;  // through the ADInplaceOrView kernel, which bumps the statistics' versions
    auto [out, mean, var, count] = forward_op().call(x, weight, bias, running_mean, running_var, num_batches_tracked,
                                                     residual, momentum, eps, pre_relu, post_relu, p, seed,
                                                     group_name);
    ctx->mark_non_differentiable({mean, var, count});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), mean, var, count, post_relu ? out : at::Tensor(), seed});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["pre_relu"] = pre_relu;
    ctx->saved_data["post_relu"] = post_relu;
    ctx->saved_data["p"] = p;
    ctx->saved_data["group_name"] = std::string(group_name);
    ctx->saved_data["bias_dtype"] = present(bias) ? static_cast<int64_t>(bias->scalar_type()) : int64_t(-1);
    // needs_input_grad counts the tensor inputs that are present: the edges of weight, bias and residual
    int64_t edge = 1;
    ctx->saved_data["weight_edge"] = present(weight) ? edge++ : int64_t(-1);
    ctx->saved_data["bias_edge"] = present(bias) ? edge++ : int64_t(-1);
    edge += present(running_mean) + present(running_var) + present(num_batches_tracked);
    ctx->saved_data["residual_edge"] = present(residual) ? edge : int64_t(-1);
    return {out, mean, var, count};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastfuse::sync_batch_norm_backward", "")
                         .typed<decltype(sync_batch_norm_backward_kernel)>();
    TORCH_CHECK(!double_backward_wanted(),
                "fastfuse sync_batch_norm: second derivatives (create_graph=True) are not supported");
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &weight = s[1], &mean = s[2], &var = s[3], &count = s[4], &out = s[5], &seed = s[6];
    auto needs = [&](const char* edge) {
      const int64_t e = ctx->saved_data[edge].toInt();
      return e >= 0 && ctx->needs_input_grad(e);
    };
    const std::array<bool, 4> mask{ctx->needs_input_grad(0), needs("weight_edge"), needs("bias_edge"),
                                   needs("residual_edge")};
    variable_list res(14);
    if (!(mask[0] || mask[1] || mask[2] || mask[3])) return res;
    // every rank must join the backward's all_reduce: a rank whose output got no gradient adds zeros
    const at::Tensor g = grads[0].defined() ? grads[0] : at::zeros_like(x);
    const bool post_relu = ctx->saved_data["post_relu"].toBool();
    auto [gi, gw, gb, gr] =
        op.call(g, x, weight.defined() ? OptTensor(weight) : c10::nullopt, mean, var, count,
                post_relu ? OptTensor(out) : c10::nullopt, ctx->saved_data["eps"].toDouble(),
                ctx->saved_data["pre_relu"].toBool(), post_relu, ctx->saved_data["p"].toDouble(), seed,
                ctx->saved_data["group_name"].toStringRef(), mask);
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    if (mask[0]) res[0] = gi;
    if (mask[1]) res[1] = gw;
    if (mask[2]) res[2] = bias_dtype >= 0 ? gb.to(static_cast<at::ScalarType>(bias_dtype)) : gb;
    if (mask[3]) res[6] = gr;
    return res;
  }
};

Tensor4 sync_batch_norm_autograd(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                 const OptTensor& running_mean, const OptTensor& running_var,
                                 const OptTensor& num_batches_tracked, const OptTensor& residual,
                                 c10::optional<double> momentum, double eps, bool pre_relu, bool post_relu, double p,
                                 const at::Tensor& seed, c10::string_view group_name) {
  const auto r = SyncBatchNormFunction::apply(x, weight, bias, running_mean, running_var, num_batches_tracked,
                                              residual, momentum, eps, pre_relu, post_relu, p, seed, group_name);
  return {r[0], r[1], r[2], r[3]};
}

Tensor4 sync_batch_norm_inplace_or_view(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                        const OptTensor& running_mean, const OptTensor& running_var,
                                        const OptTensor& num_batches_tracked, const OptTensor& residual,
                                        c10::optional<double> momentum, double eps, bool pre_relu, bool post_relu,
                                        double p, const at::Tensor& seed, c10::string_view group_name) {
  Tensor4 r;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    r = forward_op().call(x, weight, bias, running_mean, running_var, num_batches_tracked, residual, momentum, eps,
                          pre_relu, post_relu, p, seed, group_name);
  }
  for (const OptTensor* t : {&running_mean, &running_var, &num_batches_tracked})
    if (present(*t)) torch::autograd::impl::bump_version(**t);
  return r;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastfuse, m) {
  // Batch norm in training with the statistics of every rank of the process group `group_name` (torch's
  // ProcessGroup.group_name), fused as fastfuse::batch_norm; updates the running statistics with the global mean
  // and unbiased variance. Returns (output, mean, var, count): the global statistics and values per channel.
  m.def("sync_batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, Tensor? residual, float? momentum, float eps, "
        "bool pre_relu, bool post_relu, float p, Tensor seed, str group_name) -> (Tensor, Tensor, Tensor, Tensor)");
  // entries not asked for in output_mask come back as empty tensors; grad_weight and grad_bias are this rank's share
  m.def("sync_batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor var, "
        "Tensor count, Tensor? output, float eps, bool pre_relu, bool post_relu, float p, Tensor seed, "
        "str group_name, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastfuse, Autograd, m) { m.impl("sync_batch_norm", &sync_batch_norm_autograd); }
TORCH_LIBRARY_IMPL(fastfuse, ADInplaceOrView, m) { m.impl("sync_batch_norm", &sync_batch_norm_inplace_or_view); }

}  // namespace fastfuse
