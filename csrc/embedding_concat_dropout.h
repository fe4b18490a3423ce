// Host-side pieces of embedding_concat_dropout shared by the CPU and CUDA kernels.
//
// Output (B, D + C): columns [off_t, off_t + d_t) hold row x_cat[b, t] of table t (D = sum d_t), with
// dropout: element (b, j) of the (B, D) embedding block is element b*D + j of the Philox stream
// (csrc/philox.h); then the C columns of `cont` (already batch-normed), copied unchanged.
// Backward: table t's gradient row r = sum over b with x_cat[b, t] == r of the dropped-out grad_output
// row segment, summed in a fixed order (deterministic, no atomics).
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace fastfuse {

struct TableLayout {
  std::vector<int64_t> rows, dims, offs;  // n_t, d_t, first output column of table t
  int64_t width = 0;                      // D
};

inline TableLayout table_layout(const at::TensorList& weights) {
  TableLayout L;
  for (const auto& w : weights) {
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "embedding_concat_dropout: tables must be contiguous 2-D");
    TORCH_CHECK(w.scalar_type() == weights[0].scalar_type(), "embedding_concat_dropout: tables differ in dtype");
    L.rows.push_back(w.size(0));
    L.dims.push_back(w.size(1));
    L.offs.push_back(L.width);
    L.width += w.size(1);
  }
  return L;
}

// The per-table checks of the Python wrapper (ops/embedding_concat_dropout.py, _validate), with its errors (ValueError,
// the same messages), for the eager path that skips them in Python: a loop over the tables there cost ~10 us.
inline void check_tables(const at::Tensor& x_cat, const at::TensorList& weights) {
  auto dtype = [](const at::Tensor& w) { return "torch." + std::string(c10::getDtypeNames(w.scalar_type()).first); };
  for (size_t t = 0; t < weights.size(); ++t) {
    const at::Tensor& w = weights[t];
    TORCH_CHECK_VALUE(w.defined() && w.dim() == 2 && at::isFloatingType(w.scalar_type()), "embedding_concat_dropout: ",
                      "table ", t, " must be a 2-D floating-point tensor (n_t, d_t)");
    TORCH_CHECK_VALUE(w.scalar_type() == weights[0].scalar_type() && w.device() == weights[0].device(),
                      "embedding_concat_dropout: table ", t, " is ", dtype(w), " on ", w.device(), ", table 0 is ",
                      dtype(weights[0]), " on ", weights[0].device(), "; all tables must match");
    TORCH_CHECK_VALUE(w.device() == x_cat.device(), "embedding_concat_dropout: x_cat is on ", x_cat.device(),
                      ", the tables on ", w.device());
  }
}

inline void check_embedding_inputs(const at::Tensor& x_cat, const at::TensorList& weights,
                                   const c10::optional<at::Tensor>& cont) {
  TORCH_CHECK(x_cat.scalar_type() == at::kLong && x_cat.dim() == 2 && x_cat.is_contiguous(),
              "embedding_concat_dropout kernel: x_cat must be a contiguous int64 (B, T) tensor");
  TORCH_CHECK(x_cat.size(1) == static_cast<int64_t>(weights.size()) && !weights.empty(),
              "embedding_concat_dropout kernel: x_cat has ", x_cat.size(1), " columns but ", weights.size(),
              " tables were given");
  if (cont.has_value()) {
    TORCH_CHECK(cont->dim() == 2 && cont->size(0) == x_cat.size(0) && cont->is_contiguous() &&
                    cont->scalar_type() == weights[0].scalar_type(),
                "embedding_concat_dropout kernel: cont must be a contiguous (B, C) tensor of the tables' dtype");
  }
}

at::Tensor embedding_concat_dropout_cpu(const at::Tensor& x_cat, at::TensorList weights, double p, int64_t seed,
                                        int64_t offset, const c10::optional<at::Tensor>& cont, bool check_index);
std::vector<at::Tensor> embedding_concat_dropout_backward_cpu(const at::Tensor& grad, const at::Tensor& x_cat,
                                                              at::TensorList weights, double p, int64_t seed,
                                                              int64_t offset);
// With the continuous columns' batch norm in the same call (the eager CPU path;
// cpu/embedding_concat_dropout_kernel.cpp).
// seed and offset None: drawn from torch's default CPU generator as _rng.new_seed() draws them (cpu/seed.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_concat_dropout_bn_cpu(
    const at::Tensor& x_cat, at::TensorList weights, double p, c10::optional<int64_t> seed,
    c10::optional<int64_t> offset, const at::Tensor& cont,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& num_batches_tracked, bool batch_stats, bool update,
    c10::optional<double> momentum, double eps, bool check_index);
std::vector<at::Tensor> embedding_concat_dropout_bn_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_cat, at::TensorList weights, double p, int64_t seed,
    int64_t offset, const at::Tensor& cont, const c10::optional<at::Tensor>& bn_weight, const at::Tensor& mean,
    const at::Tensor& var, bool batch_stats, double eps, bool need_tables, bool need_gi, bool need_gw, bool need_gb);
#ifdef FASTFUSE_WITH_CUDA
at::Tensor embedding_concat_dropout_cuda(const at::Tensor& x_cat, at::TensorList weights, double p, int64_t seed,
                                         int64_t offset, const c10::optional<at::Tensor>& cont, bool check_index);
std::vector<at::Tensor> embedding_concat_dropout_backward_cuda(const at::Tensor& grad, const at::Tensor& x_cat,
                                                               at::TensorList weights, double p, int64_t seed,
                                                               int64_t offset);
#endif

}  // namespace fastfuse
