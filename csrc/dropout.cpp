// fastfuse::dropout: the schemas and the one autograd definition.
// Both ops multiply by the same mask, so each one's derivative is dropout_backward (double backward included).
// The backward lays the gradient out like the output first: the mask follows the output's storage order.
#include <torch/autograd.h>
#include <torch/library.h>

#include "backend.h"
#include "dropout.h"
#include "layout.h"

namespace fastfuse {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using DropoutSig = at::Tensor(const at::Tensor&, double, const at::Tensor&);

template <bool kBackward>
struct DropoutFunction : torch::autograd::Function<DropoutFunction<kBackward>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double p, const at::Tensor& seed) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow(kBackward ? "fastfuse::dropout_backward" : "fastfuse::dropout", "")
                         .typed<DropoutSig>();
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor out = op.call(x, p, seed);
    ctx->saved_data["p"] = p;
    ctx->saved_data["strides"] = out.sym_strides().vec();
    ctx->saved_data["backend"] = static_cast<int64_t>(current_backend());
    ctx->save_for_backward({seed});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("fastfuse::dropout_backward", "").typed<DropoutSig>();
    variable_list res(3);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return res;
    BackendGuard backend(static_cast<Backend>(ctx->saved_data["backend"].toInt()));
    const at::Tensor g = to_strides(grads[0], ctx->saved_data["strides"].toSymIntVector());
    res[0] = op.call(g, ctx->saved_data["p"].toDouble(), ctx->get_saved_variables()[0]);
    return res;
  }
};

at::Tensor dropout_autograd(const at::Tensor& x, double p, const at::Tensor& seed) {
  return DropoutFunction<false>::apply(x, p, seed);
}

at::Tensor dropout_backward_autograd(const at::Tensor& g, double p, const at::Tensor& seed) {
  return DropoutFunction<true>::apply(g, p, seed);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastfuse, m) {
  m.def("dropout(Tensor input, float p, Tensor seed) -> Tensor");
  m.def("dropout_backward(Tensor grad_output, float p, Tensor seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastfuse, Autograd, m) {
  m.impl("dropout", &dropout_autograd);
  m.impl("dropout_backward", &dropout_backward_autograd);
}

}  // namespace fastfuse
