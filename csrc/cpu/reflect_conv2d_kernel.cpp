// Reflection-padded conv2d on CPU: oneDNN's zero-padded convolution plus the frame correction of
// reflect_conv2d.h. The loops below are the device part: strided reads and writes, so contiguous and
// channels_last tensors take the same path; each output element has exactly one writer.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "reflect_conv2d.h"

namespace fastfuse {
namespace {

using rconv::Geom;
using rconv::reflect;
using rconv::Region;

struct CpuFrame {
  static void gather(const at::Tensor& x, at::Tensor& A, const Geom& g, const Region& reg) {
    const int64_t R = reg.rows(), Cc = reg.cols(), NP = g.N * R * Cc, T = reg.taps.n, K = g.Cg * T;
    const auto st = x.strides();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "reflect_conv2d_gather", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      acc_t* ap = A.mutable_data_ptr<acc_t>();
      at::parallel_for(0, NP, 16, [&](int64_t b, int64_t e) {
        for (int64_t p = b; p < e; ++p) {
          const int64_t n = p / (R * Cc), r = reg.r0 + p / Cc % R, c = reg.c0 + p % Cc;
          for (int t = 0; t < T; ++t) {
            const int64_t ih = reflect(r * g.sh - g.ph + reg.taps.kh[t] * g.dh, g.H);
            const int64_t iw = reflect(c * g.sw - g.pw + reg.taps.kw[t] * g.dw, g.W);
            const scalar_t* src = xp + n * st[0] + ih * st[2] + iw * st[3];
            for (int64_t gi = 0; gi < g.G; ++gi) {
              acc_t* dst = ap + (gi * NP + p) * K + t * g.Cg;
              const scalar_t* s = src + gi * g.Cg * st[1];
              for (int64_t cg = 0; cg < g.Cg; ++cg) dst[cg] = static_cast<acc_t>(s[cg * st[1]]);
            }
          }
        }
      });
    });
  }

  static void add(at::Tensor& out, const at::Tensor& corr_in, const Geom& g, const Region& reg) {
    const at::Tensor corr = corr_in.contiguous();
    const int64_t R = reg.rows(), Cc = reg.cols(), NP = g.N * R * Cc;
    const auto st = out.strides();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "reflect_conv2d_add", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const acc_t* cp = corr.const_data_ptr<acc_t>();
      at::parallel_for(0, NP, 16, [&](int64_t b, int64_t e) {
        for (int64_t p = b; p < e; ++p) {
          const int64_t n = p / (R * Cc), r = reg.r0 + p / Cc % R, c = reg.c0 + p % Cc;
          scalar_t* dst = op + n * st[0] + r * st[2] + c * st[3];
          for (int64_t gi = 0; gi < g.G; ++gi) {
            const acc_t* src = cp + (gi * NP + p) * g.OCg;
            for (int64_t oc = 0; oc < g.OCg; ++oc) {
              scalar_t& o = dst[(gi * g.OCg + oc) * st[1]];
              o = static_cast<scalar_t>(static_cast<acc_t>(o) + src[oc]);
            }
          }
        }
      });
    });
  }

  // One thread per image: the reflected sources of different frame pixels coincide, so each image's
  // gradient is summed by one writer in a fixed order (deterministic, no atomics).
  static void fold(at::Tensor& gin, const at::Tensor& B_in, const Geom& g, const Region& reg) {
    const at::Tensor B = B_in.contiguous();
    const int64_t R = reg.rows(), Cc = reg.cols(), NP = g.N * R * Cc, T = reg.taps.n, K = g.Cg * T;
    const auto st = gin.strides();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gin.scalar_type(), "reflect_conv2d_fold", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* gp = gin.mutable_data_ptr<scalar_t>();
      const acc_t* bp = B.const_data_ptr<acc_t>();
      at::parallel_for(0, g.N, 1, [&](int64_t nb, int64_t ne) {
        for (int64_t n = nb; n < ne; ++n)
          for (int64_t q = 0; q < R * Cc; ++q) {
            const int64_t p = n * R * Cc + q, r = reg.r0 + q / Cc, c = reg.c0 + q % Cc;
            for (int t = 0; t < T; ++t) {
              const int64_t ih = reflect(r * g.sh - g.ph + reg.taps.kh[t] * g.dh, g.H);
              const int64_t iw = reflect(c * g.sw - g.pw + reg.taps.kw[t] * g.dw, g.W);
              scalar_t* dst = gp + n * st[0] + ih * st[2] + iw * st[3];
              for (int64_t gi = 0; gi < g.G; ++gi) {
                const acc_t* src = bp + (gi * NP + p) * K + t * g.Cg;
                scalar_t* d = dst + gi * g.Cg * st[1];
                for (int64_t cg = 0; cg < g.Cg; ++cg) {
                  scalar_t& o = d[cg * st[1]];
                  o = static_cast<scalar_t>(static_cast<acc_t>(o) + src[cg]);
                }
              }
            }
          }
      });
    });
  }
};

}  // namespace

at::Tensor reflect_conv2d_cpu(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, int64_t algo) {
  TORCH_CHECK(x.device().is_cpu(), "fastfuse reflect_conv2d_cpu: expected CPU tensors, got ", x.device());
  return rconv::forward<CpuFrame>(x, w, bias, stride, padding, dilation, groups, algo);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reflect_conv2d_backward_cpu(
    const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> mask, int64_t algo) {
  TORCH_CHECK(x.device().is_cpu(), "fastfuse reflect_conv2d_backward_cpu: expected CPU tensors, got ", x.device());
  return rconv::backward<CpuFrame>(go, x, w, stride, padding, dilation, groups, mask, algo);
}

TORCH_LIBRARY_IMPL(fastfuse_C, CPU, m) {
  m.impl("reflect_conv2d", &reflect_conv2d_cpu);
  m.impl("reflect_conv2d_backward", &reflect_conv2d_backward_cpu);
}

}  // namespace fastfuse
