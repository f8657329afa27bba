// The row consumer of a TwELL matrix: one warp per token row (see
// sparse_ffn.h for the contract, sparse_ffn_internal.cuh for the variants).
//
// Work decomposition
// ------------------
// A warp owns token m and the whole D range of its output: lane l owns the
// 16-byte chunks (8 bf16 columns) l, l + 32, ..., l + 32 (CH - 1) of a row.
// x[m] is read once (streamed) into the warp's slice of shared memory, where
// each lane reads back only the chunks it wrote (registers are kept for the
// accumulators and the rows in flight); y[m] is accumulated in fp32 registers
// and stored once (streamed). There is no barrier, so a warp runs from its
// first load to its store on its own, and many resident warps keep many
// weight rows in flight. Weight rows are
// read with default caching, so the rows of hot neurons stay in L1 and L2 for
// the other tokens on the SM.
//
// Per group of 32 tiles of the row:
//  1. lane l reads the count word of tile w0 + l; the true counts are summed
//     for the statistics; each is clamped to the tile's capacity (slots - 1);
//     an inclusive warp scan gives each tile's first pair;
//  2. per batch of 32 pairs, lane l finds the tile of pair q0 + l by a binary
//     search over the scan (shuffles) and reads that entry word: neuron j,
//     gate value g (entries outside their tile or outside H are dropped, a
//     ballot keeps the rest in order);
//  3. per pair (or pair group, G = 2): the W_u row(s) of j are loaded and
//     dotted with x (fp32 FMAs of the exact bf16 products in a fixed order,
//     then a 5-step xor butterfly: every lane holds the same u), h = g * u,
//     and acc += h * W_d[j] (W_d's row is loaded together with W_u's when
//     EARLY, after the dot otherwise).
// Pairs run in ascending column order, so each token's sum over neurons runs
// in ascending neuron order, in the same fixed order on every call:
// deterministic. Flagged rows (row_flags[m] != 0) only add their counts to the
// statistics; their y row is left to the fallback.
#include <climits>

#include "common/bf16x8.cuh"
#include "common/launch_cache.h"
#include "common/pack_entry.cuh"
#include "common/warp.cuh"
#include "sparse_ffn/row_pairs.cuh"
#include "sparse_ffn/sparse_ffn_internal.cuh"

namespace twell {
namespace {

using namespace rows_detail;

constexpr int kWarpsPerCta = 4;

template <int CH>
__device__ __forceinline__ void load_row(uint4 (&w)[CH], const bf16* base, int64_t ld, uint32_t j, int lane, int nch) {
  const uint4* row = reinterpret_cast<const uint4*>(base + static_cast<int64_t>(j) * ld);
#pragma unroll
  for (int k = 0; k < CH; ++k) {
    const int c = lane + 32 * k;
    w[k] = c < nch ? __ldg(row + c) : make_uint4(0u, 0u, 0u, 0u);
  }
}

// xs: this lane's x chunks (xs[32 k] is chunk lane + 32 k).
template <int CH>
__device__ __forceinline__ float dot_row(const uint4* xs, const uint4 (&w)[CH]) {
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < CH; ++k) s = dot8(xs[32 * k], w[k], s);
  return warp_sum(s);
}

template <int CH>
__device__ __forceinline__ void axpy_row(float (&acc)[CH][8], float h, const uint4 (&w)[CH]) {
#pragma unroll
  for (int k = 0; k < CH; ++k) axpy8(acc[k], h, w[k]);
}

// Step 3 for one batch: G pairs at a time, in ascending order.
template <int CH, bool GATED, int G, bool EARLY>
__device__ __forceinline__ void run_pairs(float (&acc)[CH][8], const uint4* xs, const RowParams& p, const PairBatch& b,
                                          int lane) {
  unsigned left = b.valid;
  while (left != 0u) {
    uint32_t j[G];
    float g[G];
    bool have[G];
#pragma unroll
    for (int i = 0; i < G; ++i) {
      have[i] = left != 0u;
      const int src = have[i] ? __ffs(left) - 1 : 0;
      left &= left - 1u;
      j[i] = __shfl_sync(kFull, b.j, src);
      g[i] = __shfl_sync(kFull, b.g, src);
    }
    if constexpr (GATED) {
      uint4 wu[G][CH];
#pragma unroll
      for (int i = 0; i < G; ++i) {
        if (have[i]) {
          load_row<CH>(wu[i], p.wu.ptr, p.wu.ld, j[i], lane, p.nch);
        } else {
#pragma unroll
          for (int k = 0; k < CH; ++k) wu[i][k] = make_uint4(0u, 0u, 0u, 0u);
        }
      }
      uint4 wd[G][CH];
      if constexpr (EARLY) {
#pragma unroll
        for (int i = 0; i < G; ++i)
          if (have[i]) load_row<CH>(wd[i], p.wd.ptr, p.wd.ld, j[i], lane, p.nch);
      }
      float h[G];
#pragma unroll
      for (int i = 0; i < G; ++i) h[i] = g[i] * dot_row<CH>(xs, wu[i]);
      if constexpr (!EARLY) {
#pragma unroll
        for (int i = 0; i < G; ++i)
          if (have[i]) load_row<CH>(wd[i], p.wd.ptr, p.wd.ld, j[i], lane, p.nch);
      }
#pragma unroll
      for (int i = 0; i < G; ++i)
        if (have[i]) axpy_row<CH>(acc, h[i], wd[i]);
    } else {
      (void)xs;
      uint4 wd[G][CH];
#pragma unroll
      for (int i = 0; i < G; ++i)
        if (have[i]) load_row<CH>(wd[i], p.wd.ptr, p.wd.ld, j[i], lane, p.nch);
#pragma unroll
      for (int i = 0; i < G; ++i)
        if (have[i]) axpy_row<CH>(acc, g[i], wd[i]);
    }
  }
}

template <int CH, bool GATED, int G, bool EARLY, int MINB>
__global__ void __launch_bounds__(kWarpsPerCta * 32, MINB) sparse_rows_kernel(const RowParams p) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  if (m >= p.M) return;  // whole warps only: no barrier below
  if (p.skip_blocks != nullptr && p.skip_blocks[m / kBlockTokens] != 0) return;  // written by the block consumer
  const uint32_t* prow = p.packed + m * p.row_words;
  const bool live = p.flags == nullptr || p.flags[m] == 0;
  const uint32_t cap = static_cast<uint32_t>(p.slots - 1);

  extern __shared__ uint4 smem_x[];  // [kWarpsPerCta][32 * CH] (gated)
  uint4* xs = smem_x + (threadIdx.x >> 5) * (32 * CH) + lane;
  if constexpr (GATED) {
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const int c = lane + 32 * k;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (live && c < p.nch) v = __ldcs(reinterpret_cast<const uint4*>(p.x.ptr + m * p.x.ld) + c);
      xs[32 * k] = v;
    }
  }
  float acc[CH][8];
#pragma unroll
  for (int k = 0; k < CH; ++k)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[k][e] = 0.f;

  u64 true_sum = 0;
  for (int w0 = 0; w0 < p.tiles; w0 += 32) {
    const int tile = w0 + lane;
    const uint32_t cw = tile < p.tiles ? __ldcs(prow + static_cast<int64_t>(tile) * p.slots) : 0u;
    true_sum += cw;
    if (!live) continue;
    const int cnt = static_cast<int>(min(cw, cap));
    const int incl = warp_incl_scan(cnt, lane);
    const int total = __shfl_sync(kFull, incl, 31);
    for (int q0 = 0; q0 < total; q0 += 32) {
      const PairBatch b = read_pairs(p, prow, w0, incl, total, q0, lane);
      run_pairs<CH, GATED, G, EARLY>(acc, xs, p, b, lane);
    }
  }

  if (live) {
    uint4* yr = reinterpret_cast<uint4*>(p.y.ptr + m * p.y.ld);
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const int c = lane + 32 * k;
      if (c < p.nch) __stcs(yr + c, pack8(acc[k]));
    }
  }
  if (p.stats != nullptr) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) true_sum += __shfl_xor_sync(kFull, true_sum, o);
    // The running maximum rarely grows: read it first, so that most rows issue
    // no atomic (M atomics on one word would serialise at large M).
    u64* slot = p.stats + TWELL_STAT_MAX_ROW_COUNT;
    if (lane == 0 && true_sum != 0 && true_sum > __ldcg(slot)) atomicMax(slot, true_sum);
  }
}

// The sub-variants (sparse_ffn_internal.cuh: kRowsVariants): pairs per group,
// W_d's row loaded together with W_u's, and the CTAs per SM the registers are
// sized for (4 warps per CTA).
template <int CH, bool GATED>
cudaError_t launch_rows_ch(int variant, const RowParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.M + kWarpsPerCta - 1) / kWarpsPerCta;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks)), block(kWarpsPerCta * 32);
  const size_t smem = GATED ? kWarpsPerCta * 32 * CH * sizeof(uint4) : 0;  // <= 16 KiB
  switch (variant) {
    case 0: sparse_rows_kernel<CH, GATED, 1, true, 3><<<grid, block, smem, stream>>>(p); break;
    case 1: sparse_rows_kernel<CH, GATED, 1, false, 4><<<grid, block, smem, stream>>>(p); break;
    case 2: sparse_rows_kernel<CH, GATED, 2, false, 2><<<grid, block, smem, stream>>>(p); break;
    case 3: sparse_rows_kernel<CH, GATED, 1, false, 3><<<grid, block, smem, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <bool GATED>
cudaError_t launch_rows(int variant, const RowParams& p, cudaStream_t stream) {
  if (p.nch <= 32) return launch_rows_ch<1, GATED>(variant, p, stream);
  if (p.nch <= 64) return launch_rows_ch<2, GATED>(variant, p, stream);
  if (p.nch <= 128) return launch_rows_ch<4, GATED>(variant, p, stream);
  if (p.nch <= 256) return launch_rows_ch<8, GATED>(variant, p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

namespace sparse_ffn_detail {

bool rows_supported(int64_t D) { return D > 0 && D <= kRowsMaxD; }

cudaError_t sparse_ffn_rows(const SparseFfnArgs& a, int variant, const uint8_t* skip_blocks, cudaStream_t stream) {
  // The caller (sparse_ffn_config) has checked the arguments.
  if (!rows_supported(a.D) || variant < 0 || variant >= kRowsVariants) return cudaErrorInvalidValue;
  if (a.M == 0) return cudaSuccess;
  const RowParams p = row_params(a, skip_blocks);
  return a.w_up.ptr != nullptr ? launch_rows<true>(variant, p, stream) : launch_rows<false>(variant, p, stream);
}

}  // namespace sparse_ffn_detail
}  // namespace twell
