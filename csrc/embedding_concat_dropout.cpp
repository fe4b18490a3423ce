// fastfuse::embedding_concat_dropout: the schemas and the one autograd definition.
// The tables' gradients come from the backward op, which regenerates the mask; cont's gradient is the last
// columns of the output's gradient. Second derivatives (create_graph=True) differentiate the reference
// composition (index_select per table, concat, times the forward's mask) in ATen ops.
#include <torch/autograd.h>
#include <torch/library.h>

#include "backend.h"
#include "double_backward.h"
#include "embedding_concat_dropout.h"

namespace fastfuse {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using ForwardSig = at::Tensor(const at::Tensor&, at::TensorList, double, const at::Tensor&, const OptTensor&, bool);
using BackwardSig = std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, at::TensorList, double,
                                            const at::Tensor&);

struct EmbeddingConcatDropoutFunction : torch::autograd::Function<EmbeddingConcatDropoutFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_cat, at::TensorList weights, double p,
                            const at::Tensor& seed, const OptTensor& cont, bool check_index) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastfuse::embedding_concat_dropout", "")
                         .typed<ForwardSig>();
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor out = op.call(x_cat, weights, p, seed, cont, check_index);
    std::vector<at::Tensor> saved{x_cat, seed};
    saved.insert(saved.end(), weights.begin(), weights.end());  // for their shapes; the seed regenerates the mask
    ctx->save_for_backward(saved);
    ctx->saved_data["p"] = p;
    ctx->saved_data["has_cont"] = cont.has_value() && cont->defined();
    ctx->saved_data["backend"] = static_cast<int64_t>(current_backend());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastfuse::embedding_concat_dropout_backward", "")
                         .typed<BackwardSig>();
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x_cat = s[0], &seed = s[1];
    const std::vector<at::Tensor> weights(s.begin() + 2, s.end());
    const size_t T = weights.size();
    const double p = ctx->saved_data["p"].toDouble();
    const bool has_cont = ctx->saved_data["has_cont"].toBool();
    // inputs: x_cat, the T tables, p, seed, cont, check_index; edges (present tensors): x_cat, tables, seed, cont
    variable_list res(T + 5);
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return res;
    std::vector<bool> need(T);
    bool any = false;
    for (size_t t = 0; t < T; ++t) any |= need[t] = ctx->needs_input_grad(1 + t);
    int64_t width = 0;
    for (const auto& w : weights) width += w.size(1);
    if (any) {
      std::vector<at::Tensor> g;
      if (double_backward_wanted()) {
        static auto dropout = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("fastfuse::dropout", "")
                                  .typed<at::Tensor(const at::Tensor&, double, const at::Tensor&)>();
        const at::Tensor codes = x_cat.to(at::kLong);
        // element (b, j) of the (B, D) block is element b * D + j of the mask's stream: dropout's on a dense block
        const at::Tensor factor =
            p > 0 ? dropout.call(at::ones({x_cat.size(0), width}, weights[0].options()), p, seed) : at::Tensor();
        auto forward = [&](const std::vector<at::Tensor>& ws) {
          std::vector<at::Tensor> cols;
          for (size_t t = 0; t < T; ++t) cols.push_back(ws[t].index_select(0, codes.select(1, t)));
          const at::Tensor block = at::cat(cols, 1);
          return factor.defined() ? block * factor : block;
        };
        g = reference_grads(forward, weights, grad.narrow(1, 0, width), need);
      } else {
        BackendGuard backend(static_cast<Backend>(ctx->saved_data["backend"].toInt()));
        g = op.call(grad, x_cat, weights, p, seed);
      }
      for (size_t t = 0; t < T; ++t)
        if (need[t]) res[1 + t] = g[t];
    }
    if (has_cont && ctx->needs_input_grad(T + 2)) res[T + 3] = grad.narrow(1, width, grad.size(1) - width);
    return res;
  }
};

at::Tensor embedding_concat_dropout_autograd(const at::Tensor& x_cat, at::TensorList weights, double p,
                                             const at::Tensor& seed, const OptTensor& cont, bool check_index) {
  return EmbeddingConcatDropoutFunction::apply(x_cat, weights, p, seed, cont, check_index);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastfuse, m) {
  // (B, sum d_t + C): embedding rows in column order with dropout, then `cont` (already batch-normed) unchanged
  m.def("embedding_concat_dropout(Tensor x_cat, Tensor[] weights, float p, Tensor seed, Tensor? cont, "
        "bool check_index) -> Tensor");
  m.def("embedding_concat_dropout_backward(Tensor grad_output, Tensor x_cat, Tensor[] weights, float p, "
        "Tensor seed) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastfuse, Autograd, m) { m.impl("embedding_concat_dropout", &embedding_concat_dropout_autograd); }

// the code check for the Python backends (python/fastfuse/ops/embedding_concat_dropout.py)
TORCH_LIBRARY_IMPL(fastfuse_C, CompositeExplicitAutograd, m) {
  m.impl("embedding_check_codes", [](const at::Tensor& x_cat, at::TensorList weights) { check_codes(x_cat, weights); });
}

}  // namespace fastfuse
