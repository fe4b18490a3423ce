// fastai's LinBnDrop(lin_first=True) block, Linear(bias=False) -> [ReLU] -> BatchNorm1d -> [Dropout], as one C++
// call forward and one backward on CPU (python/fastfuse/nn/lin_bn_drop.py, eager mode). At fastai's tabular
// sizes (batch 64, 1000 features) the Linear's and the batch norm's autograd nodes, the batch norm's Python and
// its per-call bookkeeping cost about as much as the kernels; here they are one node.
//
// Forward:  y = x @ W^T;  out = dropout(bn(relu(y)))   (y is kept for the backward, as the unfused block keeps it)
// Backward: g = dropout'(grad_out);  gy = bn'(g);  gW = gy^T @ x  (written (out, in), the weight's own layout: no
//           transposing copy when autograd accumulates it);  gx = gy @ W.
// The batch norm of the (B, C) rows is done here, per channel slice in one parallel region (statistics, then
// apply; gradient sums, then the input gradient): a thread owns whole channels, so it needs no barrier between
// the two, and the adds run along the channels, which are contiguous. Dropout is fastfuse_C's dropout kernel
// over the output's memory order (the masks fastfuse.batch_norm(dropout_p=...) draws, bit for bit); the
// statistics match it to rounding. The running statistics are updated as batch_norm() does (cpu/bn_module.h).
// y, gW, gx and the outputs come from the output cache (cpu/cached_empty.h): fresh, the 2 MB gW page-faults every
// step.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "dropout.h"
#include "cpu/bn_module.h"
#include "cpu/cached_empty.h"

namespace fastfuse {
namespace {

constexpr int64_t kChannelGrain = 64;  // channels per parallel task, at least

// Channels [c0, c1) of the (N, C) rows y: statistics of relu?(y) (when batch_stats; else mean/var hold the running
// ones), then out = relu?(y) * scale + shift.
template <typename scalar_t>
void bn_rows_forward(const scalar_t* y, scalar_t* out, int64_t N, int64_t C, int64_t c0, int64_t c1,
                     const at::opmath_type<scalar_t>* w, const at::opmath_type<scalar_t>* b, bool pre_relu,
                     bool batch_stats, double eps, at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* var) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = c1 - c0;
  auto r = [pre_relu](acc_t v) { return pre_relu && !(v > 0) ? acc_t(0) : v; };
  if (batch_stats) {  // shifted sums in double: the shift (row 0) keeps a large mean from cancelling the variance
    std::vector<acc_t> shift(n);
    std::vector<double> s1(n, 0.0), s2(n, 0.0);
    for (int64_t k = 0; k < n; ++k) shift[k] = r(static_cast<acc_t>(y[c0 + k]));
    for (int64_t i = 0; i < N; ++i) {
      const scalar_t* yr = y + i * C + c0;
      for (int64_t k = 0; k < n; ++k) {
        const double v = static_cast<double>(r(static_cast<acc_t>(yr[k])) - shift[k]);
        s1[k] += v;
        s2[k] += v * v;
      }
    }
    for (int64_t k = 0; k < n; ++k) {
      const double m = s1[k] / N;
      mean[c0 + k] = static_cast<acc_t>(shift[k] + m);
      var[c0 + k] = static_cast<acc_t>(std::max(0.0, s2[k] / N - m * m));
    }
  }
  std::vector<acc_t> scale(n), sh(n);
  for (int64_t k = 0; k < n; ++k) {
    const acc_t invstd = acc_t(1) / std::sqrt(var[c0 + k] + static_cast<acc_t>(eps));
    scale[k] = invstd * (w ? w[c0 + k] : acc_t(1));
    sh[k] = (b ? b[c0 + k] : acc_t(0)) - mean[c0 + k] * scale[k];
  }
  for (int64_t i = 0; i < N; ++i) {
    const scalar_t* yr = y + i * C + c0;
    scalar_t* orow = out + i * C + c0;
    for (int64_t k = 0; k < n; ++k) orow[k] = static_cast<scalar_t>(r(static_cast<acc_t>(yr[k])) * scale[k] + sh[k]);
  }
}

// Channels [c0, c1): sums of g and g * (relu?(y) - mean) over the rows, then (need_gi) the input gradient
// gi = relu'(y) * (k1 g + k2 (relu?(y) - mean) + k3), the batch-statistics terms k2, k3 only when batch_stats.
template <typename scalar_t>
void bn_rows_backward(const scalar_t* g, const scalar_t* y, scalar_t* gi, int64_t N, int64_t C, int64_t c0,
                      int64_t c1, const at::opmath_type<scalar_t>* w, const at::opmath_type<scalar_t>* mean,
                      const at::opmath_type<scalar_t>* var, bool pre_relu, bool batch_stats, double eps,
                      at::opmath_type<scalar_t>* sum_g, at::opmath_type<scalar_t>* sum_gxmu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = c1 - c0;
  auto r = [pre_relu](acc_t v) { return pre_relu && !(v > 0) ? acc_t(0) : v; };
  std::vector<double> s1(n, 0.0), s2(n, 0.0);
  for (int64_t i = 0; i < N; ++i) {
    const scalar_t* gr = g + i * C + c0;
    const scalar_t* yr = y + i * C + c0;
    for (int64_t k = 0; k < n; ++k) {
      const acc_t gv = static_cast<acc_t>(gr[k]);
      s1[k] += gv;
      s2[k] += static_cast<double>(gv * (r(static_cast<acc_t>(yr[k])) - mean[c0 + k]));
    }
  }
  std::vector<acc_t> k1(n), k2(n), k3(n), mu(n);
  for (int64_t k = 0; k < n; ++k) {
    const acc_t invstd = acc_t(1) / std::sqrt(var[c0 + k] + static_cast<acc_t>(eps));
    sum_g[c0 + k] = static_cast<acc_t>(s1[k]);
    sum_gxmu[c0 + k] = static_cast<acc_t>(s2[k]);
    k1[k] = invstd * (w ? w[c0 + k] : acc_t(1));
    k2[k] = batch_stats ? static_cast<acc_t>(-k1[k] * invstd * invstd * s2[k] / N) : acc_t(0);
    k3[k] = batch_stats ? static_cast<acc_t>(-k1[k] * s1[k] / N) : acc_t(0);
    mu[k] = mean[c0 + k];
  }
  if (!gi) return;
  for (int64_t i = 0; i < N; ++i) {
    const scalar_t* gr = g + i * C + c0;
    const scalar_t* yr = y + i * C + c0;
    scalar_t* o = gi + i * C + c0;
    for (int64_t k = 0; k < n; ++k) {
      const acc_t yv = static_cast<acc_t>(yr[k]);
      const acc_t v = k1[k] * static_cast<acc_t>(gr[k]) + k2[k] * (r(yv) - mu[k]) + k3[k];
      o[k] = static_cast<scalar_t>(pre_relu && !(yv > 0) ? acc_t(0) : v);
    }
  }
}

at::Tensor acc_vec(const OptTensor& t, at::ScalarType acc) {
  return t.has_value() && t->defined() ? t->to(acc).contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lin_bn_drop_cpu(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bn_weight, const OptTensor& bn_bias,
    const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& num_batches_tracked,
    bool batch_stats, bool update, c10::optional<double> momentum, double eps, bool pre_relu, double p, int64_t seed,
    int64_t offset) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) && x.is_contiguous() &&
                  x.scalar_type() == weight.scalar_type(),
              "lin_bn_drop: expected a contiguous x (B, in) and weight (out, in) of one dtype, got ", x.sizes(),
              " and ", weight.sizes());
  TORCH_CHECK(batch_stats || (running_mean.has_value() && running_var.has_value()),
              "lin_bn_drop: running statistics are needed without batch statistics");
  const int64_t N = x.size(0), C = weight.size(0);
  TORCH_CHECK(!batch_stats || N > 1, "lin_bn_drop: expected more than 1 value per channel when training");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = empty_cached({N, C}, x.scalar_type());
  at::mm_out(y, x, weight.t());
  at::Tensor mean = batch_stats ? at::empty({C}, y.options().dtype(acc)) : running_mean->to(acc, false, true);
  at::Tensor var = batch_stats ? at::empty({C}, y.options().dtype(acc)) : running_var->to(acc, false, true);
  at::Tensor out = empty_cached({N, C}, x.scalar_type());
  const at::Tensor w = acc_vec(bn_weight, acc), b = acc_vec(bn_bias, acc);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lin_bn_drop_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    const acc_t* bp = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* vp = var.mutable_data_ptr<acc_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, C, kChannelGrain, [&](int64_t c0, int64_t c1) {
      bn_rows_forward<scalar_t>(yp, op, N, C, c0, c1, wp, bp, pre_relu, batch_stats, eps, mp, vp);
    });
  });
  if (p > 0) out = dropout_cpu(out, p, seed, offset);
  if (update && running_mean.has_value() && running_mean->defined())
    update_running_stats(*running_mean, *running_var, num_batches_tracked, momentum, mean, var, N);
  return {out, y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lin_bn_drop_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& y,
    const OptTensor& bn_weight, const at::Tensor& mean, const at::Tensor& var, bool batch_stats, double eps,
    bool pre_relu, double p, int64_t seed, int64_t offset, bool need_gx, bool need_gw, bool need_gbw, bool need_gbb) {
  const int64_t N = y.size(0), C = y.size(1);
  const auto acc = mean.scalar_type();
  const at::Tensor empty = x.new_empty({0});
  const at::Tensor g = p > 0 ? dropout_cpu(grad_out.contiguous(), p, seed, offset) : grad_out.contiguous();
  const bool need_gy = need_gx || need_gw;
  at::Tensor gy = need_gy ? empty_cached({N, C}, y.scalar_type()) : empty;
  at::Tensor sum_g = at::empty({C}, mean.options()), sum_gxmu = at::empty({C}, mean.options());
  const at::Tensor w = acc_vec(bn_weight, acc);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "lin_bn_drop_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* gyp = need_gy ? gy.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* vp = var.const_data_ptr<acc_t>();
    acc_t* sgp = sum_g.mutable_data_ptr<acc_t>();
    acc_t* sxp = sum_gxmu.mutable_data_ptr<acc_t>();
    at::parallel_for(0, C, kChannelGrain, [&](int64_t c0, int64_t c1) {
      bn_rows_backward<scalar_t>(gp, yp, gyp, N, C, c0, c1, wp, mp, vp, pre_relu, batch_stats, eps, sgp, sxp);
    });
  });
  at::Tensor gw = empty, gx = empty;
  if (need_gw) at::mm_out(gw = empty_cached(weight.sizes(), weight.scalar_type()), gy.t(), x);
  if (need_gx) at::mm_out(gx = empty_cached(x.sizes(), x.scalar_type()), gy, weight);
  const auto wdt = bn_weight.has_value() && bn_weight->defined() ? bn_weight->scalar_type() : acc;
  at::Tensor gbw = need_gbw ? (sum_gxmu * at::rsqrt(var + eps)).to(wdt) : empty;
  return {gx, gw, gbw, need_gbb ? sum_g.to(wdt) : empty};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastfuse_C, m) {
  m.def("lin_bn_drop(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool batch_stats, bool update, float? momentum, "
        "float eps, bool pre_relu, float p, int seed, int offset) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lin_bn_drop_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor y, Tensor? bn_weight, Tensor mean, "
        "Tensor var, bool batch_stats, float eps, bool pre_relu, float p, int seed, int offset, bool need_gx, "
        "bool need_gw, bool need_gbw, bool need_gbb) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastfuse_C, CPU, m) {
  m.impl("lin_bn_drop", &lin_bn_drop_cpu);
  m.impl("lin_bn_drop_backward", &lin_bn_drop_backward_cpu);
}

}  // namespace fastfuse
