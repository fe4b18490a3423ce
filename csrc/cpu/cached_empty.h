// A fresh contiguous CPU tensor whose memory, when it is big, comes from the output cache (cpu/alloc.h): blocks
// that were already touched, handed back when the tensor dies. A training step asks for the same sizes every
// time (activations, weight gradients), and a fresh multi-hundred-KB malloc block page-faults on first touch:
// a 2 MB gradient costs ~0.3 ms of faults here, as much as the matmul that writes it.
#pragma once
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include "cpu/alloc.h"

namespace fastfuse {

inline at::Tensor empty_cached(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  if (n * static_cast<int64_t>(c10::elementSize(dtype)) < kCachedOutputBytes)
    return at::empty(sizes, at::TensorOptions().dtype(dtype));
  return at::detail::empty_generic(sizes, output_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   c10::nullopt);
}

}  // namespace fastfuse
