// Design (a) on CPU, a reflected im2col of a few images at a time and one GEMM per task (no vendor
// convolution), and the same gathered GEMM over (b)'s frame regions where (b) cannot correct in place.
#include <ATen/Dispatch.h>

#include "cpu/reflect_conv2d_cpu.h"

namespace fastfuse {
namespace rconv_cpu {
namespace {

struct Task {
  int64_t region, p0, p1;  // GEMM rows [p0, p1) of regions[region]; row p = (n * R + r) * Cc + c
};

// Forward tasks, largest first. Design (b): rows of one region in even pieces of at most kTaskRows (and
// kTaskElems). Design (a): whole images, evenly split the same way.
std::vector<Task> make_tasks(const Geom& g, const std::vector<Region>& regions, bool gemm) {
  std::vector<Task> tasks;
  for (int64_t i = 0; i < (int64_t)regions.size(); ++i) {
    const int64_t img = regions[i].rows() * regions[i].cols(), np = g.N * img;
    const int64_t max_rows = std::max<int64_t>(1, std::min(kTaskRows, kTaskElems / (regions[i].taps.n * g.Cg * g.G)));
    int64_t step;
    if (gemm) {  // whole images: as many as fit, then spread evenly (16 images: 8 x 2, not 5 x 3 + 1)
      const int64_t ntask = (g.N + std::max<int64_t>(1, max_rows / img) - 1) / std::max<int64_t>(1, max_rows / img);
      step = (g.N + ntask - 1) / ntask * img;
    } else {
      const int64_t ntask = std::max<int64_t>(1, (np + max_rows - 1) / max_rows);
      step = (np + ntask - 1) / ntask;
    }
    for (int64_t p = 0; p < np; p += step) tasks.push_back({i, p, std::min(np, p + step)});
  }
  std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& b) {
    return (a.p1 - a.p0) * regions[a.region].taps.n > (b.p1 - b.p0) * regions[b.region].taps.n;
  });
  return tasks;
}

// Largest gathered matrix of any task, in elements: each thread allocates its scratch once and reuses it
// (a fresh multi-MB buffer per task is a fresh mmap, whose page faults showed up in profiles).
int64_t max_gather(const Geom& g, const std::vector<Region>& regions, const std::vector<Task>& tasks) {
  int64_t m = 0;
  for (const Task& t : tasks) m = std::max(m, g.G * (t.p1 - t.p0) * regions[t.region].taps.n * g.Cg);
  return m;
}

int64_t max_rows(const std::vector<Task>& tasks) {
  int64_t m = 0;
  for (const Task& t : tasks) m = std::max(m, t.p1 - t.p0);
  return m;
}

}  // namespace

void add_gathered(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, at::Tensor& out,
                  const Geom& g, bool gemm) {
  const auto acc = rconv::acc_type(x.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  const bool direct = direct_rows(g, gemm, out, acc);
  const auto regions = regions_for(g, gemm);
  const auto tasks = make_tasks(g, regions, gemm);
  const auto cols = region_columns(w, g, regions);
  const at::Tensor out_rows = direct ? pixel_rows(out) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "reflect_conv2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    struct Scratch {
      at::Tensor A, C;
    };
    const int64_t gather_max = max_gather(g, regions, tasks), rows_max = max_rows(tasks);
    for_each_task(
        (int64_t)tasks.size(),
        [&] {
          return Scratch{empty_cached({gather_max}, acc),
                         direct ? at::Tensor() : empty_cached({g.OC * rows_max}, acc)};
        },
        [&](Scratch& sc, int64_t i) {
          const Task& tk = tasks[i];
          const Region& reg = regions[tk.region];
          const int64_t rows = tk.p1 - tk.p0;
          at::Tensor A = scratch(sc.A, g.G, rows, reg.taps.n * g.Cg);
          gather_x<scalar_t, acc_t>(xp, x.strides(), A.mutable_data_ptr<acc_t>(), g, reg, tk.p0, tk.p1);
          if (direct) {
            at::Tensor o = out_rows.narrow(0, tk.p0, rows);
            const at::Tensor wt = cols[tk.region].select(0, 0).t();
            if (has_bias) {
              o.copy_(bias->view({1, g.OC}).expand_as(o));
              o.addmm_(A.select(0, 0), wt);
            } else {
              at::mm_out(o, A.select(0, 0), wt);
            }
            return;
          }
          at::Tensor corr = scratch(sc.C, g.G, rows, g.OCg);
          at::bmm_out(corr, A, cols[tk.region].transpose(1, 2));
          add_out<scalar_t, acc_t>(op, out.strides(), corr.const_data_ptr<acc_t>(), g, reg, tk.p0, tk.p1);
        });
  });
}

int64_t gemm_tasks(const Geom& g) { return (int64_t)make_tasks(g, {rconv::whole(g)}, true).size(); }

at::Tensor forward_gemm(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                        const Geom& g) {
  at::Tensor out = empty_out(g, x, w);
  if (!direct_rows(g, true, out, rconv::acc_type(x.scalar_type()))) {  // else each task writes its rows whole
    if (bias.has_value() && bias->defined())
      out.copy_(bias->view({1, g.OC, 1, 1}).expand_as(out));
    else
      out.zero_();
  }
  if (out.numel() == 0) return out;
  if (columns_apply(x, w))
    add_columns(x, w, out, g);
  else
    add_gathered(x, w, bias, out, g, true);
  return out;
}

}  // namespace rconv_cpu
}  // namespace fastfuse
