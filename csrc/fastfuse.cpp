// Module init: importing fastfuse._C runs the static registrations in csrc/cpu and csrc/cuda.
// The public ops (fastfuse::*) are declared in python/fastfuse/_library.py; this library, fastfuse_C,
// holds the C++ kernels that the Python backend router calls. Its schemas take plain ints for the seed,
// which the router reads from the op's seed tensor.
#include <torch/extension.h>

#include "cpu/alloc.h"
#include "cpu/relayout.h"
#include "reflect_conv2d.h"

TORCH_LIBRARY(fastfuse_C, m) {
  m.def("dropout(Tensor x, float p, int seed, int offset) -> Tensor");
  m.def("embedding_concat_dropout(Tensor x_cat, Tensor[] weights, float p, int seed, int offset, Tensor? cont, "
        "bool check_index) -> Tensor");
  m.def("embedding_concat_dropout_backward(Tensor grad_output, Tensor x_cat, Tensor[] weights, float p, int seed, "
        "int offset) -> Tensor[]");
  // batch norm primitives (see csrc/batch_norm.h and fastfuse/reference.py)
  m.def("bn_stats(Tensor x, bool pre_relu) -> (Tensor, Tensor)");
  m.def("bn_apply(Tensor x, Tensor mean, Tensor scale, Tensor bias, Tensor? residual, bool pre_relu, "
        "bool post_relu, float p, int seed, int offset) -> Tensor");
  m.def("bn_grad_reduce(Tensor grad_out, Tensor x, Tensor? out, Tensor mean, bool pre_relu, bool post_relu, "
        "float p, int seed, int offset) -> (Tensor, Tensor)");
  m.def("bn_grad_apply(Tensor grad_out, Tensor x, Tensor? out, Tensor mean, Tensor k1, Tensor k2, Tensor k3, "
        "bool pre_relu, bool post_relu, float p, int seed, int offset, bool need_gi, bool need_g) "
        "-> (Tensor, Tensor)");
  // CPU only: one-read training forward / backward for contiguous (N, C, *) tensors (cpu/batch_norm_impl.h)
  m.def("bn_train_planes(Tensor x, Tensor weight, Tensor bias, Tensor? residual, float eps, bool pre_relu, "
        "bool post_relu, float p, int seed, int offset) -> (Tensor, Tensor, Tensor)");
  m.def("bn_train_planes_backward(Tensor grad_out, Tensor x, Tensor? out, Tensor weight, Tensor mean, Tensor var, "
        "float eps, bool pre_relu, bool post_relu, float p, int seed, int offset, bool need_g) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
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
