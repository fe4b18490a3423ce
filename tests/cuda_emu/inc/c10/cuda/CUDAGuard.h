// Stand-in for c10/cuda/CUDAGuard.h in the CPU emulation (tests/cuda_emu).
#pragma once
#include <c10/core/Device.h>
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
