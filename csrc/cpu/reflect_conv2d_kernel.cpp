// The CPU ops of reflect_conv2d (the op's entry file, cpu/<op>_kernel.cpp as for every op): the design per direction,
// and the registration. The designs are in reflect_conv2d_{frame,backward,direct,direct_wgrad}.cpp (see
// cpu/reflect_conv2d_cpu.h).
#include <torch/library.h>

#include "backend.h"
#include "cpu/reflect_conv2d_cpu.h"
#include "cpu/relayout.h"
#include "reflect_conv2d.h"

namespace fastfuse {
namespace {

using rconv::Geom;
using rconv_cpu::kDirect;
using rconv_cpu::kFrame;

// The design of one direction (backward: both the input and the weight gradient). Forward and backward pick
// independently: each computes all of its outputs, so any pair of picks gives correct results. A pick depends on the
// shape, dtype, layout and machine only (never on the thread count or the run), so every run gives the same bits.
int pick(const Geom& g, int64_t algo, bool direct_ok, bool backward) {
  // direct needs fp32, one group, a dense NCHW or channels_last layout and AVX-512 (direct_ok); frame runs anything
  // (every dtype, group count, stride, dilation and layout). Forced direct where it cannot run is auto: frame.
  if (algo == kFrame || !direct_ok) return kFrame;
  if (algo == kDirect) return kDirect;
  // auto, forward: direct. It computes each output pixel once, the reflected taps folded, at about oneDNN's own rate,
  // while frame runs oneDNN's whole zero-padded convolution and then its correction on top (in NCHW also oneDNN's
  // slower NCHW kernels and strided gathers): where the frame is a small share of the work they tie, elsewhere
  // direct wins, most on small outputs (7x7) and on the 3-channel stem, where oneDNN is far from its peak.
  if (!backward) return kDirect;
  // auto, backward: direct too, but only with input channels in whole 16-lane vectors. Its grad_weight reads a
  // partial vector with a masked load, on which the compiler spills its accumulators: with 3 channels (the stem) its
  // backward takes several times frame's (oneDNN's zero-padded backward plus a small correction).
  return g.Cg % 16 == 0 ? kDirect : kFrame;
}

int forward_design(const at::Tensor& x, const at::Tensor& w, const Geom& g, int64_t algo) {
  return pick(g, algo, rconv_cpu::direct_applies(g, x, w), false);
}

}  // namespace

at::Tensor reflect_conv2d_cpu(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, int64_t algo) {
  TORCH_CHECK(x.device().is_cpu(), "fastfuse reflect_conv2d_cpu: expected CPU tensors, got ", x.device());
  // Called directly with tensors that require grad (the op has no autograd kernel here), the designs' inner ATen
  // calls must not record autograd: index_select_out refuses such inputs.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Geom g = rconv::geometry(x, w, stride, padding, dilation, groups);
  if (forward_design(x, w, g, algo) == kDirect) return rconv_cpu::forward_direct(x, w, bias, g);
  return rconv_cpu::forward_frame(x, w, bias, g, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reflect_conv2d_backward_cpu(
    const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> mask, int64_t algo) {
  TORCH_CHECK(x.device().is_cpu(), "fastfuse reflect_conv2d_backward_cpu: expected CPU tensors, got ", x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in the forward
  const Geom g = rconv::geometry(x, w, stride, padding, dilation, groups);
  if (!(mask[0] || mask[1]) || pick(g, algo, rconv_cpu::direct_grads_apply(g, go, x, w), true) != kDirect)
    return rconv_cpu::backward_frame(go, x, w, g, stride, padding, dilation, groups, mask);
  // NCHW tensors relayout to channels_last, each once (views where they are; grad_input is written in its layout)
  const at::Tensor go_cl = relayout(go, at::MemoryFormat::ChannelsLast);
  const at::Tensor x_cl = relayout(x, at::MemoryFormat::ChannelsLast);
  const at::Tensor gi =
      mask[0] ? rconv_cpu::dgrad_direct(go_cl, x_cl, w, g, rconv_cpu::conv_format(x, w)) : at::Tensor();
  const at::Tensor gw = mask[1] ? rconv_cpu::wgrad_direct(go_cl, x_cl, w, g) : at::Tensor();
  at::Tensor gb;  // the bias's gradient as the frame design gives it
  if (mask[2])
    gb = std::get<2>(rconv_cpu::backward_frame(go, x, w, g, stride, padding, dilation, groups, {false, false, true}));
  return {gi, gw, gb};
}

std::string reflect_conv2d_cpu_design(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t algo) {
  return forward_design(x, w, rconv::geometry(x, w, stride, padding, dilation, groups), algo) == kDirect ? "direct"
                                                                                                          : "frame";
}

namespace {

using OptTensor = c10::optional<at::Tensor>;

at::Tensor reflect_conv2d_kernel(const at::Tensor& x, const at::Tensor& w, const OptTensor& b, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_reflect_conv2d_args(x, w, b, stride, padding, dilation, groups);
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CPU, "reflect_conv2d", reflect_conv2d_kernel, x, w, b, stride, padding,
                          dilation, groups);
  return reflect_conv2d_op(x, w, b, stride, padding, dilation, groups, reflect_conv2d_cpu);
}

Tensor3 reflect_conv2d_backward_kernel(const at::Tensor& go, const at::Tensor& x, const at::Tensor& w,
                                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t groups, std::array<bool, 3> mask) {
  check_reflect_conv2d_args(x, w, c10::nullopt, stride, padding, dilation, groups);
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CPU, "reflect_conv2d_backward", reflect_conv2d_backward_kernel, go, x, w,
                          stride, padding, dilation, groups, mask);
  return reflect_conv2d_backward_op(go, x, w, stride, padding, dilation, groups, mask, reflect_conv2d_backward_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfuse, CPU, m) {
  m.impl("reflect_conv2d", &reflect_conv2d_kernel);
  m.impl("reflect_conv2d_backward", &reflect_conv2d_backward_kernel);
}

// the helper ops with a forced design (tests, benchmarks)
TORCH_LIBRARY_IMPL(fastfuse_C, CPU, m) {
  m.impl("reflect_conv2d", &reflect_conv2d_cpu);
  m.impl("reflect_conv2d_backward", &reflect_conv2d_backward_cpu);
}

}  // namespace fastfuse
