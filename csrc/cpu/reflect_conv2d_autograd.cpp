// fastfuse_C::reflect_conv2d_module: fastfuse.reflect_conv2d's eager CPU path (ReflectConv2d, ConvLayer) as one C++
// autograd node. Through torch.library's generated autograd the Python around the kernels cost ~160 us forward and
// more backward per call: a (1, 8, 4, 4) convolution took 200 us against torch's 33. The kernels, the design pick
// and the output layouts are those of python/fastfuse/ops/reflect_conv2d.py (_route, _route_backward), so the bits
// are too. torch.compile does not come here: it traces fastfuse::reflect_conv2d.
#include <torch/autograd.h>
#include <torch/library.h>

#include "reflect_conv2d.h"
#include "cpu/double_backward.h"

namespace fastfuse {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

// ops/reflect_conv2d.py's _channels_last and _format: torch's convolution returns channels_last when the input or
// the weight is
bool channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}
at::MemoryFormat out_format(const at::Tensor& x, const at::Tensor& w) {
  return channels_last(x) || channels_last(w) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

struct RconvArgs {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups, algo;
};

struct RconvFunction : torch::autograd::Function<RconvFunction> {
  // Inputs as autograd counts them: x, weight, bias, args.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                            const RconvArgs& a) {
    at::Tensor out = reflect_conv2d_cpu(x, w, b, a.stride, a.padding, a.dilation, a.groups, a.algo);
    ctx->save_for_backward({x, w});
    ctx->saved_data["stride"] = a.stride;
    ctx->saved_data["padding"] = a.padding;
    ctx->saved_data["dilation"] = a.dilation;
    ctx->saved_data["groups"] = a.groups;
    ctx->saved_data["algo"] = a.algo;
    ctx->saved_data["has_bias"] = b.has_value();
    return out.contiguous(out_format(x, w));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &w = s[1];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_bias && ctx->needs_input_grad(2)};
    variable_list res(4);  // x, weight, bias, args
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return res;
    const auto stride = ctx->saved_data["stride"].toIntVector(), padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    at::Tensor gi, gw, gb;
    if (double_backward_wanted()) {  // create_graph=True: through F.pad(mode="reflect") + conv2d, as reference.py
      auto forward = [&](const std::vector<at::Tensor>& in) {
        const at::Tensor xp = padding[0] || padding[1]
                                  ? at::reflection_pad2d(in[0], {padding[1], padding[1], padding[0], padding[0]})
                                  : in[0];
        const std::vector<int64_t> no_padding{0, 0};
        return at::conv2d(xp, in[1], in[2].defined() ? c10::optional<at::Tensor>(in[2]) : c10::nullopt, stride,
                          no_padding, dilation, groups);
      };
      // the gradients do not depend on the bias's value
      const at::Tensor b = mask[2] ? at::zeros({w.size(0)}, w.options()) : at::Tensor();
      const auto g = reference_grads(forward, {x, w, b}, grads[0], {mask[0], mask[1], mask[2]});
      gi = g[0], gw = g[1], gb = g[2];
    } else {
      std::tie(gi, gw, gb) = reflect_conv2d_backward_cpu(grads[0], x, w, stride, padding, dilation, groups, mask,
                                                         ctx->saved_data["algo"].toInt());
      // _route_backward's layouts: grad_input like the output, grad_weight like the weight
      if (mask[0]) gi = gi.contiguous(out_format(x, w));
      if (mask[1]) gw = gw.contiguous(channels_last(w) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
      if (mask[2]) gb = gb.contiguous();
    }
    if (mask[0]) res[0] = gi;
    if (mask[1]) res[1] = gw;
    if (mask[2]) res[2] = gb;
    return res;
  }
};

// The op without autograd (inference mode): the forward kernel and the output layout
at::Tensor reflect_conv2d_module_cpu(const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups, int64_t algo) {
  return reflect_conv2d_cpu(x, w, b, stride, padding, dilation, groups, algo).contiguous(out_format(x, w));
}

at::Tensor reflect_conv2d_module_autograd(const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                          int64_t groups, int64_t algo) {
  const OptTensor bias = b.has_value() && b->defined() ? b : c10::nullopt;
  return RconvFunction::apply(x, w, bias, RconvArgs{stride.vec(), padding.vec(), dilation.vec(), groups, algo});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastfuse_C, m) {
  m.def("reflect_conv2d_module(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
        "int groups, int algo) -> Tensor");
}
TORCH_LIBRARY_IMPL(fastfuse_C, CPU, m) { m.impl("reflect_conv2d_module", &reflect_conv2d_module_cpu); }
TORCH_LIBRARY_IMPL(fastfuse_C, Autograd, m) { m.impl("reflect_conv2d_module", &reflect_conv2d_module_autograd); }

}  // namespace fastfuse
