// fastfuse::sync_batch_norm's kernels, on every device: batch norm's primitives (the fastfuse_C bn_* ops, which
// reach the device's kernels through the dispatcher) around one all_reduce per direction, run through torch's
// functional collectives (_c10d_functional::all_reduce_ + wait_tensor, by group name: gloo on CPU, NCCL on CUDA).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "dropout.h"
#include "layout.h"
#include "sync_batch_norm.h"

namespace fastfuse {
namespace {

using StatsSig = Tensor2(const at::Tensor&, bool);
using ApplySig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const OptTensor&, bool, bool, double, int64_t, int64_t);
using GradReduceSig = Tensor2(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, bool, bool,
                              double, int64_t, int64_t);
using GradApplySig = Tensor2(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, bool, double, int64_t,
                             int64_t, bool, bool);

template <typename Sig>
c10::TypedOperatorHandle<Sig> primitive(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// buf summed over the group's ranks, in place: one _c10d_functional::all_reduce_, then its wait. Called boxed, as
// the schema's group_name is `str` in some torch versions and `Any` in others. A failed collective (with
// TORCH_DISTRIBUTED_DEBUG=DETAIL, torch compares every collective's shape across ranks first) is reported with
// the channel count, the usual cause of buffers that differ between ranks.
void all_reduce_sum(const at::Tensor& buf, c10::string_view group_name, int64_t C, const char* what) {
  static const auto all_reduce = c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::all_reduce_", "");
  static const auto wait = c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::wait_tensor", "");
  try {
    torch::jit::Stack stack{buf, std::string("sum"), std::string(group_name)};
    all_reduce.callBoxed(stack);
    stack = {buf};
    wait.callBoxed(stack);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "fastfuse sync_batch_norm: the all_reduce of the ", what, " (", buf.numel(),
                " values for C=", C, " channels on this rank) failed in process group '", group_name,
                "'. Do all ranks run the same layers, with inputs of the same channel count? ", e.what_without_backtrace());
  }
}

// The running statistics after a step, as torch's _BatchNorm updates them (csrc/batch_norm.h's
// bn_update_running_stats), with the global count n as a tensor, so that no device waits for it.
void update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                          const OptTensor& num_batches_tracked, c10::optional<double> momentum,
                          const at::Tensor& mean, const at::Tensor& var, const at::Tensor& n) {
  if (present(num_batches_tracked)) num_batches_tracked->add_(1);
  const at::Tensor unbiased = var * (n / (n - 1)).to(var.scalar_type());
  at::Tensor factor;
  if (momentum.has_value()) {
    factor = at::scalar_tensor(*momentum, mean.options());
  } else {
    TORCH_CHECK(present(num_batches_tracked), "fastfuse sync_batch_norm: momentum=None needs num_batches_tracked");
    factor = at::reciprocal(num_batches_tracked->to(mean.scalar_type()));
  }
  for (auto [stat, batch] : {std::pair{running_mean, mean}, std::pair{running_var, unbiased}}) {
    if (stat.scalar_type() == batch.scalar_type())
      stat.lerp_(batch, factor);
    else
      stat.copy_(batch * factor + stat.to(batch.scalar_type()) * (1 - factor));
  }
}

}  // namespace

// Forward: the local mean and variance (bn_stats), as the float64 sums (n mean, n (var + mean^2), n) in ONE
// all_reduce of 2C + 1 values, the global mean and variance from them, then the fused apply (bn_apply). Float64
// sums of the local moments lose nothing to cancellation that float32 data could show (each local moment has
// float32 precision; the combination is exact to ~1e-16 relative). An empty rank adds zeros.
Tensor4 sync_batch_norm_kernel(const at::Tensor& x_in, const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& running_mean, const OptTensor& running_var,
                               const OptTensor& num_batches_tracked, const OptTensor& residual,
                               c10::optional<double> momentum, double eps, bool pre_relu, bool post_relu, double p,
                               const at::Tensor& seed, c10::string_view group_name) {
  static const auto stats = primitive<StatsSig>("fastfuse_C::bn_stats");
  static const auto apply = primitive<ApplySig>("fastfuse_C::bn_apply");
  TORCH_CHECK(x_in.dim() >= 2, "fastfuse sync_batch_norm: expected an (N, C, *) input, got ", x_in.dim(), "D");
  const at::Tensor x = bn_channel_dense(x_in);
  const auto acc = bn_acc_type(x);
  const int64_t C = x.size(1), n = C == 0 ? 0 : x.numel() / C;
  const auto f64 = x.options().dtype(at::kDouble);
  at::Tensor buf;
  if (n > 0) {
    const auto [m_local, v_local] = stats.call(x, pre_relu);
    const at::Tensor m = m_local.to(at::kDouble), v = v_local.to(at::kDouble);
    buf = at::cat({m * n, (v + m * m) * n, at::full({1}, static_cast<double>(n), f64)});
  } else {
    buf = at::zeros({2 * C + 1}, f64);
  }
  all_reduce_sum(buf, group_name, C, "statistics");
  const at::Tensor count = buf[2 * C].clone();  // an output of its own, not a view of buf
  if (buf.is_cpu()) {  // free here; on other devices it would wait for the device
    TORCH_CHECK(count.item<double>() > 1, "Expected more than 1 value per channel when training, got ",
                count.item<double>(), " values per channel over all ranks (input size ", x_in.sizes(),
                " on this rank)");
  }
  const at::Tensor mean64 = buf.narrow(0, 0, C) / count;
  const at::Tensor mean = mean64.to(acc);
  const at::Tensor var = (buf.narrow(0, C, C) / count - mean64 * mean64).clamp_min(0).to(acc);
  if (present(running_mean))
    update_running_stats(*running_mean, *running_var, num_batches_tracked, momentum, mean, var, count);
  if (n == 0 || p >= 1) return {at::zeros_like(x), mean, var, count};
  const auto [key, offset] = seed_words(seed, p);
  at::Tensor scale = at::rsqrt(var + eps);
  if (present(weight)) scale = scale * weight->to(acc);
  const at::Tensor b = present(bias) ? bias->to(acc).contiguous() : at::zeros({C}, x.options().dtype(acc));
  OptTensor res;
  if (present(residual)) res = to_strides(*residual, x.strides());
  return {apply.call(x, mean, scale.contiguous(), b, res, pre_relu, post_relu, p, key, offset), mean, var, count};
}

// Backward: the local sums of g and g (x - mean) (bn_grad_reduce), ONE all_reduce of both (2C values) when the
// input's gradient is needed, then the fused apply (bn_grad_apply) with the global sums and count. The weight's
// and bias's gradients are this rank's own sums. Every rank of the group joins the all_reduce, an empty one too.
Tensor4 sync_batch_norm_backward_kernel(const at::Tensor& grad_out, const at::Tensor& x_in, const OptTensor& weight,
                                        const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count,
                                        const OptTensor& out_in, double eps, bool pre_relu, bool post_relu, double p,
                                        const at::Tensor& seed, c10::string_view group_name,
                                        std::array<bool, 4> mask) {
  static const auto grad_reduce = primitive<GradReduceSig>("fastfuse_C::bn_grad_reduce");
  static const auto grad_apply = primitive<GradApplySig>("fastfuse_C::bn_grad_apply");
  const auto [need_gi, need_gw, need_gb, need_gr] = mask;
  const at::Tensor x = bn_channel_dense(x_in);
  const int64_t C = x.size(1);
  if (p >= 1) return bn_backward_zeros(x, weight, mean, mask);  // every rank has the same p: none joins a collective
  const auto acc = bn_acc_type(x);
  const auto wdt = present(weight) ? weight->scalar_type() : acc;
  const at::Tensor empty = x.new_empty({0});
  const auto [key, offset] = seed_words(seed, p);
  const at::Tensor g = to_strides(grad_out, x.strides());
  OptTensor out;
  if (present(out_in)) out = to_strides(*out_in, x.strides());
  at::Tensor sum_g = at::zeros({C}, mean.options()), sum_gxmu = at::zeros({C}, mean.options());
  if (x.numel() > 0 && (need_gi || need_gw || need_gb))
    std::tie(sum_g, sum_gxmu) = grad_reduce.call(g, x, out, mean, pre_relu, post_relu, p, key, offset);
  const at::Tensor invstd = at::rsqrt(var + eps);
  const at::Tensor k1 = present(weight) ? invstd * weight->to(acc) : invstd;
  at::Tensor k2 = at::zeros_like(k1), k3 = at::zeros_like(k1);
  if (need_gi) {
    const at::Tensor buf = at::cat({sum_g, sum_gxmu});
    all_reduce_sum(buf, group_name, C, "gradient sums");
    const at::Tensor n = count.to(acc);
    k2 = -k1 * invstd * invstd * buf.narrow(0, C, C) / n;
    k3 = -k1 * buf.narrow(0, 0, C) / n;
  }
  at::Tensor gi = empty, gr = empty;
  if (need_gi || need_gr) {
    if (x.numel() > 0) {
      std::tie(gi, gr) = grad_apply.call(g, x, out, mean, k1.contiguous(), k2.contiguous(), k3.contiguous(), pre_relu,
                                         post_relu, p, key, offset, need_gi, need_gr);
    } else {
      gi = need_gi ? at::zeros_like(x) : empty;
      gr = need_gr ? at::zeros_like(x) : empty;
    }
  }
  return {gi, need_gw ? (sum_gxmu * invstd).to(wdt) : empty.to(wdt), need_gb ? sum_g.to(wdt) : empty.to(wdt), gr};
}

TORCH_LIBRARY_IMPL(fastfuse, CompositeExplicitAutograd, m) {
  m.impl("sync_batch_norm", &sync_batch_norm_kernel);
  m.impl("sync_batch_norm_backward", &sync_batch_norm_backward_kernel);
}

}  // namespace fastfuse
