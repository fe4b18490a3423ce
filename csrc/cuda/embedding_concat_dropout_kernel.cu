// embedding_concat_dropout on CUDA, with no host synchronisation: the per-table metadata goes to the kernels by
// value (a Tables struct of up to kMaxTables tables, as kernel parameters; more tables run as groups of
// kMaxTables, one set of launches each), and every buffer has a size known on the host before any launch.
// Forward: one thread per Philox group (8 consecutive elements of the (B, D) embedding block: one Philox call per 8
// elements), gathering each element's table row and applying the mask, written straight into the (B, D + C) output.
// check_index: a bad code is a device-side assert in that same kernel (check_codes_cuda says what the user sees).
// Backward, deterministic and contention-free (no atomics): the (b, t) lookups are keyed by their global row (row
// offset of table t + code; 32-bit keys where the rows allow, halving the radix sort's passes) and stable-sorted;
// the sorted lookups are cut into fixed chunks of kChunk. Kernel 1, one block per chunk, regenerates the chunk's
// masks (one Philox call per 8 elements, staged in shared memory) and sums each run of equal keys in order: a run
// whose row starts and ends in the chunk is written to the table gradient directly; the run that continues from
// the previous chunk and the one that continues into the next are written to the chunk's two partial rows. Kernel
// 2 sums, for each row that crosses chunks, its partials in chunk order. So the partial buffer is 2 rows per
// kChunk lookups (N / 16 rows of the widest table), a hot row hit by 4096 lookups spreads over 128 blocks, and
// each gradient element has exactly one writer.
// Unchecked bad codes (check_index=False) read nothing, give a zero row and no gradient.
// Launches per group of kMaxTables tables: forward 1 (+1 to copy the continuous columns); backward 4 and torch's
// sort (zero fill, keys, sort, 2 sums).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdio>
#include <limits>

#include "dropout.h"
#include "backend.h"
#include "embedding_concat_dropout.h"
#include "philox.h"

namespace fastfuse {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 32;  // sorted lookups per block of the backward's first kernel
constexpr int kMaxTables = 64;  // tables per launch: 6 * 64 * 8 bytes of kernel parameters (limit 4 KB)

// A group of tables, by value. Per table: data pointer (the gradient's in the backward), n_t, d_t, first output
// column, first row in the group's row numbering, first element in the group's element numbering.
struct Tables {
  int n;          // tables in the group
  int first;      // x_cat column of the group's first table
  int64_t rows_total, numel_total;
  int64_t ptr[kMaxTables], rows[kMaxTables], dim[kMaxTables], off[kMaxTables], rowoff[kMaxTables],
      start[kMaxTables];
};

std::vector<Tables> table_groups(const std::vector<at::Tensor>& tensors, const TableLayout& L) {
  std::vector<Tables> groups;
  for (size_t t = 0; t < tensors.size(); ++t) {
    if (t % kMaxTables == 0) groups.push_back(Tables{0, static_cast<int>(t), 0, 0, {}, {}, {}, {}, {}, {}});
    Tables& g = groups.back();
    const int i = g.n++;
    g.ptr[i] = reinterpret_cast<int64_t>(tensors[t].const_data_ptr());
    g.rows[i] = L.rows[t], g.dim[i] = L.dims[t], g.off[i] = L.offs[t];
    g.rowoff[i] = g.rows_total, g.start[i] = g.numel_total;
    g.rows_total += L.rows[t], g.numel_total += L.rows[t] * L.dims[t];
  }
  return groups;
}

// The first table of the group whose range [begin[i], begin[i] + size[i]) ends after v (ranges in order, empty
// ones allowed): the table holding v.
__device__ __forceinline__ int find_table(const int64_t* begin, const int64_t* size, int n, int64_t v) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (begin[mid] + size[mid] > v) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// A code outside its table under check_index: the message, then a device-side assert. As torch.nn.Embedding's
// out-of-range index on CUDA, the error is asynchronous and fatal to the CUDA context (see check_codes_cuda).
__device__ __forceinline__ void bad_code(int64_t b, int64_t t, int64_t code, int64_t rows) {
  printf("fastfuse embedding_concat_dropout: x_cat column %lld has code %lld (row %lld), outside [0, %lld) of its "
         "embedding table\n", static_cast<long long>(t), static_cast<long long>(code), static_cast<long long>(b),
         static_cast<long long>(rows));
  CUDA_KERNEL_ASSERT(false && "embedding_concat_dropout: a code outside its embedding table");
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t drop_elem(scalar_t v, bool keep, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  return static_cast<scalar_t>(static_cast<acc_t>(v) * (keep ? scale : acc_t(0)));  // NaN * 0 = NaN, as torch
}

int grid_for(int64_t work) {
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min((work + kThreads - 1) / kThreads, max_blocks)));
}

// One thread per Philox group of the (B, D) block; of its 8 elements, those in the columns of this launch's tables.
template <typename scalar_t>
__global__ void ecd_forward_kernel(const int64_t* __restrict__ x, Tables tb, scalar_t* __restrict__ out, int64_t B,
                                   int64_t T, int64_t D, int64_t W, bool drop, uint32_t threshold,
                                   at::opmath_type<scalar_t> scale, uint64_t seed, uint64_t offset, bool check) {
  const int64_t n = B * D, ngroups = (n + kKeysPerGroup - 1) / kKeysPerGroup;
  const int64_t c0 = tb.off[0], c1 = tb.off[tb.n - 1] + tb.dim[tb.n - 1];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < ngroups; g += stride) {
    DropKeys keys{{0u, 0u, 0u, 0u}};
    bool have_keys = !drop;
    int64_t b = kKeysPerGroup * g / D, j = kKeysPerGroup * g - b * D;
    int tl = find_table(tb.off, tb.dim, tb.n, j);
#pragma unroll
    for (int l = 0; l < kKeysPerGroup; ++l) {
      if (kKeysPerGroup * g + l >= n) break;
      if (j >= c0 && j < c1) {
        if (!have_keys) keys = dropout_group_keys(seed, offset, static_cast<uint64_t>(g)), have_keys = true;
        while (j >= tb.off[tl] + tb.dim[tl]) ++tl;
        const int64_t idx = x[b * T + tb.first + tl];
        scalar_t v = static_cast<scalar_t>(0);
        if (idx >= 0 && idx < tb.rows[tl])
          v = reinterpret_cast<const scalar_t*>(tb.ptr[tl])[idx * tb.dim[tl] + (j - tb.off[tl])];
        else if (check)
          bad_code(b, tb.first + tl, idx, tb.rows[tl]);
        out[b * W + j] = drop_elem(v, !drop || keys[l] >= threshold, scale);
      }
      if (++j == D) j = 0, ++b, tl = 0;
    }
  }
}

// The codes of the group's columns: bad_code for any outside its table.
__global__ void ecd_check_codes_kernel(const int64_t* __restrict__ x, Tables tb, int64_t B, int64_t T) {
  const int64_t total = B * tb.n, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t b = i / tb.n, tl = i % tb.n, code = x[b * T + tb.first + tl];
    if (code < 0 || code >= tb.rows[tl]) bad_code(b, tb.first + tl, code, tb.rows[tl]);
  }
}

// Every element of the group's gradients set to zero (the sums then write the rows that were looked up).
template <typename scalar_t>
__global__ void ecd_zero_kernel(Tables tb) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < tb.numel_total; i += stride) {
    int lo = 0, hi = tb.n - 1;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (tb.start[mid] + tb.rows[mid] * tb.dim[mid] > i) hi = mid; else lo = mid + 1;
    }
    reinterpret_cast<scalar_t*>(tb.ptr[lo])[i - tb.start[lo]] = static_cast<scalar_t>(0);
  }
}

// key of lookup i = b * n + tl: its row in the group's row numbering; bad codes (unchecked) get rows_total, a key
// past every row, whose run is skipped. key_t is int32_t where the rows allow: half the radix sort's passes.
template <typename key_t>
__global__ void ecd_keys_kernel(const int64_t* __restrict__ x, Tables tb, int64_t B, int64_t T,
                                key_t* __restrict__ keys) {
  const int64_t total = B * tb.n, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t b = i / tb.n, tl = i % tb.n, code = x[b * T + tb.first + tl];
    keys[i] = static_cast<key_t>(code >= 0 && code < tb.rows[tl] ? tb.rowoff[tl] + code : tb.rows_total);
  }
}

// Kernel 1: one block per chunk of kChunk sorted lookups, threads over the columns in tiles of blockDim.x.
// partial[(2c + 0) * maxd + k]: the chunk's first run when its row began in an earlier chunk (head);
// partial[(2c + 1) * maxd + k]: the chunk's last run when it began in this chunk and continues (tail).
template <typename scalar_t, typename key_t>
__global__ void ecd_chunk_sums_kernel(const scalar_t* __restrict__ grad, const key_t* __restrict__ sorted,
                                      const int64_t* __restrict__ order, Tables tb, at::opmath_type<scalar_t>* partial,
                                      int64_t N, int64_t D, int64_t W, int64_t maxd, bool drop, uint32_t threshold,
                                      at::opmath_type<scalar_t> scale, uint64_t seed, uint64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ key_t s_key[kChunk];
  __shared__ int64_t s_b[kChunk];
  __shared__ int s_t[kChunk];
  __shared__ uint8_t s_keep[kChunk][kThreads];
  const int64_t c = blockIdx.x, s0 = c * kChunk, len = N - s0 < kChunk ? N - s0 : kChunk, s1 = s0 + len;
  for (int i = threadIdx.x; i < len; i += blockDim.x) {
    s_key[i] = sorted[s0 + i];
    s_b[i] = order[s0 + i] / tb.n;
    s_t[i] = static_cast<int>(order[s0 + i] % tb.n);
  }
  __syncthreads();
  const bool head_before = s0 > 0 && sorted[s0 - 1] == s_key[0];
  const bool tail_after = s1 < N && sorted[s1] == s_key[len - 1];
  const int tile = blockDim.x;
  for (int64_t k0 = 0; k0 < maxd; k0 += tile) {
    if (drop) {  // the tile's keep flags: per lookup, the Philox groups of its columns [k0, k0 + tile)
      const int groups_per = tile / kKeysPerGroup + 1;
      for (int w = threadIdx.x; w < len * groups_per; w += blockDim.x) {
        const int i = w / groups_per, t = s_t[i];
        const int64_t k_end = std::min<int64_t>(k0 + tile, tb.dim[t]);
        if (k0 >= k_end) continue;
        const int64_t e0 = s_b[i] * D + tb.off[t];  // element of column 0 of this lookup's row segment
        const int64_t g = (e0 + k0) / kKeysPerGroup + w % groups_per;
        if (g * kKeysPerGroup > e0 + k_end - 1) continue;
        const DropKeys keys = dropout_group_keys(seed, offset, static_cast<uint64_t>(g));
        for (int l = 0; l < kKeysPerGroup; ++l) {
          const int64_t k = g * kKeysPerGroup + l - e0;
          if (k >= k0 && k < k_end) s_keep[i][k - k0] = keys[l] >= threshold;
        }
      }
      __syncthreads();
    }
    const int64_t k = k0 + threadIdx.x;
    acc_t acc = 0;
    int run_start = 0;
    for (int i = 0; i < len; ++i) {
      const int t = s_t[i];
      const key_t key = s_key[i];
      const bool valid = k < tb.dim[t] && key < tb.rows_total;
      if (valid) {
        const bool keep = !drop || s_keep[i][threadIdx.x];
        acc += static_cast<acc_t>(drop_elem(grad[s_b[i] * W + tb.off[t] + k], keep, scale));
      }
      if (i + 1 < len && s_key[i + 1] == key) continue;
      // the run [run_start, i] of key ends here
      if (valid) {
        const bool begun = run_start == 0 && head_before, goes_on = i == len - 1 && tail_after;
        if (begun)
          partial[(2 * c) * maxd + k] = acc;
        else if (goes_on)
          partial[(2 * c + 1) * maxd + k] = acc;
        else
          reinterpret_cast<scalar_t*>(tb.ptr[t])[(key - tb.rowoff[t]) * tb.dim[t] + k] = static_cast<scalar_t>(acc);
      }
      acc = 0;
      run_start = i + 1;
    }
    if (drop) __syncthreads();  // s_keep is rewritten by the next tile
  }
}

// Kernel 2: block c owns the row whose run starts in chunk c and continues past it; it adds the run's tail partial
// and the following chunks' head partials, in chunk order, and writes the row.
template <typename scalar_t, typename key_t>
__global__ void ecd_row_sums_kernel(const at::opmath_type<scalar_t>* __restrict__ partial,
                                    const key_t* __restrict__ sorted, const int64_t* __restrict__ order, Tables tb,
                                    int64_t N, int64_t maxd) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x, s0 = c * kChunk, s1 = std::min<int64_t>(s0 + kChunk, N);
  const key_t key = sorted[s1 - 1];
  const bool goes_on = s1 < N && sorted[s1] == key;
  const bool begun = sorted[s0] == key && s0 > 0 && sorted[s0 - 1] == key;
  if (!goes_on || begun || key >= tb.rows_total) return;
  const int t = static_cast<int>(order[s1 - 1] % tb.n);
  const int64_t n_chunks = (N + kChunk - 1) / kChunk;
  scalar_t* dst = reinterpret_cast<scalar_t*>(tb.ptr[t]) + (key - tb.rowoff[t]) * tb.dim[t];
  for (int64_t k = threadIdx.x; k < tb.dim[t]; k += blockDim.x) {
    acc_t acc = partial[(2 * c + 1) * maxd + k];
    for (int64_t d = c + 1; d < n_chunks; ++d) {
      acc += partial[(2 * d) * maxd + k];
      const int64_t e = std::min<int64_t>(d * kChunk + kChunk, N);
      if (e == N || sorted[e] != key) break;  // the run ends in chunk d
    }
    dst[k] = static_cast<scalar_t>(acc);
  }
}

}  // namespace

// check_index on CUDA tensors, with no sync: one launch per group of tables; a bad code prints its column, code and
// row and triggers a device-side assert, reported at the next synchronizing CUDA call as "device-side assert
// triggered". As for torch.nn.Embedding on CUDA, the CUDA context is then unusable (the process must restart).
void check_codes_cuda(const at::Tensor& x_cat_in, at::TensorList weights) {
  TORCH_CHECK(x_cat_in.dim() == 2 && x_cat_in.size(1) == static_cast<int64_t>(weights.size()),
              "embedding_concat_dropout: x_cat must be (batch, n_tables)");
  if (x_cat_in.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x_cat_in.device());
  const at::Tensor x_cat = x_cat_in.to(at::kLong).contiguous();
  std::vector<at::Tensor> tables(weights.begin(), weights.end());
  TableLayout L;  // only the rows are read: the tables may be of any layout here
  for (const auto& w : tables) L.rows.push_back(w.size(0)), L.dims.push_back(0), L.offs.push_back(0);
  const int64_t B = x_cat.size(0), T = x_cat.size(1);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const Tables& tb : table_groups(tables, L)) {
    ecd_check_codes_kernel<<<grid_for(B * tb.n), kThreads, 0, stream>>>(x_cat.const_data_ptr<int64_t>(), tb, B, T);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor embedding_concat_dropout_cuda(const at::Tensor& x_cat, at::TensorList weights, double p, int64_t seed,
                                         int64_t offset, const c10::optional<at::Tensor>& cont, bool check_index) {
  check_embedding_inputs(x_cat, weights, cont);
  TORCH_CHECK(x_cat.is_cuda(), "embedding_concat_dropout_cuda: expected CUDA tensors");
  check_tables(x_cat, weights);  // the kernel dereferences every table's raw pointer on x_cat's device
  TORCH_CHECK(p >= 0 && p < 1, "embedding_concat_dropout kernel: p must be in [0, 1), got ", p);
  const c10::cuda::CUDAGuard guard(x_cat.device());
  std::vector<at::Tensor> tables(weights.begin(), weights.end());
  const TableLayout L = table_layout(weights);
  const int64_t B = x_cat.size(0), T = x_cat.size(1), C = cont.has_value() ? cont->size(1) : 0, D = L.width;
  at::Tensor out = at::empty({B, D + C}, weights[0].options());
  if (B == 0) return out;
  if (C) out.narrow(1, D, C).copy_(*cont);
  // the forward kernel checks the codes of tables with columns; those of tables of width 0 need their own launch
  if (check_index && std::count(L.dims.begin(), L.dims.end(), 0)) check_codes_cuda(x_cat, weights);
  if (D == 0) return out;
  const bool drop = p > 0;
  const uint32_t threshold = drop ? dropout_threshold(p) : 0;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const Tables& tb : table_groups(tables, L)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "ecd_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      ecd_forward_kernel<scalar_t><<<grid_for((B * D + kKeysPerGroup - 1) / kKeysPerGroup), kThreads, 0, stream>>>(
          x_cat.const_data_ptr<int64_t>(), tb, out.mutable_data_ptr<scalar_t>(), B, T, D, D + C, drop, threshold,
          static_cast<acc_t>(drop ? dropout_scale(p) : 1.0), static_cast<uint64_t>(seed),
          static_cast<uint64_t>(offset), check_index);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
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
  const int64_t B = x_cat.size(0), T = x_cat.size(1), D = L.width, W = grad.size(1);
  // the kernels read grad[b * W + j] for b < B, j < D (the CPU kernel checks the same)
  TORCH_CHECK(grad.size(0) == B && W >= D, "embedding_concat_dropout_backward: grad_output must be (B, D + C) = (",
              B, ", >= ", D, "), got ", grad.sizes());
  std::vector<at::Tensor> grads;
  for (const auto& w : weights) grads.push_back(at::empty_like(w, at::MemoryFormat::Contiguous));
  const bool drop = p > 0;
  const uint32_t threshold = drop ? dropout_threshold(p) : 0;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const Tables& tb : table_groups(grads, L)) {
    if (tb.numel_total == 0) continue;
    const int64_t N = B * tb.n, n_chunks = (N + kChunk - 1) / kChunk;
    const int64_t maxd = *std::max_element(tb.dim, tb.dim + tb.n);
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, ((maxd + 31) / 32) * 32));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "ecd_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      ecd_zero_kernel<scalar_t><<<grid_for(tb.numel_total), kThreads, 0, stream>>>(tb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (N == 0) return;
      auto sums = [&](auto key_zero) {  // the keys, their sort and the two sums, with keys of key_zero's type
        using key_t = decltype(key_zero);
        at::Tensor keys = at::empty({N}, x_cat.options().dtype(c10::CppTypeToScalarType<key_t>::value));
        ecd_keys_kernel<key_t><<<grid_for(N), kThreads, 0, stream>>>(x_cat.const_data_ptr<int64_t>(), tb, B, T,
                                                                     keys.mutable_data_ptr<key_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const auto [sorted, order] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
        const auto acc_dtype = at::toOpMathType(grad.scalar_type());
        at::Tensor partial = at::empty({2 * n_chunks, maxd}, grad.options().dtype(acc_dtype));
        ecd_chunk_sums_kernel<scalar_t, key_t><<<static_cast<unsigned>(n_chunks), threads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), sorted.const_data_ptr<key_t>(), order.const_data_ptr<int64_t>(), tb,
            partial.mutable_data_ptr<acc_t>(), N, D, W, maxd, drop, threshold,
            static_cast<acc_t>(drop ? dropout_scale(p) : 1.0), static_cast<uint64_t>(seed),
            static_cast<uint64_t>(offset));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        ecd_row_sums_kernel<scalar_t, key_t><<<static_cast<unsigned>(n_chunks), threads, 0, stream>>>(
            partial.const_data_ptr<acc_t>(), sorted.const_data_ptr<key_t>(), order.const_data_ptr<int64_t>(), tb, N,
            maxd);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (tb.rows_total < std::numeric_limits<int32_t>::max()) sums(int32_t{0}); else sums(int64_t{0});
    });
  }
  return grads;
}

namespace {

using OptTensor = c10::optional<at::Tensor>;

at::Tensor embedding_concat_dropout_kernel(const at::Tensor& x_cat, at::TensorList weights, double p,
                                           const at::Tensor& seed, const OptTensor& cont, bool check_index) {
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CUDA, "embedding_concat_dropout", embedding_concat_dropout_kernel, x_cat,
                          weights, p, seed, cont, check_index);
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
