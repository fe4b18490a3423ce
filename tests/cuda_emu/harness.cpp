// The emulated CUDA kernels register themselves (TORCH_LIBRARY_IMPL(fastfuse_emu, CPU, ...), see run.py); this
// module only has to exist.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
