// The CPU batch-norm kernels, written once and compiled twice: in namespace FF_BN_NS = base (the build's
// baseline ISA) by batch_norm_primitives.cpp, and = avx2 (AVX2 + FMA) by batch_norm_primitives_avx2.cpp. The
// loops are vectorised by the compiler, and at SSE2 width they are compute-bound, hence the AVX2 build.
// The including file includes every header first, so that only this code takes the ISA pragma.
//
// Determinism: reductions split the tensor into blocks that depend only on its shape and add the partial sums
// in a fixed order, so results are the same bits on every run and for every thread count (for one ISA).
namespace fastfuse {
namespace FF_BN_NS {
namespace {

constexpr int64_t kChunk = 4096;  // elements per elementwise task / per Philox buffer (8 KB of keys)
// Fewer elements than this run on one thread: opening a parallel region costs more than a second thread saves on
// a tabular layer's (64, 1000).
constexpr int64_t kParallelMin = int64_t(1) << 17;

// at::parallel_for's grain for n tasks of `each` elements: one thread below kParallelMin elements in all. Passes
// that draw dropout keys cost ~4x more per element (Philox), so they go parallel from a quarter of that.
inline int64_t grain_for(int64_t n, int64_t each, bool keys = false) {
  return n * each * (keys ? 4 : 1) < kParallelMin ? std::max<int64_t>(n, 1) : 1;
}
constexpr int kLanes = 16;        // independent accumulators: lets the compiler vectorise the sums

// Rows per block of a rows tensor's channel sums (float within a block, double across blocks): every route that
// reduces rows uses this one split, which the bits depend on.
inline int64_t sum_rows_per_block(int64_t C) { return std::max<int64_t>(1, 4 * kChunk / C); }

template <typename acc_t>
inline acc_t relu(acc_t v) { return v < acc_t(0) ? acc_t(0) : v; }  // NaN stays NaN, as in torch.relu

// ---- drivers: walk the geometry, call an element functor F ----
// F::begin(buf, i0, n) prepares storage elements [i0, i0 + n) (e.g. their dropout keys, in buf);
// reduction functors add two quantities of element i (k = i - i0) of channel c: F::pair(k, i, c, a, b);
// elementwise functors run over a piece of a plane (one channel) or of a row: F::plane / F::row (ElemLoops).

// Sums (d1, d2) of channel c of a planes tensor (N runs of S contiguous elements), in a fixed order.
template <typename acc_t, typename F>
void plane_sums(const BnGeom& g, F& f, uint16_t* buf, int64_t c, double& d1, double& d2) {
  const int64_t N = g.numel / (g.C * g.S);
  d1 = d2 = 0;
  // float lanes, added into the doubles once they hold kChunk or more elements: per plane, small planes (7x7:
  // 49 elements, 3 lane steps) spent as long on the flush as on the sums
  acc_t l1[kLanes] = {}, l2[kLanes] = {};
  int64_t pending = 0;
  auto flush = [&] {
    for (int l = 0; l < kLanes; ++l) d1 += l1[l], d2 += l2[l], l1[l] = l2[l] = acc_t(0);
    pending = 0;
  };
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < g.S; j += kChunk) {
      const int64_t i0 = (n * g.C + c) * g.S + j, len = std::min(kChunk, g.S - j);
      f.begin(buf, i0, len);
      int64_t k = 0;
      for (; k + kLanes <= len; k += kLanes)
        for (int l = 0; l < kLanes; ++l) f.pair(k + l, i0 + k + l, c, l1[l], l2[l]);
      for (; k < len; ++k) f.pair(k, i0 + k, c, l1[0], l2[0]);
      if ((pending += len) >= kChunk) flush();
    }
  }
  flush();
}

// Runs the elementwise functor f over channel c of a planes tensor.
template <typename F>
void plane_apply(const BnGeom& g, F& f, uint16_t* buf, int64_t c) {
  const int64_t N = g.numel / (g.C * g.S);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < g.S; j += kChunk) {
      const int64_t i0 = (n * g.C + c) * g.S + j, len = std::min(kChunk, g.S - j);
      f.begin(buf, i0, len);
      f.plane(0, i0, len, c);
    }
  }
}

// Per-channel sums (s1, s2) in double.
template <typename acc_t, typename F>
void channel_sums(const BnGeom& g, const F& proto, double* s1, double* s2) {
  if (!g.rows) {  // planes: one task per channel range
    at::parallel_for(0, g.C, grain_for(g.C, g.numel / g.C, F::kKeys), [&](int64_t c0, int64_t c1) {
      std::vector<uint16_t> buf(kChunk + kKeyPad);
      F f = proto;
      for (int64_t c = c0; c < c1; ++c) plane_sums<acc_t>(g, f, buf.data(), c, s1[c], s2[c]);
    });
    return;
  }
  // rows of C: fixed blocks of rows give per-block partials [block][C], then a fixed-order sum over blocks
  const int64_t R = g.numel / g.C, rpb = sum_rows_per_block(g.C), nb = (R + rpb - 1) / rpb;
  // the blocks' partials (every entry is written before it is read). Big ones come from the output cache (cpu/alloc.h;
  // fastfuse.empty_cpu_cache() frees them): a fresh vector of a few MB would page-fault on every call. Small ones
  // stay in a per-thread vector, so a small call allocates nothing.
  const int64_t need = 2 * nb * g.C;
  static thread_local std::vector<double> small;
  at::Tensor big;
  double* p1;
  if (need * static_cast<int64_t>(sizeof(double)) < kCachedOutputBytes) {
    if (small.size() < static_cast<size_t>(need)) small.resize(need);
    p1 = small.data();
  } else {
    big = empty_cached({need}, at::kDouble);
    p1 = big.mutable_data_ptr<double>();
  }
  double* p2 = p1 + nb * g.C;
  at::parallel_for(0, nb, grain_for(nb, rpb * g.C, F::kKeys), [&](int64_t b0, int64_t b1) {
    std::vector<uint16_t> buf(rpb * g.C + kKeyPad);
    std::vector<acc_t> l1(g.C), l2(g.C);
    F f = proto;
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(l1.begin(), l1.end(), acc_t(0));
      std::fill(l2.begin(), l2.end(), acc_t(0));
      const int64_t r0 = b * rpb, r1 = std::min(R, r0 + rpb);
      f.begin(buf.data(), r0 * g.C, (r1 - r0) * g.C);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i0 = r * g.C, k0 = (r - r0) * g.C;
        acc_t* a = l1.data();
        acc_t* q = l2.data();
#pragma GCC ivdep
        for (int64_t c = 0; c < g.C; ++c) f.pair(k0 + c, i0 + c, c, a[c], q[c]);
      }
      for (int64_t c = 0; c < g.C; ++c) p1[b * g.C + c] = l1[c], p2[b * g.C + c] = l2[c];
    }
  });
  // per channel in ascending block order (the bits), walking the partials row by row (a column walk strided
  // by C cost a cache line per value)
  at::parallel_for(0, g.C, std::max<int64_t>(64, grain_for(g.C, 2 * nb)), [&](int64_t c0, int64_t c1) {
    std::fill(s1 + c0, s1 + c1, 0.0);
    std::fill(s2 + c0, s2 + c1, 0.0);
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t c = c0; c < c1; ++c) s1[c] += p1[b * g.C + c], s2[c] += p2[b * g.C + c];
  });
}

template <typename F>
void for_each_element(const BnGeom& g, const F& proto) {
  const int64_t nchunks = (g.numel + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, grain_for(nchunks, kChunk, F::kKeys), [&](int64_t a, int64_t b) {
    alignas(64) uint16_t buf[kChunk + kKeyPad];
    F f = proto;
    for (int64_t ch = a; ch < b; ++ch) {
      const int64_t i0 = ch * kChunk, end = std::min(g.numel, i0 + kChunk);
      f.begin(buf, i0, end - i0);
      for (int64_t i = i0; i < end;) {
        if (g.rows) {  // a piece of one row: channels c .. c + len - 1
          const int64_t c = i % g.C, len = std::min(g.C - c, end - i);
          f.row(i - i0, i, len, c);
          i += len;
        } else {  // a piece of one plane: one channel
          const int64_t c = (i / g.S) % g.C, len = std::min(g.S - i % g.S, end - i);
          f.plane(i - i0, i, len, c);
          i += len;
        }
      }
    }
  });
}

// Elementwise functors give consts(c) (the channel's parameters, loaded once per plane run) and
// elem(k, i, consts); this base turns them into the two loops the driver calls.
template <class D>
struct ElemLoops {
  void plane(int64_t k0, int64_t i0, int64_t len, int64_t c) const {
    const D& d = static_cast<const D&>(*this);
    const auto cc = d.consts(c);
#pragma GCC ivdep  // outputs never alias inputs: skip GCC's runtime alias checks
    for (int64_t t = 0; t < len; ++t) d.elem(k0 + t, i0 + t, cc);
  }
  void row(int64_t k0, int64_t i0, int64_t len, int64_t c0) const {
    const D& d = static_cast<const D&>(*this);
#pragma GCC ivdep
    for (int64_t t = 0; t < len; ++t) d.elem(k0 + t, i0 + t, d.consts(c0 + t));
  }
};

// ---- element functors ----
struct Drop {
  uint32_t threshold;
  uint64_t seed, offset;
  const uint16_t* w = nullptr;  // the dropout key of each element of the current run
  void begin(uint16_t* buf, int64_t i0, int64_t n) { w = element_keys(buf, i0, n, seed, offset); }
  void reuse(const uint16_t* buf, int64_t i0) { w = buf + (i0 & 7); }  // keys an earlier begin(buf, i0, n) made
};

template <typename scalar_t>
struct StatsOp {  // (x' - K_c, (x' - K_c)^2): sums shifted by a value of the channel, for stability
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kKeys = false;  // draws no dropout keys
  const scalar_t* x;
  const acc_t* shift;
  bool pre;
  void begin(uint16_t*, int64_t, int64_t) {}
  void pair(int64_t, int64_t i, int64_t c, acc_t& a, acc_t& b) const {
    acc_t v = static_cast<acc_t>(x[i]);
    const acc_t d = (pre ? relu(v) : v) - shift[c];
    a += d;
    b += d * d;
  }
};

// g = dL/d(bn + residual): grad_out through dropout (scale ds) and the post-ReLU.
// kMask: a MaskKind (csrc/batch_norm.h).
template <typename scalar_t, int kMask>
struct GradOf : Drop {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kKeys = kMask == kMaskDrop;
  const scalar_t* go;
  const scalar_t* out;
  acc_t ds;
  void begin(uint16_t* buf, int64_t i0, int64_t n) {
    if (kMask == kMaskDrop) Drop::begin(buf, i0, n);
  }
  acc_t g(int64_t k, int64_t i) const {
    const acc_t v = static_cast<acc_t>(go[i]) * ds;
    if (kMask == kMaskPost) return static_cast<acc_t>(out[i]) > acc_t(0) ? v : acc_t(0);
    if (kMask == kMaskDrop) return v * (w[k] >= threshold ? acc_t(1) : acc_t(0));  // NaN * 0 = NaN, as torch
    return v;
  }
};

template <typename scalar_t, int kMask>
struct GradReduceOp : GradOf<scalar_t, kMask> {  // (g, g * (x' - mean_c))
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const acc_t* mean;
  bool pre;
  void pair(int64_t k, int64_t i, int64_t c, acc_t& a, acc_t& b) const {
    const acc_t g = this->g(k, i), v = static_cast<acc_t>(x[i]);
    a += g;
    b += g * ((pre ? relu(v) : v) - mean[c]);
  }
};

template <typename scalar_t, bool kRes, bool kDrop>
struct ApplyOp : Drop, ElemLoops<ApplyOp<scalar_t, kRes, kDrop>> {  // y = drop(post((x' - m) * s + b + res))
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kKeys = kDrop;
  struct Consts {
    acc_t m, s, b;
  };
  const scalar_t* x;
  const scalar_t* res;
  scalar_t* y;
  const acc_t *mean, *scale, *bias;
  acc_t ds;
  bool pre, post;
  void begin(uint16_t* buf, int64_t i0, int64_t n) {
    if (kDrop) Drop::begin(buf, i0, n);
  }
  Consts consts(int64_t c) const { return {mean[c], scale[c], bias[c]}; }
  void elem(int64_t k, int64_t i, const Consts& cc) const {
    const acc_t v = static_cast<acc_t>(x[i]);
    acc_t z = ((pre ? relu(v) : v) - cc.m) * cc.s + cc.b;
    if (kRes) z += static_cast<acc_t>(res[i]);
    if (post) z = relu(z);
    if (kDrop) z *= w[k] >= threshold ? ds : acc_t(0);  // NaN * 0 = NaN, as torch
    y[i] = static_cast<scalar_t>(z);
  }
};

template <typename scalar_t, int kMask, bool kGi, bool kG>
struct GradApplyOp : GradOf<scalar_t, kMask>, ElemLoops<GradApplyOp<scalar_t, kMask, kGi, kG>> {
  // gi = relu'(x) * (k1 g + k2 (x' - mean) + k3), and g itself (for the residual's gradient)
  using acc_t = at::opmath_type<scalar_t>;
  struct Consts {
    acc_t m, k1, k2, k3;
  };
  const scalar_t* x;
  const acc_t *mean, *k1, *k2, *k3;
  scalar_t* gi;
  scalar_t* gout;
  bool pre;
  Consts consts(int64_t c) const { return {mean[c], k1[c], k2[c], k3[c]}; }
  void elem(int64_t k, int64_t i, const Consts& cc) const {
    const acc_t g = this->g(k, i);
    if (kG) gout[i] = static_cast<scalar_t>(g);
    if (kGi) {
      const acc_t v = static_cast<acc_t>(x[i]);
      const acc_t r = cc.k1 * g + cc.k2 * ((pre ? relu(v) : v) - cc.m) + cc.k3;
      gi[i] = static_cast<scalar_t>(pre && !(v > acc_t(0)) ? acc_t(0) : r);
    }
  }
};

// ---- helpers ----
void check_vec(const at::Tensor& v, const at::Tensor& x, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.numel() == x.size(1) && v.is_contiguous() && v.scalar_type() == bn_acc_type(x),
              "fastfuse batch_norm kernel: ", name, " must be a contiguous (C,) ", bn_acc_type(x), " tensor");
}

void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "fastfuse batch_norm CPU kernel: expected CPU tensors, got ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fastfuse batch_norm: expected a floating-point input");
}

const uint32_t kNoDrop = 0;

template <typename T>
void set_drop(T& f, double p, int64_t seed, int64_t offset) {
  f.threshold = p > 0 ? dropout_threshold(p) : kNoDrop;
  f.seed = static_cast<uint64_t>(seed);
  f.offset = static_cast<uint64_t>(offset);
}

}  // namespace

// The shift of channel c's sums: its first element (after the pre-ReLU), for stability with a large mean.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
acc_t channel_shift(const scalar_t* x, const BnGeom& g, int64_t c, bool pre_relu) {
  const acc_t v = static_cast<acc_t>(x[g.rows ? c : c * g.S]);
  return pre_relu ? relu(v) : v;
}

// Mean and biased variance of a channel of n values from its shifted sums d1 = sum(v - shift), d2 = sum((v - shift)^2).
template <typename acc_t>
void channel_moments(acc_t shift, double d1, double d2, int64_t n, acc_t& mean, acc_t& var) {
  const double m = d1 / n;
  mean = static_cast<acc_t>(shift + m);
  var = static_cast<acc_t>(std::max(0.0, d2 / n - m * m));
}

// Builds the ApplyOp for this call (with or without residual and dropout) and calls fn(op).
template <typename scalar_t, typename Fn>
void with_apply_op(const scalar_t* x, const scalar_t* res, scalar_t* y, const at::opmath_type<scalar_t>* mean,
                   const at::opmath_type<scalar_t>* scale, const at::opmath_type<scalar_t>* bias, bool pre_relu,
                   bool post_relu, double p, int64_t seed, int64_t offset, Fn fn) {
  using acc_t = at::opmath_type<scalar_t>;
  auto run = [&](auto res_c, auto drop_c) {
    ApplyOp<scalar_t, decltype(res_c)::value, decltype(drop_c)::value> f;
    set_drop(f, p, seed, offset);
    f.x = x;
    f.res = res;
    f.y = y;
    f.mean = mean;
    f.scale = scale;
    f.bias = bias;
    f.ds = static_cast<acc_t>(p > 0 ? dropout_scale(p) : 1.0);
    f.pre = pre_relu;
    f.post = post_relu;
    fn(f);
  };
  if (res)
    p > 0 ? run(std::true_type(), std::true_type()) : run(std::true_type(), std::false_type());
  else
    p > 0 ? run(std::false_type(), std::true_type()) : run(std::false_type(), std::false_type());
}

Tensor2 bn_stats_cpu(const at::Tensor& x, bool pre_relu) {
  check_input(x);
  const BnGeom g = bn_geometry(x);
  TORCH_CHECK(g.numel > 0, "fastfuse bn_stats: empty input");
  const int64_t n = g.numel / g.C;
  at::Tensor mean = at::empty({g.C}, x.options().dtype(bn_acc_type(x)));
  at::Tensor var = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastfuse_bn_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    std::vector<acc_t> shift(g.C);
    for (int64_t c = 0; c < g.C; ++c) shift[c] = channel_shift(xp, g, c, pre_relu);
    std::vector<double> s1(g.C), s2(g.C);
    channel_sums<acc_t>(g, StatsOp<scalar_t>{xp, shift.data(), pre_relu}, s1.data(), s2.data());
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* vp = var.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < g.C; ++c) channel_moments(shift[c], s1[c], s2[c], n, mp[c], vp[c]);
  });
  return {mean, var};
}

at::Tensor bn_apply_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& bias,
                        const c10::optional<at::Tensor>& residual, bool pre_relu, bool post_relu, double p,
                        int64_t seed, int64_t offset) {
  check_input(x);
  const BnGeom g = bn_geometry(x);
  check_vec(mean, x, "mean");
  check_vec(scale, x, "scale");
  check_vec(bias, x, "bias");
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) bn_check_like(*residual, x, "residual");
  at::Tensor y = empty_like_output(x);
  if (g.numel == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastfuse_bn_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_apply_op(x.const_data_ptr<scalar_t>(), has_res ? residual->const_data_ptr<scalar_t>() : nullptr,
                  y.mutable_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(),
                  bias.const_data_ptr<acc_t>(), pre_relu, post_relu, p, seed, offset,
                  [&](auto& f) { for_each_element(g, f); });
  });
  return y;
}

template <typename F, typename scalar_t>
void init_grad(F& f, const at::Tensor& grad_out, const c10::optional<at::Tensor>& out, double p, int64_t seed,
               int64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  set_drop(f, p, seed, offset);
  f.go = grad_out.const_data_ptr<scalar_t>();
  f.out = out.has_value() && out->defined() ? out->const_data_ptr<scalar_t>() : nullptr;
  f.ds = static_cast<acc_t>(p > 0 ? dropout_scale(p) : 1.0);
}

// The training backward's two functors (reduce, then apply with coefficients k1..k3 that the caller fills in
// between), on the same inputs. gout: the residual's gradient, written when kG.
template <typename scalar_t, int kMask, bool kG, typename acc_t = at::opmath_type<scalar_t>>
std::pair<GradReduceOp<scalar_t, kMask>, GradApplyOp<scalar_t, kMask, true, kG>> grad_ops(
    const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& out, const acc_t* mean,
    const std::vector<acc_t>& k1, const std::vector<acc_t>& k2, const std::vector<acc_t>& k3, at::Tensor& gi,
    at::Tensor& gout, bool pre_relu, double p, int64_t seed, int64_t offset) {
  GradReduceOp<scalar_t, kMask> fr;
  init_grad<decltype(fr), scalar_t>(fr, grad_out, out, p, seed, offset);
  fr.x = x.const_data_ptr<scalar_t>();
  fr.mean = mean;
  fr.pre = pre_relu;
  GradApplyOp<scalar_t, kMask, true, kG> fa;
  init_grad<decltype(fa), scalar_t>(fa, grad_out, out, p, seed, offset);
  fa.x = fr.x;
  fa.mean = mean;
  fa.k1 = k1.data();
  fa.k2 = k2.data();
  fa.k3 = k3.data();
  fa.gi = gi.mutable_data_ptr<scalar_t>();
  fa.gout = kG ? gout.mutable_data_ptr<scalar_t>() : nullptr;
  fa.pre = pre_relu;
  return {fr, fa};
}

void check_grad_inputs(const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& out,
                       bool post_relu) {
  check_input(x);
  bn_check_like(grad_out, x, "grad_out");
  if (post_relu) {
    TORCH_CHECK(out.has_value() && out->defined(), "fastfuse batch_norm backward: post_relu needs the output");
    bn_check_like(*out, x, "output");
  }
}

Tensor2 bn_grad_reduce_cpu(const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& out,
                           const at::Tensor& mean, bool pre_relu, bool post_relu, double p, int64_t seed,
                           int64_t offset) {
  check_grad_inputs(grad_out, x, out, post_relu);
  check_vec(mean, x, "mean");
  const BnGeom g = bn_geometry(x);
  at::Tensor sum_g = at::zeros({g.C}, x.options().dtype(bn_acc_type(x)));
  at::Tensor sum_gx = at::zeros_like(sum_g);
  if (g.numel == 0) return {sum_g, sum_gx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastfuse_bn_grad_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_mask_kind(post_relu, p, [&](auto mask_c) {
      GradReduceOp<scalar_t, decltype(mask_c)::value> f;
      init_grad<decltype(f), scalar_t>(f, grad_out, out, p, seed, offset);
      f.x = x.const_data_ptr<scalar_t>();
      f.mean = mean.const_data_ptr<acc_t>();
      f.pre = pre_relu;
      std::vector<double> s1(g.C), s2(g.C);
      channel_sums<acc_t>(g, f, s1.data(), s2.data());
      acc_t* sg = sum_g.mutable_data_ptr<acc_t>();  // once: each call checks the tensor (~13% at (64, 1000))
      acc_t* sgx = sum_gx.mutable_data_ptr<acc_t>();
      for (int64_t c = 0; c < g.C; ++c) {
        sg[c] = static_cast<acc_t>(s1[c]);
        sgx[c] = static_cast<acc_t>(s2[c]);
      }
    });
  });
  return {sum_g, sum_gx};
}

Tensor2 bn_grad_apply_cpu(const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& out,
                          const at::Tensor& mean, const at::Tensor& k1, const at::Tensor& k2, const at::Tensor& k3,
                          bool pre_relu, bool post_relu, double p, int64_t seed, int64_t offset, bool need_gi,
                          bool need_g) {
  check_grad_inputs(grad_out, x, out, post_relu);
  check_vec(mean, x, "mean");
  check_vec(k1, x, "k1");
  check_vec(k2, x, "k2");
  check_vec(k3, x, "k3");
  const BnGeom g = bn_geometry(x);
  at::Tensor gi = need_gi ? empty_like_output(x) : x.new_empty({0});
  at::Tensor gout = need_g ? empty_like_output(x) : x.new_empty({0});
  if (g.numel == 0 || !(need_gi || need_g)) return {gi, gout};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastfuse_bn_grad_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto mask_c, auto gi_c, auto g_c) {
      GradApplyOp<scalar_t, decltype(mask_c)::value, decltype(gi_c)::value, decltype(g_c)::value> f;
      init_grad<decltype(f), scalar_t>(f, grad_out, out, p, seed, offset);
      f.x = x.const_data_ptr<scalar_t>();
      f.mean = mean.const_data_ptr<acc_t>();
      f.k1 = k1.const_data_ptr<acc_t>();
      f.k2 = k2.const_data_ptr<acc_t>();
      f.k3 = k3.const_data_ptr<acc_t>();
      f.gi = need_gi ? gi.mutable_data_ptr<scalar_t>() : nullptr;
      f.gout = need_g ? gout.mutable_data_ptr<scalar_t>() : nullptr;
      f.pre = pre_relu;
      for_each_element(g, f);
    };
    with_mask_kind(post_relu, p, [&](auto mask_c) {
      if (need_gi && need_g)
        run(mask_c, std::true_type(), std::true_type());
      else if (need_gi)
        run(mask_c, std::true_type(), std::false_type());
      else
        run(mask_c, std::false_type(), std::true_type());
    });
  });
  return {gi, gout};
}

// ---- training in one read per pass, for planes (NCHW) tensors ----
// The two-pass forward reads x from memory twice (statistics, then apply) and the backward reads grad_out and x
// twice. Here each task takes whole channels and applies one right after reducing it, while its plane is still
// in cache (L2 for planes up to about 1 MB, L3 beyond), so memory sees x once forward and (grad_out, x) once
// backward. The per-channel arithmetic between the two steps is batch_norm.h's composite's.

Tensor3 bn_train_planes_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const c10::optional<at::Tensor>& residual, double eps, bool pre_relu, bool post_relu,
                            double p, int64_t seed, int64_t offset) {
  check_input(x);
  const BnGeom g = bn_geometry(x);
  TORCH_CHECK(!g.rows && g.numel > 0, "fastfuse bn_train_planes: expected a non-empty contiguous (N, C, *) tensor");
  check_vec(weight, x, "weight");
  check_vec(bias, x, "bias");
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) bn_check_like(*residual, x, "residual");
  const int64_t n = g.numel / g.C;
  at::Tensor mean = at::empty({g.C}, x.options().dtype(bn_acc_type(x)));
  at::Tensor var = at::empty_like(mean);
  at::Tensor y = empty_like_output(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastfuse_bn_train_planes", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* vp = var.mutable_data_ptr<acc_t>();
    const acc_t* wp = weight.const_data_ptr<acc_t>();
    std::vector<acc_t> shift(g.C), scale(g.C);
    with_apply_op(xp, has_res ? residual->const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(), mp,
                  scale.data(), bias.const_data_ptr<acc_t>(), pre_relu, post_relu, p, seed, offset,
                  [&](const auto& fa) {
      at::parallel_for(0, g.C, grain_for(g.C, g.numel / g.C, p > 0), [&](int64_t c0, int64_t c1) {
        std::vector<uint16_t> buf(kChunk + kKeyPad);
        StatsOp<scalar_t> fs{xp, shift.data(), pre_relu};
        auto f = fa;
        for (int64_t c = c0; c < c1; ++c) {
          shift[c] = channel_shift(xp, g, c, pre_relu);
          double d1, d2;
          plane_sums<acc_t>(g, fs, buf.data(), c, d1, d2);
          channel_moments(shift[c], d1, d2, n, mp[c], vp[c]);
          scale[c] = acc_t(1) / std::sqrt(vp[c] + static_cast<acc_t>(eps)) * wp[c];
          plane_apply(g, f, buf.data(), c);
        }
      });
    });
  });
  return {y, mean, var};
}

Tensor4 bn_train_planes_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                     const c10::optional<at::Tensor>& out, const at::Tensor& weight,
                                     const at::Tensor& mean, const at::Tensor& var, double eps, bool pre_relu,
                                     bool post_relu, double p, int64_t seed, int64_t offset, bool need_g) {
  check_grad_inputs(grad_out, x, out, post_relu);
  const BnGeom g = bn_geometry(x);
  TORCH_CHECK(!g.rows && g.numel > 0, "fastfuse bn_train_planes_backward: expected a non-empty contiguous tensor");
  check_vec(weight, x, "weight");
  check_vec(mean, x, "mean");
  check_vec(var, x, "var");
  const int64_t n = g.numel / g.C;
  at::Tensor sum_g = at::empty({g.C}, x.options().dtype(bn_acc_type(x)));
  at::Tensor sum_gx = at::empty_like(sum_g);
  at::Tensor gi = empty_like_output(x);
  at::Tensor gout = need_g ? empty_like_output(x) : x.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastfuse_bn_train_planes_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* vp = var.const_data_ptr<acc_t>();
    const acc_t* wp = weight.const_data_ptr<acc_t>();
    acc_t* sg = sum_g.mutable_data_ptr<acc_t>();
    acc_t* sgx = sum_gx.mutable_data_ptr<acc_t>();
    std::vector<acc_t> k1(g.C), k2(g.C), k3(g.C);
    auto run = [&](auto mask_c, auto g_c) {
      constexpr int kMask = decltype(mask_c)::value;
      const auto [fr, fa] = grad_ops<scalar_t, kMask, decltype(g_c)::value>(grad_out, x, out, mp, k1, k2, k3, gi,
                                                                            gout, pre_relu, p, seed, offset);
      at::parallel_for(0, g.C, grain_for(g.C, g.numel / g.C, p > 0), [&](int64_t c0, int64_t c1) {
        std::vector<uint16_t> buf(kChunk + kKeyPad);
        auto r = fr;
        auto a = fa;
        for (int64_t c = c0; c < c1; ++c) {
          double d1, d2;
          plane_sums<acc_t>(g, r, buf.data(), c, d1, d2);
          sg[c] = static_cast<acc_t>(d1);
          sgx[c] = static_cast<acc_t>(d2);
          const auto q = bn_grad_coeffs(vp[c], wp + c, static_cast<acc_t>(eps), sg[c], sgx[c], static_cast<acc_t>(n));
          k1[c] = q.k1, k2[c] = q.k2, k3[c] = q.k3;
          plane_apply(g, a, buf.data(), c);
        }
      });
    };
    with_mask_kind(post_relu, p, [&](auto mask_c) {
      need_g ? run(mask_c, std::true_type()) : run(mask_c, std::false_type());
    });
  });
  return {gi, gout, sum_g, sum_gx};
}

// ---- training backward in one parallel region, for rows tensors (channel innermost) with few rows ----
// At (64, 1000), the shape of a tabular model's hidden layer, the two-pass backward drops grad_out out, reduces and
// applies: three passes and up to three parallel regions over 64K elements. Here each task takes a block of
// columns (channels) over all rows: it draws the block's dropout keys once into its buffer, reduces, does the
// block's per-channel arithmetic and applies, while the block is still in cache (col_blocks sizes it to 256 KB).
// More rows do not fit and keep the two-pass route (a forward the same way gains nothing: Philox and the apply
// dominate it). Each channel's sums run in channel_sums'
// order (float within sum_rows_per_block-row blocks, double across them) and the per-channel arithmetic is
// bn_grad_coeffs (batch_norm.h) as on the two-pass route, so the bits are the two-pass route's.

namespace {

constexpr int64_t kRowsTaskBytes = int64_t(256) << 10;

// Column blocks: task t takes columns [c0(t), c0(t) + cols(t)) of all R rows.
struct ColBlocks {
  int64_t R, C, width, ntasks;
  int64_t c0(int64_t t) const { return t * width; }
  int64_t cols(int64_t t) const { return std::min(width, C - t * width); }
};

// The blocks for this shape, or width 0 where the route does not apply (fewer than 256 columns, or a block of 128
// columns already too big for cache). One block per thread where it fits in cache, else narrower ones: the split
// changes no bits (every channel is reduced and applied the same way whatever block it is in), and short rows of
// fewer than 128 columns (one Philox SIMD step) cost more per element.
inline ColBlocks col_blocks(const BnGeom& g, int64_t bytes_per_elem) {
  constexpr int64_t kMinCols = 128;
  const int64_t R = g.rows && g.C > 0 ? g.numel / g.C : 0;
  if (!g.rows || g.C < 2 * kMinCols || R * kMinCols * bytes_per_elem > kRowsTaskBytes) return {R, g.C, 0, 0};
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = (g.C + threads - 1) / threads;
  int64_t w = std::max(kMinCols, (per_thread + 7) / 8 * 8);
  while (R * w * bytes_per_elem > kRowsTaskBytes) w = std::max(kMinCols, (w / 2 + 7) / 8 * 8);
  return {R, g.C, w, (g.C + w - 1) / w};
}

// Sums (d1, d2) of columns [c0, c0 + w) over all rows, in channel_sums' order. With dropout keys, row r's keys go
// to keys + r * kstride (for the apply pass to reuse).
template <typename acc_t, typename F>
void column_sums(const BnGeom& g, F& f, int64_t R, int64_t c0, int64_t w, uint16_t* keys, int64_t kstride,
                 acc_t* l1, acc_t* l2, double* d1, double* d2) {
  const int64_t rpb = sum_rows_per_block(g.C);
  std::fill(d1, d1 + w, 0.0);
  std::fill(d2, d2 + w, 0.0);
  for (int64_t r0 = 0; r0 < R; r0 += rpb) {
    std::fill(l1, l1 + w, acc_t(0));
    std::fill(l2, l2 + w, acc_t(0));
    for (int64_t r = r0; r < std::min(R, r0 + rpb); ++r) {
      const int64_t i0 = r * g.C + c0;
      if constexpr (F::kKeys) f.begin(keys + r * kstride, i0, w);
#pragma GCC ivdep
      for (int64_t c = 0; c < w; ++c) f.pair(c, i0 + c, c0 + c, l1[c], l2[c]);
    }
    for (int64_t c = 0; c < w; ++c) d1[c] += l1[c], d2[c] += l2[c];
  }
}

// Per-thread scratch of a rows task: accumulators and dropout keys.
template <typename acc_t>
struct RowsScratch {
  std::vector<acc_t> l1, l2;
  std::vector<double> d1, d2;
  std::vector<uint16_t> keys;
  RowsScratch(int64_t w, int64_t nkeys) : l1(w), l2(w), d1(w), d2(w), keys(nkeys) {}
};

}  // namespace

// Training backward with the input's gradient: (grad_input, grad_weight, grad_bias (both of the accumulation type;
// empty where not asked for), grad of the residual (the g of GradApplyOp; empty unless need_g)).
Tensor4 bn_train_rows_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                   const c10::optional<at::Tensor>& out, const at::Tensor& weight,
                                   const at::Tensor& mean, const at::Tensor& var, double eps, bool pre_relu,
                                   bool post_relu, double p, int64_t seed, int64_t offset, bool need_gw, bool need_gb,
                                   bool need_g) {
  check_grad_inputs(grad_out, x, out, post_relu);
  const BnGeom g = bn_geometry(x);
  const ColBlocks cb = col_blocks(g, bn_rows_backward_bytes(x, post_relu, p));
  TORCH_CHECK(cb.width > 0 && g.numel > 0, "fastfuse bn_train_rows_backward: this shape takes the two-pass route");
  if (weight.defined()) check_vec(weight, x, "weight");
  check_vec(mean, x, "mean");
  check_vec(var, x, "var");
  const auto acc = bn_acc_type(x);
  at::Tensor gw = at::empty({need_gw ? g.C : 0}, x.options().dtype(acc));
  at::Tensor gb = at::empty({need_gb ? g.C : 0}, x.options().dtype(acc));
  at::Tensor gi = empty_like_output(x);
  at::Tensor gout = need_g ? empty_like_output(x) : x.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastfuse_bn_train_rows_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* vp = var.const_data_ptr<acc_t>();
    const acc_t* wp = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    acc_t* gwp = need_gw ? gw.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* gbp = need_gb ? gb.mutable_data_ptr<acc_t>() : nullptr;
    const acc_t e = static_cast<acc_t>(eps), nn = static_cast<acc_t>(cb.R);
    std::vector<acc_t> k1(g.C), k2(g.C), k3(g.C);
    auto run = [&](auto mask_c, auto g_c) {
      constexpr int kMask = decltype(mask_c)::value;
      const auto [fr, fa] = grad_ops<scalar_t, kMask, decltype(g_c)::value>(grad_out, x, out, mp, k1, k2, k3, gi,
                                                                            gout, pre_relu, p, seed, offset);
      constexpr bool kKeys = GradReduceOp<scalar_t, kMask>::kKeys;
      const int64_t kstride = cb.width + kKeyPad;
      at::parallel_for(0, cb.ntasks, grain_for(cb.ntasks, cb.R * cb.width, kKeys), [&](int64_t t0, int64_t t1) {
        RowsScratch<acc_t> s(cb.width, kKeys ? cb.R * kstride : 0);
        auto r = fr;
        auto a = fa;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t c0 = cb.c0(t), w = cb.cols(t);
          column_sums<acc_t>(g, r, cb.R, c0, w, s.keys.data(), kstride, s.l1.data(), s.l2.data(), s.d1.data(),
                             s.d2.data());
          for (int64_t j = 0; j < w; ++j) {  // on the sums rounded as bn_grad_reduce's
            const int64_t c = c0 + j;
            const acc_t sg = static_cast<acc_t>(s.d1[j]), sgx = static_cast<acc_t>(s.d2[j]);
            const auto q = bn_grad_coeffs(vp[c], wp ? wp + c : nullptr, e, sg, sgx, nn);
            k1[c] = q.k1, k2[c] = q.k2, k3[c] = q.k3;
            if (gwp) gwp[c] = sgx * q.invstd;
            if (gbp) gbp[c] = sg;
          }
          for (int64_t row = 0; row < cb.R; ++row) {
            const int64_t i0 = row * g.C + c0;
            if constexpr (kKeys) a.reuse(s.keys.data() + row * kstride, i0);
            a.row(0, i0, w, c0);
          }
        }
      });
    };
    with_mask_kind(post_relu, p, [&](auto mask_c) {
      need_g ? run(mask_c, std::true_type()) : run(mask_c, std::false_type());
    });
  });
  return {gi, gw, gb, gout};
}

}  // namespace FF_BN_NS
}  // namespace fastfuse
