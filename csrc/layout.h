// Tensor layouts the kernels take.
#pragma once
#include <ATen/ATen.h>

namespace fastfuse {

// x itself when non-overlapping and dense (a kernel runs over its storage), else contiguous
inline at::Tensor dense(const at::Tensor& x) { return x.is_non_overlapping_and_dense() ? x : x.contiguous(); }

// t with the given strides, a copy only when they differ (a gradient laid out like the output it belongs to)
inline at::Tensor to_strides(const at::Tensor& t, at::IntArrayRef strides) {
  if (t.strides() == strides || t.numel() <= 1) return t;
  return at::empty_strided(t.sizes(), strides, t.options()).copy_(t);
}

inline at::Tensor to_strides(const at::Tensor& t, c10::SymIntArrayRef strides) {
  if (t.sym_strides() == strides || t.sym_numel() <= 1) return t;
  return at::empty_strided_symint(t.sym_sizes(), strides, t.options()).copy_(t);
}

}  // namespace fastfuse
