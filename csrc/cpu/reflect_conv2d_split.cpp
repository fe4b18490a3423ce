// Design (c)'s forward on CPU: the vendor's convolution without padding on the block of the output it
// gets right, our GEMM with every tap on the rest; and "fold", that GEMM on every pixel. (b) pays the
// zero-padded conv plus the frame's reflected taps again (4.7% more multiply-adds at 28x28, 18% at 7x7); here
// each output pixel is computed once. On the frame, taps that the reflection sends to one input pixel are
// folded into one (3x3, top row: W0 x1 + W1 x0 + W2 x1 = W1 x0 + (W0 + W2) x1), so the frame has as many
// multiply-adds as the zero-padded conv's in-bounds taps.
#include <ATen/Dispatch.h>

#include "cpu/reflect_conv2d_split.h"

namespace fastfuse {
namespace rconv_cpu {
namespace {

// Along one axis, the kernel taps of output o grouped by the input pixel they read (bitmasks, in order of
// their first tap), and runs of outputs with the same grouping and the same block membership.
struct AxisRun {
  int64_t b, e;
  bool block;
  std::vector<uint64_t> classes;
};

std::vector<AxisRun> axis_runs(int64_t out, int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, int64_t b0,
                               int64_t b1) {
  std::vector<AxisRun> runs;
  for (int64_t o = 0; o < out; ++o) {
    std::vector<int64_t> src;
    std::vector<uint64_t> cls;
    for (int64_t t = 0; t < k; ++t) {
      const int64_t i = reflect(o * s - p + t * d, in);
      const auto it = std::find(src.begin(), src.end(), i);
      if (it == src.end()) {
        src.push_back(i);
        cls.push_back(uint64_t(1) << t);
      } else {
        cls[it - src.begin()] |= uint64_t(1) << t;
      }
    }
    const bool blk = o >= b0 && o < b1;
    if (!runs.empty() && runs.back().e == o && runs.back().block == blk && runs.back().classes == cls)
      runs.back().e = o + 1;
    else
      runs.push_back({o, o + 1, blk, std::move(cls)});
  }
  return runs;
}

// The outputs [b0, b1) along one axis that a convolution without padding gives, and the input offset i0 it starts
// at: output o reads o*s - p + t*d = (o - b0)*s + i0 + t*d from the first o whose window starts inside the input.
// Where s divides p, i0 = 0 and the convolution reads x in place; else it reads x narrowed by i0, which oneDNN
// copies first: slower than the other designs at ResNet's stride-2 3x3 shapes (README), but cheap for a
// 3-channel stem.
struct BlockRange {
  int64_t b0 = 0, b1 = 0, i0 = 0;
};
BlockRange block_range(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  const int64_t span = d * (k - 1) + 1, b0 = (p + s - 1) / s, i0 = b0 * s - p;
  if (in - i0 < span) return {};
  return {b0, b0 + (in - i0 - span) / s + 1, i0};
}

}  // namespace

SplitPlan split_plan(const Geom& g, bool use_block) {
  SplitPlan sp;
  if (use_block) {
    const BlockRange r = block_range(g.H, g.KH, g.sh, g.ph, g.dh);
    const BlockRange c = block_range(g.W, g.KW, g.sw, g.pw, g.dw);
    sp.r0 = r.b0, sp.r1 = r.b1, sp.ri = r.i0, sp.c0 = c.b0, sp.c1 = c.b1, sp.ci = c.i0;
    if (!sp.has_block()) sp.r0 = sp.r1 = sp.c0 = sp.c1 = sp.ri = sp.ci = 0;
  }
  const auto rows = axis_runs(g.OH, g.H, g.KH, g.sh, g.ph, g.dh, sp.r0, sp.r1);
  const auto cols = axis_runs(g.OW, g.W, g.KW, g.sw, g.pw, g.dw, sp.c0, sp.c1);
  for (const AxisRun& rr : rows)
    for (const AxisRun& cr : cols) {
      if (rr.block && cr.block) continue;
      Region reg{rr.b, rr.e, cr.b, cr.e, {}};
      std::vector<std::pair<uint64_t, uint64_t>> fold;
      for (int folded = 0; folded < 2; ++folded)  // unfolded taps first, in tap order: one run of the weight
        for (uint64_t mh : rr.classes)
          for (uint64_t mw : cr.classes) {
            if ((__builtin_popcountll(mh) * __builtin_popcountll(mw) > 1) != bool(folded)) continue;
            reg.taps.kh[reg.taps.n] = __builtin_ctzll(mh);
            reg.taps.kw[reg.taps.n] = __builtin_ctzll(mw);
            ++reg.taps.n;
            fold.emplace_back(mh, mw);
          }
      sp.regions.push_back(reg);
      sp.folds.push_back(std::move(fold));
    }
  return sp;
}

at::Tensor run_weight(const SplitWeights& sw, const Geom& g, const WeightRun& run) {
  const at::Tensor& src = run.table ? sw.table : sw.w_tap;  // [OC, slices, Cg]
  const int64_t ld = src.size(1) * g.Cg;                    // slices [off, off + nt)
  return src.as_strided({g.G, g.OCg, run.nt * g.Cg}, {g.OCg * ld, ld, 1}, src.storage_offset() + run.off * g.Cg);
}

void region_gemm(const at::Tensor& A, at::Tensor& res, const Geom& g, const SplitWeights& sw,
                 const std::vector<WeightRun>& runs) {
  for (size_t r = 0; r < runs.size(); ++r) {
    const WeightRun& run = runs[r];
    const at::Tensor b = run_weight(sw, g, run);
    const at::Tensor a = A.narrow(2, run.t0 * g.Cg, run.nt * g.Cg);
    if (r == 0)
      at::bmm_out(res, a, b.transpose(1, 2));
    else
      res.baddbmm_(a, b.transpose(1, 2));
  }
}

std::vector<std::vector<int>> tap_groups(const SplitPlan& sp) {
  std::vector<std::vector<int>> groups;
  for (int i = 0; i < (int)sp.regions.size(); ++i) {
    const auto same = [&](const std::vector<int>& q) { return sp.folds[q[0]] == sp.folds[i]; };
    const auto it = std::find_if(groups.begin(), groups.end(), same);
    if (it == groups.end())
      groups.push_back({i});
    else
      it->push_back(i);
  }
  return groups;
}

namespace {

struct GroupTask {
  int64_t group, q0, q1;  // rows [q0, q1) of the group's regions' GEMM rows, one region after the other
};

int64_t group_rows(const Geom& g, const SplitPlan& sp, const std::vector<int>& group) {
  int64_t n = 0;
  for (int r : group) n += g.N * sp.regions[r].rows() * sp.regions[r].cols();
  return n;
}

// Even pieces of at most kTaskRows rows (and kTaskElems gathered elements) per group, largest first.
std::vector<GroupTask> group_tasks(const Geom& g, const SplitPlan& sp, const std::vector<std::vector<int>>& groups) {
  std::vector<GroupTask> tasks;
  for (int64_t i = 0; i < (int64_t)groups.size(); ++i) {
    const int64_t np = group_rows(g, sp, groups[i]), k = sp.regions[groups[i][0]].taps.n * g.Cg * g.G;
    const int64_t max_rows = std::max<int64_t>(1, std::min(kTaskRows, kTaskElems / k));
    const int64_t ntask = std::max<int64_t>(1, (np + max_rows - 1) / max_rows), step = (np + ntask - 1) / ntask;
    for (int64_t q = 0; q < np; q += step) tasks.push_back({i, q, std::min(np, q + step)});
  }
  std::stable_sort(tasks.begin(), tasks.end(), [&](const GroupTask& a, const GroupTask& b) {
    return (a.q1 - a.q0) * sp.regions[groups[a.group][0]].taps.n >
           (b.q1 - b.q0) * sp.regions[groups[b.group][0]].taps.n;
  });
  return tasks;
}

// Calls fn(region, p0, p1, row) for each region's share [p0, p1) of the group rows [q0, q1), row = its first
// row in the task.
template <typename Fn>
void for_pieces(const Geom& g, const SplitPlan& sp, const std::vector<int>& group, int64_t q0, int64_t q1,
                const Fn& fn) {
  int64_t base = 0;
  for (int r : group) {
    const int64_t np = g.N * sp.regions[r].rows() * sp.regions[r].cols();
    const int64_t lo = std::max(q0, base), hi = std::min(q1, base + np);
    if (lo < hi) fn(sp.regions[r], lo - base, hi - base, lo - q0);
    base += np;
  }
}

}  // namespace

int64_t fold_tasks(const Geom& g) {
  const SplitPlan sp = split_plan(g, false);
  return (int64_t)group_tasks(g, sp, tap_groups(sp)).size();
}

// Design (c)'s forward: the block by the vendor's convolution without padding, copied into the output, and
// every other pixel by a gathered GEMM with the folded taps, written with the bias; all of it as tasks of one
// parallel region.
at::Tensor forward_split(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                         const Geom& g, at::IntArrayRef stride, at::IntArrayRef dilation, bool use_block) {
  const SplitPlan sp = split_plan(g, use_block);
  at::Tensor out = empty_out(g, x, w);
  if (out.numel() == 0) return out;
  // The block's convolution runs as tasks of whole images in the GEMMs' parallel region (oneDNN runs
  // single-threaded inside it), each copying its images into the output while they are in cache: with
  // oneDNN's own parallel region first, a thread that the shared machine preempted held up both regions,
  // and the GEMMs could not fill the other thread's wait. Chunks of kConvImages images (a function of the
  // shape only: oneDNN's results are not always the same bits for another batch size) cost the same per
  // image as one call here; single images cost 10-20% more.
  const at::Tensor inner = sp.has_block() ? out.slice(2, sp.r0, sp.r1).slice(3, sp.c0, sp.c1) : at::Tensor();
  const int64_t chunks = sp.has_block() ? (g.N + kConvImages - 1) / kConvImages : 0;
  const auto acc = rconv::acc_type(x.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bias_acc = has_bias ? bias->to(acc).contiguous() : at::Tensor();
  const auto groups = tap_groups(sp);
  const auto tasks = group_tasks(g, sp, groups);
  int64_t gather_max = 0, rows_max = 0;  // per-thread scratch, allocated once
  for (const GroupTask& t : tasks) {
    gather_max = std::max(gather_max, g.G * (t.q1 - t.q0) * sp.regions[groups[t.group][0]].taps.n * g.Cg);
    rows_max = std::max(rows_max, t.q1 - t.q0);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "reflect_conv2d_split_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SplitWeights sw = split_weights<acc_t>(w, g, sp);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t* bp = has_bias ? bias_acc.const_data_ptr<acc_t>() : nullptr;
    struct Scratch {
      at::Tensor A, C;
    };
    for_each_task(
        chunks + (int64_t)tasks.size(),
        [&] {
          return Scratch{empty_cached({gather_max}, acc), empty_cached({g.OC * rows_max}, acc)};
        },
        [&](Scratch& sc, int64_t i) {
          if (i < chunks) {  // the largest tasks first
            const int64_t n0 = i * g.N / chunks, n = (i + 1) * g.N / chunks - n0;
            inner.narrow(0, n0, n).copy_(at::convolution(x.narrow(0, n0, n).narrow(2, sp.ri, g.H - sp.ri)
                                                             .narrow(3, sp.ci, g.W - sp.ci),
                                                         w, bias, stride, {0, 0}, dilation, false, {0, 0}, g.G));
            return;
          }
          const GroupTask& tk = tasks[i - chunks];
          const auto& group = groups[tk.group];
          const int64_t rows = tk.q1 - tk.q0, K = sp.regions[group[0]].taps.n * g.Cg;
          at::Tensor A = scratch(sc.A, g.G, rows, K);
          acc_t* ap = A.mutable_data_ptr<acc_t>();
          for_pieces(g, sp, group, tk.q0, tk.q1, [&](const Region& reg, int64_t p0, int64_t p1, int64_t row) {
            gather_x<scalar_t, acc_t>(xp, x.strides(), ap + row * K, g, reg, p0, p1, rows);
          });
          at::Tensor res = scratch(sc.C, g.G, rows, g.OCg);
          region_gemm(A, res, g, sw, sw.runs[group[0]]);
          const acc_t* rp = res.const_data_ptr<acc_t>();
          for_pieces(g, sp, group, tk.q0, tk.q1, [&](const Region& reg, int64_t p0, int64_t p1, int64_t row) {
            add_out<scalar_t, acc_t>(op, out.strides(), rp + row * g.OCg, g, reg, p0, p1, true, bp, rows);
          });
        });
  });
  return out;
}

}  // namespace rconv_cpu
}  // namespace fastfuse
