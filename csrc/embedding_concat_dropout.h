// Host-side pieces of embedding_concat_dropout shared by the CPU and CUDA kernels.
//
// Output (B, D + C): columns [off_t, off_t + d_t) hold row x_cat[b, t] of table t (D = sum d_t), with
// dropout: element (b, j) of the (B, D) embedding block is element b*D + j of the Philox stream
// (csrc/philox.h); then the C columns of `cont` (already batch-normed), copied unchanged.
// Backward: table t's gradient row r = sum over b with x_cat[b, t] == r of the dropped-out grad_output
// row segment, summed in a fixed order (deterministic, no atomics).
#pragma once
#include <ATen/ATen.h>

#include "dropout.h"

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

// The per-table checks, with the errors the Python wrapper raises for its own arguments (ValueError).
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
#ifdef FASTFUSE_WITH_CUDA
at::Tensor embedding_concat_dropout_cuda(const at::Tensor& x_cat, at::TensorList weights, double p, int64_t seed,
                                         int64_t offset, const c10::optional<at::Tensor>& cont, bool check_index);
std::vector<at::Tensor> embedding_concat_dropout_backward_cuda(const at::Tensor& grad, const at::Tensor& x_cat,
                                                               at::TensorList weights, double p, int64_t seed,
                                                               int64_t offset);
#endif

#ifdef FASTFUSE_WITH_CUDA
// check_codes on CUDA tensors, with no host sync: a bad code is a device-side assert (cuda/embedding_concat_dropout_kernel.cu)
void check_codes_cuda(const at::Tensor& x_cat, at::TensorList weights);
#endif

// Codes outside [0, n_t): on CPU, IndexError naming the first bad one in row-major order (the CPU kernel also
// checks inside its gather loop). On CUDA, check_codes_cuda: no sync, a device-side assert. On other devices a
// reduction and a device sync. check_index=False skips the check.
inline void check_codes(const at::Tensor& x_cat_in, const at::TensorList& weights) {
  if (x_cat_in.numel() == 0) return;
#ifdef FASTFUSE_WITH_CUDA
  if (x_cat_in.is_cuda()) return check_codes_cuda(x_cat_in, weights);
#endif
  const int64_t T = static_cast<int64_t>(weights.size());
  int64_t bad_b = -1, bad_t = -1, bad_code = 0;
  if (x_cat_in.is_cpu()) {
    const at::Tensor x_cat = x_cat_in.to(at::kLong).contiguous();
    const int64_t* x = x_cat.const_data_ptr<int64_t>();
    std::vector<int64_t> rows;
    for (const auto& w : weights) rows.push_back(w.size(0));
    const int64_t B = x_cat.size(0);
    for (int64_t b = 0; b < B && bad_b < 0; ++b)
      for (int64_t t = 0; t < T; ++t)
        if (static_cast<uint64_t>(x[b * T + t]) >= static_cast<uint64_t>(rows[t])) {  // negative codes too
          bad_b = b, bad_t = t, bad_code = x[b * T + t];
          break;
        }
  } else {
    std::vector<int64_t> rows;
    for (const auto& w : weights) rows.push_back(w.size(0));
    const at::Tensor n = at::tensor(rows, x_cat_in.options().dtype(at::kLong).device(at::kCPU)).to(x_cat_in.device());
    const at::Tensor bad = (x_cat_in < 0).logical_or(x_cat_in >= n);
    if (!bad.any().item<bool>()) return;
    const at::Tensor where = bad.nonzero()[0].cpu();
    bad_b = where[0].item<int64_t>(), bad_t = where[1].item<int64_t>();
    bad_code = x_cat_in[bad_b][bad_t].item<int64_t>();
  }
  TORCH_CHECK_INDEX(bad_b < 0, "embedding_concat_dropout: x_cat column ", bad_t, " has code ", bad_code, " (row ",
                    bad_b, "), outside [0, ", bad_t >= 0 ? weights[bad_t].size(0) : 0, ") of its embedding table");
}

// The op on one device: the layouts and rules around the device's kernels. Forward kernel(x_cat, weights, p, key,
// offset, cont, check_index), which checks the codes itself when check_index (the CPU's inside its gather loop, the
// CUDA entry with check_codes first); p == 1 runs it with p = 0 and zeroes the embedding block as torch's x * 0
// would.
template <typename Kernel>
at::Tensor embedding_concat_dropout_op(const at::Tensor& x_cat_in, at::TensorList weights_in, double p,
                                       const at::Tensor& seed, const c10::optional<at::Tensor>& cont_in,
                                       bool check_index, Kernel kernel) {
  TORCH_CHECK(x_cat_in.dim() == 2 && x_cat_in.size(1) == static_cast<int64_t>(weights_in.size()),
              "embedding_concat_dropout: x_cat must be (batch, n_tables)");
  check_tables(x_cat_in, weights_in);
  const at::Tensor x_cat = x_cat_in.to(at::kLong).contiguous();
  std::vector<at::Tensor> weights;
  for (const auto& w : weights_in) weights.push_back(w.contiguous());
  if (weights.empty()) {  // the continuous columns alone (or nothing)
    return cont_in.has_value() ? cont_in->clone() : x_cat.new_empty({x_cat.size(0), 0}, at::kFloat);
  }
  c10::optional<at::Tensor> cont;
  if (cont_in.has_value()) cont = cont_in->to(weights[0].scalar_type()).contiguous();
  const auto [key, offset] = seed_words(seed, p);
  if (p >= 1) {
    at::Tensor out = kernel(x_cat, weights, 0.0, key, offset, cont, check_index);
    int64_t width = 0;
    for (const auto& w : weights) width += w.size(1);
    out.narrow(1, 0, width).mul_(0);
    return out;
  }
  return kernel(x_cat, weights, p, key, offset, cont, check_index);
}

// Backward kernel(grad, x_cat, weights, p, key, offset) -> every table's gradient.
template <typename Kernel>
std::vector<at::Tensor> embedding_concat_dropout_backward_op(const at::Tensor& grad, const at::Tensor& x_cat_in,
                                                             at::TensorList weights_in, double p,
                                                             const at::Tensor& seed, Kernel kernel) {
  const at::Tensor x_cat = x_cat_in.to(at::kLong).contiguous();
  std::vector<at::Tensor> weights;
  for (const auto& w : weights_in) weights.push_back(w.contiguous());
  if (p >= 1 || weights.empty()) {
    std::vector<at::Tensor> zeros;
    for (const auto& w : weights) zeros.push_back(at::zeros_like(w));
    return zeros;
  }
  const auto [key, offset] = seed_words(seed, p);
  return kernel(grad.contiguous(), x_cat, weights, p, key, offset);
}

}  // namespace fastfuse
