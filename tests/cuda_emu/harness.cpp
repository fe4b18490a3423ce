// The emulated CUDA entry points as a Python module (ffemu), called with CPU tensors.
#include <torch/extension.h>
#include "dropout.h"
#include "embedding_concat_dropout.h"
#include "batch_norm.h"
#include "reflect_conv2d.h"
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fastfuse;
  m.def("dropout", &dropout_cuda);
  m.def("ecd", [](const at::Tensor& x, std::vector<at::Tensor> w, double p, int64_t s, int64_t o,
                  c10::optional<at::Tensor> c, bool ci) { return embedding_concat_dropout_cuda(x, w, p, s, o, c, ci); });
  m.def("ecd_backward", [](const at::Tensor& g, const at::Tensor& x, std::vector<at::Tensor> w, double p, int64_t s,
                           int64_t o) { return embedding_concat_dropout_backward_cuda(g, x, w, p, s, o); });
  m.def("bn_stats", &bn_stats_cuda);
  m.def("bn_apply", &bn_apply_cuda);
  m.def("bn_grad_reduce", &bn_grad_reduce_cuda);
  m.def("bn_grad_apply", &bn_grad_apply_cuda);
  m.def("reflect_conv2d", [](const at::Tensor& x, const at::Tensor& w, c10::optional<at::Tensor> b,
                             std::vector<int64_t> s, std::vector<int64_t> p, std::vector<int64_t> d, int64_t g,
                             int64_t algo) { return reflect_conv2d_cuda(x, w, b, s, p, d, g, algo); });
  m.def("reflect_conv2d_backward", [](const at::Tensor& go, const at::Tensor& x, const at::Tensor& w,
                                      std::vector<int64_t> s, std::vector<int64_t> p, std::vector<int64_t> d,
                                      int64_t g, std::array<bool, 3> mask, int64_t algo) {
    return reflect_conv2d_backward_cuda(go, x, w, s, p, d, g, mask, algo);
  });
}
