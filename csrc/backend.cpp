#include "backend.h"

#include <c10/util/Exception.h>

namespace fastfuse {
namespace {
thread_local Backend tls_backend = Backend::kDefault;
}  // namespace

Backend current_backend() { return tls_backend; }

Backend set_backend(Backend b) {
  const Backend prev = tls_backend;
  tls_backend = b;
  return prev;
}

bool python_backend(c10::DeviceType dev) {
  switch (tls_backend) {
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
