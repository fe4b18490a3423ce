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
