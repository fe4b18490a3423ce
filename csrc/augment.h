// fastfuse::augment: one pass of fastai's batch augmentation. For each output pixel: map it through the image's
// 3x3 projective matrix, reflect (or clamp, or zero) into the image, sample bilinearly (grid_sample with
// align_corners=True), apply the lighting in logit space, normalise per channel, write once.
// Forward only: the output never requires grad (csrc/augment.cpp).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#ifdef __CUDACC__
#define FF_AUG_HD __host__ __device__ __forceinline__
#else
#define FF_AUG_HD inline
#endif

namespace fastfuse {

// a * b, never fused into a multiply-add (nvcc fuses by default; the CPU build has -ffp-contract=off), so every
// device rounds the coordinates as written and computes the same bits.
FF_AUG_HD float aug_mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

enum AugmentPad : int { kAugZeros = 0, kAugBorder = 1, kAugReflection = 2 };

inline int augment_pad_code(const std::string& pad_mode) {
  if (pad_mode == "zeros") return kAugZeros;
  if (pad_mode == "border") return kAugBorder;
  if (pad_mode == "reflection") return kAugReflection;
  TORCH_CHECK(false, "fastfuse augment: pad_mode must be 'reflection', 'zeros' or 'border', got '", pad_mode, "'");
}

// The image's matrix in pixel coordinates: source column = (p[0] ox + p[1] oy + p[2]) / (p[6] ox + p[7] oy + p[8]),
// source row = (p[3] ox + p[4] oy + p[5]) / (the same), for output pixel (ox, oy). Derived from the normalised
// definition (u = 2 ox / (w - 1) - 1, or 0 when w == 1; source column = (x / w + 1) (W - 1) / 2) with the
// factors grouped so that identity and flip matrices give exact integers (an exact copy, an exact flip). Every
// device computes it in float in this order, so the coordinates are the same bits everywhere.
FF_AUG_HD void augment_pixel_matrix(const float* m, int64_t H, int64_t W, int64_t h, int64_t w, float* p) {
  const float sw = static_cast<float>(W - 1), sh = static_cast<float>(H - 1);
  const float dw = w > 1 ? static_cast<float>(w - 1) : 0.f, dh = h > 1 ? static_cast<float>(h - 1) : 0.f;
  const float bu = w > 1 ? 1.f : 0.f, bv = h > 1 ? 1.f : 0.f;  // u = 2 ox / dw - bu
  // rows of (x + w), (y + w) and w, in (u, v, 1)
  const float r[3][3] = {{m[0] + m[6], m[1] + m[7], m[2] + m[8]},
                         {m[3] + m[6], m[4] + m[7], m[5] + m[8]},
                         {m[6], m[7], m[8]}};
  const float scale[3] = {sw, sh, 2.f};  // source column = (x + w) / w * (W - 1) / 2; w keeps its own factor 2
  for (int i = 0; i < 3; ++i) {
    const float s = scale[i];
    p[3 * i + 0] = dw > 0 ? (r[i][0] * s) / dw : 0.f;
    p[3 * i + 1] = dh > 0 ? (r[i][1] * s) / dh : 0.f;
    p[3 * i + 2] = aug_mul(s * 0.5f, (r[i][2] - aug_mul(r[i][0], bu)) - aug_mul(r[i][1], bv));
  }
}

// Reflection (align_corners=True, about the centres of the edge pixels) or clamping of a source coordinate into
// [0, n - 1]; non-finite coordinates go to -1 (outside: zero weight under 'zeros', the edge otherwise).
FF_AUG_HD float augment_fold(float c, float n1, int pad) {
  c = (c == c && c > -3.0e8f && c < 3.0e8f) ? c : -1.f;
  if (pad == kAugReflection) {  // branch-free, so that the CPU's loops vectorise; a 1-pixel side gives 0
    const float span2 = 2.f * n1, safe = n1 > 0.f ? span2 : 1.f;
    float t = c < 0.f ? -c : c;
    t = t - aug_mul(floorf(t / safe), safe);
    t = t > n1 ? span2 - t : t;
    t = t < 0.f ? 0.f : (t > n1 ? n1 : t);
    return n1 > 0.f ? t : 0.f;
  }
  if (pad == kAugBorder) return c < 0.f ? 0.f : (c > n1 ? n1 : c);
  return c;
}

// Lighting and normalisation parameters as the kernels read them (float32 on the input's device, or absent).
struct AugmentParams {
  at::Tensor x, matrix, brightness, contrast, mean, std, out;
  int pad = kAugReflection;
};

inline void check_augment_args(const at::Tensor& x, const at::Tensor& matrix, at::IntArrayRef size,
                               const c10::optional<at::Tensor>& brightness, const c10::optional<at::Tensor>& contrast,
                               const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& std,
                               at::ScalarType out_dtype) {
  TORCH_CHECK(x.dim() == 4, "fastfuse augment: x must be (B, C, H, W), got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kByte || at::isFloatingType(x.scalar_type()),
              "fastfuse augment: x must be uint8 or floating point, got ", x.scalar_type());
  TORCH_CHECK(matrix.dim() == 3 && matrix.size(0) == x.size(0) && matrix.size(1) == 3 && matrix.size(2) == 3,
              "fastfuse augment: matrix must be (B, 3, 3) with B = ", x.size(0), ", got ", matrix.sizes());
  TORCH_CHECK(at::isFloatingType(matrix.scalar_type()), "fastfuse augment: matrix must be floating point");
  TORCH_CHECK(size.size() == 2 && size[0] > 0 && size[1] > 0, "fastfuse augment: size must be two positive ints, got ",
              size);
  TORCH_CHECK(brightness.has_value() == contrast.has_value(),
              "fastfuse augment: brightness and contrast come together (or neither)");
  TORCH_CHECK(mean.has_value() == std.has_value(), "fastfuse augment: mean and std come together (or neither)");
  for (const auto* t : {&brightness, &contrast})
    if (t->has_value())
      TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == x.size(0), "fastfuse augment: brightness and contrast must be (",
                  x.size(0), ",), got ", (*t)->sizes());
  for (const auto* t : {&mean, &std})
    if (t->has_value())
      TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == x.size(1), "fastfuse augment: mean and std must be (",
                  x.size(1), ",), got ", (*t)->sizes());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "fastfuse augment: out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
  for (const auto* t : {&brightness, &contrast, &mean, &std})
    if (t->has_value())
      TORCH_CHECK((*t)->device() == x.device(), "fastfuse augment: every tensor must be on x's device");
  TORCH_CHECK(matrix.device() == x.device(), "fastfuse augment: matrix must be on x's device");
}

// The device kernels: fill p.out (allocated, B > 0) from p.x (dense, NCHW or NHWC).
void augment_cpu(const AugmentParams& p);
#ifdef FASTFUSE_WITH_CUDA
void augment_cuda(const AugmentParams& p);
#endif

// The output's strides: (B, C, h, w) contiguous or channels_last.
inline std::vector<int64_t> augment_out_strides(at::IntArrayRef s, bool channels_last) {
  if (channels_last) return {s[1] * s[2] * s[3], 1, s[3] * s[1], s[1]};
  return {s[1] * s[2] * s[3], s[2] * s[3], s[3], 1};
}

// fastfuse::augment on one device: the checks, the layouts, the output (alloc(sizes, strides, dtype): the device's
// allocation), then the device's kernel.
template <typename Alloc, typename Kernel>
at::Tensor augment_op(const at::Tensor& x_in, const at::Tensor& matrix, at::IntArrayRef size,
                      const c10::optional<at::Tensor>& brightness, const c10::optional<at::Tensor>& contrast,
                      const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& std,
                      c10::string_view pad_mode, at::ScalarType out_dtype, bool channels_last, Alloc alloc,
                      Kernel kernel) {
  check_augment_args(x_in, matrix, size, brightness, contrast, mean, std, out_dtype);
  AugmentParams p;
  p.pad = augment_pad_code(std::string(pad_mode));
  const std::vector<int64_t> sizes{x_in.size(0), x_in.size(1), size[0], size[1]};
  p.out = alloc(at::IntArrayRef(sizes), at::IntArrayRef(augment_out_strides(sizes, channels_last)), out_dtype);
  if (p.out.numel() == 0) return p.out;
  // the kernels read NCHW or NHWC storage
  p.x = x_in.is_contiguous() || x_in.is_contiguous(at::MemoryFormat::ChannelsLast) ? x_in : x_in.contiguous();
  auto f32 = [](const c10::optional<at::Tensor>& t) {
    return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
  };
  p.matrix = matrix.to(at::kFloat).contiguous();
  p.brightness = f32(brightness);
  p.contrast = f32(contrast);
  p.mean = f32(mean);
  p.std = f32(std);
  kernel(p);
  return p.out;
}

// NHWC storage (channels innermost) rather than NCHW; a tensor that is both (C == 1 or H == W == 1) reads as NCHW.
inline bool augment_nhwc(const at::Tensor& x) { return !x.is_contiguous(); }

}  // namespace fastfuse
