// fastfuse::augment on CPU. Rows of output pixels (one image, one output row) in parallel; each row in three
// loops over its pixels that GCC vectorises (built for AVX2 and for the baseline, picked at load time):
//   1. coordinates: the pixel matrix, the fold into the image, the four taps' offsets and bilinear weights;
//   2. per channel, the four-tap gather and blend (gathers: the one loop that stays mostly scalar);
//   3. per channel, lighting (logit space, with a vectorisable log and exp below) and normalisation.
// Nothing depends on the thread count: every output element is computed by the same arithmetic in one place.
// -ffp-contract=off (setup.py) keeps the AVX2 and baseline builds bit-identical: no fused multiply-adds.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

#include "augment.h"
#include "backend.h"
#include "cpu/alloc.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FF_AUG_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FF_AUG_CLONES
#endif

namespace fastfuse {
namespace {

// log(x) for normal x > 0: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s), s = (m - 1) / (m + 1),
// |s| <= 0.172, by its series to s^9 (next term < 1e-9). Within about 2 float ulps of std::log, and vectorisable.
inline float vlog(float x) {
  const int32_t i = std::bit_cast<int32_t>(x);
  int32_t e = ((i >> 23) & 0xff) - 127;
  float m = std::bit_cast<float>((i & 0x007fffff) | 0x3f800000);
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float s = (m - 1.f) / (m + 1.f), s2 = s * s;
  const float poly = 2.f * s * (1.f + s2 * (1.f / 3 + s2 * (1.f / 5 + s2 * (1.f / 7 + s2 * (1.f / 9)))));
  const float fe = static_cast<float>(e);
  return fe * 0.693145751953125f + (fe * 1.428606765330187e-06f + poly);  // ln 2 split: fe * hi is exact
}

// exp(x) for |x| <= 87: x = n ln 2 + r, |r| <= ln2 / 2, exp r by its Taylor series to r^7 (error < 2e-8).
inline float vexp(float x) {
  x = x < -87.f ? -87.f : (x > 87.f ? 87.f : x);
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  const float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720 +
                                                                                           r * (1.f / 5040)))))));
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

// The taps of one output row: offsets of the four source pixels (nw, ne, sw, se; in elements, from the channel's
// origin) and their weights, zero for taps outside the image (grid_sample skips those).
struct Taps {
  int32_t *o0, *o1, *o2, *o3;
  float *w0, *w1, *w2, *w3;
  float *cx, *cy;  // scratch: the folded source coordinates
};

struct RowTaps {
  std::vector<int32_t> o;
  std::vector<float> wt;
  explicit RowTaps(int64_t w) : o(4 * w), wt(6 * w) {}
  Taps taps(int64_t w) {
    return {o.data(), o.data() + w, o.data() + 2 * w, o.data() + 3 * w,
            wt.data(), wt.data() + w, wt.data() + 2 * w, wt.data() + 3 * w, wt.data() + 4 * w, wt.data() + 5 * w};
  }
};

// The taps' offsets and weights of one row, for pad mode PAD (a constant, so the loops have no branch), in three
// loops over restrict-qualified streams: GCC vectorises the coordinates' and the offsets' loops (one loop doing all
// of it, or streams carved out of one array, it leaves scalar).
template <int PAD>
__attribute__((always_inline)) inline void row_coords_body(const float* __restrict__ pm, float fy, int64_t w,
                                                           int64_t H, int64_t W, int32_t sx, int32_t sy, Taps t) {
  const float n1x = static_cast<float>(W - 1), n1y = static_cast<float>(H - 1);
  const int32_t W1 = static_cast<int32_t>(W - 1), H1 = static_cast<int32_t>(H - 1);
  const float ax = pm[1] * fy + pm[2], ay = pm[4] * fy + pm[5], aw = pm[7] * fy + pm[8];
  const float p0 = pm[0], p3 = pm[3], p6 = pm[6];
  int32_t* __restrict__ o0 = t.o0; int32_t* __restrict__ o1 = t.o1;
  int32_t* __restrict__ o2 = t.o2; int32_t* __restrict__ o3 = t.o3;
  float* __restrict__ w0 = t.w0; float* __restrict__ w1 = t.w1;
  float* __restrict__ w2 = t.w2; float* __restrict__ w3 = t.w3;
  float* __restrict__ cxs = t.cx; float* __restrict__ cys = t.cy;
  for (int64_t ox = 0; ox < w; ++ox) {
    const float fx = static_cast<float>(static_cast<int32_t>(ox));  // int32: AVX2 has no int64 -> float
    const float den = p6 * fx + aw;
    cxs[ox] = augment_fold((p0 * fx + ax) / den, n1x, PAD);
    cys[ox] = augment_fold((p3 * fx + ay) / den, n1y, PAD);
  }
  for (int64_t ox = 0; ox < w; ++ox) {  // offsets, clamped into the image
    const int32_t x0 = static_cast<int32_t>(std::floor(cxs[ox])), y0 = static_cast<int32_t>(std::floor(cys[ox]));
    const int32_t x1 = x0 + 1, y1 = y0 + 1;
    const int32_t cx0 = x0 < 0 ? 0 : (x0 > W1 ? W1 : x0), cx1 = x1 < 0 ? 0 : (x1 > W1 ? W1 : x1);
    const int32_t cy0 = y0 < 0 ? 0 : (y0 > H1 ? H1 : y0), cy1 = y1 < 0 ? 0 : (y1 > H1 ? H1 : y1);
    o0[ox] = cy0 * sy + cx0 * sx;
    o1[ox] = cy0 * sy + cx1 * sx;
    o2[ox] = cy1 * sy + cx0 * sx;
    o3[ox] = cy1 * sy + cx1 * sx;
  }
  for (int64_t ox = 0; ox < w; ++ox) {  // weights, 0 for taps outside the image
    const float cx = cxs[ox], cy = cys[ox];
    const float x0f = std::floor(cx), y0f = std::floor(cy);
    const float wx0 = (x0f + 1.f) - cx, wx1 = cx - x0f, wy0 = (y0f + 1.f) - cy, wy1 = cy - y0f;
    const float x1f = x0f + 1.f, y1f = y0f + 1.f;
    // 1 or 0 (integers compared as floats, exactly); the weights are >= 0, so a product with 0 is +0, as
    // grid_sample's skipped tap
    const float mx0 = (x0f >= 0.f && x0f <= n1x) ? 1.f : 0.f, mx1 = (x1f >= 0.f && x1f <= n1x) ? 1.f : 0.f;
    const float my0 = (y0f >= 0.f && y0f <= n1y) ? 1.f : 0.f, my1 = (y1f >= 0.f && y1f <= n1y) ? 1.f : 0.f;
    w0[ox] = (wx0 * wy0) * (mx0 * my0);
    w1[ox] = (wx1 * wy0) * (mx1 * my0);
    w2[ox] = (wx0 * wy1) * (mx0 * my1);
    w3[ox] = (wx1 * wy1) * (mx1 * my1);
  }
}

FF_AUG_CLONES void row_coords_zeros(const float* pm, float fy, int64_t w, int64_t H, int64_t W, int32_t sx,
                                    int32_t sy, Taps t) {
  row_coords_body<kAugZeros>(pm, fy, w, H, W, sx, sy, t);
}
FF_AUG_CLONES void row_coords_border(const float* pm, float fy, int64_t w, int64_t H, int64_t W, int32_t sx,
                                     int32_t sy, Taps t) {
  row_coords_body<kAugBorder>(pm, fy, w, H, W, sx, sy, t);
}
FF_AUG_CLONES void row_coords_reflection(const float* pm, float fy, int64_t w, int64_t H, int64_t W, int32_t sx,
                                         int32_t sy, Taps t) {
  row_coords_body<kAugReflection>(pm, fy, w, H, W, sx, sy, t);
}

void row_coords(const float* pm, float fy, int64_t w, int64_t H, int64_t W, int pad, int32_t sx, int32_t sy,
                Taps t) {
  if (pad == kAugReflection) row_coords_reflection(pm, fy, w, H, W, sx, sy, t);
  else if (pad == kAugBorder) row_coords_border(pm, fy, w, H, W, sx, sy, t);
  else row_coords_zeros(pm, fy, w, H, W, sx, sy, t);
}

// grid_sample's sum, in its order (nw, ne, sw, se), of the taps of one channel; uint8 is read as x / 255.
template <typename scalar_t>
void row_sample(const scalar_t* __restrict__ src, int64_t w, Taps t, float* __restrict__ val) {
  for (int64_t ox = 0; ox < w; ++ox) {
    const float v00 = static_cast<float>(src[t.o0[ox]]), v01 = static_cast<float>(src[t.o1[ox]]);
    const float v10 = static_cast<float>(src[t.o2[ox]]), v11 = static_cast<float>(src[t.o3[ox]]);
    val[ox] = ((t.w0[ox] * v00 + t.w1[ox] * v01) + t.w2[ox] * v10) + t.w3[ox] * v11;
  }
  if constexpr (std::is_same_v<scalar_t, uint8_t>)
    for (int64_t ox = 0; ox < w; ++ox) val[ox] = val[ox] / 255.f;
}

// Lighting, y = sigmoid(c (logit(v) + logit(b))) (lb = logit(b)), then (y - mean) / std, in place.
FF_AUG_CLONES void row_finish(float* __restrict__ val, int64_t w, bool light, float lb, float c, bool norm, float mean,
                              float std) {
  if (light)
    for (int64_t ox = 0; ox < w; ++ox) {
      float v = val[ox];
      v = v < 1e-7f ? 1e-7f : (v > 1.f - 1e-7f ? 1.f - 1e-7f : v);
      val[ox] = 1.f / (1.f + vexp(-(c * (vlog(v / (1.f - v)) + lb))));
    }
  if (norm)
    for (int64_t ox = 0; ox < w; ++ox) val[ox] = (val[ox] - mean) / std;
}

template <typename scalar_t, typename out_t>
void augment_impl(const AugmentParams& p) {
  const at::Tensor& x = p.x;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t h = p.out.size(2), w = p.out.size(3);
  TORCH_CHECK(H * W * C < (int64_t(1) << 31), "fastfuse augment: images of 2^31 elements or more are not supported");
  const bool nhwc = augment_nhwc(x), out_nhwc = !p.out.is_contiguous();
  const int32_t sx = nhwc ? static_cast<int32_t>(C) : 1, sy = static_cast<int32_t>(W * sx);
  const int64_t cstride = nhwc ? 1 : H * W;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  out_t* yp = p.out.mutable_data_ptr<out_t>();
  const float* mp = p.matrix.const_data_ptr<float>();
  const bool light = p.brightness.defined(), norm = p.mean.defined();
  const float* bp = light ? p.brightness.const_data_ptr<float>() : nullptr;
  const float* kp = light ? p.contrast.const_data_ptr<float>() : nullptr;
  const float* meanp = norm ? p.mean.const_data_ptr<float>() : nullptr;
  const float* stdp = norm ? p.std.const_data_ptr<float>() : nullptr;
  // pixel matrices and logit(brightness), once per image
  std::vector<float> pix(9 * B), lb(B);
  for (int64_t b = 0; b < B; ++b) {
    augment_pixel_matrix(mp + 9 * b, H, W, h, w, pix.data() + 9 * b);
    if (light) {
      const float v = std::min(std::max(bp[b], 1e-7f), 1.f - 1e-7f);
      lb[b] = -std::log(1.f / v - 1.f);
    }
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, w * C));
  at::parallel_for(0, B * h, grain, [&](int64_t r0, int64_t r1) {
    RowTaps row_taps(w);
    const Taps taps = row_taps.taps(w);
    std::vector<float> val(w * (out_nhwc ? C : 1));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / h, oy = r % h;
      row_coords(pix.data() + 9 * b, static_cast<float>(oy), w, H, W, p.pad, sx, sy, taps);
      const scalar_t* xb = xp + b * C * H * W;
      for (int64_t c = 0; c < C; ++c) {
        float* v = val.data() + (out_nhwc ? c * w : 0);
        row_sample<scalar_t>(xb + c * cstride, w, taps, v);
        row_finish(v, w, light, light ? lb[b] : 0.f, light ? kp[b] : 1.f, norm, norm ? meanp[c] : 0.f,
                   norm ? stdp[c] : 1.f);
        if (!out_nhwc) {
          out_t* y = yp + ((b * C + c) * h + oy) * w;
          for (int64_t ox = 0; ox < w; ++ox) y[ox] = static_cast<out_t>(v[ox]);
        }
      }
      if (out_nhwc) {
        out_t* y = yp + (b * h + oy) * w * C;
        for (int64_t ox = 0; ox < w; ++ox)
          for (int64_t c = 0; c < C; ++c) y[ox * C + c] = static_cast<out_t>(val[c * w + ox]);
      }
    }
  });
}

// Big outputs from the CPU output cache (cpu/alloc.h): a fresh 38 MB batch would page-fault on every call.
at::Tensor alloc_cpu(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  if (n * static_cast<int64_t>(c10::elementSize(dtype)) < kCachedOutputBytes)
    return at::empty_strided(sizes, strides, at::TensorOptions().dtype(dtype));
  return at::detail::empty_strided_generic(sizes, strides, output_allocator(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), dtype);
}

at::Tensor augment_kernel(const at::Tensor& x, const at::Tensor& matrix, at::IntArrayRef size,
                          const c10::optional<at::Tensor>& brightness, const c10::optional<at::Tensor>& contrast,
                          const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& std,
                          c10::string_view pad_mode, at::ScalarType out_dtype, bool channels_last) {
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CPU, "augment", augment_kernel, x, matrix, size, brightness, contrast,
                          mean, std, pad_mode, out_dtype, channels_last);
  return augment_op(x, matrix, size, brightness, contrast, mean, std, pad_mode, out_dtype, channels_last, alloc_cpu,
                    augment_cpu);
}

}  // namespace

void augment_cpu(const AugmentParams& p) {
  TORCH_CHECK(p.x.device().is_cpu(), "fastfuse augment_cpu: expected CPU tensors, got ", p.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, p.x.scalar_type(), "fastfuse_augment_cpu", [&] {
    using in_t = scalar_t;
    switch (p.out.scalar_type()) {
      case at::kFloat: augment_impl<in_t, float>(p); break;
      case at::kBFloat16: augment_impl<in_t, at::BFloat16>(p); break;
      case at::kHalf: augment_impl<in_t, at::Half>(p); break;
      default: TORCH_CHECK(false, "fastfuse augment: unsupported out_dtype ", p.out.scalar_type());
    }
  });
}

TORCH_LIBRARY_IMPL(fastfuse, CPU, m) { m.impl("augment", &augment_kernel); }

}  // namespace fastfuse
