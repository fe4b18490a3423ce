// Design (c)'s plan on CPU, shared by its forward (reflect_conv2d_split.cpp) and backward
// (reflect_conv2d_split_backward.cpp): the block of the output that the vendor's convolution without padding gets
// right, the frame regions with their folded taps, and the weight runs their GEMMs multiply.
#pragma once
#include "cpu/reflect_conv2d_cpu.h"

namespace fastfuse {
namespace rconv_cpu {


struct SplitPlan {
  int64_t r0 = 0, r1 = 0, c0 = 0, c1 = 0;  // the convolution's block of the output; empty: no convolution
  int64_t ri = 0, ci = 0;                  // where in x its input starts (row, column)
  std::vector<Region> regions;             // the rest; taps = one representative per folded class
  std::vector<std::vector<std::pair<uint64_t, uint64_t>>> folds;  // per region tap: (kh mask, kw mask) summed
  bool has_block() const { return r1 > r0 && c1 > c0; }
};

// The block (use_block) and the frame regions, each region tap one folded class of taps that read one input pixel.
SplitPlan split_plan(const Geom& g, bool use_block);

// Weight runs of the regions: taps [t0, t0 + nt) of a region multiply nt consecutive [OC, Cg] slices, at
// off in the tap-major weight [OC, KH*KW, Cg] (unfolded taps in tap order) or in the table of folded sums
// [OC, E, Cg]; one GEMM per run and group, accumulating. The table holds each distinct sequence of
// (kh mask, kw mask) taps once (top and bottom edges share theirs), so it costs a few weight-sized passes at
// most instead of one per region (at 7x7, 512 channels, per-region copies took longer than the GEMMs).
struct WeightRun {
  int t0, nt;
  bool table;
  int64_t off;  // in slices
};

struct SplitWeights {
  at::Tensor w_tap, table;
  std::vector<std::vector<WeightRun>> runs;  // per region
};

template <typename acc_t>
inline void fill_table(const at::Tensor& w_tap, at::Tensor& table, const Geom& g,
                const std::vector<std::pair<uint64_t, uint64_t>>& entries) {
  const int64_t KK = g.KH * g.KW, E = (int64_t)entries.size();
  const acc_t* src = w_tap.const_data_ptr<acc_t>();
  acc_t* dst = table.mutable_data_ptr<acc_t>();
  // in parallel: serial, the 11 MB table of 7x7 with 512 channels took ~0.6 ms, ~3% of a quiet forward
  at::parallel_for(0, g.OC, std::max<int64_t>(1, 65536 / (E * g.Cg)), [&](int64_t oc0, int64_t oc1) {
  for (int64_t oc = oc0; oc < oc1; ++oc)
    for (int64_t e = 0; e < E; ++e) {
      acc_t* __restrict__ d = dst + (oc * E + e) * g.Cg;
      bool first = true;
      for (int kh = 0; kh < g.KH; ++kh)
        for (int kw = 0; kw < g.KW; ++kw) {
          if (!(entries[e].first >> kh & 1) || !(entries[e].second >> kw & 1)) continue;
          const acc_t* __restrict__ s = src + (oc * KK + kh * g.KW + kw) * g.Cg;
          if (first)
            std::memcpy(d, s, g.Cg * sizeof(acc_t));
          else
            for (int64_t c = 0; c < g.Cg; ++c) d[c] += s[c];
          first = false;
        }
    }
  });
}

template <typename acc_t>
inline SplitWeights split_weights(const at::Tensor& w, const Geom& g, const SplitPlan& sp) {
  SplitWeights sw;
  sw.w_tap = tap_major(w, g);
  std::vector<std::pair<uint64_t, uint64_t>> entries;
  std::vector<std::pair<std::vector<std::pair<uint64_t, uint64_t>>, int64_t>> seqs;  // sequence -> its offset
  for (size_t i = 0; i < sp.regions.size(); ++i) {
    const auto& f = sp.folds[i];
    const int n = sp.regions[i].taps.n;
    int plain = 0;  // leading unfolded taps that are consecutive in the weight
    auto tap_of = [&](int t) { return __builtin_ctzll(f[t].first) * g.KW + __builtin_ctzll(f[t].second); };
    auto single = [&](int t) { return __builtin_popcountll(f[t].first) * __builtin_popcountll(f[t].second) == 1; };
    while (plain < n && single(plain) && (plain == 0 || tap_of(plain) == tap_of(plain - 1) + 1)) ++plain;
    std::vector<WeightRun> runs;
    if (plain) runs.push_back({0, plain, false, tap_of(0)});
    if (plain < n) {
      std::vector<std::pair<uint64_t, uint64_t>> seq(f.begin() + plain, f.end());
      auto it = std::find_if(seqs.begin(), seqs.end(), [&](const auto& q) { return q.first == seq; });
      int64_t off;
      if (it != seqs.end()) {
        off = it->second;
      } else {
        off = (int64_t)entries.size();
        entries.insert(entries.end(), seq.begin(), seq.end());
        seqs.emplace_back(std::move(seq), off);
      }
      runs.push_back({plain, n - plain, true, off});
    }
    sw.runs.push_back(std::move(runs));
  }
  if (!entries.empty()) {
    sw.table = empty_cached({g.OC, (int64_t)entries.size(), g.Cg}, sw.w_tap.scalar_type());
    fill_table<acc_t>(sw.w_tap, sw.table, g, entries);
  }
  return sw;
}

// Group gi's [OCg, nt*Cg] weight of one run, as a [G, OCg, nt*Cg] strided view (no copy).
at::Tensor run_weight(const SplitWeights& sw, const Geom& g, const WeightRun& run);

// res = A [G, rows, T*Cg] times the region's weight runs (group gi's [OCg, T*Cg]), as [G, rows, OCg]: one
// batched GEMM per run on strided views (no copies), the later ones accumulating.
void region_gemm(const at::Tensor& A, at::Tensor& res, const Geom& g, const SplitWeights& sw,
                 const std::vector<WeightRun>& runs);

// Regions with the same folded taps (top and bottom edges, left and right, the four corners) share their
// weight runs, so their rows go through one GEMM: MKL packs the weight once per GEMM call, and at 7x7 with 512
// channels packing it per region and task took a sixth of the GEMM time.
std::vector<std::vector<int>> tap_groups(const SplitPlan& sp);

}  // namespace rconv_cpu
}  // namespace fastfuse
