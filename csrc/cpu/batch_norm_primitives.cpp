// Batch norm on CPU: two reductions (statistics; gradient sums) and two elementwise passes (fused forward;
// fused backward), each one pass over memory in storage order, with Philox dropout words made on the fly.
// The kernels are in cpu/batch_norm_impl.h; this file picks the AVX2 build of them when the CPU has it.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "batch_norm.h"
#include "dropout.h"
#include "cpu/alloc.h"
#include "cpu/philox_cpu.h"

#define FF_BN_NS base
#include "cpu/batch_norm_impl.h"
#undef FF_BN_NS

namespace fastfuse {

#ifdef FASTFUSE_BN_AVX2
namespace avx2 {
FASTFUSE_BN_DECLARE(cpu)
FASTFUSE_BN_PLANES_DECLARE
}
#define FF_BN_PICK(fn) (use_avx2() ? avx2::fn : base::fn)
static bool use_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#else
#define FF_BN_PICK(fn) base::fn
#endif

Tensor2 bn_stats_cpu(const at::Tensor& x, bool pre_relu) { return FF_BN_PICK(bn_stats_cpu)(x, pre_relu); }

at::Tensor bn_apply_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& bias,
                        const c10::optional<at::Tensor>& residual, bool pre_relu, bool post_relu, double p,
                        int64_t seed, int64_t offset) {
  return FF_BN_PICK(bn_apply_cpu)(x, mean, scale, bias, residual, pre_relu, post_relu, p, seed, offset);
}

Tensor2 bn_grad_reduce_cpu(const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& out,
                           const at::Tensor& mean, bool pre_relu, bool post_relu, double p, int64_t seed,
                           int64_t offset) {
  return FF_BN_PICK(bn_grad_reduce_cpu)(grad_out, x, out, mean, pre_relu, post_relu, p, seed, offset);
}

Tensor2 bn_grad_apply_cpu(const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& out,
                          const at::Tensor& mean, const at::Tensor& k1, const at::Tensor& k2, const at::Tensor& k3,
                          bool pre_relu, bool post_relu, double p, int64_t seed, int64_t offset, bool need_gi,
                          bool need_g) {
  return FF_BN_PICK(bn_grad_apply_cpu)(grad_out, x, out, mean, k1, k2, k3, pre_relu, post_relu, p, seed, offset,
                                       need_gi, need_g);
}

Tensor3 bn_train_planes_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const c10::optional<at::Tensor>& residual, double eps, bool pre_relu, bool post_relu,
                            double p, int64_t seed, int64_t offset) {
  return FF_BN_PICK(bn_train_planes_cpu)(x, weight, bias, residual, eps, pre_relu, post_relu, p, seed, offset);
}

Tensor4 bn_train_planes_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                     const c10::optional<at::Tensor>& out, const at::Tensor& weight,
                                     const at::Tensor& mean, const at::Tensor& var, double eps, bool pre_relu,
                                     bool post_relu, double p, int64_t seed, int64_t offset, bool need_g) {
  return FF_BN_PICK(bn_train_planes_backward_cpu)(grad_out, x, out, weight, mean, var, eps, pre_relu, post_relu, p,
                                                  seed, offset, need_g);
}

Tensor4 bn_train_rows_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                   const c10::optional<at::Tensor>& out, const at::Tensor& weight,
                                   const at::Tensor& mean, const at::Tensor& var, double eps, bool pre_relu,
                                   bool post_relu, double p, int64_t seed, int64_t offset, bool need_gw, bool need_gb,
                                   bool need_g) {
  return FF_BN_PICK(bn_train_rows_backward_cpu)(grad_out, x, out, weight, mean, var, eps, pre_relu, post_relu, p,
                                                seed, offset, need_gw, need_gb, need_g);
}

bool bn_rows_route_cpu(const at::Tensor& x, int64_t bytes_per_elem) {
  return x.dim() >= 2 && x.numel() > 0 && base::col_blocks(bn_geometry(x), bytes_per_elem).width > 0;
}

TORCH_LIBRARY_IMPL(fastfuse_C, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_apply", &bn_apply_cpu);
  m.impl("bn_grad_reduce", &bn_grad_reduce_cpu);
  m.impl("bn_grad_apply", &bn_grad_apply_cpu);
}

}  // namespace fastfuse
