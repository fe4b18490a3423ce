// fastfuse::reflect_conv2d: the schemas and the one autograd definition.
// Second derivatives (create_graph=True) differentiate the reference composition, torch's reflection pad +
// conv2d, in ATen ops: the fused backward kernels are not differentiable themselves.
#include <torch/autograd.h>
#include <torch/library.h>

#include "backend.h"
#include "double_backward.h"
#include "reflect_conv2d.h"

namespace fastfuse {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using ForwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, at::IntArrayRef,
                              at::IntArrayRef, at::IntArrayRef, int64_t);
using BackwardSig = Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                            at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 3>);

struct ReflectConv2dFunction : torch::autograd::Function<ReflectConv2dFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups) {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("fastfuse::reflect_conv2d", "").typed<ForwardSig>();
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor out = op.call(x, w, b, stride, padding, dilation, groups);
    ctx->save_for_backward({x, w});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["has_bias"] = b.has_value() && b->defined();
    ctx->saved_data["backend"] = static_cast<int64_t>(current_backend());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastfuse::reflect_conv2d_backward", "")
                         .typed<BackwardSig>();
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &w = s[1];
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
    variable_list res(7);
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return res;
    const auto stride = ctx->saved_data["stride"].toIntVector(), padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    at::Tensor gi, gw, gb;
    if (double_backward_wanted()) {
      auto forward = [&](const std::vector<at::Tensor>& in) {
        return at::conv2d(rconv_pad(in[0], padding), in[1], in[2].defined() ? OptTensor(in[2]) : c10::nullopt,
                          stride, at::IntArrayRef{0, 0}, dilation, groups);
      };
      // the gradients do not depend on the bias's value
      const at::Tensor b = mask[2] ? at::zeros({w.size(0)}, w.options()) : at::Tensor();
      const auto g = reference_grads(forward, {x, w, b}, grads[0], {mask[0], mask[1], mask[2]});
      gi = g[0], gw = g[1], gb = g[2];
    } else {
      BackendGuard backend(static_cast<Backend>(ctx->saved_data["backend"].toInt()));
      std::tie(gi, gw, gb) = op.call(grads[0], x, w, stride, padding, dilation, groups, mask);
    }
    if (mask[0]) res[0] = gi;
    if (mask[1]) res[1] = gw;
    if (mask[2]) res[2] = gb;
    return res;
  }
};

at::Tensor reflect_conv2d_autograd(const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups) {
  return ReflectConv2dFunction::apply(x, w, b, stride, padding, dilation, groups);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastfuse, m) {
  m.def("reflect_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> Tensor");
  // entries not asked for in output_mask come back as empty tensors
  m.def("reflect_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastfuse, Autograd, m) { m.impl("reflect_conv2d", &reflect_conv2d_autograd); }

}  // namespace fastfuse
