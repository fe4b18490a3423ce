// Which backend runs a fastfuse op.
//
// Every op's CPU and CUDA kernels are C++ functions registered on the dispatcher, so the default path has no
// Python in it. fastfuse.use_backend(name) and FASTFUSE_BACKEND set an override: "cpp" and "cuda" name the C++
// kernels, "triton" and "reference" name Python ones. A C++ kernel asks python_backend() first (one thread-local
// load); when it says yes, the kernel hands its arguments to the op of the same name and schema in the
// fastfuse_py namespace, whose Python kernel (python/fastfuse/_backends.py) runs the chosen backend.
// The autograd node records the backend of the forward and sets it again for the backward, so a backward run on
// the autograd engine's own threads uses the forward's backend.
//
// Without an override, each op runs on its default for the tensor's device. The defaults are process-wide (not
// thread-local: the autograd engine's threads must see them too), one per op and device, kept in a fixed table of
// atomics that the kernels read with one relaxed load. Python sets them once, at import: for CUDA tensors, the
// fastest backend in the committed GPU results (python/fastfuse/_backends.py); for CPU tensors the C++ kernels,
// so the CPU default path stays free of Python. An op and its backward share one default, so a backward runs on
// the backend of its forward.
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceType.h>

#include <cstdint>
#include <string>

namespace fastfuse {

enum class Backend : int64_t { kDefault = 0, kCpp = 1, kCuda = 2, kTriton = 3, kReference = 4 };

// The override of this thread (kDefault: none); set_backend returns the previous one.
Backend current_backend();
Backend set_backend(Backend b);

struct BackendGuard {
  explicit BackendGuard(Backend b) : prev_(set_backend(b)) {}
  ~BackendGuard() { set_backend(prev_); }
  BackendGuard(const BackendGuard&) = delete;
  BackendGuard& operator=(const BackendGuard&) = delete;

 private:
  Backend prev_;
};

// The slot of op `name` in the defaults table ("<op>_backward" shares the slot of "<op>"); registers it on first
// use. Kernels call it once (a function-local static), so the table is never searched on the hot path.
int op_slot(const std::string& name);

// The default of op `name` (either spelling) for tensors of device type `dev` (CPU or CUDA; kDefault: the device's
// C++ kernel). set_default_backend returns the previous default.
Backend default_backend(const std::string& name, c10::DeviceType dev);
Backend set_default_backend(const std::string& name, c10::DeviceType dev, Backend b);

// For a C++ kernel of device type `dev` and op slot `slot`: true when the override, or else the op's default for
// the device, names a Python backend; false when the C++ kernel runs; raises when the choice names the C++ kernels
// of the other device.
bool python_backend(c10::DeviceType dev, int slot);

// The typed handle of fastfuse_py::<name>, the Python backends' copy of fastfuse::<name> (same schema).
template <typename Sig>
c10::TypedOperatorHandle<Sig> python_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((std::string("fastfuse_py::") + name).c_str(), "")
      .template typed<Sig>();
}

// The first statement of every kernel registered for a public op: when the override names a Python backend, the
// call goes to fastfuse_py::<name> with the kernel's own arguments.
#define FASTFUSE_PYTHON_BACKEND(device, name, kernel, ...)                  \
  static const int ff_op_slot = ::fastfuse::op_slot(name);                  \
  if (::fastfuse::python_backend(device, ff_op_slot)) {                     \
    static auto py_op = ::fastfuse::python_op<decltype(kernel)>(name);      \
    return py_op.call(__VA_ARGS__);                                         \
  }

}  // namespace fastfuse
