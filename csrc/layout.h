// Tensor layouts the kernels take, as python/fastfuse/_layout.py gives them (shared by the C++ paths that must lay
// tensors out exactly as the Python routers do, so the two give the same bits).
#pragma once
#include <ATen/ATen.h>

namespace fastfuse {

// _layout.dense: x itself when non-overlapping and dense (a kernel runs over its storage), else contiguous
inline at::Tensor dense(const at::Tensor& x) { return x.is_non_overlapping_and_dense() ? x : x.contiguous(); }

// _layout.to_strides: t with the given strides, a copy only when they differ
inline at::Tensor to_strides(const at::Tensor& t, at::IntArrayRef strides) {
  if (t.strides() == strides || t.numel() <= 1) return t;
  return at::empty_strided(t.sizes(), strides, t.options()).copy_(t);
}

}  // namespace fastfuse
