// Batch norm primitives shared by the CPU and CUDA kernels; the per-channel arithmetic between them is done
// once in python/fastfuse/ops/batch_norm.py, and fastfuse/reference.py defines what each one computes.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/FunctionRef.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastfuse {

// How per-channel kernels walk a dense (N, C, *) tensor in storage order: "planes" (contiguous, element i has
// channel (i / S) % C) or "rows" (channel innermost, e.g. channels_last: channel i % C).
struct BnGeom {
  int64_t numel, C, S;
  bool rows;
};

// True for a dense (N, C, *) tensor whose channel dim is innermost in memory (channels_last and its N-D kin).
inline bool bn_channels_inner(const at::Tensor& x) {
  std::vector<int64_t> perm{0};
  for (int64_t d = 2; d < x.dim(); ++d) perm.push_back(d);
  perm.push_back(1);
  return x.permute(perm).is_contiguous();
}

// _layout.channel_dense: the layouts the per-channel kernels take; x itself when contiguous or channels-inner, else
// a contiguous copy
inline at::Tensor bn_channel_dense(const at::Tensor& x) {
  if (x.is_contiguous() || x.dim() < 3) return x.contiguous();
  return bn_channels_inner(x) ? x : x.contiguous();
}

// The dtype of the statistics and per-channel vectors: double for double input, float otherwise.
inline at::ScalarType bn_acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// An optional per-channel parameter (a BatchNorm's weight or bias) as the CPU kernels take it: contiguous, of the
// accumulation type acc, or undefined where there is none.
inline at::Tensor bn_acc_vector(const c10::optional<at::Tensor>& v, at::ScalarType acc) {
  if (!v.has_value() || !v->defined()) return at::Tensor();
  return v->scalar_type() == acc ? v->contiguous() : v->to(acc).contiguous();
}

inline BnGeom bn_geometry(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "fastfuse batch_norm: expected an (N, C, *) tensor, got ", x.dim(), "D");
  const int64_t C = x.size(1), numel = x.numel();
  if (x.is_contiguous()) {
    const int64_t S = numel == 0 ? 1 : numel / (x.size(0) * C);
    return {numel, C, S, S == 1};
  }
  TORCH_CHECK(bn_channels_inner(x),
              "fastfuse batch_norm kernel: expected a contiguous or channels-last tensor (the router makes it so)");
  return {numel, C, 1, true};
}

inline void bn_check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.strides() == x.strides() && t.scalar_type() == x.scalar_type(),
              "fastfuse batch_norm kernel: ", name, " must have the input's shape, strides and dtype");
}

using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Which mask the backward applies to grad_out: none, the post-ReLU's (out > 0, which also means "kept" when
// there is dropout too) or dropout's (Philox word >= threshold). with_mask_kind calls fn with it as a
// compile-time constant, so each kernel is instantiated once per kind.
enum MaskKind { kMaskNone = 0, kMaskPost = 1, kMaskDrop = 2 };

template <typename Fn>
void with_mask_kind(bool post_relu, double p, Fn fn) {
  if (post_relu)
    fn(std::integral_constant<int, kMaskPost>());
  else if (p > 0)
    fn(std::integral_constant<int, kMaskDrop>());
  else
    fn(std::integral_constant<int, kMaskNone>());
}

// The training backward's coefficients of one channel from its gradient sums sg = sum(g), sgx = sum(g (x' - mean))
// (rounded to the accumulation type T) over n values: grad_x = k1 g + k2 (x' - mean) + k3, k1 = invstd * weight
// (w: the weight, or null for none). Every CPU route computes them here, op for op, so all give the same bits.
template <typename T>
struct BnGradCoeffs {
  T invstd, k1, k2, k3;
};

template <typename T>
inline BnGradCoeffs<T> bn_grad_coeffs(T var, const T* w, T eps, T sg, T sgx, T n) {
  const T invstd = T(1) / std::sqrt(var + eps);
  const T k1 = w ? invstd * *w : invstd;
  return {invstd, k1, -k1 * invstd * invstd * sgx / n, -k1 * sg / n};
}

// x86-64 with GCC/Clang: the CPU kernels are also built for AVX2 + FMA and picked at run time.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define FASTFUSE_BN_AVX2 1
#endif

#define FASTFUSE_BN_DECLARE(dev)                                                                            \
  Tensor2 bn_stats_##dev(const at::Tensor& x, bool pre_relu);                                              \
  at::Tensor bn_apply_##dev(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,          \
                            const at::Tensor& bias, const c10::optional<at::Tensor>& residual, bool pre_relu, \
                            bool post_relu, double p, int64_t seed, int64_t offset);                        \
  Tensor2 bn_grad_reduce_##dev(const at::Tensor& grad_out, const at::Tensor& x,                            \
                               const c10::optional<at::Tensor>& out, const at::Tensor& mean, bool pre_relu, \
                               bool post_relu, double p, int64_t seed, int64_t offset);                     \
  Tensor2 bn_grad_apply_##dev(const at::Tensor& grad_out, const at::Tensor& x,                             \
                              const c10::optional<at::Tensor>& out, const at::Tensor& mean,                 \
                              const at::Tensor& k1, const at::Tensor& k2, const at::Tensor& k3, bool pre_relu, \
                              bool post_relu, double p, int64_t seed, int64_t offset, bool need_gi, bool need_g);

FASTFUSE_BN_DECLARE(cpu)

// CPU only: training forward / backward of a contiguous (N, C, *) tensor, one channel at a time, and the backward
// of a rows tensor with few rows, a block of channels at a time (see cpu/batch_norm_impl.h). weight and bias are
// given for planes (ones / zeros when the module has none); rows take an undefined weight for none.
#define FASTFUSE_BN_PLANES_DECLARE                                                                            \
  Tensor3 bn_train_planes_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,          \
                              const c10::optional<at::Tensor>& residual, double eps, bool pre_relu,          \
                              bool post_relu, double p, int64_t seed, int64_t offset);                       \
  Tensor4 bn_train_planes_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,                      \
                                       const c10::optional<at::Tensor>& out, const at::Tensor& weight,       \
                                       const at::Tensor& mean, const at::Tensor& var, double eps,            \
                                       bool pre_relu, bool post_relu, double p, int64_t seed, int64_t offset, \
                                       bool need_g);                                                          \
  Tensor4 bn_train_rows_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,                        \
                                     const c10::optional<at::Tensor>& out, const at::Tensor& weight,         \
                                     const at::Tensor& mean, const at::Tensor& var, double eps, bool pre_relu, \
                                     bool post_relu, double p, int64_t seed, int64_t offset, bool need_gw,   \
                                     bool need_gb, bool need_g);
FASTFUSE_BN_PLANES_DECLARE
// Whether a training backward on x can take bn_train_rows_backward (a rows tensor with at most a few hundred rows
// and 256 columns or more; cpu/batch_norm_impl.h), given the bytes one element brings into cache:
bool bn_rows_route_cpu(const at::Tensor& x, int64_t bytes_per_elem);
inline int64_t bn_rows_backward_bytes(const at::Tensor& x, bool post_relu, double p) {
  return x.element_size() * (post_relu ? 3 : 2) + (p > 0 && !post_relu ? 2 : 0);  // x, grad_out (out; keys)
}
#ifdef FASTFUSE_WITH_CUDA
FASTFUSE_BN_DECLARE(cuda)
#endif

}  // namespace fastfuse
