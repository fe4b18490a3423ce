// Autograd of fastfuse_C::embedding_concat_dropout_bn (the eager CPU path of the tabular input layer) in C++.
// As a Python autograd.Function the node cost ~60 us per forward+backward at Rossmann sizes (apply over 29
// inputs, Python forward and backward, tuple conversions): as much as the kernels' own multi-threaded time.
// Here forward and backward are the same C++ kernels with no Python in between. torch.compile does not come
// here: it traces the torch.library op (python/fastfuse/ops/embedding_concat_dropout.py).
#include <torch/autograd.h>
#include <torch/library.h>

#include "embedding_concat_dropout.h"
#include "cpu/bn_node.h"
#include "cpu/double_backward.h"
#include "cpu/seed.h"

namespace fastfuse {
namespace {

// The op's non-differentiable arguments, in one value (see BnModuleArgs)
struct EcdBnArgs {
  double p;
  int64_t seed, offset;  // drawn already where the caller gave none
  BnModuleArgs bn;
  bool check_index;
};

struct EcdBnFunction : torch::autograd::Function<EcdBnFunction> {
  // Inputs as autograd counts them: x_cat, cont, bn_weight, bn_bias, every table, args (backward returns one
  // gradient, or an undefined tensor, for each).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x_cat, const at::Tensor& cont,
                               const OptTensor& bn_weight, const OptTensor& bn_bias, at::TensorList weights,
                               const EcdBnArgs& a) {
    auto [out, mean, var] = embedding_concat_dropout_bn_cpu(
        x_cat, weights, a.p, a.seed, a.offset, cont, bn_weight, bn_bias, a.bn.running_mean, a.bn.running_var,
        a.bn.num_batches_tracked, a.bn.batch_stats, a.bn.update, a.bn.momentum, a.bn.eps, a.check_index);
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);
    const at::Tensor w = bn_weight.has_value() ? *bn_weight : at::Tensor();
    ctx->save_for_backward({x_cat, cont, w, mean, var});
    // the tables only for their shapes: kept as references (not SavedVariables, whose checks cost more than the
    // rest of the bookkeeping over 24 tables), as the Python node did
    ctx->saved_data["weights"] = weights.vec();
    ctx->saved_data["p"] = a.p;
    ctx->saved_data["seed"] = a.seed;
    ctx->saved_data["offset"] = a.offset;
    ctx->saved_data["batch_stats"] = a.bn.batch_stats;
    ctx->saved_data["eps"] = a.bn.eps;
    save_bn_params(ctx, bn_weight, bn_bias);
    return {out, mean, var};
  }

  // create_graph=True (cpu/double_backward.h): [drop(tables' rows) | bn(cont)] again in ATen ops; the BN bias only
  // shifts the output, so zeros stand in for it. Codes outside a table (check_index=False) give zero rows.
  static variable_list reference_grads(AutogradContext* ctx, const at::Tensor& grad, const variable_list& saved,
                                       const std::vector<at::Tensor>& weights, const BnParamGrads& bn,
                                       bool need_tables, bool need_gi) {
    const at::Tensor &x_cat = saved[0], &mean = saved[3], &var = saved[4];
    const int64_t T = static_cast<int64_t>(weights.size()), B = x_cat.size(0);
    int64_t D = 0;
    for (const auto& w : weights) D += w.size(1);
    const at::Tensor factor = dropout_factor(B, D, mean.scalar_type(), ctx->saved_data["p"].toDouble(),
                                             ctx->saved_data["seed"].toInt(), ctx->saved_data["offset"].toInt());
    const bool batch_stats = ctx->saved_data["batch_stats"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    auto forward = [&](const std::vector<at::Tensor>& in) {  // in: cont, bn weight, bn bias, tables
      std::vector<at::Tensor> cols;
      for (int64_t t = 0; t < T; ++t) {
        const at::Tensor idx = x_cat.select(1, t), ok = (idx >= 0).logical_and(idx < in[3 + t].size(0));
        cols.push_back(at::embedding(in[3 + t], at::where(ok, idx, 0)) * ok.unsqueeze(1));
      }
      at::Tensor block = at::cat(cols, 1);
      if (factor.defined()) block = block * factor;
      const at::Tensor z = bn_rows_reference(in[0], in[1], in[2], mean, var, batch_stats, eps);
      return at::cat({block.to(in[0].scalar_type()), z.to(in[0].scalar_type())}, 1);
    };
    std::vector<at::Tensor> inputs{saved[1], bn.has_w ? saved[2] : at::Tensor(),
                                   bn.need_b ? at::zeros_like(mean) : at::Tensor()};
    std::vector<bool> need{need_gi, bn.need_w, bn.need_b};
    for (int64_t t = 0; t < T; ++t) {
      inputs.push_back(weights[t]);
      need.push_back(need_tables && ctx->needs_input_grad(bn.next_edge + t));
    }
    const auto g = fastfuse::reference_grads(forward, inputs, grad, need);
    variable_list res(4 + T + 1);  // x_cat, cont, bn_weight, bn_bias, tables, args
    res[1] = g[0], res[2] = g[1], res[3] = g[2];
    for (int64_t t = 0; t < T; ++t) res[4 + t] = g[3 + t];
    return res;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x_cat = saved[0], &cont = saved[1], &w = saved[2], &mean = saved[3], &var = saved[4];
    const std::vector<at::Tensor> weights = ctx->saved_data["weights"].toTensorVector();
    const int64_t T = static_cast<int64_t>(weights.size());
    // edges: x_cat (never requires grad), cont, then bn_weight and bn_bias where given, then the tables
    const bool need_gi = ctx->needs_input_grad(1);
    const BnParamGrads bn = bn_param_grads(ctx, 2);
    bool need_tables = false;
    for (int64_t t = 0; t < T; ++t) need_tables = need_tables || ctx->needs_input_grad(bn.next_edge + t);
    variable_list res(4 + T + 1);  // x_cat, cont, bn_weight, bn_bias, tables, args
    if (!grads[0].defined()) return res;  // the output was not used
    if (double_backward_wanted()) return reference_grads(ctx, grads[0], saved, weights, bn, need_tables, need_gi);
    const auto g = embedding_concat_dropout_bn_backward_cpu(
        grads[0], x_cat, weights, ctx->saved_data["p"].toDouble(), ctx->saved_data["seed"].toInt(),
        ctx->saved_data["offset"].toInt(), cont, bn.has_w ? OptTensor(w) : OptTensor(), mean, var,
        ctx->saved_data["batch_stats"].toBool(), ctx->saved_data["eps"].toDouble(), need_tables, need_gi, bn.need_w,
        bn.need_b);
    if (need_gi) res[1] = g[g.size() - 3];
    if (bn.need_w) res[2] = g[g.size() - 2];
    if (bn.need_b) res[3] = g[g.size() - 1].to(bn.bias.toScalarType());
    if (need_tables)
      for (int64_t t = 0; t < T; ++t) res[4 + t] = g[t];
    return res;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_concat_dropout_bn_autograd(
    const at::Tensor& x_cat, at::TensorList weights, double p, c10::optional<int64_t> seed,
    c10::optional<int64_t> offset, const at::Tensor& cont, const OptTensor& bn_weight, const OptTensor& bn_bias,
    const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& num_batches_tracked,
    bool batch_stats, bool update, c10::optional<double> momentum, double eps, bool check_index) {
  check_tables(x_cat, weights);  // before the seed is drawn: a bad call leaves the generator as it was
  // non-contiguous tables (rare) as contiguous copies: the kernels read rows
  std::vector<at::Tensor> tables;
  for (const auto& w : weights)
    if (!w.is_contiguous()) {
      for (const auto& v : weights) tables.push_back(v.contiguous());
      break;
    }
  if (!tables.empty()) weights = tables;
  // no seed given: drawn here, before the forward, so that the node keeps it for the backward's mask
  const auto [key, off] = seed_or_draw(seed, offset, p);
  const EcdBnArgs args{p, key, off,
                       {present(running_mean), present(running_var), present(num_batches_tracked), batch_stats, update,
                        momentum, eps},
                       check_index};
  auto r = EcdBnFunction::apply(x_cat, cont, present(bn_weight), present(bn_bias), weights, args);
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfuse_C, Autograd, m) {
  m.impl("embedding_concat_dropout_bn", &embedding_concat_dropout_bn_autograd);
}

}  // namespace fastfuse
