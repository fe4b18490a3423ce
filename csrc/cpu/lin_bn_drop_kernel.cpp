// fastai's LinBnDrop(lin_first=True) block, Linear(bias=False) -> [ReLU] -> BatchNorm1d -> [Dropout], as one C++
// call forward and one backward on CPU (python/fastfuse/nn/lin_bn_drop.py, eager mode). At fastai's tabular
// sizes (batch 64, 1000 features) the Linear's and the batch norm's autograd nodes, the batch norm's Python and
// its per-call bookkeeping cost about as much as the kernels; here they are one node. The batch norm (ReLU and
// dropout fused in, Philox masks as fastfuse.batch_norm's) runs through cpu/bn_module.h, so its bits, masks and
// running statistics are the unfused block's.
//
// Forward:  y = x @ W^T;  out = dropout(bn(relu(y)))   (y is kept for the backward, as the unfused block keeps it)
// Backward: gy = bn_backward(...);  gW = gy^T @ x  (written (out, in), the weight's own layout: no transposing
//           copy when autograd accumulates it);  gx = gy @ W.
// y, gW and gx come from the output cache (empty_cached, cpu/alloc.h): fresh, the 2 MB gW page-faults every step
// (~0.3 ms here). (A batch norm of the rows written here, channels per thread, was slower in the training step than
// fastfuse_C::bn_backward's AVX2 kernels, so the block uses those.)
// Its autograd is C++ too (cpu/lin_bn_drop_autograd.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "batch_norm.h"
#include "cpu/alloc.h"
#include "cpu/bn_module.h"
#include "cpu/lin_bn_drop.h"
#include "cpu/seed.h"

namespace fastfuse {

void check_lin_bn_drop(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) &&
                  x.scalar_type() == weight.scalar_type(),
              "lin_bn_drop: expected x (B, in) and weight (out, in) of one dtype, got ", x.sizes(), " and ",
              weight.sizes());
}

// y = x W^T. Up to kSplitRows rows: two single-threaded GEMMs over the halves of the output features, side by side
// (6-10% faster than one two-threaded MKL call at 64 rows here, 5-7% slower at 512). The split depends on the
// shape only, so the bits do not depend on the thread count; they differ from nn.Linear's single GEMM by rounding.
constexpr int64_t kSplitRows = 128;

// y[:, c0:c0+n] = x W[c0:c0+n]^T, from inside a parallel region: worker threads inherit neither the caller's grad
// mode nor its inference mode (y may be an inference tensor).
void linear_columns(const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight, int64_t c0, int64_t n) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor yi = y.narrow(1, c0, n);
  at::mm_out(yi, x, weight.narrow(0, c0, n).t());
}

void linear_forward(at::Tensor& y, const at::Tensor& x, const at::Tensor& weight) {
  const int64_t out = weight.size(0), h = out / 2;
  if (x.size(0) > kSplitRows || h == 0) {
    at::mm_out(y, x, weight.t());
    return;
  }
  at::parallel_for(0, 2, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) linear_columns(y, x, weight, i ? h : 0, i ? out - h : h);
  });
}

// Up to kSplitRows rows in training, the forward's GEMM halves and its batch norm run in one parallel region
// (bn_train_rows_forward, cpu/batch_norm_impl.h): each core takes its half of the output features from GEMM to
// batch norm. As a GEMM region, statistics on one thread and an apply region, the batch norm read half of y from the
// other core's cache and paid two more regions: 8-14 us more per block at (64, 1000) and (64, 500) here. (The same
// in backward, with grad_W and a partial grad_x per half, was 4-16 us slower: four half-size GEMMs and a sum
// against two whole ones.) The halves are fixed, so the bits do not depend on the thread count.
bool halves_route(const at::Tensor& x, const at::Tensor& weight, bool batch_stats, double p) {
  return batch_stats && p < 1 && x.size(0) > 0 && x.size(0) <= kSplitRows && weight.size(0) >= 2 && x.is_contiguous() &&
         weight.is_contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lin_bn_drop_cpu(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bn_weight, const OptTensor& bn_bias,
    const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& num_batches_tracked,
    bool batch_stats, bool update, c10::optional<double> momentum, double eps, bool pre_relu, double p,
    c10::optional<int64_t> seed_in, c10::optional<int64_t> offset_in) {
  check_lin_bn_drop(x, weight);
  // no seed given: draw one, as _rng.new_seed() would (the C++ autograd node draws it before, to keep it)
  const auto [seed, offset] = seed_or_draw(seed_in, offset_in, p);
  at::Tensor y = empty_cached({x.size(0), weight.size(0)}, x.scalar_type());
  at::Tensor out, mean, var;
  if (halves_route(x, weight, batch_stats, p)) {
    auto produce = [&](int64_t, int64_t c0, int64_t n) { linear_columns(y, x, weight, c0, n); };
    std::tie(out, mean, var) = bn_train_rows_forward_cpu(y, produce, bn_acc_vector(bn_weight, bn_acc_type(x)),
                                                         bn_acc_vector(bn_bias, bn_acc_type(x)), eps, pre_relu, p, seed,
                                                         offset);
  } else {
    linear_forward(y, x, weight);
    std::tie(out, mean, var) = call_bn_forward(y, bn_weight, bn_bias, running_mean, running_var, batch_stats, eps,
                                               pre_relu, p, seed, offset);
  }
  if (update && running_mean.has_value() && running_mean->defined())
    update_running_stats(*running_mean, *running_var, num_batches_tracked, momentum, mean, var, y.size(0));
  return {out, y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lin_bn_drop_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& y,
    const OptTensor& bn_weight, const at::Tensor& mean, const at::Tensor& var, bool batch_stats, double eps,
    bool pre_relu, double p, int64_t seed, int64_t offset, bool need_gx, bool need_gw, bool need_gbw, bool need_gbb) {
  const at::Tensor empty = x.new_empty({0});
  auto [gy, gbw, gbb, gr] = call_bn_backward(grad_out, y, bn_weight, mean, var, batch_stats, eps, pre_relu, p, seed,
                                             offset, need_gx || need_gw, need_gbw, need_gbb);
  at::Tensor gw = need_gw ? empty_cached(weight.sizes(), weight.scalar_type()) : empty;
  at::Tensor gx = need_gx ? empty_cached(x.sizes(), x.scalar_type()) : empty;
  // Both GEMMs: side by side, one thread each (at:: ops run single-threaded inside a parallel region). At batch 64
  // they are the same number of multiply-adds (gW: out x in over B, gx: B x in over out), and two single-threaded
  // GEMMs ran 3-8% faster here than one after the other on two threads. The split is fixed: the same bits every run.
  // (Only one of them: that one on all threads.)
  at::parallel_for(0, 2, need_gw && need_gx ? 1 : 2, [&](int64_t i0, int64_t i1) {
    // worker threads inherit neither the backward's grad mode (x and W require grad) nor an inference mode
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = i0; i < i1; ++i) {
      if (i == 0 && need_gw) at::mm_out(gw, gy.t(), x);
      if (i == 1 && need_gx) at::mm_out(gx, gy, weight);
    }
  });
  return {gx, gw, need_gbw ? gbw : empty, need_gbb ? gbb : empty};
}

TORCH_LIBRARY_FRAGMENT(fastfuse_C, m) {
  m.def("lin_bn_drop(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool batch_stats, bool update, float? momentum, "
        "float eps, bool pre_relu, float p, int? seed, int? offset) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lin_bn_drop_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor y, Tensor? bn_weight, Tensor mean, "
        "Tensor var, bool batch_stats, float eps, bool pre_relu, float p, int seed, int offset, bool need_gx, "
        "bool need_gw, bool need_gbw, bool need_gbb) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastfuse_C, CPU, m) {
  m.impl("lin_bn_drop", &lin_bn_drop_cpu);
  m.impl("lin_bn_drop_backward", &lin_bn_drop_backward_cpu);
}

}  // namespace fastfuse
