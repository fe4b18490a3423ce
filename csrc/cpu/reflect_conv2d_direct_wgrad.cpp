// The direct design's weight gradient on CPU: fp32 channels_last, one group, AVX-512, any stride and dilation.
// grad_weight[oc, :, kh, kw] sums grad_output[n, r, c, oc] * x[n, reflect(r*s - p + kh*d), reflect(...), :] over the
// output pixels. The forward's plan (reflect_conv2d_direct_plan.h) cuts the output into rectangles whose pixels read
// through the same folded taps; a class of taps that read one pixel is summed once and added to each of its taps.
//
// The kernel holds up to 12 output channels times 32 input channels of a tap in registers (or of 2-3 taps whose
// sources lie one step apart, fewer channels each) and steps over pixels: grad_output's channels are broadcast
// (contiguous in channels_last, read at fixed offsets), x's 32 channels are two vector loads. Tasks own disjoint
// blocks of grad_weight and go through the images in a fixed order, so no sum depends on the thread count or the
// run, and nothing is reduced across threads.
#include "cpu/reflect_conv2d_cpu.h"
#include "cpu/reflect_conv2d_direct_plan.h"

namespace fastfuse {
namespace rconv_cpu {
namespace {

using namespace rconv_direct;

// The pixels of one call: images, rows, columns, and the steps of x and grad_output per each (floats)
struct Walk {
  int64_t n, r, c;
  int64_t xn, xr, xc, gn, gr, gc;
};

// Runs of taps: T single taps whose sources lie one step apart along the walk's columns (3x3 at stride 1: kw = 0, 1,
// 2 of one kh; at stride 2: kw = 0 and 2) share each step's grad_output broadcasts and x vectors, tap i+1's pixel
// being tap i's at the next step: fewer loads per multiply-add than a tap at a time. Output channels per call at
// most kRunCap[T - 1] (T x M x NV accumulators).
constexpr int kMaxRun = 3;
constexpr int kRunCap[kMaxRun] = {kMaxM, 6, 4};
// output channels per block of grad_weight (of the 14 a lone tap could hold): runs of 2 and 3 split a block into 2
// and 3 calls
constexpr int64_t kBlock = 12;

// vector v of NV of a tile's pixel: the last one masked where the tile is partial
template <bool Masked, int NV>
__attribute__((target("avx512f"), always_inline)) inline __m512 tile_load(const float* p, int v, __mmask16 mask) {
  return Masked && v == NV - 1 ? _mm512_maskz_loadu_ps(mask, p + 16 * v) : _mm512_loadu_ps(p + 16 * v);
}

// dst[i][j * ds + lane] += sum over the walk of g[j] * x[i * xc + lane] for taps i < T, j < M (output channels) and
// NV vectors of 16 input channels (the last one's lanes past `mask` are neither read nor written); with T = 1, each
// of dst[0..nd) gets tap 0's sum (a folded class). Full tiles (Masked false) read without a mask: with a masked load
// in the loop the compiler stored every accumulator to the stack each step.
template <int T, int M, int NV, bool Masked>
__attribute__((target("avx512f"))) void wgrad_micro(const float* x, const float* g, const Walk& wk,
                                                     float* const* dst, int nd, int64_t ds, __mmask16 mask) {
  __m512 acc[T][M][NV];
  for (int i = 0; i < T; ++i)
    for (int j = 0; j < M; ++j)
      for (int v = 0; v < NV; ++v) acc[i][j][v] = _mm512_setzero_ps();
  // one loop over the rows of every image
  const int64_t rows = wk.n * wk.r, cols = wk.c, xc = wk.xc, gc = wk.gc;
  const float* xrow = x;
  const float* grow = g;
  for (int64_t q = 0, r = 0; q < rows; ++q) {
    const float* xp = xrow;
    const float* gp = grow;
    __m512 px[T][NV];  // px[i]: the pixel tap i reads at this step
    for (int i = 0; i + 1 < T; ++i)
      for (int v = 0; v < NV; ++v) px[i][v] = tile_load<Masked, NV>(xp + i * xc, v, mask);
    for (int64_t c = 0; c < cols; ++c, xp += xc, gp += gc) {
      for (int v = 0; v < NV; ++v) px[T - 1][v] = tile_load<Masked, NV>(xp + (T - 1) * xc, v, mask);
#pragma GCC unroll 16
      for (int j = 0; j < M; ++j) {
        const __m512 av = _mm512_set1_ps(gp[j]);
        for (int i = 0; i < T; ++i)
          for (int v = 0; v < NV; ++v) acc[i][j][v] = _mm512_fmadd_ps(av, px[i][v], acc[i][j][v]);
      }
      for (int i = 0; i + 1 < T; ++i)
        for (int v = 0; v < NV; ++v) px[i][v] = px[i + 1][v];
    }
    if (++r < wk.r) {
      xrow += wk.xr, grow += wk.gr;
    } else {  // the next image
      r = 0;
      xrow += wk.xn - (wk.r - 1) * wk.xr, grow += wk.gn - (wk.r - 1) * wk.gr;
    }
  }
  alignas(64) float sum[T][M][NV * 16];
  for (int i = 0; i < T; ++i)
    for (int j = 0; j < M; ++j)
      for (int v = 0; v < NV; ++v) _mm512_store_ps(&sum[i][j][16 * v], acc[i][j][v]);
  for (int d = 0; d < nd; ++d)
    for (int j = 0; j < M; ++j)
      for (int v = 0; v < NV; ++v) {
        float* p = dst[d] + j * ds + 16 * v;
        const __mmask16 m = v == NV - 1 ? mask : 0xffff;
        const float* add = &sum[T == 1 ? 0 : d][j][16 * v];
        _mm512_mask_storeu_ps(p, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, p), _mm512_load_ps(add)));
      }
}

using WMicro = void (*)(const float*, const float*, const Walk&, float* const*, int, int64_t, __mmask16);

template <int T, int NV, bool Masked, int... Ms>
constexpr std::array<WMicro, kMaxM + 1> wgrad_table(std::integer_sequence<int, Ms...>) {
  std::array<WMicro, kMaxM + 1> t{};
  ((t[Ms + 1] = &wgrad_micro<T, Ms + 1, NV, Masked>), ...);
  return t;
}
template <int T, int NV, bool Masked>
constexpr std::array<WMicro, kMaxM + 1> wgrad_row() {
  return wgrad_table<T, NV, Masked>(std::make_integer_sequence<int, kRunCap[T - 1]>());
}
// [T - 1][NV - 1][masked][M]
using WRow = std::array<WMicro, kMaxM + 1>;
const std::array<std::array<std::array<WRow, 2>, 2>, kMaxRun> kWgrad{{
    {{{wgrad_row<1, 1, false>(), wgrad_row<1, 1, true>()}, {wgrad_row<1, 2, false>(), wgrad_row<1, 2, true>()}}},
    {{{wgrad_row<2, 1, false>(), wgrad_row<2, 1, true>()}, {wgrad_row<2, 2, false>(), wgrad_row<2, 2, true>()}}},
    {{{wgrad_row<3, 1, false>(), wgrad_row<3, 1, true>()}, {wgrad_row<3, 2, false>(), wgrad_row<3, 2, true>()}}},
}};

// A region's taps as calls (indices into reg.taps): runs of up to max_run single taps one step apart along the
// columns, else one class
std::vector<std::vector<int>> tap_runs(const DRegion& reg, int max_run) {
  std::vector<bool> used(reg.taps.size());
  std::vector<std::vector<int>> runs;
  for (size_t a = 0; a < reg.taps.size(); ++a) {
    if (used[a]) continue;
    std::vector<int> run{int(a)};
    used[a] = true;
    const LineTap& A = reg.taps[a];
    if (A.single() && A.sc != 0 && reg.cols() > 1)
      for (bool grew = true; grew && (int)run.size() < max_run;) {
        grew = false;
        for (size_t b = 0; b < reg.taps.size() && !grew; ++b) {
          const LineTap& B = reg.taps[b];
          if (!used[b] && B.single() && B.r == A.r && B.sr == A.sr && B.sc == A.sc &&
              B.c == A.c + A.sc * (int64_t)run.size()) {
            run.push_back(int(b));
            used[b] = grew = true;
          }
        }
      }
    runs.push_back(std::move(run));
  }
  return runs;
}

// Regions of at least this many pixels per image run per chunk of images, while the chunk is in cache; the rest
// (the frame's edges and corners: few pixels per image, many classes) run across the whole batch, each call then
// summing enough pixels to pay for its read-modify-write of the grad_weight block.
constexpr int64_t kChunkRegionPixels = 64;

}  // namespace

at::Tensor wgrad_direct(const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, const Geom& g) {
  TORCH_CHECK(direct_grads_apply(g, go, x, w) && channels_last_fp32(go) && channels_last_fp32(x),
              "fastfuse reflect_conv2d: the direct grad_weight takes fp32 channels_last tensors with one group on an "
              "AVX-512 CPU");
  // [OC, KH, KW, C]: each block's rows are 32 contiguous input channels
  at::Tensor gw = empty_cached({g.OC, g.KH, g.KW, g.C}, at::kFloat);
  if (gw.numel() == 0 || go.numel() == 0) return gw.zero_().permute({0, 3, 1, 2});
  float* gwp = gw.mutable_data_ptr<float>();
  const auto regions = direct_plan(forward_axis(g.OH, g.H, g.KH, g.sh, g.ph, g.dh),
                                   forward_axis(g.OW, g.W, g.KW, g.sw, g.pw, g.dw), g.N);
  std::vector<std::vector<std::vector<int>>> runs;  // per region
  for (const DRegion& reg : regions) runs.push_back(tap_runs(reg, kMaxRun));
  const float* xp = x.const_data_ptr<float>();
  const float* gp = go.const_data_ptr<float>();
  const int64_t sN = x.stride(0), sH = x.stride(2), sW = x.stride(3);
  const int64_t dN = go.stride(0), dH = go.stride(2), dW = go.stride(3);
  const int64_t ds = g.KH * g.KW * g.C;  // grad_weight's step per output channel
  // output channels in even blocks of at most kBlock, input channels in tiles of 32
  const int64_t blocks = (g.OC + kBlock - 1) / kBlock, tiles = (g.C + kTile - 1) / kTile;
  const auto block = [&](int64_t b) { return std::make_pair(b * g.OC / blocks, (b + 1) * g.OC / blocks); };
  // tasks: a grid of block ranges x tile ranges (every split gives the same bits): a range of tiles per thread where
  // the tiles divide evenly (each task then reads its own channels of x: at 56x56, 2 tiles and 5 blocks, a 2 x 2 grid
  // gave one thread 6 of the 10 units), else about two tasks per thread
  const int64_t threads = at::get_num_threads();
  const bool even = tiles % threads == 0;
  const int64_t tsplit = even ? threads : std::min(tiles, 2 * threads);
  const int64_t bsplit = even ? 1 : std::min(blocks, (2 * threads + tsplit - 1) / tsplit);
  // Images per chunk: x's and grad_output's pixels of a chunk about kChunkBytes, and where one image is more, bands
  // of output rows of about that (both from the shape alone: they set the order of the sums, so they must not
  // depend on the task split). A chunk stays in L2 while every block and tile of the task walks it; a few MB would
  // leave the kernel waiting on memory, a much smaller one adds per-call overhead.
  constexpr int64_t kChunkBytes = int64_t(1) << 20;
  const int64_t img_bytes = 4 * (g.H * g.W * g.C + g.OH * g.OW * g.OC);
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / img_bytes);
  const int64_t band = img_bytes <= kChunkBytes ? g.OH : std::max<int64_t>(1, g.OH * kChunkBytes / img_bytes);
  for_each_task(
      bsplit * tsplit, [] { return 0; },
      [&](int&, int64_t ti) {
        const int64_t b0 = (ti / tsplit) * blocks / bsplit, b1 = (ti / tsplit + 1) * blocks / bsplit;
        const int64_t t0 = (ti % tsplit) * tiles / tsplit, t1 = (ti % tsplit + 1) * tiles / tsplit;
        const int64_t c0 = t0 * kTile, c1 = std::min(g.C, t1 * kTile);
        const int64_t oc0 = block(b0).first, oc1 = block(b1 - 1).second;
        for (int64_t oc = oc0; oc < oc1; ++oc)
          for (int64_t t = 0; t < g.KH * g.KW; ++t) std::fill_n(gwp + oc * ds + t * g.C + c0, c1 - c0, 0.0f);
        // rows [ra, rb) of a region over images [n0, n1), every block and tile of the task
        const auto run = [&](size_t ri, int64_t n0, int64_t n1, int64_t ra, int64_t rb) {
          const DRegion& reg = regions[ri];
          for (int64_t b = b0; b < b1; ++b)
            for (int64_t t = t0; t < t1; ++t) {
              const int64_t lanes = std::min(kTile, g.C - t * kTile);
              const __mmask16 mask = last_vector_mask(lanes);
              for (const std::vector<int>& tr : runs[ri]) {
                const int T = (int)tr.size();
                const LineTap& lt = reg.taps[tr[0]];
                const Walk wk{n1 - n0, rb - ra, reg.cols(), sN, lt.sr * sH, lt.sc * sW, dN, dH, dW};
                const auto [o0, o1] = block(b);
                const int64_t pieces = (o1 - o0 + kRunCap[T - 1] - 1) / kRunCap[T - 1];
                for (int64_t k = 0; k < pieces; ++k) {  // output channels [p0, p1) of the block
                  const int64_t p0 = o0 + k * (o1 - o0) / pieces, p1 = o0 + (k + 1) * (o1 - o0) / pieces;
                  float* dst[kMaxFold];
                  int nd = 0;
                  const auto tap_dst = [&](uint64_t mh, uint64_t mw) {
                    return gwp + p0 * ds + (__builtin_ctzll(mh) * g.KW + __builtin_ctzll(mw)) * g.C + t * kTile;
                  };
                  if (T == 1) {  // every tap of the class
                    for (uint64_t mh = lt.mh; mh; mh &= mh - 1)
                      for (uint64_t mw = lt.mw; mw; mw &= mw - 1) dst[nd++] = tap_dst(mh, mw);
                  } else {  // each tap of the run
                    for (int i : tr) dst[nd++] = tap_dst(reg.taps[i].mh, reg.taps[i].mw);
                  }
                  kWgrad[T - 1][lanes > 16][lanes % 16 != 0][p1 - p0](
                      xp + n0 * sN + (lt.r + lt.sr * (ra - reg.r0)) * sH + lt.c * sW + t * kTile,
                      gp + n0 * dN + ra * dH + reg.c0 * dW + p0,
                      wk, dst, nd, ds, mask);
                }
              }
            }
        };
        for (int64_t n0 = 0; n0 < g.N; n0 += chunk)
          for (int64_t r0 = 0; r0 < g.OH; r0 += band)
            for (size_t ri = 0; ri < regions.size(); ++ri) {
              const DRegion& reg = regions[ri];
              const int64_t ra = std::max(reg.r0, r0), rb = std::min(reg.r1, r0 + band);
              if (reg.rows() * reg.cols() >= kChunkRegionPixels && ra < rb)
                run(ri, n0, std::min(g.N, n0 + chunk), ra, rb);
            }
        for (size_t ri = 0; ri < regions.size(); ++ri)
          if (regions[ri].rows() * regions[ri].cols() < kChunkRegionPixels)
            run(ri, 0, g.N, regions[ri].r0, regions[ri].r1);
      });
  return gw.permute({0, 3, 1, 2});  // [OC, C, KH, KW], channels_last strides
}

}  // namespace rconv_cpu
}  // namespace fastfuse
