// The CPU ops of reflect_conv2d (the op's entry file, cpu/<op>_kernel.cpp as for every op): the forward's design
// per shape, and the registration. The designs are in reflect_conv2d_{frame,gemm,split,direct,backward}.cpp (see
// cpu/reflect_conv2d_cpu.h).
#include <torch/library.h>

#include "backend.h"
#include "cpu/reflect_conv2d_cpu.h"
#include "reflect_conv2d_op.h"

namespace fastfuse {
namespace {

using rconv::Geom;
using rconv_cpu::kDirect;
using rconv_cpu::kFold;
using rconv_cpu::kFrame;
using rconv_cpu::kGemm;
using rconv_cpu::kSplit;

// algo 0 picks by shape, and by the thread count where a design runs as our tasks (pick_forward below), so the
// bits never depend on the run. Measured on
// ResNet-34's shapes (README): (b) where its correction adds under 3% to the multiply-adds (56x56 stride 1,
// both 56x56 inputs) or the GEMM rows would be short (Cg*KH*KW < 32); (c) up to 12% where the
// stride divides the padding (28x28 and 14x14 stride 1: the valid conv runs at oneDNN's speed, only the
// frame at MKL's); past that, or at stride 2, the folded GEMM everywhere (7x7 outputs, where the frame is half
// the pixels; stride-2 28x28 and 14x14 inputs). (a) was not faster than "fold" (fewer MACs) on any of them.
// (c) at 56x56 stride 1 ran 1.11x the zero-padded conv on a quiet machine against (b)'s 1.04-1.08x (but 0.93x
// in a benchmark run with the cores shared, where (b) ran 1.12x in another: one parallel region against two).
//
// Three input channels (an RGB image) are oneDNN's slow case here: its zero-padded 7x7 stride-2 stem ran at ~90
// GFLOP/s and a 3x3 stride-1 convolution at ~26, while its unpadded convolution and MKL's GEMM ran far faster. So
// the stem takes (c) (its block's input starts one pixel in, a cheap copy at 3 channels): 0.62-0.69x the
// zero-padded conv against (b)'s 1.01-1.02x, (16, 3, 224, 224) -> 64; and 3x3 stride 1 takes "fold": 0.60x and
// 0.87x against (b)'s 1.00x and 1.10x, (16, 3, 224, 224) -> 64 and -> 32. (Other small-channel shapes measured
// no such rule: one input channel, 5x5 kernels and 3x3 stride 2 each had another best design, or (b).)
//
// Small batches and NCHW (measured on (4-16, 16-128, H, H) inputs, 3x3): (c) runs its convolution in chunks of
// kConvImages images, one thread each, so with one chunk (N <= 8) the other thread idles
// (rconv_cpu::chunks_fill_threads: and with more threads than chunks, the rest idle): 1.7-1.9x the zero-padded conv
// against (b)'s 1.2-1.5x; those take (b). In NCHW, (b)'s correction gathers with strided reads and (c) won wherever
// it had two chunks (0.50-1.22x against (b)'s 1.14-2.08x), so NCHW takes (c) there even below 3%.
//
// AVX-512 (2 cores of an Emerald Rapids Xeon VM; rconv::cpu_avx512): oneDNN's zero-padded convolution runs near
// the cores' peak there, stem included, and (c)'s and "fold"'s GEMMs fall further behind it, so channels_last takes
// (b) up to a 7% correction share (rconv::kAvx512FrameShare): 28x28 stride 1 1.06-1.08x the zero-padded conv
// against (c)'s 1.10-1.13x (two runs), 28x28 stride 2 1.12x against "fold"'s 1.22x. The stem keeps (c): what swung
// there was oneDNN's zero-padded conv, not (c) (session 23, four processes, channels_last input: (c) took 19.2-20.2
// ms and (b) 26.0-26.7, while the zero-padded conv took 24.9-25.9 ms, or 41.9 in one process from an OIHW weight;
// (c) 0.48-0.81x of it, (b) 0.62-1.05x). An earlier session had read the swing as (c)'s (0.92x to 1.39x).
//
// Design (d) "direct" (our own AVX-512 kernel for the whole output; fp32, one group: direct_ok; NCHW since session 26)
// computes each pixel once with the frame's taps folded, at about oneDNN's own rate on the interior. Measured
// against the zero-padded conv on the Xeon (session 24, forward under no_grad, two runs of ResNet-34's shapes and
// one of small batches): 14x14 stride 1 1.04x against (c)'s 1.10-1.11x; the stem 0.60-0.63x against (c)'s
// 0.82-0.84x; 3x3 stride 1 on 3 channels 0.27-0.39x against "fold"'s 0.83-1.24x; batches of 1-4 at 14x14 and 28x28
// 1.07-1.11x against 1.11-1.24x. It lost where the frame is small and oneDNN's whole conv is hard to beat (28x28
// and 56x56 at batch 16: 1.06-1.10x against (b)'s 1.01-1.05x) and for the stem at batch 1-4 (1.23-1.42x against
// 1.08-1.13x; it wins there since, below). (At 7x7 it first lost too, 1.10-1.12x against "fold"'s 1.08-1.12x,
// streaming its 9 MB weight once per task of images; see the weight-bound rule below.)
// Session 25: with its pixels read through base + scaled-index addresses (reflect_conv2d_direct_kernel.h) it won
// 28x28 too, 1.03x against (b)'s 1.06-1.08x, and stride-2 28x28, 1.05x against (b)'s 1.09-1.10x (forward under
// no_grad, two in-process runs of ResNet-34's shapes); at 56x56 (2.4% frame) it tied (b) until it ran two weight
// tiles per line (below).
// NCHW (session 26): the direct design takes NCHW tensors through an AVX-512 relayout to channels_last and back
// (cpu/relayout.h, at a plain copy's speed), and there it wins wider than in channels_last, as oneDNN's own NCHW
// convolution is slower (and swings up to 2x between processes: a zero-padded 16 -> 16 channel 56x56 batch 16 took
// 1.06 ms in one and 3.44 in another, while the direct design took 1.2-1.3 ms in both). Against torch's
// zero-padded NCHW conv, forward under no_grad at batch 16: ResNet-34's shapes 0.64-1.19x where the old picks took
// 0.74-1.38x (28x28 1.19x to 0.99x, 7x7 1.38x to 1.05x, the stem 1.00x to 0.45x); 16 channels at 56x56 0.36-0.42x
// against (c)'s 0.54-0.61x; 64 channels at 112x112 (batch 4) 13.1-13.7 ms against (b)'s 12.8-22.1. So NCHW takes
// it below 3% of frame share with any channels and image size. The stem takes it at any batch in both layouts:
// NCHW batch 1-8 0.38-0.52x against (b)'s 1.11-1.18x (at batch 1 in a process where oneDNN ran its fast NCHW stem,
// 1.31 ms against 1.25); channels_last batch 1, 2 and 4 1.20x, 1.06x and 1.06x against (b)'s 1.22x, 1.13x and 1.11x,
// once a task too few for the threads splits into bands of rows (reflect_conv2d_direct.cpp).
int pick_by_shape(const Geom& g, int64_t algo, bool channels_last, bool direct_ok) {
  if (algo == kGemm || algo == kSplit || algo == kFold || algo == kDirect) return int(algo);
  if (algo != 0) return kFrame;
  const bool avx512 = rconv::cpu_avx512();
  const bool chunks = rconv_cpu::chunks_fill_threads(g.N);
  const int64_t K = g.Cg * g.KH * g.KW;
  const bool unit = g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1;
  if (g.G == 1 && g.Cg == 3 && g.dh == 1 && g.dw == 1) {
    if (g.KH == 7 && g.KW == 7 && g.sh == 2 && g.sw == 2) return direct_ok ? kDirect : chunks ? kSplit : kFrame;
    if (g.KH == 3 && g.KW == 3 && unit) return direct_ok ? kDirect : kFold;
  }
  if (rconv::small_conv(g, channels_last, false)) return kGemm;
  // stride 1 or 2 with a 3-12% frame share: 28x28 (4.7%) and 14x14 (9.3%) at stride 1, 28x28 at stride 2 (outputs
  // of up to 8x8 go by the rule below: at batch 1, 256 -> 512 channels at stride 2 from 14x14, (a) ran 0.93x the
  // zero-padded conv against direct's 1.09x). Below 3% (56x56), from 32 channels and images of up to 1 MB, with
  // two tiles per line: forward+backward interleaved in one process (the backward then all direct) 0.95-0.98x the
  // zero-padded conv against 1.00-1.01x with (b)'s forward, 1.03-1.04x against 1.03-1.05x at stride 2 (two runs
  // each, batch 16); forward alone a tie at batch 16, 1.05x against 1.10-1.20x at batch 4 (32 and 64 channels). At
  // 112x112 (64 channels, 3.2 MB images, batch 4) the forward lost, 1.10x against 1.04x.
  const bool thin_ok = !channels_last || (g.Cg >= 32 && g.OC >= 32 && g.H * g.W * g.C * 4 <= (int64_t(1) << 20));
  if (direct_ok && rconv_cpu::direct_share_band(g, thin_ok)) return kDirect;
  // Outputs of up to 8x8 (7x7 stride 1, stride-2 14x14 inputs), where the weight outweighs the activations and the
  // direct design runs a tile per task over the batch: 0.95-0.98x the zero-padded conv against "fold"'s and (a)'s
  // 1.07-1.13x from 392 output pixels (batch 8 at 7x7) up; at batch 4 they tied, at batch 1 (a) won (0.95x against
  // 1.13x at stride 2, 1.25x against 1.30x at 7x7). Session 26, with the weight packed by a transpose (its pack had
  // been a large part of a small batch's time): channels_last batch 1 1.15x against (a)'s 1.23x at 7x7, a tie at
  // stride 2 (0.94x, 0.92x), batch 4 0.93x and 0.85x against 1.02x and 0.94x; NCHW batch 2-4 1.05-1.15x against
  // 1.17-1.70x, but batch 1 1.08x and 0.97x against (a)'s 0.89x and 0.81x. So: any batch in channels_last, from
  // two images in NCHW.
  if (direct_ok && g.dh == 1 && g.dw == 1 && g.OH * g.OW <= 64 && (channels_last || g.N >= 2)) return kDirect;
  // Small batches (one chunk: (c) and "fold" run on one thread) of long GEMM rows (K = Cg*KH*KW >= 2048, ResNet's
  // 14x14 and 7x7 stages), up to 1024 output pixels: (a)'s one GEMM per task beats (b), whose weight copies cost
  // as much as its small correction, and "fold". Measured on AVX-512, batch 1, 2, 4 (and 8 at 7x7): 256 channels at
  // 14x14 took 1.21-1.29x the zero-padded conv against the old pick's 1.37-1.91x in channels_last, 1.45-1.61x
  // against 1.61-2.34x in NCHW; 512 at 7x7 0.36-1.11x against 0.49-1.71x (oneDNN's own 7x7 times swing 2x there);
  // 256 -> 512 stride 2 0.74-1.07x against 1.07-1.48x (NCHW 1.30-1.37x against 1.80-2.16x). At 28x28 (K = 1152)
  // (a) lost. torch's pad + conv still ran 1.03-1.14x at 14x14: no design here matches it at these batches.
  // In NCHW, where (a) builds its im2col as columns (reflect_conv2d_columns.cpp) and (b) gathers with strided reads,
  // (a) wins from shorter rows: batch 1-4, 80-160 channels (K = 720-1440), 14x14 to 32x32, (a) took 1.26-1.66x the
  // zero-padded conv against the old pick's 1.52-1.78x (two runs of seven shapes, forward under no_grad); at 64
  // channels (K = 576) they tied (1.35-1.41x against 1.33-1.48x).
  if (!chunks && K >= (channels_last ? 2048 : 720) && g.N * g.OH * g.OW <= 1024) return kGemm;
  const double share = rconv::correction_share(g);
  const bool divides = g.ph % g.sh == 0 && g.pw % g.sw == 0;
  if (K < 32) return kFrame;
  if (!channels_last && divides && chunks && share <= 0.12) return kSplit;
  if (share < 0.03 || (avx512 && channels_last && share <= rconv::kAvx512FrameShare)) return kFrame;
  if (share <= 0.12 && divides) return chunks ? kSplit : kFrame;
  return kFold;
}

// ... and with more than 2 threads, (a) and "fold" only where they make a task per thread (tasks_fill_threads).
int pick_forward(const Geom& g, int64_t algo, bool channels_last, bool direct_ok) {
  const int design = pick_by_shape(g, algo, channels_last, direct_ok);
  if (algo != 0) return design;
  const auto gemm_tasks = [&] { return channels_last ? rconv_cpu::gemm_tasks(g) : rconv_cpu::columns_task_count(g); };
  if (design == kGemm && !rconv_cpu::tasks_fill_threads(gemm_tasks)) return kFrame;
  if (design == kFold && !rconv_cpu::tasks_fill_threads([&] { return rconv_cpu::fold_tasks(g); })) return kFrame;
  return design;
}

int design_for(const at::Tensor& x, const at::Tensor& w, const Geom& g, int64_t algo) {
  const bool direct_ok = rconv_cpu::direct_applies(g, x, w);
  if (algo == kDirect) algo = direct_ok ? kDirect : 0;  // forced where it cannot run: the automatic pick
  return pick_forward(g, algo, rconv::conv_format(x, w) == at::MemoryFormat::ChannelsLast, direct_ok);
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       int64_t algo) {
  const Geom g = rconv::geometry(x, w, stride, padding, dilation, groups);
  const int design = design_for(x, w, g, algo);
  if (design == kDirect) return rconv_cpu::forward_direct(x, w, bias, g);
  if (design >= kSplit) return rconv_cpu::forward_split(x, w, bias, g, stride, dilation, design == kSplit);
  if (design == kGemm) return rconv_cpu::forward_gemm(x, w, bias, g);
  return rconv_cpu::forward_frame(x, w, bias, g, stride, padding, dilation, groups);
}

}  // namespace

at::Tensor reflect_conv2d_cpu(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, int64_t algo) {
  TORCH_CHECK(x.device().is_cpu(), "fastfuse reflect_conv2d_cpu: expected CPU tensors, got ", x.device());
  // Called directly with tensors that require grad (the op has no autograd kernel here), the designs' inner ATen
  // calls must not record autograd: index_select_out refuses such inputs.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return forward_cpu(x, w, bias, stride, padding, dilation, groups, algo);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reflect_conv2d_backward_cpu(
    const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> mask, int64_t algo) {
  TORCH_CHECK(x.device().is_cpu(), "fastfuse reflect_conv2d_backward_cpu: expected CPU tensors, got ", x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in the forward
  return rconv_cpu::backward_cpu(go, x, w, stride, padding, dilation, groups, mask, algo);
}

std::string reflect_conv2d_cpu_design(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t algo) {
  static const char* names[] = {"auto", "frame", "gemm", "split", "fold", "direct"};
  return names[design_for(x, w, rconv::geometry(x, w, stride, padding, dilation, groups), algo)];
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
