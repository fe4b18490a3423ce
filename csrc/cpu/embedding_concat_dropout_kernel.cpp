// embedding_concat_dropout on CPU.
// Forward: parallel over rows; per block of rows, dropout keys for its span of the (B, D) embedding block
// (SIMD, stays in L1), then one gather + compare-select-scale pass straight into the output row.
// Backward: (1) the dropped-out gradient of the embedding block (mask regenerated, not stored), then
// (2) per-table sums parallel over (table, column slice) work items, each summing rows in ascending b:
// the result is bit-identical from run to run and for any thread count, and a hot row (a 3-row table hit
// by 4096 rows) is just a sequential loop in one item, with no atomics and no contention.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "backend.h"
#include "dropout.h"
#include "embedding_concat_dropout.h"
#include "cpu/alloc.h"
#include "cpu/philox_cpu.h"

namespace fastfuse {
namespace {

constexpr int64_t kBlockElems = 2048;  // embedding elements per Philox refill (4 KB of keys)
constexpr int64_t kSliceCols = 16;     // columns per backward work item
constexpr int64_t kRowBlock = 32;      // rows of the gradient each backward item sums at a time
constexpr int kMaxFixedWidth = 16;     // widths with a compile-time case (with_width)

// f(std::integral_constant<int, W>()) with W = w for w in 1..kMaxFixedWidth, W = 0 (a runtime width) otherwise:
// the tables' rows are 2..16 wide at fastai's sizes, where a fixed-size copy or add is a few moves and a
// runtime-length loop (or a libc memcpy per row) costs as much as the rest of the kernel.
template <typename F>
decltype(auto) with_width(int64_t w, F&& f) {
  switch (w) {
#define FF_ECD_WIDTH(W) \
  case W:               \
    return f(std::integral_constant<int, W>());
    FF_ECD_WIDTH(1) FF_ECD_WIDTH(2) FF_ECD_WIDTH(3) FF_ECD_WIDTH(4) FF_ECD_WIDTH(5) FF_ECD_WIDTH(6)
    FF_ECD_WIDTH(7) FF_ECD_WIDTH(8) FF_ECD_WIDTH(9) FF_ECD_WIDTH(10) FF_ECD_WIDTH(11) FF_ECD_WIDTH(12)
    FF_ECD_WIDTH(13) FF_ECD_WIDTH(14) FF_ECD_WIDTH(15) FF_ECD_WIDTH(16)
#undef FF_ECD_WIDTH
    default:
      return f(std::integral_constant<int, 0>());
  }
}
static_assert(kMaxFixedWidth == 16, "with_width has a case for every width up to kMaxFixedWidth");

// Codes outside [0, n_t): IndexError naming the first bad one in row-major order (as check_codes does on the
// other backends), whichever one the caller met first.
[[noreturn]] void throw_bad_code(const int64_t* x, const int64_t* rows, int64_t B, int64_t T) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      TORCH_CHECK_INDEX(x[b * T + t] >= 0 && x[b * T + t] < rows[t], "embedding_concat_dropout: x_cat column ", t,
                        " has code ", x[b * T + t], " (row ", b, "), outside [0, ", rows[t],
                        ") of its embedding table");
  TORCH_CHECK(false, "embedding_concat_dropout: internal error, no bad code found");
}

// Rows [b0, b1) of one table into their output columns. Table by table, so that the row width is a compile-time
// constant (D > 0, with_width) for the usual short widths. A bad code gives a zero row (check_index=False; it is
// never read), or false.
template <int D, typename scalar_t>
bool gather_rows(scalar_t* out, int64_t W, const int64_t* x, int64_t T, const scalar_t* table, int64_t n,
                 int64_t d_rt, int64_t b0, int64_t b1, bool check_index) {
  const int64_t d = D > 0 ? D : d_rt;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t idx = x[b * T];
    scalar_t* dst = out + b * W;
    if (idx < 0 || idx >= n) {
      if (check_index) return false;
      std::fill(dst, dst + d, scalar_t(0));
      continue;
    }
    std::memcpy(dst, table + idx * d, d * sizeof(scalar_t));
  }
  return true;
}

template <typename scalar_t>
bool gather_table(scalar_t* out, int64_t W, const int64_t* x, int64_t T, const scalar_t* table, int64_t n, int64_t d,
                  int64_t b0, int64_t b1, bool check_index) {
  return with_width(d, [&](auto D) {
    return gather_rows<decltype(D)::value>(out, W, x, T, table, n, d, b0, b1, check_index);
  });
}

// Keys covering stream elements [e0, e1): keys[e - base] for e in range, base = 8 * floor(e0 / 8).
int64_t fill_keys(std::vector<uint16_t>& keys, int64_t e0, int64_t e1, uint64_t seed, uint64_t offset) {
  const int64_t g0 = e0 / kKeysPerGroup, g1 = (e1 + kKeysPerGroup - 1) / kKeysPerGroup;
  keys.resize(kKeysPerGroup * (g1 - g0));
  philox_keys(keys.data(), static_cast<uint64_t>(g0), g1 - g0, seed, offset);
  return kKeysPerGroup * g0;
}

template <typename scalar_t>
void forward_impl(const int64_t* x, const std::vector<const scalar_t*>& tables, const TableLayout& L,
                  const scalar_t* cont, int64_t C, scalar_t* out, int64_t B, double p, uint64_t seed,
                  uint64_t offset, bool check_index) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = static_cast<int64_t>(tables.size()), D = L.width, W = D + C;
  const bool drop = p > 0;
  const uint32_t threshold = drop ? dropout_threshold(p) : 0;
  const acc_t scale = static_cast<acc_t>(drop ? dropout_scale(p) : 1.0);
  const int64_t rows_per_block = std::max<int64_t>(1, kBlockElems / std::max<int64_t>(D, 1));
  // plain pointers for the hot loops (the vectors' members are not reloaded after each row copy)
  const int64_t *rows = L.rows.data(), *dims = L.dims.data(), *offs = L.offs.data();
  const scalar_t* const* tabs = tables.data();
  at::parallel_for(0, B, rows_per_block, [&](int64_t b0, int64_t b1) {
    std::vector<uint16_t> keys;
    for (int64_t rb = b0; rb < b1; rb += rows_per_block) {
      const int64_t re = std::min(b1, rb + rows_per_block);
      const int64_t base = drop ? fill_keys(keys, rb * D, re * D, seed, offset) : 0;
      for (int64_t t = 0; t < T; ++t)
        if (!gather_table(out + offs[t], W, x + t, T, tabs[t], rows[t], dims[t], rb, re, check_index))
          throw_bad_code(x, rows, B, T);
      for (int64_t b = rb; b < re; ++b) {
        scalar_t* orow = out + b * W;
        if (drop) {  // one pass over the whole row: vectorises, where the tables' short rows (d ~ 2..10) do not
          apply_keys(orow, orow, keys.data() + (b * D - base), D, threshold, scale);
        }
        if (C) std::memcpy(orow + D, cont + b * C, C * sizeof(scalar_t));
      }
    }
  });
}

// Backward work item: columns [k0, k0 + w) of table t. Each item owns a disjoint part of one table's gradient
// and sums its rows in ascending b: the bits do not depend on how tables are shared out among threads.
struct Item {
  int64_t t, k0, w;
};

// Rows [b0, b1) of one item: acc[x_b * d + k] += g[b * gstride + k] for k < w, in ascending b. W > 0 makes the
// width a compile-time constant (with_width); __restrict lets the compiler keep the item's constants in registers
// and vectorise the adds.
template <int W, typename scalar_t, typename acc_t>
inline void add_row(acc_t* a, const scalar_t* s, int64_t w) {
  const int64_t width = W > 0 ? W : w;
  int64_t k = 0;
#if defined(__GNUC__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    // four lanes at a time (GCC does not vectorise these short rows by itself); the same float adds
    typedef float v4 __attribute__((vector_size(16)));
    for (; k + 4 <= width; k += 4) {
      v4 va, vs;
      std::memcpy(&va, a + k, sizeof(v4));
      std::memcpy(&vs, s + k, sizeof(v4));
      va += vs;
      std::memcpy(a + k, &va, sizeof(v4));
    }
  }
#endif
  for (; k < width; ++k) a[k] += static_cast<acc_t>(s[k]);
}

template <int W, typename scalar_t, typename acc_t>
void sum_rows(acc_t* __restrict acc, int64_t d, const scalar_t* __restrict g, int64_t gstride,
              const int64_t* __restrict x, int64_t T, int64_t n, int64_t b0, int64_t b1, int64_t w) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t idx = x[b * T];
    if (idx < 0 || idx >= n) continue;  // only reachable with check_index=False: no gradient
    add_row<W>(acc + idx * d, g + b * gstride, w);
  }
}

template <typename scalar_t, typename acc_t>
void sum_rows_any(acc_t* acc, int64_t d, const scalar_t* g, int64_t gstride, const int64_t* x, int64_t T, int64_t n,
                  int64_t b0, int64_t b1, int64_t w) {
  with_width(w, [&](auto W) { sum_rows<decltype(W)::value>(acc, d, g, gstride, x, T, n, b0, b1, w); });
}
static_assert(kSliceCols <= kMaxFixedWidth, "every backward item's width has a compile-time case");

template <typename scalar_t>
void backward_impl(const scalar_t* grad, const int64_t* x, const TableLayout& L, int64_t B, int64_t W,
                   double p, uint64_t seed, uint64_t offset, std::vector<at::Tensor>& accs) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = static_cast<int64_t>(L.rows.size()), D = L.width;
  // (1) dropped-out gradient of the embedding block, (B, D); with p == 0 read grad_output directly
  const scalar_t* g = grad;
  int64_t gstride = W;
  at::Tensor masked;
  if (p > 0) {
    masked = empty_cached({B, D}, c10::CppTypeToScalarType<scalar_t>::value);
    scalar_t* m = masked.mutable_data_ptr<scalar_t>();
    const uint32_t threshold = dropout_threshold(p);
    const acc_t scale = static_cast<acc_t>(dropout_scale(p));
    const int64_t rows_per_block = std::max<int64_t>(1, kBlockElems / std::max<int64_t>(D, 1));
    at::parallel_for(0, B, rows_per_block, [&](int64_t b0, int64_t b1) {
      std::vector<uint16_t> keys;
      for (int64_t rb = b0; rb < b1; rb += rows_per_block) {
        const int64_t re = std::min(b1, rb + rows_per_block);
        const int64_t base = fill_keys(keys, rb * D, re * D, seed, offset);
        for (int64_t b = rb; b < re; ++b)
          apply_keys(grad + b * W, m + b * D, keys.data() + (b * D - base), D, threshold, scale);
      }
    });
    g = m;
    gstride = D;
  }
  // (2) work items: (table, column slice). Whole tables go to each thread, in contiguous ranges of about equal
  // work (a row of an item costs its width plus a fixed part). A thread zeroes its tables' gradients, then sums
  // blocks of kRowBlock rows item by item: the block stays in L1 while every item of the range reads it.
  std::vector<Item> items;
  std::vector<int64_t> first_item{0}, cost{0};  // per table: its first item; prefix sums of the work
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k0 = 0; k0 < L.dims[t]; k0 += kSliceCols)
      items.push_back({t, k0, std::min(L.dims[t] - k0, kSliceCols)});
    first_item.push_back(static_cast<int64_t>(items.size()));
    cost.push_back(cost.back() + (L.dims[t] + 4 * (first_item[t + 1] - first_item[t])));
  }
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), T, B * D / 4096 + 1}));
  std::vector<int64_t> cut(parts + 1, T);  // tables [cut[q], cut[q + 1]) go to part q
  cut[0] = 0;
  for (int64_t q = 1; q < parts; ++q)
    cut[q] = std::lower_bound(cost.begin(), cost.end(), cost.back() * q / parts) - cost.begin();
  std::vector<acc_t*> acc_ptrs(T);
  for (int64_t t = 0; t < T; ++t) acc_ptrs[t] = accs[t].template mutable_data_ptr<acc_t>();
  at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t t0 = cut[q], t1 = std::max(cut[q], cut[q + 1]);
      for (int64_t t = t0; t < t1; ++t) std::memset(acc_ptrs[t], 0, L.rows[t] * L.dims[t] * sizeof(acc_t));
      for (int64_t b0 = 0; b0 < B; b0 += kRowBlock) {
        const int64_t b1 = std::min(B, b0 + kRowBlock);
        for (int64_t i = first_item[t0]; i < first_item[t1]; ++i) {
          const Item it = items[i];
          sum_rows_any(acc_ptrs[it.t] + it.k0, L.dims[it.t], g + L.offs[it.t] + it.k0, gstride, x + it.t, T,
                       L.rows[it.t], b0, b1, it.w);
        }
      }
    }
  });
}

}  // namespace

at::Tensor embedding_concat_dropout_cpu(const at::Tensor& x_cat, at::TensorList weights, double p, int64_t seed,
                                        int64_t offset, const c10::optional<at::Tensor>& cont, bool check_index) {
  check_embedding_inputs(x_cat, weights, cont);
  TORCH_CHECK(x_cat.device().is_cpu(), "embedding_concat_dropout_cpu: expected CPU tensors");
  TORCH_CHECK(p >= 0 && p < 1, "embedding_concat_dropout kernel: p must be in [0, 1), got ", p);
  const TableLayout L = table_layout(weights);
  const int64_t B = x_cat.size(0), C = cont.has_value() ? cont->size(1) : 0;
  at::Tensor out = empty_cached({B, L.width + C}, weights[0].scalar_type());
  if (B == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "ecd_forward_cpu", [&] {
    std::vector<const scalar_t*> tables;
    for (const auto& w : weights) tables.push_back(w.const_data_ptr<scalar_t>());
    forward_impl<scalar_t>(x_cat.const_data_ptr<int64_t>(), tables, L,
                           C ? cont->const_data_ptr<scalar_t>() : nullptr, C, out.mutable_data_ptr<scalar_t>(), B,
                           p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), check_index);
  });
  return out;
}

std::vector<at::Tensor> embedding_concat_dropout_backward_cpu(const at::Tensor& grad, const at::Tensor& x_cat,
                                                              at::TensorList weights, double p, int64_t seed,
                                                              int64_t offset) {
  check_embedding_inputs(x_cat, weights, c10::nullopt);
  TORCH_CHECK(p >= 0 && p < 1, "embedding_concat_dropout kernel: p must be in [0, 1), got ", p);
  const TableLayout L = table_layout(weights);
  const int64_t B = x_cat.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == B && grad.size(1) >= L.width && grad.is_contiguous() &&
                  grad.scalar_type() == weights[0].scalar_type(),
              "embedding_concat_dropout_backward: grad_output must be a contiguous (B, D + C) tensor");
  const auto acc_type = at::toOpMathType(weights[0].scalar_type());
  std::vector<at::Tensor> accs;
  for (const auto& w : weights) accs.push_back(empty_cached(w.sizes(), acc_type));  // zeroed by backward_impl
  if (B == 0) {
    for (auto& a : accs) a.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "ecd_backward_cpu", [&] {
      backward_impl<scalar_t>(grad.const_data_ptr<scalar_t>(), x_cat.const_data_ptr<int64_t>(), L, B,
                              grad.size(1), p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), accs);
    });
  }
  if (acc_type != weights[0].scalar_type())
    for (auto& a : accs) a = a.to(weights[0].scalar_type());
  return accs;
}

namespace {

using OptTensor = c10::optional<at::Tensor>;

at::Tensor embedding_concat_dropout_kernel(const at::Tensor& x_cat, at::TensorList weights, double p,
                                           const at::Tensor& seed, const OptTensor& cont, bool check_index) {
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CPU, "embedding_concat_dropout", embedding_concat_dropout_kernel, x_cat,
                          weights, p, seed, cont, check_index);
  return embedding_concat_dropout_op(x_cat, weights, p, seed, cont, check_index, embedding_concat_dropout_cpu);
}

std::vector<at::Tensor> embedding_concat_dropout_backward_kernel(const at::Tensor& grad, const at::Tensor& x_cat,
                                                                 at::TensorList weights, double p,
                                                                 const at::Tensor& seed) {
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CPU, "embedding_concat_dropout_backward",
                          embedding_concat_dropout_backward_kernel, grad, x_cat, weights, p, seed);
  return embedding_concat_dropout_backward_op(grad, x_cat, weights, p, seed, embedding_concat_dropout_backward_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfuse, CPU, m) {
  m.impl("embedding_concat_dropout", &embedding_concat_dropout_kernel);
  m.impl("embedding_concat_dropout_backward", &embedding_concat_dropout_backward_kernel);
}

}  // namespace fastfuse
