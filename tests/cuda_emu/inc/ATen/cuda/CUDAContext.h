// Stand-in for ATen/cuda/CUDAContext.h in the CPU emulation (tests/cuda_emu).
#pragma once
#include "cuda_emu_runtime.h"
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
namespace at {
namespace cuda {
struct EmuProps {
  int multiProcessorCount = 1;  // few blocks per launch: each emulated thread is a std::thread
};
inline EmuProps* getCurrentDeviceProperties() {
  static EmuProps p;
  return &p;
}
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace cuda
}  // namespace at
