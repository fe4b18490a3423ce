// fastfuse_C::dropout_module: fastfuse.dropout's eager CPU path (the Dropout module and the functional call) as
// one C++ autograd node. Through torch.library's generated autograd the Python around the kernel cost ~40 us
// forward and ~80 us backward per call: at (64, 100) fastfuse's Dropout ran 0.53x torch's forward+backward. The
// kernel, the seed (drawn as _rng.new_seed() draws it, cpu/seed.h) and the mask are fastfuse.dropout's, so the
// bits are too. torch.compile does not come here: it traces fastfuse::dropout (python/fastfuse/ops/dropout.py).
#include <torch/autograd.h>
#include <torch/library.h>

#include "dropout.h"
#include "layout.h"
#include "cpu/double_backward.h"
#include "cpu/seed.h"

namespace fastfuse {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct DropoutArgs {
  double p;
  int64_t seed, offset;
};

struct DropoutFunction : torch::autograd::Function<DropoutFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const DropoutArgs& a) {
    at::Tensor out = dropout_cpu(dense(x), a.p, a.seed, a.offset);
    ctx->saved_data["p"] = a.p;
    ctx->saved_data["seed"] = a.seed;
    ctx->saved_data["offset"] = a.offset;
    ctx->saved_data["strides"] = out.strides().vec();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list res(2);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return res;
    const double p = ctx->saved_data["p"].toDouble();
    const int64_t seed = ctx->saved_data["seed"].toInt(), offset = ctx->saved_data["offset"].toInt();
    // the mask lives in the output's storage order: the gradient laid out the same way
    const at::Tensor g = to_strides(grads[0], ctx->saved_data["strides"].toIntVector());
    if (double_backward_wanted()) {  // create_graph=True: grad times the mask's factor, differentiable in grad
      res[0] = g * dropout_cpu(at::ones_like(g), p, seed, offset);
    } else {
      res[0] = dropout_cpu(g, p, seed, offset);
    }
    return res;
  }
};

// The op without autograd (inference mode)
at::Tensor dropout_module_cpu(const at::Tensor& x, double p) {
  dropout_threshold(p);  // p in [0, 1): checked before the seed is drawn
  const auto [seed, offset] = draw_seed();
  return dropout_cpu(dense(x), p, seed, offset);
}

at::Tensor dropout_module_autograd(const at::Tensor& x, double p) {
  dropout_threshold(p);  // p in [0, 1): checked before the seed is drawn
  const auto [seed, offset] = draw_seed();
  return DropoutFunction::apply(x, DropoutArgs{p, seed, offset});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastfuse_C, m) { m.def("dropout_module(Tensor x, float p) -> Tensor"); }
TORCH_LIBRARY_IMPL(fastfuse_C, CPU, m) { m.impl("dropout_module", &dropout_module_cpu); }
TORCH_LIBRARY_IMPL(fastfuse_C, Autograd, m) { m.impl("dropout_module", &dropout_module_autograd); }

}  // namespace fastfuse
