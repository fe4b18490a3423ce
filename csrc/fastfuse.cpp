// Module init: importing fastfuse._C runs the static registrations of every op.
// The public ops live in namespace fastfuse: each op's file csrc/<op>.cpp defines its schemas and its autograd,
// csrc/cpu/<op>_kernel.cpp and csrc/cuda/<op>_kernel.cu register its kernels, and python/fastfuse/ops/<op>.py its
// fake. Namespace fastfuse_C holds kernel-level helper ops without autograd (for tests and benchmarks).
#include <torch/extension.h>

#include "backend.h"
#include "cpu/alloc.h"
#include "cpu/relayout.h"
#include "seed.h"
#include "reflect_conv2d.h"

namespace fastfuse {
namespace {

// [key, offset] for Philox, drawn from torch's default CPU generator as torch.randint(0, 2**63 - 1, (2,)) would
// draw them. An op of its own (not torch.randint) so that compiled code draws eager's seeds, and tagged
// nondeterministic_seeded so that no compiler merges two calls.
at::Tensor seed() {
  const auto [key, offset] = draw_seed();
  at::Tensor s = at::empty({2}, at::kLong);
  s.data_ptr<int64_t>()[0] = key;
  s.data_ptr<int64_t>()[1] = offset;
  return s;
}

}  // namespace
}  // namespace fastfuse

TORCH_LIBRARY(fastfuse, m) {
  m.set_python_module("fastfuse.ops");
  m.def("seed() -> Tensor", {at::Tag::nondeterministic_seeded});
}

TORCH_LIBRARY_IMPL(fastfuse, CompositeExplicitAutograd, m) { m.impl("seed", &fastfuse::seed); }

TORCH_LIBRARY(fastfuse_C, m) {
  // batch norm primitives (see csrc/batch_norm.h and fastfuse/reference.py)
  m.def("bn_stats(Tensor x, bool pre_relu) -> (Tensor, Tensor)");
  m.def("bn_apply(Tensor x, Tensor mean, Tensor scale, Tensor bias, Tensor? residual, bool pre_relu, "
        "bool post_relu, float p, int seed, int offset) -> Tensor");
  m.def("bn_grad_reduce(Tensor grad_out, Tensor x, Tensor? out, Tensor mean, bool pre_relu, bool post_relu, "
        "float p, int seed, int offset) -> (Tensor, Tensor)");
  m.def("bn_grad_apply(Tensor grad_out, Tensor x, Tensor? out, Tensor mean, Tensor k1, Tensor k2, Tensor k3, "
        "bool pre_relu, bool post_relu, float p, int seed, int offset, bool need_gi, bool need_g) "
        "-> (Tensor, Tensor)");
  m.def("bn_update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, "
        "float? momentum, Tensor mean, Tensor var, int n) -> ()");
  // IndexError naming the first code outside its table (csrc/embedding_concat_dropout.h)
  m.def("embedding_check_codes(Tensor x_cat, Tensor[] weights) -> ()");
  // reflect_conv2d with its CPU design forced (algo, see csrc/reflect_conv2d.h)
  m.def("reflect_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, int algo) -> Tensor");
  m.def("reflect_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool[3] output_mask, int algo) -> (Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", []() {
    pybind11::dict info;
    info["torch_version"] = FASTFUSE_TORCH_VERSION;
#ifdef FASTFUSE_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    return info;
  });
  m.def("set_backend",
        [](int64_t b) { return static_cast<int64_t>(fastfuse::set_backend(static_cast<fastfuse::Backend>(b))); },
        "Set this thread's backend override (0: none); returns the previous one");
  m.def("current_backend", []() { return static_cast<int64_t>(fastfuse::current_backend()); });
  m.def("set_default_backend",
        [](const std::string& op, bool cuda, int64_t b) {
          return static_cast<int64_t>(fastfuse::set_default_backend(
              op, cuda ? c10::DeviceType::CUDA : c10::DeviceType::CPU, static_cast<fastfuse::Backend>(b)));
        },
        "Set op's process-wide default for CPU or CUDA tensors (0: the device's C++ kernel); returns the previous one");
  m.def("default_backend", [](const std::string& op, bool cuda) {
    return static_cast<int64_t>(
        fastfuse::default_backend(op, cuda ? c10::DeviceType::CUDA : c10::DeviceType::CPU));
  });
  m.def("empty_cpu_cache", &fastfuse::empty_cpu_cache, "Free the idle blocks of the CPU output cache");
  m.def("cpu_cache_idle_bytes", &fastfuse::cpu_cache_idle_bytes, "Bytes the CPU output cache holds idle");
  m.def("reflect_conv2d_cpu_design",
        [](const at::Tensor& x, const at::Tensor& w, std::vector<int64_t> stride, std::vector<int64_t> padding,
           std::vector<int64_t> dilation, int64_t groups, int64_t algo) {
          return fastfuse::reflect_conv2d_cpu_design(x, w, stride, padding, dilation, groups, algo);
        },
        "The design reflect_conv2d's CPU forward runs for these arguments (algo 0: the automatic pick)");
  m.def("relayout",
        [](const at::Tensor& t, bool channels_last) {
          return fastfuse::relayout(t, channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
        },
        "An fp32 4-d tensor in NCHW or channels_last (the AVX-512 transpose the direct conv design uses; for tests)");
  m.def("relayout_applies", &fastfuse::relayout_applies, "Whether relayout takes this tensor on this CPU");
}
