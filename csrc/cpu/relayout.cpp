// NCHW <-> channels_last for fp32 (relayout.h): per image, a [rows, cols] matrix transposed in 16x16 tiles held in
// registers; each tile loads 16 source lines and stores 16 full destination lines.
#include "cpu/relayout.h"

#include <immintrin.h>

#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/alloc.h"
#include "cpu/transpose16.h"

namespace fastfuse {
namespace {

// dst[j * ldd + i] = src[i * lds + j] for i < ni, j < nj (both at most 16)
__attribute__((target("avx512f"))) void tile16(const float* src, int64_t lds, float* dst, int64_t ldd, int ni,
                                               int nj) {
  const __mmask16 cols = __mmask16((1u << nj) - 1), rows = __mmask16((1u << ni) - 1);
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = i < ni ? _mm512_maskz_loadu_ps(cols, src + i * lds) : _mm512_setzero_ps();
  transpose16(r);
  for (int j = 0; j < nj; ++j) _mm512_mask_storeu_ps(dst + j * ldd, rows, r[j]);
}

}  // namespace

void transpose_block(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; i += 16)
    for (int64_t j = 0; j < cols; j += 16)
      tile16(src + i * lds + j, lds, dst + j * ldd + i, ldd, (int)std::min<int64_t>(16, rows - i),
             (int)std::min<int64_t>(16, cols - j));
}

namespace {

// Each image's [rows, cols] source becomes [cols, rows]. Tasks: blocks of 256 rows x 64 columns of one image (64 KB),
// so that a batch of one image still spreads over the threads; a tile reads 16 lines of one cache line each and
// writes 16 whole destination lines.
void transpose_images(const float* src, float* dst, int64_t N, int64_t rows, int64_t cols) {
  constexpr int64_t kRows = 256, kCols = 64;
  const int64_t rb = (rows + kRows - 1) / kRows, cb = (cols + kCols - 1) / kCols;
  at::parallel_for(0, N * rb * cb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / (rb * cb), i0 = b / cb % rb * kRows, j0 = b % cb * kCols;
      const int64_t i1 = std::min(rows, i0 + kRows), j1 = std::min(cols, j0 + kCols);
      const int64_t img = n * rows * cols;
      transpose_block(src + img + i0 * cols + j0, cols, dst + img + j0 * rows + i0, rows, i1 - i0, j1 - j0);
    }
  });
}

}  // namespace

bool relayout_applies(const at::Tensor& t) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512 && t.is_cpu() && t.dim() == 4 && t.scalar_type() == at::kFloat &&
         (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast));
}

at::Tensor relayout(const at::Tensor& t, at::MemoryFormat fmt) {
  TORCH_CHECK(relayout_applies(t), "fastfuse relayout: expected a contiguous or channels_last 4-d fp32 CPU tensor");
  const int64_t N = t.size(0), C = t.size(1), P = t.size(2) * t.size(3);
  // already laid out: t with the layout's own strides (a size-1 dimension's stride can be anything)
  if (t.is_contiguous(fmt))
    return fmt == at::MemoryFormat::ChannelsLast ? t.as_strided(t.sizes(), {P * C, 1, t.size(3) * C, C})
                                                 : t.as_strided(t.sizes(), {C * P, P, t.size(3), 1});
  if (fmt == at::MemoryFormat::ChannelsLast) {
    at::Tensor out = empty_cached({N, t.size(2), t.size(3), C}, at::kFloat);
    transpose_images(t.const_data_ptr<float>(), out.mutable_data_ptr<float>(), N, C, P);
    return out.permute({0, 3, 1, 2});
  }
  at::Tensor out = empty_cached(t.sizes(), at::kFloat);
  transpose_images(t.const_data_ptr<float>(), out.mutable_data_ptr<float>(), N, P, C);
  return out;
}

}  // namespace fastfuse
