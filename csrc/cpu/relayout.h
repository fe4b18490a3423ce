// fp32 [N, C, H, W] tensors between NCHW and channels_last, as a blocked AVX-512 transpose at about a plain copy's
// rate. ATen's copy_ between the layouts runs several times slower, more than the reflection costs, so the designs
// that compute in channels_last (reflect_conv2d's direct one) take NCHW tensors through here.
#pragma once
#include <ATen/ATen.h>

namespace fastfuse {

// Whether relayout() takes t: a 4-d fp32 CPU tensor, contiguous in one of the two layouts, on an AVX-512 CPU
bool relayout_applies(const at::Tensor& t);

// t laid out in fmt (Contiguous or ChannelsLast): a view of t if it is, else a copy in a cached block (cpu/alloc.h).
// Takes what relayout_applies takes.
at::Tensor relayout(const at::Tensor& t, at::MemoryFormat fmt);

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols, on the calling thread (AVX-512 only: where
// relayout_applies holds for some tensor)
void transpose_block(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols);

}  // namespace fastfuse
