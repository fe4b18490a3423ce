// embedding_concat_dropout on CUDA.
// Forward: one thread per Philox group (8 consecutive elements of the (B, D) embedding block), gathering
// each element's table row and applying the mask, written straight into the (B, D + C) output.
// Backward, deterministic and contention-free (no atomics): the (b, t) lookups are keyed by their global
// row (row offset of table t + code), stable-sorted, cut into segments of equal key and those into chunks of
// at most kChunk lookups; kernel 1 sums each chunk (mask regenerated per element) into a partial buffer,
// kernel 2 sums each segment's partials in chunk order into the table gradient. A 3-row table hit by 4096
// rows thus spreads over 128 chunks instead of serializing on three atomics.
// Bad codes (the op raises IndexError before launching unless check_index=False) are guarded:
// they read nothing, give a zero row and no gradient, so the CUDA context is never corrupted.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "dropout.h"
#include "backend.h"
#include "embedding_concat_dropout.h"
#include "philox.h"

namespace fastfuse {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 32;  // lookups per partial sum

// Per table, on the device: data pointer, n_t, d_t, first output column, first global row.
struct Meta {
  int64_t ptr, rows, dim, off, rowoff;
};

at::Tensor meta_tensor(const std::vector<int64_t>& ptrs, const TableLayout& L, const at::Device& dev) {
  const int64_t T = static_cast<int64_t>(ptrs.size());
  at::Tensor m = at::empty({T, 5}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = m.data_ptr<int64_t>();
  int64_t rowoff = 0;
  for (int64_t t = 0; t < T; ++t) {
    p[5 * t + 0] = ptrs[t];
    p[5 * t + 1] = L.rows[t];
    p[5 * t + 2] = L.dims[t];
    p[5 * t + 3] = L.offs[t];
    p[5 * t + 4] = rowoff;
    rowoff += L.rows[t];
  }
  return m.to(dev);
}

at::Tensor col_table(const TableLayout& L, const at::Device& dev) {
  at::Tensor c = at::empty({L.width}, at::TensorOptions().dtype(at::kInt));
  int32_t* p = c.data_ptr<int32_t>();
  for (size_t t = 0; t < L.dims.size(); ++t)
    for (int64_t k = 0; k < L.dims[t]; ++k) p[L.offs[t] + k] = static_cast<int32_t>(t);
  return c.to(dev);
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t drop_elem(scalar_t v, bool keep, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  return static_cast<scalar_t>(static_cast<acc_t>(v) * (keep ? scale : acc_t(0)));  // NaN * 0 = NaN, as torch
}

template <typename scalar_t>
__global__ void ecd_forward_kernel(const int64_t* __restrict__ x, const Meta* __restrict__ meta,
                                   const int32_t* __restrict__ col_t, scalar_t* __restrict__ out, int64_t B,
                                   int64_t T, int64_t D, int64_t W, bool drop, uint32_t threshold,
                                   at::opmath_type<scalar_t> scale, uint64_t seed, uint64_t offset) {
  const int64_t n = B * D, ngroups = (n + kKeysPerGroup - 1) / kKeysPerGroup;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < ngroups; g += stride) {
    DropKeys keys{{0u, 0u, 0u, 0u}};
    if (drop) keys = dropout_group_keys(seed, offset, static_cast<uint64_t>(g));
#pragma unroll
    for (int l = 0; l < kKeysPerGroup; ++l) {
      const int64_t e = kKeysPerGroup * g + l;
      if (e >= n) break;
      const int64_t b = e / D, j = e - b * D;
      const Meta m = meta[col_t[j]];
      const int64_t idx = x[b * T + col_t[j]];
      scalar_t v = static_cast<scalar_t>(0);
      if (idx >= 0 && idx < m.rows) v = reinterpret_cast<const scalar_t*>(m.ptr)[idx * m.dim + (j - m.off)];
      out[b * W + j] = drop_elem(v, !drop || keys[l] >= threshold, scale);
    }
  }
}

// One block per chunk of equal-key lookups; thread k sums column k of the chunk's table over its lookups.
template <typename scalar_t>
__global__ void ecd_chunk_sums_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ order,
                                      const int64_t* __restrict__ chunk_start, const int64_t* __restrict__ chunk_end,
                                      const Meta* __restrict__ meta, at::opmath_type<scalar_t>* __restrict__ partial,
                                      int64_t T, int64_t D, int64_t W, int64_t maxd, bool drop, uint32_t threshold,
                                      at::opmath_type<scalar_t> scale, uint64_t seed, uint64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x, i0 = chunk_start[c], i1 = chunk_end[c];
  const int64_t t = order[i0] % T;  // every lookup of a chunk has the same key, hence the same table
  const Meta m = meta[t];
  for (int64_t k = threadIdx.x; k < maxd; k += blockDim.x) {
    acc_t acc = 0;
    if (k < m.dim) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = order[i] / T, j = m.off + k;
        bool keep = true;
        if (drop) {
          keep = dropout_element_key(seed, offset, static_cast<uint64_t>(b * D + j)) >= threshold;
        }
        acc += static_cast<acc_t>(drop_elem(grad[b * W + j], keep, scale));
      }
    }
    partial[c * maxd + k] = acc;
  }
}

// One block per segment (one table row): its chunks' partials summed in chunk order.
template <typename scalar_t>
__global__ void ecd_segment_sums_kernel(const at::opmath_type<scalar_t>* __restrict__ partial,
                                        const int64_t* __restrict__ seg_first, const int64_t* __restrict__ seg_last,
                                        const int64_t* __restrict__ chunk_start, const int64_t* __restrict__ sorted,
                                        const int64_t* __restrict__ order, const Meta* __restrict__ out_meta,
                                        int64_t T, int64_t total_rows, int64_t maxd) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t s = blockIdx.x, c0 = seg_first[s], c1 = seg_last[s];
  const int64_t first = chunk_start[c0], key = sorted[first];
  if (key >= total_rows) return;  // the segment of unchecked bad codes: no gradient
  const Meta m = out_meta[order[first] % T];
  const int64_t row = key - m.rowoff;
  scalar_t* dst = reinterpret_cast<scalar_t*>(m.ptr) + row * m.dim;
  for (int64_t k = threadIdx.x; k < m.dim; k += blockDim.x) {
    acc_t acc = 0;
    for (int64_t c = c0; c < c1; ++c) acc += partial[c * maxd + k];
    dst[k] = static_cast<scalar_t>(acc);
  }
}

int grid_for(int64_t work) {
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min((work + kThreads - 1) / kThreads, max_blocks)));
}

}  // namespace

at::Tensor embedding_concat_dropout_cuda(const at::Tensor& x_cat, at::TensorList weights, double p, int64_t seed,
                                         int64_t offset, const c10::optional<at::Tensor>& cont, bool check_index) {
  check_embedding_inputs(x_cat, weights, cont);
  TORCH_CHECK(x_cat.is_cuda(), "embedding_concat_dropout_cuda: expected CUDA tensors");
  check_tables(x_cat, weights);  // the kernel dereferences every table's raw pointer on x_cat's device
  TORCH_CHECK(p >= 0 && p < 1, "embedding_concat_dropout kernel: p must be in [0, 1), got ", p);
  (void)check_index;  // codes are checked by the router before launch; the kernel guards every read anyway
  const c10::cuda::CUDAGuard guard(x_cat.device());
  const TableLayout L = table_layout(weights);
  const int64_t B = x_cat.size(0), T = x_cat.size(1), C = cont.has_value() ? cont->size(1) : 0, D = L.width;
  at::Tensor out = at::empty({B, D + C}, weights[0].options());
  if (B == 0) return out;
  if (C) out.narrow(1, D, C).copy_(*cont);
  std::vector<int64_t> ptrs;
  for (const auto& w : weights) ptrs.push_back(reinterpret_cast<int64_t>(w.const_data_ptr()));
  at::Tensor meta = meta_tensor(ptrs, L, x_cat.device());
  at::Tensor cols = col_table(L, x_cat.device());
  const bool drop = p > 0;
  const uint32_t threshold = drop ? dropout_threshold(p) : 0;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "ecd_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ecd_forward_kernel<scalar_t><<<grid_for((B * D + kKeysPerGroup - 1) / kKeysPerGroup), kThreads, 0, stream>>>(
        x_cat.const_data_ptr<int64_t>(), reinterpret_cast<const Meta*>(meta.const_data_ptr<int64_t>()),
        cols.const_data_ptr<int32_t>(), out.mutable_data_ptr<scalar_t>(), B, T, D, D + C, drop, threshold,
        static_cast<acc_t>(drop ? dropout_scale(p) : 1.0), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> embedding_concat_dropout_backward_cuda(const at::Tensor& grad, const at::Tensor& x_cat,
                                                               at::TensorList weights, double p, int64_t seed,
                                                               int64_t offset) {
  check_embedding_inputs(x_cat, weights, c10::nullopt);
  TORCH_CHECK(grad.is_cuda() && grad.dim() == 2 && grad.is_contiguous() &&
                  grad.scalar_type() == weights[0].scalar_type(),
              "embedding_concat_dropout_backward_cuda: grad_output must be a contiguous CUDA tensor of the tables' "
              "dtype");
  TORCH_CHECK(p >= 0 && p < 1, "embedding_concat_dropout kernel: p must be in [0, 1), got ", p);
  check_tables(x_cat, weights);
  const c10::cuda::CUDAGuard guard(x_cat.device());
  const TableLayout L = table_layout(weights);
  const int64_t B = x_cat.size(0), T = x_cat.size(1), D = L.width, W = grad.size(1), N = B * T;
  // the kernels read grad[b * W + j] for b < B, j < D (the CPU kernel checks the same)
  TORCH_CHECK(grad.size(0) == B && W >= D, "embedding_concat_dropout_backward: grad_output must be (B, D + C) = (",
              B, ", >= ", D, "), got ", grad.sizes());
  std::vector<at::Tensor> grads;
  std::vector<int64_t> ptrs;
  for (const auto& w : weights) {
    grads.push_back(at::zeros_like(w));
    ptrs.push_back(reinterpret_cast<int64_t>(grads.back().data_ptr()));
  }
  // nothing to sum; D == 0 would also launch blocks of 0 threads (an invalid configuration)
  if (N == 0 || D == 0) return grads;
  at::Tensor meta = meta_tensor(ptrs, L, x_cat.device());
  const auto dev = x_cat.device();
  const auto i64 = x_cat.options();
  int64_t total_rows = 0;
  std::vector<int64_t> rowoff_v, rows_v;
  for (int64_t t = 0; t < T; ++t) {
    rowoff_v.push_back(total_rows);
    rows_v.push_back(L.rows[t]);
    total_rows += L.rows[t];
  }
  const at::Tensor rowoff = at::tensor(rowoff_v, at::kLong).to(dev).view({1, T});
  const at::Tensor rows = at::tensor(rows_v, at::kLong).to(dev).view({1, T});
  // global row of every lookup, unchecked bad codes keyed past the end (their segment is skipped)
  const at::Tensor valid = x_cat.ge(0).logical_and(x_cat.lt(rows));
  const at::Tensor keys = at::where(valid, x_cat + rowoff, at::full({}, total_rows, i64)).view({-1});
  at::Tensor sorted, order;
  std::tie(sorted, order) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor seg_flag = at::ones({N}, i64.dtype(at::kBool));
  if (N > 1) seg_flag.slice(0, 1).copy_(sorted.slice(0, 1).ne(sorted.slice(0, 0, N - 1)));
  const at::Tensor seg_id = at::cumsum(seg_flag.to(at::kLong), 0) - 1;
  const at::Tensor seg_start = at::nonzero(seg_flag).view({-1});
  const at::Tensor in_seg = at::arange(N, i64) - seg_start.index_select(0, seg_id);
  const at::Tensor chunk_start = at::nonzero(at::remainder(in_seg, kChunk).eq(0)).view({-1});
  const int64_t n_chunks = chunk_start.size(0);
  const at::Tensor chunk_end = at::cat({chunk_start.slice(0, 1), at::full({1}, N, i64)});
  const at::Tensor seg_first = at::nonzero(seg_flag.index_select(0, chunk_start)).view({-1});
  const int64_t n_segs = seg_first.size(0);
  const at::Tensor seg_last = at::cat({seg_first.slice(0, 1), at::full({1}, n_chunks, i64)});
  const int64_t maxd = *std::max_element(L.dims.begin(), L.dims.end());
  const bool drop = p > 0;
  const uint32_t threshold = drop ? dropout_threshold(p) : 0;
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, ((maxd + 31) / 32) * 32));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "ecd_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({n_chunks, maxd}, grad.options().dtype(at::toOpMathType(grad.scalar_type())));
    const Meta* m = reinterpret_cast<const Meta*>(meta.const_data_ptr<int64_t>());
    ecd_chunk_sums_kernel<scalar_t><<<static_cast<unsigned>(n_chunks), threads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(), chunk_start.const_data_ptr<int64_t>(),
        chunk_end.const_data_ptr<int64_t>(), m, partial.mutable_data_ptr<acc_t>(), T, D, W, maxd, drop, threshold,
        static_cast<acc_t>(drop ? dropout_scale(p) : 1.0), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ecd_segment_sums_kernel<scalar_t><<<static_cast<unsigned>(n_segs), threads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), seg_first.const_data_ptr<int64_t>(), seg_last.const_data_ptr<int64_t>(),
        chunk_start.const_data_ptr<int64_t>(), sorted.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(), m,
        T, total_rows, maxd);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grads;
}

namespace {

using OptTensor = c10::optional<at::Tensor>;

at::Tensor embedding_concat_dropout_kernel(const at::Tensor& x_cat, at::TensorList weights, double p,
                                           const at::Tensor& seed, const OptTensor& cont, bool check_index) {
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CUDA, "embedding_concat_dropout", embedding_concat_dropout_kernel, x_cat,
                          weights, p, seed, cont, check_index);
  if (check_index) check_codes(x_cat, weights);  // a reduction and a device sync: check_index=False skips it
  return embedding_concat_dropout_op(x_cat, weights, p, seed, cont, check_index, embedding_concat_dropout_cuda);
}

std::vector<at::Tensor> embedding_concat_dropout_backward_kernel(const at::Tensor& grad, const at::Tensor& x_cat,
                                                                 at::TensorList weights, double p,
                                                                 const at::Tensor& seed) {
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CUDA, "embedding_concat_dropout_backward",
                          embedding_concat_dropout_backward_kernel, grad, x_cat, weights, p, seed);
  return embedding_concat_dropout_backward_op(grad, x_cat, weights, p, seed, embedding_concat_dropout_backward_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfuse, CUDA, m) {
  m.impl("embedding_concat_dropout", &embedding_concat_dropout_kernel);
  m.impl("embedding_concat_dropout_backward", &embedding_concat_dropout_backward_kernel);
}

}  // namespace fastfuse
