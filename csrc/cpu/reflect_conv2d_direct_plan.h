// The direct design's plan (reflect_conv2d_direct.cpp, reflect_conv2d_direct_wgrad.cpp): what is computed cut into
// rectangles whose pixels read through the same folded taps, each tap's source at the rectangle's first pixel and
// its steps along rows and columns.
#pragma once
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu/reflect_conv2d_direct_kernel.h"
#include "reflect_conv2d.h"

namespace fastfuse {
namespace rconv_direct {

using rconv::reflect;

// Along one axis, at one coordinate of what is computed: a class of kernel taps (mask) that read one source
// coordinate, and the step of that source per step of the coordinate (0: the class holds both a reflected and an
// unreflected read, so it exists at this coordinate only).
struct AxisClass {
  uint64_t mask;
  int64_t src, slope;
  bool operator==(const AxisClass& o) const { return mask == o.mask && slope == o.slope; }
};
using AxisPlan = std::vector<std::vector<AxisClass>>;  // per coordinate, classes in order of their first tap

inline void add_read(std::vector<AxisClass>& cls, int t, int64_t src, int64_t slope) {
  for (AxisClass& c : cls)
    if (c.src == src) {
      c.mask |= uint64_t(1) << t;
      if (c.slope != slope) c.slope = 0;
      return;
    }
  cls.push_back({uint64_t(1) << t, src, slope});
}

// Forward: output o reads input reflect(o*s - p + t*d), which moves by s, or by -s where reflected.
inline AxisPlan forward_axis(int64_t out, int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  AxisPlan ax(out);
  for (int64_t o = 0; o < out; ++o)
    for (int t = 0; t < k; ++t) {
      const int64_t u = o * s - p + t * d, i = reflect(u, in);
      add_read(ax[o], t, i, u == i ? s : -s);
    }
  return ax;
}

// grad_input at stride s, on the input pixels i = rho + s*m (one residue rho of the stride; m is the coordinate
// computed): i gathers grad_output o through tap t wherever reflect(o*s - p + t*d) = i, and o moves by one per step
// of m, or against it where the read was reflected.
inline AxisPlan dgrad_axis(int64_t in, int64_t out, int64_t k, int64_t s, int64_t rho, int64_t p, int64_t d) {
  AxisPlan ax((in - rho + s - 1) / s);
  for (int t = 0; t < k; ++t)
    for (int64_t o = 0; o < out; ++o) {
      const int64_t u = o * s - p + t * d, i = reflect(u, in);
      if ((i - rho) % s == 0) add_read(ax[(i - rho) / s], t, o, u == i ? 1 : -1);
    }
  for (auto& cls : ax)  // in order of their first tap, as the forward's
    std::stable_sort(cls.begin(), cls.end(), [](const AxisClass& a, const AxisClass& b) {
      return __builtin_ctzll(a.mask) < __builtin_ctzll(b.mask);
    });
  return ax;
}

// Runs of coordinates [b, e) whose classes continue the first one's: same masks and slopes, sources moved on.
inline std::vector<std::pair<int64_t, int64_t>> axis_runs(const AxisPlan& ax) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t o = 0; o < (int64_t)ax.size(); ++o) {
    bool joins = !runs.empty() && ax[o] == ax[o - 1];
    for (size_t c = 0; joins && c < ax[o].size(); ++c)
      joins = ax[o][c].slope != 0 && ax[o][c].src == ax[o - 1][c].src + ax[o][c].slope;
    if (joins)
      runs.back().second = o + 1;
    else
      runs.emplace_back(o, o + 1);
  }
  return runs;
}

// A rectangle of what is computed whose pixels read through the same folded taps, each tap's source at the first
// pixel and its steps; and the axis its lines run along: columns (0), rows (1), or across the images (2), whichever
// gives the kernel the most pixels per call among those along which every tap's source moves by one step.
struct LineTap {
  uint64_t mh, mw;
  int64_t r, c, sr, sc;
  bool single() const { return __builtin_popcountll(mh) == 1 && __builtin_popcountll(mw) == 1; }  // not folded
};
struct DRegion {
  int64_t r0, r1, c0, c1;
  int axis;
  std::vector<LineTap> taps;  // single taps first (the kernel's branch-free loop), each group in tap order
  int64_t rows() const { return r1 - r0; }
  int64_t cols() const { return c1 - c0; }
};

inline int64_t per_call(int64_t n) { return n / ((n + kMaxM - 1) / kMaxM); }  // even pieces of at most kMaxM

inline std::vector<DRegion> direct_plan(const AxisPlan& rows, const AxisPlan& cols, int64_t N) {
  std::vector<DRegion> regions;
  for (const auto& [r0, r1] : axis_runs(rows))
    for (const auto& [c0, c1] : axis_runs(cols)) {
      DRegion reg{r0, r1, c0, c1, 2, {}};
      for (bool single : {true, false})
        for (const AxisClass& h : rows[r0])
          for (const AxisClass& w : cols[c0]) {
            const LineTap t{h.mask, w.mask, h.src, w.src, h.slope, w.slope};
            if (t.single() == single) reg.taps.push_back(t);
          }
      bool row_step = true, col_step = true;
      for (const LineTap& t : reg.taps) {
        row_step &= t.sr == reg.taps[0].sr;
        col_step &= t.sc == reg.taps[0].sc;
      }
      int64_t best = per_call(N);
      if ((reg.rows() == 1 || row_step) && per_call(reg.rows()) >= best) reg.axis = 1, best = per_call(reg.rows());
      if ((reg.cols() == 1 || col_step) && per_call(reg.cols()) >= best) reg.axis = 0;
      regions.push_back(std::move(reg));
    }
  return regions;
}

}  // namespace rconv_direct
}  // namespace fastfuse
