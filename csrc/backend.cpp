#include "backend.h"

#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <mutex>
#include <vector>

namespace fastfuse {
namespace {
thread_local Backend tls_backend = Backend::kDefault;

// Room for every public op; op_slot raises if a new op would not fit.
constexpr int kMaxOps = 32;
// defaults[0]: CPU tensors, defaults[1]: CUDA tensors. Zero-initialised: kDefault everywhere.
std::array<std::array<std::atomic<int64_t>, kMaxOps>, 2> defaults{};
std::mutex names_mutex;
std::vector<std::string> names;  // slot -> op name; guarded by names_mutex

std::string base_name(const std::string& name) {
  const std::string suffix = "_backward";
  if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0)
    return name.substr(0, name.size() - suffix.size());
  return name;
}

int device_index(c10::DeviceType dev) {
  TORCH_CHECK(dev == c10::DeviceType::CPU || dev == c10::DeviceType::CUDA,
              "fastfuse backend defaults exist for CPU and CUDA tensors, got ", dev);
  return dev == c10::DeviceType::CUDA ? 1 : 0;
}
}  // namespace

Backend current_backend() { return tls_backend; }

Backend set_backend(Backend b) {
  const Backend prev = tls_backend;
  tls_backend = b;
  return prev;
}

int op_slot(const std::string& name) {
  const std::string base = base_name(name);
  std::lock_guard<std::mutex> lock(names_mutex);
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == base) return static_cast<int>(i);
  TORCH_CHECK(static_cast<int>(names.size()) < kMaxOps, "fastfuse: more than ", kMaxOps,
              " ops in the backend defaults table; raise kMaxOps in csrc/backend.cpp");
  names.push_back(base);
  return static_cast<int>(names.size()) - 1;
}

Backend default_backend(const std::string& name, c10::DeviceType dev) {
  return static_cast<Backend>(defaults[device_index(dev)][op_slot(name)].load(std::memory_order_relaxed));
}

Backend set_default_backend(const std::string& name, c10::DeviceType dev, Backend b) {
  TORCH_CHECK(b != Backend::kCpp || dev == c10::DeviceType::CPU, "fastfuse backend 'cpp' runs CPU tensors only");
  TORCH_CHECK(b != Backend::kCuda || dev == c10::DeviceType::CUDA, "fastfuse backend 'cuda' runs CUDA tensors only");
  return static_cast<Backend>(
      defaults[device_index(dev)][op_slot(name)].exchange(static_cast<int64_t>(b), std::memory_order_relaxed));
}

bool python_backend(c10::DeviceType dev, int slot) {
  Backend b = tls_backend;
  if (b == Backend::kDefault)
    b = static_cast<Backend>(defaults[dev == c10::DeviceType::CUDA ? 1 : 0][slot].load(std::memory_order_relaxed));
  switch (b) {
    case Backend::kDefault:
      return false;
    case Backend::kCpp:
      TORCH_CHECK(dev == c10::DeviceType::CPU, "fastfuse backend 'cpp' runs CPU tensors, got a ", dev,
                  " tensor; use 'cuda' or 'triton'");
      return false;
    case Backend::kCuda:
      TORCH_CHECK(dev == c10::DeviceType::CUDA, "fastfuse backend 'cuda' runs CUDA tensors, got a ", dev,
                  " tensor; use 'cpp'");
      return false;
    default:
      return true;
  }
}

}  // namespace fastfuse
