// CPU emulation of the CUDA runtime pieces csrc/cuda/*.cu use, for checking them without a GPU: a launch runs
// its blocks one after another, each block's threads as real std::threads (so __syncthreads is a true barrier
// and __shared__ arrays, static here, are shared by the block). Launch limits are checked as CUDA would.
// A device-side assert (CUDA_KERNEL_ASSERT, rewritten to EMU_KERNEL_ASSERT by run.py) raises, after the launch,
// a RuntimeError carrying the message the failing thread last printed. emu::to_arg is the check run.py wraps
// around the first argument of every `.to(...)` in the .cu files: inside an op a tensor may change dtype, never
// device (a copy between host and device, which syncs and cannot be captured in a CUDA graph).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

#include <barrier>
#include <cstdarg>
#include <exception>
#include <mutex>
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
inline thread_local std::string last_printf;
inline int device_printf(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  const int n = std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  last_printf = buf;
  std::fputs(buf, stdout);
  return n;
}
#define EMU_KERNEL_ASSERT(cond) \
  if (!(cond)) throw std::runtime_error("emu: device-side assert triggered (" #cond "): " + emu::last_printf)

inline c10::ScalarType to_arg(c10::ScalarType t) { return t; }
inline caffe2::TypeMeta to_arg(caffe2::TypeMeta t) { return t; }
inline const at::Tensor& to_arg(const at::Tensor& t) { return t; }  // to(other): an op's own tensors
[[noreturn]] inline void device_copy(const std::string& what) {
  throw std::runtime_error("emu: .to(" + what + ") inside a CUDA op: a copy between host and device, which " +
                           "synchronizes and cannot be captured in a CUDA graph");
}
inline c10::Device to_arg(c10::Device d) { device_copy(d.str()); }
inline c10::Device to_arg(c10::DeviceType d) { device_copy(c10::DeviceTypeName(d)); }
inline c10::TensorOptions to_arg(const c10::TensorOptions& o) {
  if (o.has_device()) device_copy("TensorOptions with a device");
  return o;
}

template <class F, class... A>
void launch(dim3 g, dim3 b, size_t smem, cudaStream_t, F f, A... args) {
  const unsigned long long nt = 1ull * b.x * b.y * b.z;
  if (g.x < 1 || g.y < 1 || g.z < 1 || g.y > 65535 || g.z > 65535 || nt < 1 || nt > 1024 || b.z > 64 || smem > 48 * 1024)
    throw std::runtime_error("emu: invalid launch configuration grid=(" + std::to_string(g.x) + "," +
                             std::to_string(g.y) + "," + std::to_string(g.z) + ") block=(" + std::to_string(b.x) +
                             "," + std::to_string(b.y) + "," + std::to_string(b.z) + ")");
  std::exception_ptr failed;
  std::mutex failed_mutex;
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
                try {
                  f(args...);
                } catch (...) {  // a device-side assert; the block's barrier is not used after it
                  const std::lock_guard<std::mutex> lock(failed_mutex);
                  if (!failed) failed = std::current_exception();
                }
              });
        for (auto& t : ts) t.join();
        if (failed) std::rethrow_exception(failed);
      }
}
}  // namespace emu
