// fastfuse::reflect_conv2d on one device: the rules around the device's kernels that both devices share.
// - Output layouts as torch's convolution: channels_last when the input or the weight is; grad_weight like the
//   weight.
// - Kernels of more than rconv::kMaxTaps taps run as torch's reflection pad + convolution (and its backward).
// - FASTFUSE_REFLECT_CONV2D_ALGO forces a CPU design ("frame", "direct"; benchmarks and tests).
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <utility>

#include "reflect_conv2d.h"

namespace fastfuse {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

inline bool rconv_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

inline at::MemoryFormat rconv_out_format(const at::Tensor& x, const at::Tensor& w) {
  return rconv_channels_last(x) || rconv_channels_last(w) ? at::MemoryFormat::ChannelsLast
                                                          : at::MemoryFormat::Contiguous;
}

// The CPU design forced by FASTFUSE_REFLECT_CONV2D_ALGO (0: the automatic pick).
inline int64_t rconv_algo_from_env() {
  const char* v = std::getenv("FASTFUSE_REFLECT_CONV2D_ALGO");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return 0;
  if (std::strcmp(v, "frame") == 0) return 1;
  if (std::strcmp(v, "direct") == 0) return 5;
  TORCH_CHECK(false, "FASTFUSE_REFLECT_CONV2D_ALGO must be auto, frame or direct, got ", v);
}

// The errors F.conv2d and F.pad(mode="reflect") raise for these arguments, before any work is done.
inline void check_reflect_conv2d_args(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "reflect_conv2d: expected a 4-D input (batched), got ", x.dim(), "-D input of size ",
              x.sizes());
  TORCH_CHECK(w.dim() == 4, "weight should have 4 dimensions, got ", w.dim(), "-D weight of size ", w.sizes());
  const bool has_b = b.has_value() && b->defined();
  using Named = std::pair<const at::Tensor*, const char*>;
  for (const auto& [t, name] : {Named{&w, "weight"}, Named{has_b ? &*b : nullptr, "bias"}}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->device() == x.device(), "Input type (", x.device(), ") and ", name, " type (", t->device(),
                ") should be the same");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "Input type (", x.scalar_type(), ") and ", name, " type (",
                t->scalar_type(), ") should be the same");
  }
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "reflect_conv2d: expected a floating-point input, got ",
              x.scalar_type());
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, "non-positive stride is not supported");
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "negative padding is not supported");
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, "dilation should be greater than zero");
  TORCH_CHECK(groups > 0, "non-positive groups is not supported");
  TORCH_CHECK(w.size(0) % groups == 0, "Given groups=", groups, ", expected weight to be divisible by ", groups,
              " at dimension 0, but got weight of size ", w.sizes(), " instead");
  TORCH_CHECK(x.size(1) == w.size(1) * groups, "Given groups=", groups, ", weight of size ", w.sizes(),
              ", expected input", x.sizes(), " to have ", w.size(1) * groups, " channels, but got ", x.size(1),
              " channels instead");
  TORCH_CHECK(!has_b || (b->dim() == 1 && b->size(0) == w.size(0)), "Given weight of size ", w.sizes(),
              ", expected bias to be 1-dimensional with ", w.size(0), " elements, but got bias of size ",
              has_b ? b->sizes() : at::IntArrayRef{}, " instead");
  // torch checks the width (argument #4 of the pad) before the height (argument #6)
  for (const auto& [dim, arg, p] : {std::tuple<int64_t, int, int64_t>{3, 4, padding[1]}, {2, 6, padding[0]}})
    TORCH_CHECK(p < x.size(dim), "Argument #", arg, ": Padding size should be less than the corresponding input ",
                "dimension, but got: padding (", p, ", ", p, ") at dimension ", dim, " of input ", x.sizes());
  const int64_t eff_h = dilation[0] * (w.size(2) - 1) + 1, eff_w = dilation[1] * (w.size(3) - 1) + 1;
  const int64_t pad_h = x.size(2) + 2 * padding[0], pad_w = x.size(3) + 2 * padding[1];
  TORCH_CHECK(pad_h >= eff_h && pad_w >= eff_w, "Calculated padded input size per channel: (", pad_h, " x ", pad_w,
              "). Kernel size: (", eff_h, " x ", eff_w, "). Kernel size can't be greater than actual input size");
}

inline bool rconv_too_many_taps(const at::Tensor& w) { return w.size(2) * w.size(3) > rconv::kMaxTaps; }

inline at::Tensor rconv_pad(const at::Tensor& x, at::IntArrayRef padding) {
  return padding[0] || padding[1] ? at::reflection_pad2d(x, {padding[1], padding[1], padding[0], padding[0]}) : x;
}

template <typename Kernel>
at::Tensor reflect_conv2d_op(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             int64_t groups, Kernel kernel) {
  const at::Tensor out =
      rconv_too_many_taps(w)
          ? at::conv2d(rconv_pad(x, padding), w, b, stride, at::IntArrayRef{0, 0}, dilation, groups)
          : kernel(x, w, b, stride, padding, dilation, groups, rconv_algo_from_env());
  return out.contiguous(rconv_out_format(x, w));
}

template <typename Kernel>
Tensor3 reflect_conv2d_backward_op(const at::Tensor& go, const at::Tensor& x, const at::Tensor& w,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, std::array<bool, 3> mask, Kernel kernel) {
  at::Tensor gi, gw, gb;
  if (rconv_too_many_taps(w)) {
    const at::Tensor xp = rconv_pad(x, padding);
    std::tie(gi, gw, gb) = at::convolution_backward(go, xp, w, at::IntArrayRef{w.size(0)}, stride, {0, 0}, dilation,
                                                    false, {0, 0}, groups, mask);
    if (mask[0] && (padding[0] || padding[1]))
      gi = at::reflection_pad2d_backward(gi, x, {padding[1], padding[1], padding[0], padding[0]});
  } else {
    std::tie(gi, gw, gb) = kernel(go, x, w, stride, padding, dilation, groups, mask, rconv_algo_from_env());
  }
  const at::Tensor empty = x.new_empty({0});
  return {mask[0] ? gi.contiguous(rconv_out_format(x, w)) : empty,
          mask[1] ? gw.contiguous(rconv_channels_last(w) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous)
                  : empty.clone(),
          mask[2] ? gb.contiguous() : empty.clone()};
}

}  // namespace fastfuse
