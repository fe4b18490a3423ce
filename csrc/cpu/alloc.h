// Output allocation for memory-bound CPU kernels.
//
// A fresh multi-MB output comes from a new mmap, and first-touching it 4 KB page by page can cost more than the
// memory-bound kernel that writes it (docs/architecture.md). So big outputs come from a small cache of blocks that were already touched (as the CUDA caching allocator
// does on the GPU): a training loop gets the same few sizes back every step. New blocks are 2 MB aligned and
// advised to use transparent huge pages, 512x fewer faults on first touch. Tensors made here are ordinary
// resizable CPU tensors; only where their memory comes from differs.
#pragma once
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <cstdint>

namespace fastfuse {

// Blocks of at least this size go through the cache; smaller ones are left to malloc. (glibc maps blocks from
// 128 KB up fresh, or trims them off its heap, often enough that a 2 MB output would page-fault on most calls.)
// 64 KB takes in a tabular model's hidden activations at small batches ((64, 500) float32 is 125 KB).
constexpr int64_t kCachedOutputBytes = int64_t(64) << 10;

// The allocator behind empty_like_output and empty_cached (a process-wide singleton).
c10::Allocator* output_allocator();

// Idle bytes the cache holds, and returning them to the system (fastfuse.empty_cpu_cache()).
int64_t cpu_cache_idle_bytes();
void empty_cpu_cache();

// at::empty_like for a dense x (same sizes and strides, so channels_last stays channels_last); big CPU outputs
// come from the cache.
inline at::Tensor empty_like_output(const at::Tensor& x) {
  if (!x.is_cpu() || x.nbytes() < static_cast<size_t>(kCachedOutputBytes) || !x.is_non_overlapping_and_dense())
    return at::empty_like(x);
  return at::detail::empty_strided_generic(x.sizes(), x.strides(), output_allocator(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), x.scalar_type());
}

// at::empty (contiguous) of the given sizes and dtype; big CPU outputs come from the cache. A training step asks
// for the same sizes every time (activations, weight gradients), whose page faults would otherwise cost about as
// much as the matmul that writes them.
inline at::Tensor empty_cached(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  if (n * static_cast<int64_t>(c10::elementSize(dtype)) < kCachedOutputBytes)
    return at::empty(sizes, at::TensorOptions().dtype(dtype));
  return at::detail::empty_generic(sizes, output_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   c10::nullopt);
}

}  // namespace fastfuse
