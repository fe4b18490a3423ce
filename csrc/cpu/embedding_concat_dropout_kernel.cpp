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

#include "dropout.h"
#include "embedding_concat_dropout.h"
#include "cpu/philox_cpu.h"

namespace fastfuse {
namespace {

constexpr int64_t kBlockElems = 2048;  // embedding elements per Philox refill (4 KB of keys)
constexpr int64_t kSliceCols = 16;     // columns per backward work item

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
  at::parallel_for(0, B, rows_per_block, [&](int64_t b0, int64_t b1) {
    std::vector<uint16_t> keys;
    for (int64_t rb = b0; rb < b1; rb += rows_per_block) {
      const int64_t re = std::min(b1, rb + rows_per_block);
      const int64_t base = drop ? fill_keys(keys, rb * D, re * D, seed, offset) : 0;
      for (int64_t b = rb; b < re; ++b) {
        scalar_t* orow = out + b * W;
        for (int64_t t = 0; t < T; ++t) {
          const int64_t idx = x[b * T + t], n = L.rows[t], d = L.dims[t];
          scalar_t* dst = orow + L.offs[t];
          if (idx < 0 || idx >= n) {
            TORCH_CHECK_INDEX(!check_index, "embedding_concat_dropout: x_cat column ", t, " has code ", idx,
                              " (row ", b, "), outside [0, ", n, ") of its embedding table");
            std::fill(dst, dst + d, scalar_t(0));  // unchecked: a zero row, the bad code is never read
            continue;
          }
          std::memcpy(dst, tables[t] + idx * d, d * sizeof(scalar_t));
        }
        if (drop) {  // one pass over the whole row: vectorises, where the tables' short rows (d ~ 2..10) do not
          const uint16_t* w = keys.data() + (b * D - base);
          for (int64_t j = 0; j < D; ++j) {
            const acc_t v = static_cast<acc_t>(orow[j]) * scale;
            orow[j] = w[j] >= threshold ? static_cast<scalar_t>(v) : static_cast<scalar_t>(0);
          }
        }
        if (C) std::memcpy(orow + D, cont + b * C, C * sizeof(scalar_t));
      }
    }
  });
}

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
    masked = at::empty({B, D}, at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
    scalar_t* m = masked.mutable_data_ptr<scalar_t>();
    const uint32_t threshold = dropout_threshold(p);
    const acc_t scale = static_cast<acc_t>(dropout_scale(p));
    const int64_t rows_per_block = std::max<int64_t>(1, kBlockElems / std::max<int64_t>(D, 1));
    at::parallel_for(0, B, rows_per_block, [&](int64_t b0, int64_t b1) {
      std::vector<uint16_t> keys;
      for (int64_t rb = b0; rb < b1; rb += rows_per_block) {
        const int64_t re = std::min(b1, rb + rows_per_block);
        const int64_t base = fill_keys(keys, rb * D, re * D, seed, offset);
        for (int64_t b = rb; b < re; ++b) {
          const uint16_t* w = keys.data() + (b * D - base);
          const scalar_t* gr = grad + b * W;
          scalar_t* mr = m + b * D;
          for (int64_t j = 0; j < D; ++j) {
            const acc_t v = static_cast<acc_t>(gr[j]) * scale;
            mr[j] = w[j] >= threshold ? static_cast<scalar_t>(v) : static_cast<scalar_t>(0);
          }
        }
      }
    });
    g = m;
    gstride = D;
  }
  // (2) work items: (table, first column, last column), each owning a disjoint slice of one table's grad
  struct Item { int64_t t, k0, k1; };
  std::vector<Item> items;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k0 = 0; k0 < L.dims[t]; k0 += kSliceCols) items.push_back({t, k0, std::min(L.dims[t], k0 + kSliceCols)});
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Item it = items[i];
      const int64_t n = L.rows[it.t], d = L.dims[it.t], w = it.k1 - it.k0;
      acc_t* acc = accs[it.t].template mutable_data_ptr<acc_t>() + it.k0;
      const scalar_t* gcol = g + L.offs[it.t] + it.k0;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t idx = x[b * T + it.t];
        if (idx < 0 || idx >= n) continue;  // only reachable with check_index=False: no gradient
        acc_t* a = acc + idx * d;
        const scalar_t* s = gcol + b * gstride;
        for (int64_t k = 0; k < w; ++k) a[k] += static_cast<acc_t>(s[k]);
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
  at::Tensor out = at::empty({B, L.width + C}, weights[0].options());
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
  for (const auto& w : weights) {  // empty + memset: at::zeros costs a dispatch (and a parallel fill) per table
    accs.push_back(at::empty(w.sizes(), w.options().dtype(acc_type)));
    std::memset(accs.back().data_ptr(), 0, accs.back().nbytes());
  }
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "ecd_backward_cpu", [&] {
      backward_impl<scalar_t>(grad.const_data_ptr<scalar_t>(), x_cat.const_data_ptr<int64_t>(), L, B,
                              grad.size(1), p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), accs);
    });
  }
  if (acc_type != weights[0].scalar_type())
    for (auto& a : accs) a = a.to(weights[0].scalar_type());
  return accs;
}

TORCH_LIBRARY_IMPL(fastfuse_C, CPU, m) {
  m.impl("embedding_concat_dropout", &embedding_concat_dropout_cpu);
  m.impl("embedding_concat_dropout_backward", &embedding_concat_dropout_backward_cpu);
}

}  // namespace fastfuse
