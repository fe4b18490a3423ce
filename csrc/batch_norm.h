// fastfuse::batch_norm: four primitives per device (per-channel statistics; the fused elementwise forward; the
// per-channel gradient sums; the fused elementwise backward; fastfuse/reference.py defines what each computes),
// and the op composed from them on any device.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "dropout.h"
#include "layout.h"

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


// ---- fastfuse::batch_norm on one device ------------------------------------------------------------------------
// The four primitives above and the O(C) per-channel arithmetic between them, forward and backward, and the
// running-statistics update. Prims gives the device's primitives and its per-channel arithmetic (coeffs): the
// CPU's is a scalar loop that rounds as the expressions in ChannelCoeffs's comments. CUDA does not compose these:
// its forward and backward are three launches each, with the per-channel arithmetic (and the running statistics)
// in a kernel of their own (cuda/batch_norm_kernel.cu).
using OptTensor = c10::optional<at::Tensor>;

inline bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// The per-channel vectors of both directions (contiguous, of the accumulation type).
struct ChannelCoeffs {
  at::Tensor scale;       // forward:  rsqrt(var + eps) * weight
  at::Tensor k1, k2, k3;  // backward: k1 = rsqrt(var + eps) * weight, k2 = -k1 * invstd * invstd * sum_gxmu / n,
                          //           k3 = -k1 * sum_g / n (k2 = k3 = 0 without batch statistics)
  at::Tensor gw;          // backward: sum_gxmu * invstd
};

template <typename Prims>
Tensor3 bn_forward_composite(const at::Tensor& x_in, const OptTensor& weight, const OptTensor& bias,
                             const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& residual,
                             bool training, double eps, bool pre_relu, bool post_relu, double p, int64_t key,
                             int64_t offset) {
  const at::Tensor x = bn_channel_dense(x_in);
  const auto acc = bn_acc_type(x);
  at::Tensor mean, var;
  if (training) {
    std::tie(mean, var) = Prims::stats(x, pre_relu);
  } else {  // copies: an op's outputs must not alias its inputs
    mean = running_mean->to(acc, /*non_blocking=*/false, /*copy=*/true);
    var = running_var->to(acc, false, true);
  }
  if (x.numel() == 0 || p >= 1) return {at::zeros_like(x), mean, var};
  const at::Tensor scale = Prims::coeffs(var, weight, eps, {}, {}, 0, false, false, false, false).scale;
  const at::Tensor b = present(bias) ? bias->to(acc) : at::zeros({x.size(1)}, x.options().dtype(acc));
  OptTensor res;
  if (present(residual)) res = to_strides(*residual, x.strides());
  return {Prims::apply(x, mean, scale, b, res, pre_relu, post_relu, p, key, offset), mean, var};
}

// g: grad_out laid out like x, already dropped out when p_keys is 0 and p is not (the CPU's drop-once route)
template <typename Prims>
Tensor4 bn_backward_composite(const at::Tensor& g, const at::Tensor& x, const OptTensor& weight, const at::Tensor& mean,
                              const at::Tensor& var, const OptTensor& out, bool training, double eps, bool pre_relu,
                              bool post_relu, double p_keys, int64_t key, int64_t offset, std::array<bool, 4> mask) {
  const auto [need_gi, need_gw, need_gb, need_gr] = mask;
  const int64_t C = x.size(1);
  const auto wdt = present(weight) ? weight->scalar_type() : bn_acc_type(x);
  const at::Tensor empty = x.new_empty({0});
  at::Tensor sum_g, sum_gxmu;
  if (need_gw || need_gb || (training && need_gi))
    std::tie(sum_g, sum_gxmu) = Prims::grad_reduce(g, x, out, mean, pre_relu, post_relu, p_keys, key, offset);
  // d/dx of the batch statistics (training): grad_x = k1 * (g - mean(g) - xhat * mean(g * xhat))
  const bool need_k = need_gi || need_gr, batch_grad = training && need_gi;
  const ChannelCoeffs k = Prims::coeffs(var, weight, eps, sum_g, sum_gxmu, x.numel() / C, true, need_k, batch_grad,
                                        need_gw);
  at::Tensor gi = empty, gr = empty;
  if (need_k)
    std::tie(gi, gr) = Prims::grad_apply(g, x, out, mean, k.k1, k.k2, k.k3, pre_relu, post_relu, p_keys, key, offset,
                                         need_gi, need_gr);
  return {gi, need_gw ? k.gw.to(wdt) : empty.to(wdt), need_gb ? sum_g.to(wdt) : empty.to(wdt), gr};
}

// The backward when the output was all zeros (empty input, or p == 1): nothing flows back.
inline Tensor4 bn_backward_zeros(const at::Tensor& x, const OptTensor& weight, const at::Tensor& mean,
                                 std::array<bool, 4> mask) {
  const auto wdt = present(weight) ? weight->scalar_type() : bn_acc_type(x);
  const at::Tensor empty = x.new_empty({0});
  auto z = [&](bool need, const at::Tensor& t) { return need ? at::zeros_like(t) : empty; };
  return {z(mask[0], x), z(mask[1], mean).to(wdt), z(mask[2], mean).to(wdt), z(mask[3], x)};
}

// The running statistics after a training step, as torch's _BatchNorm updates them: num_batches_tracked += 1, then
// stat += factor * (batch stat - stat) with factor = momentum, or 1 / num_batches_tracked when momentum is None
// (the cumulative average); the variance enters unbiased. n: values per channel.
inline void bn_update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                    const OptTensor& num_batches_tracked, c10::optional<double> momentum,
                                    const at::Tensor& mean, const at::Tensor& var, int64_t n) {
  if (present(num_batches_tracked)) num_batches_tracked->add_(1);
  const at::Tensor unbiased = var * (static_cast<double>(n) / static_cast<double>(n - 1));
  auto update = [&](const at::Tensor& stat, const at::Tensor& batch, const auto& factor) {
    if (stat.scalar_type() == batch.scalar_type())
      stat.lerp_(batch, factor);
    else
      stat.copy_(batch * factor + stat.to(batch.scalar_type()) * (1 - factor));
  };
  if (momentum.has_value()) {
    update(running_mean, mean, *momentum);
    update(running_var, unbiased, *momentum);
  } else {
    TORCH_CHECK(present(num_batches_tracked), "fastfuse batch_norm: momentum=None needs num_batches_tracked");
    const at::Tensor factor = at::reciprocal(num_batches_tracked->to(mean.scalar_type()));
    update(running_mean, mean, factor);
    update(running_var, unbiased, factor);
  }
}

// The op on one device: Forward(x, weight, bias, running_mean, running_var, residual, training, eps, pre_relu,
// post_relu, p, key, offset) -> (out, mean, var), then the update in training, unless forward_updates says that the
// forward did it (CUDA: in the kernel that finalizes the batch statistics).
template <typename Forward>
Tensor3 batch_norm_op(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                      const OptTensor& running_mean, const OptTensor& running_var,
                      const OptTensor& num_batches_tracked, const OptTensor& residual, bool training,
                      c10::optional<double> momentum, double eps, bool pre_relu, bool post_relu, double p,
                      const at::Tensor& seed, Forward forward, bool forward_updates = false) {
  TORCH_CHECK(x.dim() >= 2, "fastfuse batch_norm: expected an (N, C, *) input, got ", x.dim(), "D");
  TORCH_CHECK(training || (present(running_mean) && present(running_var)),
              "fastfuse batch_norm: running_mean and running_var must be given when training=False");
  const auto [key, offset] = seed_words(seed, p);
  auto [out, mean, var] = forward(x, weight, bias, running_mean, running_var, residual, training, eps, pre_relu,
                                  post_relu, p, key, offset);
  if (training && present(running_mean) && !forward_updates)
    bn_update_running_stats(*running_mean, *running_var, num_batches_tracked, momentum, mean, var,
                            x.numel() / x.size(1));
  return {out, mean, var};
}

// fastfuse::batch_norm_backward on one device: x in a per-channel layout, grad_out and out laid out like it, nothing
// to compute when the output was all zeros, then Backward(grad_out, x, weight, mean, var, out, training, eps,
// pre_relu, post_relu, p, key, offset, output_mask).
template <typename Backward>
Tensor4 batch_norm_backward_op(const at::Tensor& grad_out, const at::Tensor& x_in, const OptTensor& weight,
                               const at::Tensor& mean, const at::Tensor& var, const OptTensor& out_in, bool training,
                               double eps, bool pre_relu, bool post_relu, double p, const at::Tensor& seed,
                               std::array<bool, 4> mask, Backward backward) {
  const at::Tensor x = bn_channel_dense(x_in);
  if (x.numel() == 0 || p >= 1) return bn_backward_zeros(x, weight, mean, mask);
  const auto [key, offset] = seed_words(seed, p);
  OptTensor out;
  if (present(out_in)) out = to_strides(*out_in, x.strides());
  return backward(to_strides(grad_out, x.strides()), x, weight, mean, var, out, training, eps, pre_relu, post_relu, p,
                  key, offset, mask);
}

// The op in ATen ops, for second derivatives: dropout(post_relu(bn(pre_relu(x)) + residual)) with the forward's
// statistics (eval) or the batch's (training) and its masks: factor is the forward's keep ? 1 / (1 - p) : 0 (and 0
// where the post-ReLU cut).
inline at::Tensor bn_reference_output(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                      const at::Tensor& residual, const at::Tensor& mean, const at::Tensor& var,
                                      const at::Tensor& factor, bool training, double eps, bool pre_relu) {
  std::vector<int64_t> dims{0}, shape(x.dim(), 1);
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  shape[1] = -1;
  const at::Tensor xa = pre_relu ? x.to(bn_acc_type(x)).clamp_min(0) : x.to(bn_acc_type(x));
  const at::Tensor mu = training ? xa.mean(dims) : mean, s2 = training ? xa.var(dims, 0) : var;
  at::Tensor z = (xa - mu.view(shape)) * at::rsqrt(s2 + eps).view(shape);
  if (weight.defined()) z = z * weight.to(z.scalar_type()).view(shape);
  if (bias.defined()) z = z + bias.view(shape);
  if (residual.defined()) z = z + residual;
  return (z * factor).to(x.scalar_type());
}

}  // namespace fastfuse
