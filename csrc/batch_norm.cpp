// fastfuse::batch_norm: the schemas and the one autograd definition.
// The op updates the running statistics itself (mutable arguments, as aten::native_batch_norm does); its
// ADInplaceOrView kernel bumps their versions. mean and var, the statistics the output was normalised with, are
// outputs without gradients. Second derivatives (create_graph=True) differentiate the reference composition in
// ATen ops with the forward's masks: the fused backward kernels are not differentiable themselves.
#include <torch/autograd.h>
#include <torch/library.h>

#include "backend.h"
#include "batch_norm.h"
#include "double_backward.h"

namespace fastfuse {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using ForwardSig = Tensor3(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                           const OptTensor&, const OptTensor&, bool, c10::optional<double>, double, bool, bool, double,
                           const at::Tensor&);
using BackwardSig = Tensor4(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                            const at::Tensor&, const OptTensor&, bool, double, bool, bool, double, const at::Tensor&,
                            std::array<bool, 4>);

c10::TypedOperatorHandle<ForwardSig> forward_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastfuse::batch_norm", "").typed<ForwardSig>();
  return op;
}

struct BatchNormFunction : torch::autograd::Function<BatchNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                               const OptTensor& num_batches_tracked, const OptTensor& residual, bool training,
                               c10::optional<double> momentum, double eps, bool pre_relu, bool post_relu, double p,
                               const at::Tensor& seed) {
    at::AutoDispatchBelowAutograd below;  // through the ADInplaceOrView kernel, which bumps the statistics' versions
    auto [out, mean, var] = forward_op().call(x, weight, bias, running_mean, running_var, num_batches_tracked,
                                              residual, training, momentum, eps, pre_relu, post_relu, p, seed);
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);  // no zero-filled gradients for the outputs without one
    // the post-ReLU's mask is out > 0; without a post-ReLU the output is not needed
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), mean, var, post_relu ? out : at::Tensor(), seed});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["pre_relu"] = pre_relu;
    ctx->saved_data["post_relu"] = post_relu;
    ctx->saved_data["p"] = p;
    ctx->saved_data["bias_dtype"] = present(bias) ? static_cast<int64_t>(bias->scalar_type()) : int64_t(-1);
    ctx->saved_data["backend"] = static_cast<int64_t>(current_backend());
    // needs_input_grad counts the tensor inputs that are present: the edges of weight, bias and residual
    int64_t edge = 1;
    ctx->saved_data["weight_edge"] = present(weight) ? edge++ : int64_t(-1);
    ctx->saved_data["bias_edge"] = present(bias) ? edge++ : int64_t(-1);
    edge += present(running_mean) + present(running_var) + present(num_batches_tracked);
    ctx->saved_data["residual_edge"] = present(residual) ? edge : int64_t(-1);
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("fastfuse::batch_norm_backward", "").typed<BackwardSig>();
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &weight = s[1], &mean = s[2], &var = s[3], &out = s[4], &seed = s[5];
    auto needs = [&](const char* edge) {
      const int64_t e = ctx->saved_data[edge].toInt();
      return e >= 0 && ctx->needs_input_grad(e);
    };
    const std::array<bool, 4> mask{ctx->needs_input_grad(0), needs("weight_edge"), needs("bias_edge"),
                                   needs("residual_edge")};
    variable_list res(14);
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2] || mask[3])) return res;
    const bool training = ctx->saved_data["training"].toBool(), pre_relu = ctx->saved_data["pre_relu"].toBool();
    const bool post_relu = ctx->saved_data["post_relu"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble(), p = ctx->saved_data["p"].toDouble();
    const OptTensor w = weight.defined() ? OptTensor(weight) : c10::nullopt;
    at::Tensor gi, gw, gb, gr;
    BackendGuard backend(static_cast<Backend>(ctx->saved_data["backend"].toInt()));
    if (double_backward_wanted() && x.numel() > 0 && p < 1) {
      static auto dropout = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("fastfuse::dropout", "")
                                .typed<at::Tensor(const at::Tensor&, double, const at::Tensor&)>();
      const at::Tensor xd = bn_channel_dense(x);  // the dropout mask follows its memory order, as in the forward
      const at::Tensor ones = at::ones_like(xd, xd.options().dtype(bn_acc_type(x)));
      at::Tensor factor = p > 0 ? dropout.call(ones, p, seed) : ones;
      if (post_relu) factor = at::where(to_strides(out, xd.strides()) > 0, factor, at::zeros({}, factor.options()));
      auto forward = [&](const std::vector<at::Tensor>& in) {
        return bn_reference_output(in[0], in[1], in[2], in[3], mean, var, factor, training, eps, pre_relu);
      };
      // the bias and the residual only shift the output: zeros stand in for them
      const at::Tensor b = mask[2] ? at::zeros_like(mean) : at::Tensor();
      const at::Tensor r = mask[3] ? at::zeros_like(x, x.options().dtype(bn_acc_type(x))) : at::Tensor();
      const auto g = reference_grads(forward, {x, weight, b, r}, grads[0], {mask[0], mask[1], mask[2], mask[3]});
      gi = g[0], gw = g[1], gb = g[2], gr = g[3];
    } else {
      std::tie(gi, gw, gb, gr) = op.call(grads[0], x, w, mean, var, post_relu ? OptTensor(out) : c10::nullopt,
                                         training, eps, pre_relu, post_relu, p, seed, mask);
    }
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    if (mask[0]) res[0] = gi;
    if (mask[1]) res[1] = gw;
    if (mask[2]) res[2] = bias_dtype >= 0 ? gb.to(static_cast<at::ScalarType>(bias_dtype)) : gb;
    if (mask[3]) res[6] = gr;
    return res;
  }
};

Tensor3 batch_norm_autograd(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                            const OptTensor& running_mean, const OptTensor& running_var,
                            const OptTensor& num_batches_tracked, const OptTensor& residual, bool training,
                            c10::optional<double> momentum, double eps, bool pre_relu, bool post_relu, double p,
                            const at::Tensor& seed) {
  const auto r = BatchNormFunction::apply(x, weight, bias, running_mean, running_var, num_batches_tracked, residual,
                                          training, momentum, eps, pre_relu, post_relu, p, seed);
  return {r[0], r[1], r[2]};
}

Tensor3 batch_norm_inplace_or_view(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                   const OptTensor& running_mean, const OptTensor& running_var,
                                   const OptTensor& num_batches_tracked, const OptTensor& residual, bool training,
                                   c10::optional<double> momentum, double eps, bool pre_relu, bool post_relu,
                                   double p, const at::Tensor& seed) {
  Tensor3 r;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    r = forward_op().call(x, weight, bias, running_mean, running_var, num_batches_tracked, residual, training,
                          momentum, eps, pre_relu, post_relu, p, seed);
  }
  for (const OptTensor* t : {&running_mean, &running_var, &num_batches_tracked})
    if (present(*t)) torch::autograd::impl::bump_version(**t);
  return r;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastfuse, m) {
  // Batch norm fused with an optional pre-ReLU, residual add, post-ReLU and dropout; in training it updates
  // running_mean, running_var and num_batches_tracked as torch's BatchNorm modules do (momentum None: the
  // cumulative average). Returns (output, mean, var): the statistics the output was normalised with.
  m.def("batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "Tensor(c!)? num_batches_tracked, Tensor? residual, bool training, float? momentum, float eps, "
        "bool pre_relu, bool post_relu, float p, Tensor seed) -> (Tensor, Tensor, Tensor)");
  // entries not asked for in output_mask come back as empty tensors
  m.def("batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor var, "
        "Tensor? output, bool training, float eps, bool pre_relu, bool post_relu, float p, Tensor seed, "
        "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastfuse, Autograd, m) { m.impl("batch_norm", &batch_norm_autograd); }
TORCH_LIBRARY_IMPL(fastfuse, ADInplaceOrView, m) { m.impl("batch_norm", &batch_norm_inplace_or_view); }

// the update for the Python backends (python/fastfuse/ops/batch_norm.py)
TORCH_LIBRARY_IMPL(fastfuse_C, CompositeExplicitAutograd, m) {
  m.impl("bn_update_running_stats", [](const at::Tensor& running_mean, const at::Tensor& running_var,
                                       const OptTensor& num_batches_tracked, c10::optional<double> momentum,
                                       const at::Tensor& mean, const at::Tensor& var, int64_t n) {
    bn_update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, var, n);
  });
}

}  // namespace fastfuse
