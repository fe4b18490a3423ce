// CPU emulation of the CUDA runtime pieces csrc/cuda/*.cu use, for checking them without a GPU: a launch runs
// its blocks one after another, each block's threads as real std::threads (so __syncthreads is a true barrier
// and __shared__ arrays, static here, are shared by the block). Launch limits are checked as CUDA would.
#pragma once
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 blockIdx, threadIdx, blockDim, gridDim;
inline thread_local std::barrier<>* emu_barrier = nullptr;
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
typedef void* cudaStream_t;
namespace emu {
template <class F, class... A>
void launch(dim3 g, dim3 b, size_t smem, cudaStream_t, F f, A... args) {
  const unsigned long long nt = 1ull * b.x * b.y * b.z;
  if (g.x < 1 || g.y < 1 || g.z < 1 || g.y > 65535 || g.z > 65535 || nt < 1 || nt > 1024 || b.z > 64 || smem > 48 * 1024)
    throw std::runtime_error("emu: invalid launch configuration grid=(" + std::to_string(g.x) + "," +
                             std::to_string(g.y) + "," + std::to_string(g.z) + ") block=(" + std::to_string(b.x) +
                             "," + std::to_string(b.y) + "," + std::to_string(b.z) + ")");
  for (unsigned bz = 0; bz < g.z; ++bz)
    for (unsigned by = 0; by < g.y; ++by)
      for (unsigned bx = 0; bx < g.x; ++bx) {
        std::barrier<> bar(static_cast<std::ptrdiff_t>(nt));
        std::vector<std::thread> ts;
        for (unsigned tz = 0; tz < b.z; ++tz)
          for (unsigned ty = 0; ty < b.y; ++ty)
            for (unsigned tx = 0; tx < b.x; ++tx)
              ts.emplace_back([&, tx, ty, tz] {
                blockIdx = dim3(bx, by, bz); threadIdx = dim3(tx, ty, tz); blockDim = b; gridDim = g;
                emu_barrier = &bar;
                f(args...);
              });
        for (auto& t : ts) t.join();
      }
}
}  // namespace emu
