// Design (d)'s weight gradient on CPU: fp32 channels_last, one group, AVX-512, any stride and dilation.
// grad_weight[oc, :, kh, kw] sums grad_output[n, r, c, oc] * x[n, reflect(r*s - p + kh*d), reflect(...), :] over the
// output pixels. The forward's plan (reflect_conv2d_direct_plan.h) cuts the output into rectangles whose pixels read
// through the same folded taps; a class of taps that read one pixel is summed once and added to each of its taps.
//
// The kernel holds a block of up to kMaxM output channels times 32 input channels in registers and steps over
// pixels: grad_output's channels are broadcast (contiguous in channels_last, read at fixed offsets), x's 32 channels
// are two vector loads. Tasks own disjoint blocks of grad_weight and go through the images in a fixed order, so no
// sum depends on the thread count or the run, and nothing is reduced across threads.
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

// dst[d][j * ds + lane] += sum over the walk of g[j] * x[lane], for j < M (output channels) and NV vectors of 16
// input channels (the last one's lanes past `mask` are neither read nor written). Full tiles (Masked false) read
// without a mask: with a masked load in the loop the compiler stored every accumulator to the stack each step.
template <int M, int NV, bool Masked>
__attribute__((target("avx512f"))) void wgrad_micro(const float* x, const float* g, const Walk& wk,
                                                     float* const* dst, int nd, int64_t ds, __mmask16 mask) {
  __m512 acc[M][NV];
  for (int j = 0; j < M; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = _mm512_setzero_ps();
  // one loop over the rows of every image (a loop nest over images and rows kept acc on the stack)
  const int64_t rows = wk.n * wk.r, cols = wk.c, xc = wk.xc, gc = wk.gc;
  const float* xrow = x;
  const float* grow = g;
  for (int64_t q = 0, r = 0; q < rows; ++q) {
    const float* xp = xrow;
    const float* gp = grow;
    for (int64_t c = 0; c < cols; ++c, xp += xc, gp += gc) {
      __m512 bv[NV];
      for (int v = 0; v < NV; ++v)
        bv[v] = Masked && v == NV - 1 ? _mm512_maskz_loadu_ps(mask, xp + 16 * v) : _mm512_loadu_ps(xp + 16 * v);
#pragma GCC unroll 16
      for (int j = 0; j < M; ++j) {
        const __m512 av = _mm512_set1_ps(gp[j]);
        for (int v = 0; v < NV; ++v) acc[j][v] = _mm512_fmadd_ps(av, bv[v], acc[j][v]);
      }
    }
    if (++r < wk.r) {
      xrow += wk.xr, grow += wk.gr;
    } else {  // the next image
      r = 0;
      xrow += wk.xn - (wk.r - 1) * wk.xr, grow += wk.gn - (wk.r - 1) * wk.gr;
    }
  }
  alignas(64) float sum[M][NV * 16];
  for (int j = 0; j < M; ++j)
    for (int v = 0; v < NV; ++v) _mm512_store_ps(&sum[j][16 * v], acc[j][v]);
  for (int d = 0; d < nd; ++d)
    for (int j = 0; j < M; ++j)
      for (int v = 0; v < NV; ++v) {
        float* p = dst[d] + j * ds + 16 * v;
        const __mmask16 m = v == NV - 1 ? mask : 0xffff;
        _mm512_mask_storeu_ps(p, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, p), _mm512_load_ps(&sum[j][16 * v])));
      }
}

using WMicro = void (*)(const float*, const float*, const Walk&, float* const*, int, int64_t, __mmask16);

template <int NV, bool Masked, int... Ms>
constexpr std::array<WMicro, sizeof...(Ms) + 1> wgrad_table(std::integer_sequence<int, Ms...>) {
  return {nullptr, &wgrad_micro<Ms + 1, NV, Masked>...};
}
// [NV - 1][masked][M]
const std::array<std::array<std::array<WMicro, kMaxM + 1>, 2>, 2> kWgrad{
    {{wgrad_table<1, false>(std::make_integer_sequence<int, kMaxM>()),
      wgrad_table<1, true>(std::make_integer_sequence<int, kMaxM>())},
     {wgrad_table<2, false>(std::make_integer_sequence<int, kMaxM>()),
      wgrad_table<2, true>(std::make_integer_sequence<int, kMaxM>())}}};

// Regions of at least this many pixels per image run per chunk of images, while the chunk is in cache; the rest
// (the frame's edges and corners: few pixels per image, many classes) run across the whole batch, each call then
// summing enough pixels to pay for its read-modify-write of the grad_weight block.
constexpr int64_t kChunkRegionPixels = 64;

}  // namespace

at::Tensor wgrad_direct(const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, const Geom& g) {
  TORCH_CHECK(direct_wgrad_applies(g, go, x, w),
              "fastfuse reflect_conv2d: the direct grad_weight takes fp32 channels_last tensors with one group on an "
              "AVX-512 CPU");
  // [OC, KH, KW, C]: each block's rows are 32 contiguous input channels
  at::Tensor gw = empty_cached({g.OC, g.KH, g.KW, g.C}, at::kFloat);
  if (gw.numel() == 0 || go.numel() == 0) return gw.zero_().permute({0, 3, 1, 2});
  float* gwp = gw.mutable_data_ptr<float>();
  const auto regions = direct_plan(forward_axis(g.OH, g.H, g.KH, g.sh, g.ph, g.dh),
                                   forward_axis(g.OW, g.W, g.KW, g.sw, g.pw, g.dw), g.N);
  const float* xp = x.const_data_ptr<float>();
  const float* gp = go.const_data_ptr<float>();
  const int64_t sN = x.stride(0), sH = x.stride(2), sW = x.stride(3);
  const int64_t dN = go.stride(0), dH = go.stride(2), dW = go.stride(3);
  const int64_t ds = g.KH * g.KW * g.C;  // grad_weight's step per output channel
  // output channels in even blocks of at most kMaxM, input channels in tiles of 32
  const int64_t blocks = (g.OC + kMaxM - 1) / kMaxM, tiles = (g.C + kTile - 1) / kTile;
  const auto block = [&](int64_t b) { return std::make_pair(b * g.OC / blocks, (b + 1) * g.OC / blocks); };
  // tasks: a grid of block ranges x tile ranges (every split gives the same bits): a range of tiles per thread where
  // the tiles divide evenly (each task then reads its own channels of x: at 56x56, 2 tiles and 5 blocks, a 2 x 2 grid
  // gave one thread 6 of the 10 units), else about two tasks per thread
  const int64_t threads = at::get_num_threads();
  const bool even = tiles % threads == 0;
  const int64_t tsplit = even ? threads : std::min(tiles, 2 * threads);
  const int64_t bsplit = even ? 1 : std::min(blocks, (2 * threads + tsplit - 1) / tsplit);
  for_each_task(
      bsplit * tsplit, [] { return 0; },
      [&](int&, int64_t ti) {
        const int64_t b0 = (ti / tsplit) * blocks / bsplit, b1 = (ti / tsplit + 1) * blocks / bsplit;
        const int64_t t0 = (ti % tsplit) * tiles / tsplit, t1 = (ti % tsplit + 1) * tiles / tsplit;
        const int64_t c0 = t0 * kTile, c1 = std::min(g.C, t1 * kTile);
        // images per chunk: the task's channels of x and grad_output in a chunk about 1 MB (the L2 of the Xeon's cores
        // is 2 MB; from 4 MB up the kernel waited on memory, 1.3-3.4x slower)
        const int64_t task_bytes = 4 * (g.H * g.W * (c1 - c0) + g.OH * g.OW * (block(b1 - 1).second - block(b0).first));
        const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 20) / task_bytes);
        for (int64_t oc = block(b0).first; oc < block(b1 - 1).second; ++oc)
          for (int64_t t = 0; t < g.KH * g.KW; ++t) std::fill_n(gwp + oc * ds + t * g.C + c0, c1 - c0, 0.0f);
        // region i over images [n0, n1), every block and tile of the task
        const auto run = [&](const DRegion& reg, int64_t n0, int64_t n1) {
          for (int64_t b = b0; b < b1; ++b)
            for (int64_t t = t0; t < t1; ++t) {
              const auto [o0, o1] = block(b);
              const int64_t lanes = std::min(kTile, g.C - t * kTile);
              const __mmask16 mask = __mmask16((1u << (lanes > 16 ? lanes - 16 : lanes)) - 1);
              const WMicro fn = kWgrad[lanes > 16][lanes % 16 != 0][o1 - o0];
              for (const LineTap& lt : reg.taps) {
                float* dst[kMaxFold];
                int nd = 0;
                for (uint64_t mh = lt.mh; mh; mh &= mh - 1)
                  for (uint64_t mw = lt.mw; mw; mw &= mw - 1)
                    dst[nd++] = gwp + o0 * ds + (__builtin_ctzll(mh) * g.KW + __builtin_ctzll(mw)) * g.C + t * kTile;
                const Walk wk{n1 - n0, reg.rows(), reg.cols(), sN, lt.sr * sH, lt.sc * sW, dN, dH, dW};
                fn(xp + n0 * sN + lt.r * sH + lt.c * sW + t * kTile, gp + n0 * dN + reg.r0 * dH + reg.c0 * dW + o0,
                   wk, dst, nd, ds, mask);
              }
            }
        };
        for (int64_t n0 = 0; n0 < g.N; n0 += chunk)
          for (const DRegion& reg : regions)
            if (reg.rows() * reg.cols() >= kChunkRegionPixels) run(reg, n0, std::min(g.N, n0 + chunk));
        for (const DRegion& reg : regions)
          if (reg.rows() * reg.cols() < kChunkRegionPixels) run(reg, 0, g.N);
      });
  return gw.permute({0, 3, 1, 2});  // [OC, C, KH, KW], channels_last strides
}

}  // namespace rconv_cpu
}  // namespace fastfuse
