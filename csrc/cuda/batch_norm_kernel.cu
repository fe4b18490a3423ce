// Batch norm on CUDA: the four primitives of csrc/cpu/batch_norm_kernel.cpp, and the op as three launches each way:
//   forward  (training): reduce (per-block partial sums) -> finalize (mean, var, per-channel scale and bias, running
//                        statistics) -> apply;  eval: finalize (from the running statistics) -> apply;
//   backward (training): reduce (gradient sums) -> finalize (k1, k2, k3, grad_weight, grad_bias) -> apply;
//                        eval: finalize -> apply, or reduce -> finalize for the parameters' gradients alone.
// Rules:
//   - a thread's unit is 8 elements: one Philox group (one call, csrc/philox.h), loaded and stored with 128-bit
//     accesses when every tensor it touches is 16-byte aligned and the unit is whole;
//   - elementwise kernels walk their units with a (position, channel) cursor advanced by additions, and reload a
//     channel's per-channel values only when the channel changes: no division or modulo per element;
//   - reductions flatten (sample, plane position) per channel, so every lane has work at 7x7 and 14x14; each block
//     writes its partial sums, and the finalize kernel adds them over blocks in a fixed order in float64: no
//     atomics, the same bits on every run (the partition depends on the shape only);
//   - no host synchronisation: shapes decide every launch, and the running statistics (num_batches_tracked
//     included) are updated on the device.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "backend.h"
#include "batch_norm.h"
#include "dropout.h"
#include "philox.h"

namespace fastfuse {
namespace {

constexpr int kThreads = 256;
constexpr int kU = kKeysPerGroup;  // elements per unit
constexpr int kFinalLanes = 32, kFinalChannels = kThreads / kFinalLanes;

#define FF_BN_DISPATCH(type, name, ...)                                               \
  AT_DISPATCH_SWITCH(type, name, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)             \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

struct DropArgs {
  uint32_t threshold;
  float ds;  // 1 / (1 - p), or 1
  uint64_t seed, offset;
};

__device__ __forceinline__ float relu_f(float v) { return v < 0.f ? 0.f : v; }
__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- 8-element units ---------------------------------------------------------------------------------------------
template <typename T>
struct alignas(16) Vec128 {  // one 128-bit access
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

// Elements i0 .. i0+7 as floats: vector loads when vec (the unit is whole and p 16-byte aligned), else the first
// cnt elements (the rest 0).
template <typename T>
__device__ __forceinline__ void load_unit(const T* p, int64_t i0, int cnt, bool vec, float (&v)[kU]) {
  using V = Vec128<T>;
  if (vec) {
#pragma unroll
    for (int h = 0; h < kU / V::kN; ++h) {
      const V a = reinterpret_cast<const V*>(p + i0)[h];
#pragma unroll
      for (int l = 0; l < V::kN; ++l) v[h * V::kN + l] = static_cast<float>(a.v[l]);
    }
  } else {
#pragma unroll
    for (int l = 0; l < kU; ++l) v[l] = l < cnt ? static_cast<float>(p[i0 + l]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_unit(T* p, int64_t i0, int cnt, bool vec, const float (&v)[kU]) {
  using V = Vec128<T>;
  if (vec) {
#pragma unroll
    for (int h = 0; h < kU / V::kN; ++h) {
      V a;
#pragma unroll
      for (int l = 0; l < V::kN; ++l) a.v[l] = static_cast<T>(v[h * V::kN + l]);
      reinterpret_cast<V*>(p + i0)[h] = a;
    }
  } else {
#pragma unroll
    for (int l = 0; l < kU; ++l)
      if (l < cnt) p[i0 + l] = static_cast<T>(v[l]);
  }
}

// The 16-bit keys of elements i0 .. i0+cnt-1 (cnt <= 8): one Philox call, two when they straddle a group boundary
// (a reduction's unit that starts inside a group).
__device__ __forceinline__ void unit_keys(const DropArgs& d, int64_t i0, int cnt, uint32_t (&k)[kU]) {
  const uint64_t g0 = static_cast<uint64_t>(i0) / kU;
  const int off = static_cast<int>(static_cast<uint64_t>(i0) % kU);
  const DropKeys a = dropout_group_keys(d.seed, d.offset, g0);
  DropKeys b{};
  if (off + cnt > kU) b = dropout_group_keys(d.seed, d.offset, g0 + 1);
#pragma unroll
  for (int l = 0; l < kU; ++l) k[l] = off + l < kU ? a[off + l] : b[off + l - kU];
}

// g = dL/d(bn + residual) of one element (see fastfuse/reference.py: _bn_grad).
template <int kMask>
__device__ __forceinline__ float grad_of(float go, float out, uint32_t key, const DropArgs& d) {
  const float v = go * d.ds;
  if (kMask == kMaskPost) return out > 0.f ? v : 0.f;
  if (kMask == kMaskDrop) return v * (key >= d.threshold ? 1.f : 0.f);  // NaN * 0 = NaN, as torch
  return v;
}

// ---- per-channel vectors of any floating dtype (weights, running statistics, parameter gradients) --------------
struct AnyVec {
  void* p = nullptr;
  int kind = 0;  // 0 float, 1 double, 2 half, 3 bfloat16
};

AnyVec any_vec(const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), "fastfuse batch_norm CUDA kernel: per-channel vectors must be contiguous");
  const auto st = t.scalar_type();
  const int kind = st == at::kFloat ? 0 : st == at::kDouble ? 1 : st == at::kHalf ? 2 : st == at::kBFloat16 ? 3 : -1;
  TORCH_CHECK(kind >= 0, "fastfuse batch_norm: per-channel vectors must be floating point, got ", st);
  return AnyVec{t.data_ptr(), kind};
}

__device__ __forceinline__ float any_load(const AnyVec& a, int64_t c) {
  switch (a.kind) {
    case 1: return static_cast<float>(static_cast<const double*>(a.p)[c]);
    case 2: return static_cast<float>(static_cast<const c10::Half*>(a.p)[c]);
    case 3: return static_cast<float>(static_cast<const c10::BFloat16*>(a.p)[c]);
    default: return static_cast<const float*>(a.p)[c];
  }
}

__device__ __forceinline__ void any_store(const AnyVec& a, int64_t c, float v) {
  switch (a.kind) {
    case 1: static_cast<double*>(a.p)[c] = v; break;
    case 2: static_cast<c10::Half*>(a.p)[c] = static_cast<c10::Half>(v); break;
    case 3: static_cast<c10::BFloat16*>(a.p)[c] = static_cast<c10::BFloat16>(v); break;
    default: static_cast<float*>(a.p)[c] = v;
  }
}

// ---- reductions ----------------------------------------------------------------------------------------------------
// Per channel c, the sums (a, b) of (x' - r, (x' - r)^2) (statistics: r = the channel's first x', kept in
// partial[parts * C * 2 + c]) or of (g, g (x' - r)) (gradients: r = mean[c]). Each block writes its own
// partial[(c * parts + part) * 2 + {0, 1}]: a channel's partials are contiguous for the finalize kernel's lanes.
struct ReduceArgs {
  float* partial;
  const float* ref;   // the gradients' mean, or null for statistics
  int64_t* nbt;       // statistics: num_batches_tracked to increment (before the finalize kernel reads it), or null
  int64_t C, S, per;  // per: units (planes) or rows (rows) of one part
  int64_t total;      // units of one channel (planes) or rows (rows)
  bool vec, pre;
  DropArgs d;
};

// Adds one unit's summands (elements l < cnt) to the accumulators of its channels (acc index l * kPerLane).
template <typename scalar_t, bool kGrad, int kMask, int kChannels>
__device__ __forceinline__ void add_unit(const scalar_t* x, const scalar_t* go, const scalar_t* out,
    const ReduceArgs& r, int64_t i0, int cnt, const float (&ref)[kChannels],
    float (&a)[kChannels], float (&b)[kChannels]) {
  float xv[kU], gv[kU], ov[kU];
  load_unit(x, i0, cnt, r.vec, xv);
  uint32_t keys[kU] = {};
  if (kGrad) {
    load_unit(go, i0, cnt, r.vec, gv);
    if (kMask == kMaskPost) load_unit(out, i0, cnt, r.vec, ov);
    if (kMask == kMaskDrop) unit_keys(r.d, i0, cnt, keys);
  }
#pragma unroll
  for (int l = 0; l < kU; ++l) {
    if (l >= cnt) break;
    const int j = kChannels == 1 ? 0 : l;
    const float dx = (r.pre ? relu_f(xv[l]) : xv[l]) - ref[j];
    if (kGrad) {
      const float g = grad_of<kMask>(gv[l], kMask == kMaskPost ? ov[l] : 0.f, keys[l], r.d);
      a[j] += g;
      b[j] += g * dx;
    } else {
      a[j] += dx;
      b[j] += dx * dx;
    }
  }
}

// Sums sh[k][0 .. n) into sh[k][0] (k < K) over a block's threads in a fixed tree; every thread calls it.
template <int K>
__device__ __forceinline__ void block_tree(float (*sh)[kThreads], int t, int n, int stride) {
  for (int w = stride; w > 0; w >>= 1) {
    __syncthreads();
    if (t < w && t + w < n)
#pragma unroll
      for (int k = 0; k < K; ++k) sh[k][t] += sh[k][t + w];
  }
  __syncthreads();
}

int pow2_below(int n) {  // the largest power of two < n (0 for n <= 1)
  int w = 1;
  while (2 * w < n) w *= 2;
  return n > 1 ? w : 0;
}

// Planes (contiguous (N, C, S), S > 1): block (c, part) sums channel c's units (sample n, positions 8k .. 8k+7),
// flattened as n * Su + k, Su = ceil(S / 8): every lane busy whatever S is.
template <typename scalar_t, bool kGrad, int kMask>
__global__ void reduce_planes_kernel(const scalar_t* x, const scalar_t* go, const scalar_t* out, ReduceArgs r,
                                     int tree) {
  __shared__ float sh[2][kThreads];
  const int64_t c = blockIdx.x, part = blockIdx.y, S = r.S, Su = (S + kU - 1) / kU;
  const int t = threadIdx.x;
  float ref[1] = {r.ref ? r.ref[c] : (r.pre ? relu_f(static_cast<float>(x[c * S])) : static_cast<float>(x[c * S]))};
  if (!r.ref && part == 0 && t == 0) r.partial[gridDim.y * r.C * 2 + c] = ref[0];
  if (r.nbt && c == 0 && part == 0 && t == 0) *r.nbt += 1;
  float a[1] = {0.f}, b[1] = {0.f};
  const int64_t u0 = part * r.per + t, u_end = imin(r.total, (part + 1) * r.per);
  int64_t n = u0 / Su, k = u0 % Su;  // the cursor: one division per thread
  const int64_t dn = kThreads / Su, dk = kThreads % Su;
  for (int64_t u = u0; u < u_end; u += kThreads) {
    const int64_t s0 = k * kU;
    add_unit<scalar_t, kGrad, kMask, 1>(x, go, out, r, (n * r.C + c) * S + s0, static_cast<int>(imin(kU, S - s0)),
    ref, a, b);
    k += dk;
    n += dn;
    if (k >= Su) k -= Su, ++n;
  }
  sh[0][t] = a[0];
  sh[1][t] = b[0];
  block_tree<2>(sh, t, kThreads, tree);
  if (t == 0) {
    r.partial[(c * gridDim.y + part) * 2] = sh[0][0];
    r.partial[(c * gridDim.y + part) * 2 + 1] = sh[1][0];
  }
}

// Rows ((R, C), channel innermost): thread (tx, ty) of block (bx, part) sums channels 8 (bx * blockDim.x + tx) + l
// (l < 8) over the part's rows ty, ty + blockDim.y, ...; the block then adds over ty.
template <typename scalar_t, bool kGrad, int kMask>
__global__ void reduce_rows_kernel(const scalar_t* x, const scalar_t* go, const scalar_t* out, ReduceArgs r,
                                   int tree) {
  __shared__ float sh[2 * kU][kThreads];
  const int64_t C = r.C, part = blockIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kU;
  const int cnt = c0 < C ? static_cast<int>(imin(kU, C - c0)) : 0;
  const int ty = threadIdx.y, t = ty * blockDim.x + threadIdx.x;
  if (r.nbt && blockIdx.x == 0 && part == 0 && t == 0) *r.nbt += 1;
  float ref[kU], a[kU] = {}, b[kU] = {};
#pragma unroll
  for (int l = 0; l < kU; ++l) {
    const float v = l < cnt ? (r.ref ? r.ref[c0 + l] : static_cast<float>(x[c0 + l])) : 0.f;
    ref[l] = !r.ref && r.pre ? relu_f(v) : v;
    if (!r.ref && part == 0 && ty == 0 && l < cnt) r.partial[gridDim.y * C * 2 + c0 + l] = ref[l];
  }
  if (cnt > 0)
    for (int64_t row = part * r.per + ty, end = imin(r.total, (part + 1) * r.per); row < end; row += blockDim.y)
      add_unit<scalar_t, kGrad, kMask, kU>(x, go, out, r, row * C + c0, cnt, ref, a, b);
#pragma unroll
  for (int l = 0; l < kU; ++l) sh[2 * l][t] = a[l], sh[2 * l + 1][t] = b[l];
  // over ty: thread (tx, ty) adds row ty + w's values; sh is indexed by t = ty * bx + tx, so step w rows = w * bx
  const int bx = blockDim.x;
  for (int w = tree; w > 0; w >>= 1) {
    __syncthreads();
    if (ty < w && ty + w < static_cast<int>(blockDim.y))
#pragma unroll
      for (int k = 0; k < 2 * kU; ++k) sh[k][t] += sh[k][t + w * bx];
  }
  __syncthreads();
  if (ty == 0)
    for (int l = 0; l < cnt; ++l) {
      r.partial[((c0 + l) * gridDim.y + part) * 2] = sh[2 * l][t];
      r.partial[((c0 + l) * gridDim.y + part) * 2 + 1] = sh[2 * l + 1][t];
    }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

struct Partials {
  at::Tensor buf;  // (parts * C * 2 + C) floats: the blocks' sums, then the statistics' shifts
  int64_t parts;
};

// One launch: the per-block partial sums of x's channels (go/out: the gradient's inputs when kGrad).
template <bool kGrad>
Partials reduce(const at::Tensor& x, const at::Tensor& go, const at::Tensor& out, const at::Tensor& mean, bool pre,
                bool post, double p, int64_t seed, int64_t offset, int64_t* nbt) {
  const BnGeom geo = bn_geometry(x);
  TORCH_CHECK(geo.numel > 0, "fastfuse batch_norm: empty input");
  const int64_t C = geo.C;
  ReduceArgs r{};
  r.C = C;
  r.S = geo.S;
  r.pre = pre;
  r.nbt = nbt;
  r.d = DropArgs{kGrad && p > 0 && !post ? dropout_threshold(p) : 0u,
                 static_cast<float>(kGrad && p > 0 ? dropout_scale(p) : 1.0), static_cast<uint64_t>(seed),
                 static_cast<uint64_t>(offset)};
  at::Tensor ref;
  if (kGrad) {
    ref = mean.to(at::kFloat).contiguous();
    r.ref = ref.const_data_ptr<float>();
  }
  bool al = aligned16(x.const_data_ptr());
  if (kGrad) al = al && aligned16(go.const_data_ptr()) && (!post || aligned16(out.const_data_ptr()));
  dim3 grid, block;
  int tree;
  if (geo.rows) {
    const int64_t R = geo.numel / C, Cu = (C + kU - 1) / kU;
    const int bx = static_cast<int>(imin(Cu, 32)), by = kThreads / bx;
    const int64_t gx = (Cu + bx - 1) / bx;
    // at least 4 rows per thread, at most ~4096 blocks; from the shape only
    const int64_t parts = std::max<int64_t>(1, imin((R + 4 * by - 1) / (4 * by), std::max<int64_t>(1, 4096 / gx)));
    r.per = (R + parts - 1) / parts;
    r.total = R;
    r.vec = al && C % kU == 0;
    grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(parts));
    block = dim3(bx, by);
    tree = pow2_below(by);
  } else {
    const int64_t A = geo.numel / (C * geo.S), Su = (geo.S + kU - 1) / kU;
    r.total = A * Su;
    // at least 4 units per thread, at most ~4096 blocks; from the shape only
    const int64_t parts =
        std::max<int64_t>(1, imin((r.total + 4 * kThreads - 1) / (4 * kThreads), std::max<int64_t>(1, 4096 / C)));
    r.per = (r.total + parts - 1) / parts;
    r.vec = al && geo.S % kU == 0;
    grid = dim3(static_cast<unsigned>(C), static_cast<unsigned>(parts));
    block = dim3(kThreads);
    tree = pow2_below(kThreads);
  }
  at::Tensor buf = at::empty({static_cast<int64_t>(grid.y) * C * 2 + C}, x.options().dtype(at::kFloat));
  r.partial = buf.mutable_data_ptr<float>();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FF_BN_DISPATCH(x.scalar_type(), "fastfuse_bn_reduce_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = kGrad ? go.const_data_ptr<scalar_t>() : xp;
    const scalar_t* op = kGrad && post ? out.const_data_ptr<scalar_t>() : xp;
    auto launch = [&](auto grad_c, auto mask_c) {
      constexpr bool g = decltype(grad_c)::value;
      constexpr int m = decltype(mask_c)::value;
      if (geo.rows)
        reduce_rows_kernel<scalar_t, g, m><<<grid, block, 0, stream>>>(xp, gp, op, r, tree);
      else
        reduce_planes_kernel<scalar_t, g, m><<<grid, block, 0, stream>>>(xp, gp, op, r, tree);
    };
    if (kGrad)
      with_mask_kind(post, p, [&](auto mask_c) { launch(std::true_type(), mask_c); });
    else
      launch(std::false_type(), std::integral_constant<int, kMaskNone>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {buf, static_cast<int64_t>(grid.y)};
}

// ---- finalize: per-channel arithmetic, one thread block per 8 channels --------------------------------------------
// Lane q of channel c adds the partials of parts q, q + 32, ... in float64; a fixed tree then adds the 32 lanes.
__device__ __forceinline__ void sum_parts(const float* partial, int64_t parts, int64_t C, int64_t c, double& s0,
    double& s1) {
  __shared__ double sh[2][kFinalChannels][kFinalLanes];
  const int q = threadIdx.x, y = threadIdx.y;
  double a = 0, b = 0;
  if (c < C)
    for (int64_t k = q; k < parts; k += kFinalLanes) {
      a += partial[(c * parts + k) * 2];
      b += partial[(c * parts + k) * 2 + 1];
    }
  sh[0][y][q] = a;
  sh[1][y][q] = b;
  for (int w = kFinalLanes / 2; w > 0; w >>= 1) {
    __syncthreads();
    if (q < w) sh[0][y][q] += sh[0][y][q + w], sh[1][y][q] += sh[1][y][q + w];
  }
  __syncthreads();
  s0 = sh[0][y][0];
  s1 = sh[1][y][0];
}

struct ForwardFinal {
  const float* partial;  // null: eval (the statistics are the running ones)
  int64_t parts, C;
  double n;
  float* mean;
  float* var;
  float* scale;  // null: the statistics alone (bn_stats)
  float* bias;
  AnyVec weight, bias_in, run_mean, run_var;  // null where absent; run_*: read (eval) or updated (training)
  const int64_t* nbt;                          // momentum None: the factor is 1 / num_batches_tracked
  bool has_momentum;
  float momentum, unbias, eps;
};

// stat += f * (batch - stat), as torch's _BatchNorm does it: lerp_ (ATen's two-sided formula) for float stats,
// batch * f + stat * (1 - f) for the others
__device__ __forceinline__ void running_update(const AnyVec& s, int64_t c, float batch, float f) {
  const float old = any_load(s, c);
  float v;
  if (s.kind == 0)
    v = fabsf(f) < 0.5f ? old + f * (batch - old) : batch - (batch - old) * (1.f - f);
  else
    v = batch * f + old * (1.f - f);
  any_store(s, c, v);
}

__global__ void forward_final_kernel(ForwardFinal f) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFinalChannels + threadIdx.y;
  double sa = 0, sb = 0;
  if (f.partial) sum_parts(f.partial, f.parts, f.C, c, sa, sb);
  if (threadIdx.x != 0 || c >= f.C) return;
  float mean, var;
  if (f.partial) {  // float64 as the sums: shift + mean of the shifted values, E[d^2] - E[d]^2
    const double m = sa / f.n;
    mean = static_cast<float>(static_cast<double>(f.partial[f.parts * f.C * 2 + c]) + m);
    const double v = sb / f.n - m * m;
    var = static_cast<float>(v > 0 ? v : 0.0);
  } else {
    mean = any_load(f.run_mean, c);
    var = any_load(f.run_var, c);
  }
  f.mean[c] = mean;
  f.var[c] = var;
  if (f.scale) {
    const float invstd = 1.f / sqrtf(var + f.eps);
    f.scale[c] = f.weight.p ? invstd * any_load(f.weight, c) : invstd;
    f.bias[c] = f.bias_in.p ? any_load(f.bias_in, c) : 0.f;
  }
  if (f.partial && f.run_mean.p) {
    const float factor = f.has_momentum ? f.momentum : 1.f / static_cast<float>(*f.nbt);
    running_update(f.run_mean, c, mean, factor);
    running_update(f.run_var, c, var * f.unbias, factor);
  }
}

struct BackwardFinal {
  const float* partial;  // null: no gradient sums (eval, input gradient only)
  int64_t parts, C;
  float n;
  const float* var;
  AnyVec weight;
  float eps;
  float* sum_g;  // bn_grad_reduce's outputs, or null
  float* sum_gxmu;
  float* k;  // (3, C): k1, k2, k3, or null
  bool batch_grad;
  AnyVec gw, gb;  // outputs, null where not asked for
};

__global__ void backward_final_kernel(BackwardFinal f) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFinalChannels + threadIdx.y;
  double sa = 0, sb = 0;
  if (f.partial) sum_parts(f.partial, f.parts, f.C, c, sa, sb);
  if (threadIdx.x != 0 || c >= f.C) return;
  const float sg = static_cast<float>(sa), sgx = static_cast<float>(sb);  // rounded as at::sum's float result
  if (f.sum_g) f.sum_g[c] = sg, f.sum_gxmu[c] = sgx;
  if (f.gb.p) any_store(f.gb, c, sg);
  if (!f.k && !f.gw.p) return;
  // as channel_coeffs: invstd = 1 / sqrt(var + eps), k1 = invstd * w, k2 = -k1 invstd^2 sgx / n, k3 = -k1 sg / n
  const float invstd = 1.f / sqrtf(f.var[c] + f.eps);
  if (f.gw.p) any_store(f.gw, c, sgx * invstd);
  if (f.k) {
    const float k1 = f.weight.p ? invstd * any_load(f.weight, c) : invstd;
    f.k[c] = k1;
    f.k[f.C + c] = f.batch_grad ? -k1 * invstd * invstd * sgx / f.n : 0.f;
    f.k[2 * f.C + c] = f.batch_grad ? -k1 * sg / f.n : 0.f;
  }
}

dim3 final_grid(int64_t C) { return dim3(static_cast<unsigned>((C + kFinalChannels - 1) / kFinalChannels)); }
const dim3 kFinalBlock(kFinalLanes, kFinalChannels);

// ---- elementwise ---------------------------------------------------------------------------------------------------
// How a thread finds its units' channels. kPlanes8 (S % 8 == 0): a unit lies in one plane, one channel; kRows8 (S == 1,
// C % 8 == 0): a unit is channels c .. c+7 of one row; kAny: the channel is walked element by element.
enum Walk { kPlanes8 = 0, kRows8 = 1, kAny = 2 };

// Element i's plane position s = i % S and channel c = (i / S) % C, advanced by additions.
struct Cursor {
  int64_t s, c;
  __device__ __forceinline__ void advance(int64_t ds, int64_t dc, int64_t S, int64_t C) {
    s += ds;
    c += dc;
    if (s >= S) s -= S, ++c;
    if (c >= C) c -= C;
  }
};

struct Walker {
  int64_t n, C, S;
  int64_t ds, dc;  // a grid step of 8 * threads elements: its plane positions (mod S) and its channels (mod C)
  bool vec;        // all tensors 16-byte aligned
};

Walker walker(const BnGeom& g, int blocks, bool vec) {
  const int64_t step = static_cast<int64_t>(blocks) * kThreads * kU;
  return Walker{g.numel, g.C, g.S, step % g.S, (step / g.S) % g.C, vec};
}

__device__ __forceinline__ Cursor first_cursor(const Walker& w, int64_t i0) {
  return Cursor{i0 % w.S, (i0 / w.S) % w.C};  // once per thread
}

// The per-channel values (K arrays) of a unit's channels, reloaded only when its first channel changes.
template <int K, int kN>
struct ChannelCache {
  int64_t c = -1;
  float v[K][kN];
  __device__ __forceinline__ void at(int64_t ch, const float* const (&p)[K]) {
    if (ch == c) return;
    c = ch;
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
      for (int l = 0; l < kN; ++l) v[k][l] = p[k][ch + l];
  }
};

// Calls fn(l, values of element l's channel) for the unit's elements l < cnt.
template <int kWalk, int K, typename Fn>
__device__ __forceinline__ void for_unit(const Walker& w, const Cursor& cur, int cnt, const float* const (&p)[K],
    ChannelCache<K, 1>& one, ChannelCache<K, kU>& eight, Fn fn) {
  if (kWalk == kRows8) {
    eight.at(cur.c, p);
#pragma unroll
    for (int l = 0; l < kU; ++l) {
      float v[K];
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] = eight.v[k][l];
      if (l < cnt) fn(l, v);
    }
  } else {
    Cursor e = cur;
#pragma unroll
    for (int l = 0; l < kU; ++l) {
      if (l >= cnt) break;
      one.at(e.c, p);
      float v[K];
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] = one.v[k][0];
      fn(l, v);
      if (kWalk == kAny && ++e.s == w.S) {
        e.s = 0;
        if (++e.c == w.C) e.c = 0;
      }
    }
  }
}

// Calls fn(u, i0, cnt, vec, cursor) for each of this thread's units u (elements i0 = 8u .. i0+cnt-1; vec: whole
// and aligned), in grid-stride order, with the cursor at i0.
template <typename Fn>
__device__ __forceinline__ void for_each_unit(const Walker& w, Fn fn) {
  const int64_t u0 = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  Cursor cur = first_cursor(w, u0 * kU);
  for (int64_t u = u0; u * kU < w.n; u += step, cur.advance(w.ds, w.dc, w.S, w.C)) {
    const int64_t i0 = u * kU;
    const int cnt = static_cast<int>(imin(kU, w.n - i0));
    fn(u, i0, cnt, w.vec && cnt == kU, cur);
  }
}

// y = drop(post((x' - mean) * scale + bias + residual))
template <typename scalar_t, int kWalk, bool kDrop>
__global__ void apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                             scalar_t* __restrict__ y, const float* mean, const float* scale, const float* bias,
                             Walker w, bool pre, bool post, DropArgs d) {
  const float* const p[3] = {mean, scale, bias};
  ChannelCache<3, 1> one;
  ChannelCache<3, kU> eight;
  for_each_unit(w, [&](int64_t u, int64_t i0, int cnt, bool vec, const Cursor& cur) {
    float xv[kU], rv[kU] = {}, z[kU];
    load_unit(x, i0, cnt, vec, xv);
    if (res) load_unit(res, i0, cnt, vec, rv);
    DropKeys keys{};
    if (kDrop) keys = dropout_group_keys(d.seed, d.offset, static_cast<uint64_t>(u));
    for_unit<kWalk, 3>(w, cur, cnt, p, one, eight, [&](int l, const float(&v)[3]) {
      float t = ((pre ? relu_f(xv[l]) : xv[l]) - v[0]) * v[1] + v[2];
      if (res) t += rv[l];
      if (post) t = relu_f(t);
      if (kDrop) t *= keys[l] >= d.threshold ? d.ds : 0.f;
      z[l] = t;
    });
    store_unit(y, i0, cnt, vec, z);
  });
}

// gout = g; gi = relu'(x) * (k1 g + k2 (x' - mean) + k3)
template <typename scalar_t, int kWalk, int kMask>
__global__ void grad_apply_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                                  const scalar_t* __restrict__ out, scalar_t* __restrict__ gi,
                                  scalar_t* __restrict__ gout, const float* mean, const float* k, Walker w, bool pre,
                                  DropArgs d) {
  const float* const p[4] = {mean, k, k + w.C, k + 2 * w.C};
  ChannelCache<4, 1> one;
  ChannelCache<4, kU> eight;
  for_each_unit(w, [&](int64_t u, int64_t i0, int cnt, bool vec, const Cursor& cur) {
    float gv[kU], ov[kU] = {}, xv[kU] = {}, a[kU], b[kU];
    load_unit(go, i0, cnt, vec, gv);
    if (kMask == kMaskPost) load_unit(out, i0, cnt, vec, ov);
    if (gi) load_unit(x, i0, cnt, vec, xv);
    DropKeys keys{};
    if (kMask == kMaskDrop) keys = dropout_group_keys(d.seed, d.offset, static_cast<uint64_t>(u));
#pragma unroll
    for (int l = 0; l < kU; ++l) b[l] = grad_of<kMask>(gv[l], ov[l], keys[l], d);
    if (gout) store_unit(gout, i0, cnt, vec, b);
    if (!gi) return;
    for_unit<kWalk, 4>(w, cur, cnt, p, one, eight, [&](int l, const float(&v)[4]) {
      const float r = v[1] * b[l] + v[2] * ((pre ? relu_f(xv[l]) : xv[l]) - v[0]) + v[3];
      a[l] = pre && !(xv[l] > 0.f) ? 0.f : r;
    });
    store_unit(gi, i0, cnt, vec, a);
  });
}

int blocks_for(int64_t units) {
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<int>(std::max<int64_t>(1, imin((units + kThreads - 1) / kThreads, max_blocks)));
}

// Calls fn(walk constant) with x's walk.
template <typename Fn>
void with_walk(const BnGeom& g, Fn fn) {
  if (!g.rows && g.S % kU == 0)
    fn(std::integral_constant<int, kPlanes8>());
  else if (g.rows && g.S == 1 && g.C % kU == 0)
    fn(std::integral_constant<int, kRows8>());
  else
    fn(std::integral_constant<int, kAny>());
}

DropArgs drop_args(double p, int64_t seed, int64_t offset) {
  return DropArgs{p > 0 ? dropout_threshold(p) : 0u, static_cast<float>(p > 0 ? dropout_scale(p) : 1.0),
                  static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
}

// One launch: y = bn_apply(x, ...) with float per-channel vectors.
at::Tensor launch_apply(const at::Tensor& x, const float* mean, const float* scale, const float* bias,
                        const at::Tensor& res, bool pre, bool post, double p, int64_t seed, int64_t offset) {
  const BnGeom g = bn_geometry(x);
  at::Tensor y = at::empty_like(x);
  if (g.numel == 0) return y;
  const int blocks = blocks_for((g.numel + kU - 1) / kU);
  const bool vec = aligned16(x.const_data_ptr()) && aligned16(y.const_data_ptr()) &&
                   (!res.defined() || aligned16(res.const_data_ptr()));
  const Walker w = walker(g, blocks, vec);
  const DropArgs d = drop_args(p, seed, offset);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FF_BN_DISPATCH(x.scalar_type(), "fastfuse_bn_apply_cuda", [&] {
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    with_walk(g, [&](auto walk_c) {
      constexpr int kW = decltype(walk_c)::value;
      if (p > 0)
        apply_kernel<scalar_t, kW, true><<<blocks, kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), rp, y.mutable_data_ptr<scalar_t>(), mean, scale, bias, w, pre, post, d);
      else
        apply_kernel<scalar_t, kW, false><<<blocks, kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), rp, y.mutable_data_ptr<scalar_t>(), mean, scale, bias, w, pre, post, d);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// One launch: (grad_input, g) = bn_grad_apply(...) with k = (k1, k2, k3) as a float (3, C) block.
Tensor2 launch_grad_apply(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out, const float* mean,
                          const float* k, bool pre, bool post, double p, int64_t seed, int64_t offset, bool need_gi,
                          bool need_g) {
  const BnGeom g = bn_geometry(x);
  at::Tensor gi = need_gi ? at::empty_like(x) : x.new_empty({0});
  at::Tensor gout = need_g ? at::empty_like(x) : x.new_empty({0});
  if (g.numel == 0 || !(need_gi || need_g)) return {gi, gout};
  const int blocks = blocks_for((g.numel + kU - 1) / kU);
  const bool vec = aligned16(grad_out.const_data_ptr()) && aligned16(x.const_data_ptr()) &&
                   (!post || aligned16(out.const_data_ptr())) && (!need_gi || aligned16(gi.const_data_ptr())) &&
                   (!need_g || aligned16(gout.const_data_ptr()));
  const Walker w = walker(g, blocks, vec);
  const DropArgs d = drop_args(p, seed, offset);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FF_BN_DISPATCH(x.scalar_type(), "fastfuse_bn_grad_apply_cuda", [&] {
    with_walk(g, [&](auto walk_c) {
      with_mask_kind(post, p, [&](auto mask_c) {
        grad_apply_kernel<scalar_t, decltype(walk_c)::value, decltype(mask_c)::value><<<blocks, kThreads, 0, stream>>>(
            grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            post ? out.const_data_ptr<scalar_t>() : nullptr, need_gi ? gi.mutable_data_ptr<scalar_t>() : nullptr,
            need_g ? gout.mutable_data_ptr<scalar_t>() : nullptr, mean, k, w, pre, d);
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gi, gout};
}

void check_cuda_input(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "fastfuse batch_norm CUDA kernel: expected CUDA tensors, got ", x.device());
  TORCH_CHECK(x.scalar_type() != at::kDouble,
              "fastfuse batch_norm CUDA kernel: float64 is CPU-only (for gradcheck); use float32");
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// t contiguous on x's device (hold it while a kernel reads it), or undefined where absent
at::Tensor on_device(const OptTensor& t, const at::Tensor& x, const char* name) {
  if (!present(t)) return at::Tensor();
  TORCH_CHECK(t->device() == x.device(), "fastfuse batch_norm: ", name, " is on ", t->device(), ", the input on ",
              x.device());
  return t->contiguous();
}

AnyVec opt_vec(const at::Tensor& t) { return t.defined() ? any_vec(t) : AnyVec{}; }

}  // namespace

// ---- the fastfuse_C primitives (two launches for the reductions, one for the elementwise ones) ---------------------
Tensor2 bn_stats_cuda(const at::Tensor& x, bool pre_relu) {
  check_cuda_input(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Partials part = reduce<false>(x, at::Tensor(), at::Tensor(), at::Tensor(), pre_relu, false, 0, 0, 0, nullptr);
  const int64_t C = x.size(1);
  at::Tensor mean = at::empty({C}, x.options().dtype(at::kFloat)), var = at::empty_like(mean);
  ForwardFinal f{};
  f.partial = part.buf.const_data_ptr<float>();
  f.parts = part.parts;
  f.C = C;
  f.n = static_cast<double>(x.numel() / C);
  f.mean = mean.mutable_data_ptr<float>();
  f.var = var.mutable_data_ptr<float>();
  forward_final_kernel<<<final_grid(C), kFinalBlock, 0, at::cuda::getCurrentCUDAStream()>>>(f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mean, var};
}

at::Tensor bn_apply_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& bias,
                         const c10::optional<at::Tensor>& residual, bool pre_relu, bool post_relu, double p,
                         int64_t seed, int64_t offset) {
  check_cuda_input(x);
  const c10::cuda::CUDAGuard guard(x.device());
  bn_geometry(x);
  const bool has_res = present(residual);
  if (has_res) bn_check_like(*residual, x, "residual");
  const at::Tensor m = f32(mean), s = f32(scale), b = f32(bias);
  return launch_apply(x, m.const_data_ptr<float>(), s.const_data_ptr<float>(), b.const_data_ptr<float>(),
                      has_res ? *residual : at::Tensor(), pre_relu, post_relu, p, seed, offset);
}

Tensor2 bn_grad_reduce_cuda(const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& out,
                            const at::Tensor& mean, bool pre_relu, bool post_relu, double p, int64_t seed,
                            int64_t offset) {
  check_cuda_input(x);
  bn_check_like(grad_out, x, "grad_out");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor o = out.has_value() ? *out : at::Tensor();
  if (post_relu) bn_check_like(o, x, "output");
  const int64_t C = x.size(1);
  at::Tensor sum_g = at::empty({C}, x.options().dtype(at::kFloat)), sum_gxmu = at::empty_like(sum_g);
  BackwardFinal f{};
  Partials part;
  if (x.numel() > 0) {
    part = reduce<true>(x, grad_out, o, mean, pre_relu, post_relu, p, seed, offset, nullptr);
    f.partial = part.buf.const_data_ptr<float>();
    f.parts = part.parts;
  }
  f.C = C;
  f.sum_g = sum_g.mutable_data_ptr<float>();
  f.sum_gxmu = sum_gxmu.mutable_data_ptr<float>();
  if (C > 0) {
    backward_final_kernel<<<final_grid(C), kFinalBlock, 0, at::cuda::getCurrentCUDAStream()>>>(f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {sum_g, sum_gxmu};
}

Tensor2 bn_grad_apply_cuda(const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& out,
                           const at::Tensor& mean, const at::Tensor& k1, const at::Tensor& k2, const at::Tensor& k3,
                           bool pre_relu, bool post_relu, double p, int64_t seed, int64_t offset, bool need_gi,
                           bool need_g) {
  check_cuda_input(x);
  bn_check_like(grad_out, x, "grad_out");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor o = out.has_value() ? *out : at::Tensor();
  if (post_relu) bn_check_like(o, x, "output");
  bn_geometry(x);
  const at::Tensor m = f32(mean), k = at::stack({f32(k1), f32(k2), f32(k3)});
  return launch_grad_apply(grad_out, x, o, m.const_data_ptr<float>(), k.const_data_ptr<float>(), pre_relu, post_relu,
                           p, seed, offset, need_gi, need_g);
}

namespace {

// Whether the forward updates the running statistics in its finalize kernel (else batch_norm_op does, in ATen ops).
bool device_update(const at::Tensor& x, const OptTensor& rm, const OptTensor& rv, const OptTensor& nbt,
                   bool training) {
  auto ok = [&](const at::Tensor& t) { return t.device() == x.device() && t.is_contiguous(); };
  return training && x.numel() > 0 && present(rm) && present(rv) && ok(*rm) && ok(*rv) &&
         (!present(nbt) || (ok(*nbt) && nbt->scalar_type() == at::kLong && nbt->numel() == 1));
}

// The forward: reduce -> finalize -> apply (training), finalize -> apply (eval).
Tensor3 forward_cuda(const at::Tensor& x_in, const OptTensor& weight, const OptTensor& bias, const OptTensor& rm,
                     const OptTensor& rv, const OptTensor& nbt, c10::optional<double> momentum, bool update,
                     const OptTensor& residual, bool training, double eps, bool pre_relu, bool post_relu, double p,
                     int64_t key, int64_t offset) {
  const at::Tensor x = bn_channel_dense(x_in);
  check_cuda_input(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = x.size(1);
  const auto fopt = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({C}, fopt), var = at::empty({C}, fopt), coef = at::empty({2, C}, fopt);
  ForwardFinal f{};
  f.C = C;
  f.mean = mean.mutable_data_ptr<float>();
  f.var = var.mutable_data_ptr<float>();
  f.scale = coef.mutable_data_ptr<float>();
  f.bias = f.scale + C;
  const at::Tensor w = on_device(weight, x, "weight"), b = on_device(bias, x, "bias");
  f.weight = opt_vec(w);
  f.bias_in = opt_vec(b);
  f.eps = static_cast<float>(eps);
  Partials part;
  at::Tensor rmc, rvc;
  if (training) {
    if (update) {
      TORCH_CHECK(momentum.has_value() || present(nbt), "fastfuse batch_norm: momentum=None needs num_batches_tracked");
      f.run_mean = any_vec(*rm);
      f.run_var = any_vec(*rv);
      f.nbt = present(nbt) ? nbt->const_data_ptr<int64_t>() : nullptr;
      f.has_momentum = momentum.has_value();
      f.momentum = static_cast<float>(momentum.value_or(0));
      const double n = static_cast<double>(x.numel() / C);
      f.unbias = static_cast<float>(n / (n - 1));
    }
    part = reduce<false>(x, at::Tensor(), at::Tensor(), at::Tensor(), pre_relu, false, 0, 0, 0,
                         update && present(nbt) ? nbt->mutable_data_ptr<int64_t>() : nullptr);
    f.partial = part.buf.const_data_ptr<float>();
    f.parts = part.parts;
    f.n = static_cast<double>(x.numel() / C);
  } else {
    rmc = on_device(rm, x, "running_mean");
    rvc = on_device(rv, x, "running_var");
    f.run_mean = any_vec(rmc);
    f.run_var = any_vec(rvc);
  }
  if (C > 0) {
    forward_final_kernel<<<final_grid(C), kFinalBlock, 0, at::cuda::getCurrentCUDAStream()>>>(f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (x.numel() == 0 || p >= 1) return {at::zeros_like(x), mean, var};
  at::Tensor res;
  if (present(residual)) {
    res = to_strides(*residual, x.strides());
    bn_check_like(res, x, "residual");
  }
  return {launch_apply(x, f.mean, f.scale, f.bias, res, pre_relu, post_relu, p, key, offset), mean, var};
}

// The backward: reduce -> finalize -> apply (training); g, x and out laid out alike by batch_norm_backward_op.
Tensor4 backward_cuda(const at::Tensor& g, const at::Tensor& x, const OptTensor& weight, const at::Tensor& mean,
                      const at::Tensor& var, const OptTensor& out, bool training, double eps, bool pre_relu,
                      bool post_relu, double p, int64_t key, int64_t offset, std::array<bool, 4> mask) {
  check_cuda_input(x);
  bn_check_like(g, x, "grad_out");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [need_gi, need_gw, need_gb, need_gr] = mask;
  const int64_t C = x.size(1);
  const auto wdt = present(weight) ? weight->scalar_type() : at::kFloat;
  const at::Tensor o = present(out) ? *out : at::Tensor();
  if (post_relu) bn_check_like(o, x, "output");
  const at::Tensor empty = x.new_empty({0}), m = f32(mean), v = f32(var);
  at::Tensor gw = need_gw ? at::empty({C}, x.options().dtype(wdt)) : empty.to(wdt);
  at::Tensor gb = need_gb ? at::empty({C}, x.options().dtype(wdt)) : empty.to(wdt);
  const bool need_k = need_gi || need_gr;
  at::Tensor k = need_k ? at::empty({3, C}, x.options().dtype(at::kFloat)) : at::Tensor();
  BackwardFinal f{};
  Partials part;
  if (need_gw || need_gb || (training && need_gi)) {
    part = reduce<true>(x, g, o, m, pre_relu, post_relu, p, key, offset, nullptr);
    f.partial = part.buf.const_data_ptr<float>();
    f.parts = part.parts;
  }
  if (!need_k && !need_gw && !need_gb) return {empty, gw, gb, empty};
  f.C = C;
  f.n = static_cast<float>(x.numel() / C);
  f.var = v.const_data_ptr<float>();
  const at::Tensor w = on_device(weight, x, "weight");
  f.weight = opt_vec(w);
  f.eps = static_cast<float>(eps);
  f.k = need_k ? k.mutable_data_ptr<float>() : nullptr;
  f.batch_grad = training && need_gi;
  if (need_gw) f.gw = any_vec(gw);
  if (need_gb) f.gb = any_vec(gb);
  backward_final_kernel<<<final_grid(C), kFinalBlock, 0, at::cuda::getCurrentCUDAStream()>>>(f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!need_k) return {empty, gw, gb, empty};
  auto [gi, gr] = launch_grad_apply(g, x, o, m.const_data_ptr<float>(), k.const_data_ptr<float>(), pre_relu,
                                    post_relu, p, key, offset, need_gi, need_gr);
  return {gi, gw, gb, gr};
}

Tensor3 batch_norm_kernel(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                          const OptTensor& running_mean, const OptTensor& running_var,
                          const OptTensor& num_batches_tracked, const OptTensor& residual, bool training,
                          c10::optional<double> momentum, double eps, bool pre_relu, bool post_relu, double p,
                          const at::Tensor& seed) {
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CUDA, "batch_norm", batch_norm_kernel, x, weight, bias, running_mean,
                          running_var, num_batches_tracked, residual, training, momentum, eps, pre_relu, post_relu, p,
                          seed);
  const bool update = device_update(x, running_mean, running_var, num_batches_tracked, training);
  auto forward = [&](const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& rm,
                     const OptTensor& rv, const OptTensor& residual, bool training, double eps, bool pre_relu,
                     bool post_relu, double p, int64_t key, int64_t offset) {
    return forward_cuda(x, weight, bias, rm, rv, num_batches_tracked, momentum, update, residual, training, eps,
                        pre_relu, post_relu, p, key, offset);
  };
  return batch_norm_op(x, weight, bias, running_mean, running_var, num_batches_tracked, residual, training, momentum,
                       eps, pre_relu, post_relu, p, seed, forward, /*forward_updates=*/update);
}

Tensor4 batch_norm_backward_kernel(const at::Tensor& grad_out, const at::Tensor& x, const OptTensor& weight,
                                   const at::Tensor& mean, const at::Tensor& var, const OptTensor& out, bool training,
                                   double eps, bool pre_relu, bool post_relu, double p, const at::Tensor& seed,
                                   std::array<bool, 4> mask) {
  FASTFUSE_PYTHON_BACKEND(c10::DeviceType::CUDA, "batch_norm_backward", batch_norm_backward_kernel, grad_out, x,
                          weight, mean, var, out, training, eps, pre_relu, post_relu, p, seed, mask);
  return batch_norm_backward_op(grad_out, x, weight, mean, var, out, training, eps, pre_relu, post_relu, p, seed, mask,
                                backward_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastfuse, CUDA, m) {
  m.impl("batch_norm", &batch_norm_kernel);
  m.impl("batch_norm_backward", &batch_norm_backward_kernel);
}

TORCH_LIBRARY_IMPL(fastfuse_C, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_apply", &bn_apply_cuda);
  m.impl("bn_grad_reduce", &bn_grad_reduce_cuda);
  m.impl("bn_grad_apply", &bn_grad_apply_cuda);
}

}  // namespace fastfuse
