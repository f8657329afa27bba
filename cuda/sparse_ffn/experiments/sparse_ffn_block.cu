// The block consumer of a TwELL matrix: blocks of 32 tokens whose active
// neurons overlap, as two small tensor-core GEMMs over the block's union of
// active neurons (see sparse_ffn.h for the contract).
//
// Why
// ---
// A trained model's activity is concentrated: a few neurons fire in a large
// share of the tokens (docs/architecture.md, "trained" pattern). The row
// consumer reads the W_u and W_d rows of every (token, neuron) pair, 8 KiB per
// pair at D = 2048, so a neuron active in 20 of 32 tokens costs 20 row reads.
// Here a block reads each row of its union once: 32 tokens with 12 active
// neurons each share about 140 distinct ones (384 pairs), so the block reads
// 2.7x fewer weight bytes, and pays for it with dense products over the
// union (wasted on the inactive (token, neuron) pairs, cheap on tensor cores).
//
// Per CTA (256 threads, 8 warps, two CTAs per SM, tokens m0 .. m0 + 31):
//  1. union: each warp walks the stored pairs of a row (row_pairs.cuh), sets
//     neuron j's bit in a shared bitmap and keeps (row, j, g) in a shared list;
//     the count words' sums are kept for the statistics. First one row per
//     warp: if those 8 rows already have more than 128 distinct neurons
//     (uniform activity) the block stops there; then the other 24 rows.
//     K = the number of distinct neurons. If K > kMaxK or the block has fewer
//     than 1.5 K pairs (too little reuse to pay for the dense products), the
//     CTA writes skip_blocks[b] = 0 and leaves the block (and its statistics)
//     to the row consumer; otherwise skip_blocks[b] = 1.
//  2. the union list ucol[0 .. K) in ascending neuron order (bitmap prefix
//     sums), and G[32][K] in shared memory: g at (row, rank of j), 0 elsewhere.
//     Flagged rows (row_flags != 0) add no pairs: their G row is zero and
//     their y row is not written.
//  3. up (gated): U[32][K] = X[32][D] . W_u[ucol]^T (mma.sync m16n8k16, bf16
//     in, fp32 accumulation; D in stages of 32 columns through a 4-stage
//     cp.async pipeline, the gathered W_u rows zero-filled past K and past D),
//     then h = g * u where g != 0 (exactly 0 elsewhere, so an inactive pair
//     never contributes, whatever its u), rounded to bf16 in place of G (as
//     the dense FFN rounds h). Non-gated: h is G itself.
//  4. down: Y[32][D] = H[32][K] . W_d[ucol] in column chunks of 256, K in
//     stages of 32 gathered W_d rows; y rows of live tokens stored as bf16.
// Deterministic: the union order, the MMA tiling and its k order are fixed by
// the block's data. Each token's sum runs over the union in ascending order,
// in a different association than the row consumer's, so the two agree to
// rounding, not bitwise; a given input always takes the same consumer.
#include <climits>

#include "common/bf16x8.cuh"
#include "common/launch_cache.h"
#include "common/ptx_sm80.cuh"
#include "common/warp.cuh"
#include "sparse_ffn/row_pairs.cuh"
#include "sparse_ffn/experiments/sparse_ffn_block.h"
#include "sparse_ffn/sparse_ffn_internal.cuh"

namespace twell {
namespace {

using namespace rows_detail;
using namespace sm80;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBT = kBlockTokens;  // 32 tokens: two m16 tiles
constexpr int kMaxK = 256;         // union size handled (8 warps x 32 neurons)
constexpr int kMaxWords = static_cast<int>(sparse_ffn_experiments::kBlockMaxH / 32);
constexpr int kKStep = 32;    // up: D per stage; down: union rows per stage
constexpr int kNChunk = 256;  // down: output columns per chunk (8 warps x 32)
constexpr int kStages = 4;    // three stages in flight while one is computed
constexpr int kPreRows = kWarps;     // rows of the first union round (one per warp)
constexpr int kPreMaxK = kMaxK / 2;  // their union above this: the block goes to the rows
constexpr int kMaxPairs = 1024;      // pairs kept for the G fill (more: the rows)

// Shared memory. Tiles are rows of 16-byte chunks, swizzled so that the 8 rows
// an ldmatrix reads hit distinct banks: rows of 32 chunks (512 B) store chunk c
// at c ^ (row & 7) within its group of 8; rows of 4 chunks (64 B) at c ^ ((row >> 1) & 3).
//   up stage:   X [32][32] + W_u [256][32] bf16 = 18 KiB
//   down stage: W_d [32][256] bf16 = 16 KiB
constexpr int kUpXBytes = kBT * kKStep * 2;
constexpr int kUpWBytes = kMaxK * kKStep * 2;
constexpr int kStageBytes = kUpXBytes + kUpWBytes;
constexpr int kHBytes = kBT * kMaxK * 2;  // G, then H: [32][256] bf16
struct alignas(16) BlockSmem {
  uint8_t stage[kStages][kStageBytes];
  uint8_t h[kHBytes];
  uint32_t mark[kMaxWords];       // union bitmap
  uint16_t word_rank[kMaxWords];  // union neurons in the words before
  int32_t ucol[kMaxK];
  uint32_t pair_jr[kMaxPairs];  // (j << 5) | row
  uint16_t pair_g[kMaxPairs];   // bf16 bits
  u64 row_sum[kBT];             // sum of each row's count words (statistics)
  int word_sums[kWarps];
  int npairs;
};

__device__ __forceinline__ int swz(int row, int chunk) { return (chunk & ~7) | ((chunk ^ row) & 7); }
__device__ __forceinline__ int swz4(int row, int chunk) { return chunk ^ ((row >> 1) & 3); }

// Byte offset of element (row, col) of a bf16 tile with `chunks` (>= 8) 16-byte chunks per row.
__device__ __forceinline__ int tile_off(int row, int col, int chunks) {
  return (row * chunks + swz(row, col >> 3)) * 16 + (col & 7) * 2;
}

__device__ __forceinline__ int rank_of(const BlockSmem& s, uint32_t j) {
  const uint32_t w = j >> 5;
  return s.word_rank[w] + __popc(s.mark[w] & ((1u << (j & 31)) - 1u));
}

// Row r of the block (one warp): the sum of its count words to s.row_sum[r]
// and, if it is live, its stored pairs into the union bitmap and the pair list.
__device__ __forceinline__ void walk_row(const RowParams& p, BlockSmem& s, int64_t m0, int r, int lane) {
  const int64_t m = m0 + r;
  if (m >= p.M) return;
  const bool live = p.flags == nullptr || p.flags[m] == 0;
  const uint32_t* prow = p.packed + m * p.row_words;
  const uint32_t cap = static_cast<uint32_t>(p.slots - 1);
  u64 true_sum = 0;
  for (int w0 = 0; w0 < p.tiles; w0 += 32) {
    const int tile = w0 + lane;
    const uint32_t cw = tile < p.tiles ? prow[static_cast<int64_t>(tile) * p.slots] : 0u;
    true_sum += cw;
    if (!live) continue;
    const int cnt = static_cast<int>(min(cw, cap));
    const int incl = warp_incl_scan(cnt, lane);
    const int total = __shfl_sync(kFull, incl, 31);
    for (int q0 = 0; q0 < total; q0 += 32) {
      const PairBatch b = read_pairs(p, prow, w0, incl, total, q0, lane);
      if ((b.valid >> lane) & 1u) {
        atomicOr(&s.mark[b.j >> 5], 1u << (b.j & 31));
        const int i = atomicAdd(&s.npairs, 1);
        if (i < kMaxPairs) {
          s.pair_jr[i] = (b.j << 5) | static_cast<uint32_t>(r);
          s.pair_g[i] = __bfloat16_as_ushort(__float2bfloat16_rn(b.g));
        }
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) true_sum += __shfl_xor_sync(kFull, true_sum, o);
  if (lane == 0) s.row_sum[r] = true_sum;
}

// Union size so far; thread t owns words t*per .. (t+1)*per - 1 and gets
// `mine` (its words' bits) and `before` (the bits of the words before them).
__device__ __forceinline__ int union_size(BlockSmem& s, int words, int per, int tid, int* mine, int* before) {
  const int lane = tid & 31, warp = tid >> 5;
  int cnt = 0;
  for (int w = tid * per; w < (tid + 1) * per && w < words; ++w) cnt += __popc(s.mark[w]);
  const int incl = warp_incl_scan(cnt, lane);
  if (lane == 31) s.word_sums[warp] = incl;
  __syncthreads();
  int b = 0, K = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) b += s.word_sums[w];
    K += s.word_sums[w];
  }
  *mine = cnt;
  *before = b + incl - cnt;
  __syncthreads();  // word_sums is rewritten by the next call
  return K;
}

// acc = 0 for a warp's 32 x 32 tile (two m16 rows of four n8 tiles).
__device__ __forceinline__ void zero_acc(float (&acc)[2][4][4]) {
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;
}

// acc += A (two m16 x k16 fragments) . B (four n8 x k16 fragments as two ldmatrix_x4 pairs).
__device__ __forceinline__ void mma_warp_tile(float (&acc)[2][4][4], const uint32_t (&a)[2][4],
                                              const uint32_t (&b)[2][4]) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
      mma_m16n8k16_bf16(acc[mt][nt], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b[nt >> 1][(nt & 1) * 2],
                        b[nt >> 1][(nt & 1) * 2 + 1]);
}

// Up stage loads: X [32][32] and the union's W_u rows [kpad][32] at D offset k0.
__device__ __forceinline__ void load_up_stage(const RowParams& p, const BlockSmem& s, uint8_t* st, int64_t m0, int k0,
                                              int K, int kpad, int D) {
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < kBT * 4) {
    const int row = tid >> 2, c = tid & 3;
    const int64_t m = m0 + row;
    const int col = k0 + 8 * c;
    const bool ok = m < p.M && col < D;
    const bf16* src = ok ? p.x.ptr + m * p.x.ld + col : p.x.ptr;
    cp_async_16_zfill(smem_u32(st + (row * 4 + swz4(row, c)) * 16), src, ok ? 16 : 0);
  }
  uint8_t* wt = st + kUpXBytes;
  for (int i = tid; i < kpad * 4; i += kThreads) {
    const int n = i >> 2, c = i & 3;
    const int col = k0 + 8 * c;
    const bool ok = n < K && col < D;
    const bf16* src = ok ? p.wu.ptr + static_cast<int64_t>(s.ucol[n]) * p.wu.ld + col : p.wu.ptr;
    cp_async_16_zfill(smem_u32(wt + (n * 4 + swz4(n, c)) * 16), src, ok ? 16 : 0);
  }
}

// Down stage loads: the union's W_d rows k0 .. k0 + 63, columns n0 .. n0 + 255.
__device__ __forceinline__ void load_down_stage(const RowParams& p, const BlockSmem& s, uint8_t* st, int k0, int n0,
                                                int K, int D) {
  for (int i = static_cast<int>(threadIdx.x); i < kKStep * (kNChunk / 8); i += kThreads) {
    const int kr = i >> 5, c = i & 31;
    const int col = n0 + 8 * c;
    const bool ok = k0 + kr < K && col < D;
    const bf16* src = ok ? p.wd.ptr + static_cast<int64_t>(s.ucol[k0 + kr]) * p.wd.ld + col : p.wd.ptr;
    cp_async_16_zfill(smem_u32(st + (kr * 32 + swz(kr, c)) * 16), src, ok ? 16 : 0);
  }
}

template <bool GATED>
__global__ void __launch_bounds__(kThreads, 2) sparse_block_kernel(const RowParams p, uint8_t* __restrict__ done) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  BlockSmem& s = *reinterpret_cast<BlockSmem*>(smem_raw);
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBT;
  const int words = static_cast<int>((p.H + 31) / 32);
  const int D = p.nch * 8;

  // 1. Union bitmap and pair list: one row per warp first, and the block goes
  //    to the rows if those 8 rows already have more than kPreMaxK neurons
  //    (uniform activity: a cheap exit); then the other 24 rows.
  for (int w = tid; w < words; w += kThreads) s.mark[w] = 0u;
  if (tid == 0) s.npairs = 0;
  __syncthreads();
  const int per = (words + kThreads - 1) / kThreads;
  int mine = 0, before = 0;
  walk_row(p, s, m0, warp, lane);
  __syncthreads();
  int K = union_size(s, words, per, tid, &mine, &before);
  bool take = K <= kPreMaxK && s.npairs <= kMaxPairs;
  if (take) {
    for (int r = kPreRows + warp; r < kBT; r += kWarps) walk_row(p, s, m0, r, lane);
    __syncthreads();
    K = union_size(s, words, per, tid, &mine, &before);
  }
  // 2. The decision (reuse >= 1.5 pairs per union neuron), statistics, the
  //    union list in ascending order, and G.
  const int npairs = s.npairs;
  take = take && K > 0 && K <= kMaxK && npairs <= kMaxPairs && 2 * npairs >= 3 * K;
  if (tid == 0) done[blockIdx.x] = take ? 1 : 0;
  if (!take) return;  // block-uniform; the row consumer takes the rows (and their statistics)
  if (p.stats != nullptr && tid < kBT && m0 + tid < p.M) {
    const u64 v = s.row_sum[tid];
    u64* slot = p.stats + TWELL_STAT_MAX_ROW_COUNT;
    if (v != 0 && v > __ldcg(slot)) atomicMax(slot, v);
  }
  int r0 = before;
  for (int w = tid * per; w < (tid + 1) * per && w < words; ++w) {
    s.word_rank[w] = static_cast<uint16_t>(r0);
    uint32_t bits = s.mark[w];
    while (bits != 0u) {
      s.ucol[r0++] = w * 32 + __ffs(bits) - 1;
      bits &= bits - 1u;
    }
  }
  for (int i = tid; i < kHBytes / 16; i += kThreads) reinterpret_cast<uint4*>(s.h)[i] = make_uint4(0u, 0u, 0u, 0u);
  __syncthreads();
  for (int i = tid; i < npairs; i += kThreads) {
    const uint32_t jr = s.pair_jr[i];
    *reinterpret_cast<uint16_t*>(s.h + tile_off(static_cast<int>(jr & 31u), rank_of(s, jr >> 5), kMaxK / 8)) =
        s.pair_g[i];
  }
  __syncthreads();
  (void)mine;

  const int kpad = (K + 31) & ~31;  // warps with n >= kpad have no neuron
  const int g4 = lane >> 2, t4 = lane & 3;

  // 3. Up: U = X . W_u[ucol]^T, then h = g * u in place.
  if constexpr (GATED) {
    float acc[2][4][4];
    zero_acc(acc);
    const int steps = (D + kKStep - 1) / kKStep;
    const bool active = warp * 32 < kpad;
#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) {
      if (st < steps) load_up_stage(p, s, s.stage[st], m0, st * kKStep, K, kpad, D);
      cp_async_commit();
    }
    for (int ks = 0; ks < steps; ++ks) {
      cp_async_wait<kStages - 2>();
      __syncthreads();
      const int nxt = ks + kStages - 1;
      if (nxt < steps) load_up_stage(p, s, s.stage[nxt % kStages], m0, nxt * kKStep, K, kpad, D);
      cp_async_commit();
      const uint8_t* xt = s.stage[ks % kStages];
      const uint8_t* wt = xt + kUpXBytes;
      if (active) {
#pragma unroll
        for (int kk = 0; kk < kKStep / 16; ++kk) {
          uint32_t a[2][4];
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            const int row = mt * 16 + (lane & 15);
            ldmatrix_x4(a[mt], smem_u32(xt + (row * 4 + swz4(row, kk * 2 + (lane >> 4))) * 16));
          }
          uint32_t b[2][4];
#pragma unroll
          for (int np = 0; np < 2; ++np) {
            const int mi = lane >> 3;
            const int n = warp * 32 + np * 16 + (mi >> 1) * 8 + (lane & 7);
            ldmatrix_x4(b[np], smem_u32(wt + (n * 4 + swz4(n, kk * 2 + (mi & 1))) * 16));
          }
          mma_warp_tile(acc, a, b);
        }
      }
    }
    cp_async_wait_all();
    __syncthreads();  // every warp is done with the stages (the down phase reuses them)
    if (active) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int row = mt * 16 + g4 + 8 * half;
            const int col = warp * 32 + nt * 8 + 2 * t4;
            uint32_t* cell = reinterpret_cast<uint32_t*>(s.h + tile_off(row, col, kMaxK / 8));
            const uint32_t gv = *cell;
            const float g0 = bf_lo(gv), g1 = bf_hi(gv);
            const float h0 = g0 != 0.f ? g0 * acc[mt][nt][2 * half] : 0.f;
            const float h1 = g1 != 0.f ? g1 * acc[mt][nt][2 * half + 1] : 0.f;
            *cell = pack_bf16x2(h0, h1);
          }
    }
    __syncthreads();
  }

  // 4. Down: Y = H . W_d[ucol], 256 columns at a time.
  const int ksteps = (K + kKStep - 1) / kKStep;
  const int nchunks = (D + kNChunk - 1) / kNChunk;
  const int total = ksteps * nchunks;
  float acc[2][4][4];
  zero_acc(acc);
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < total) load_down_stage(p, s, s.stage[st], (st % ksteps) * kKStep, (st / ksteps) * kNChunk, K, D);
    cp_async_commit();
  }
  for (int it = 0; it < total; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int nxt = it + kStages - 1;
    if (nxt < total)
      load_down_stage(p, s, s.stage[nxt % kStages], (nxt % ksteps) * kKStep, (nxt / ksteps) * kNChunk, K, D);
    cp_async_commit();
    const int ks = it % ksteps, n0 = (it / ksteps) * kNChunk;
    const uint8_t* wt = s.stage[it % kStages];
    const bool active = n0 + warp * 32 < D;
    if (active) {
#pragma unroll
      for (int kk = 0; kk < kKStep / 16; ++kk) {
        const int kb = ks * kKStep + kk * 16;  // union index of this k16 step
        if (kb >= kpad) break;                 // zero rows and zero h past K
        uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const int row = mt * 16 + (lane & 15);
          ldmatrix_x4(a[mt], smem_u32(s.h + (row * (kMaxK / 8) + swz(row, kb / 8 + (lane >> 4))) * 16));
        }
        uint32_t b[2][4];
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          const int mi = lane >> 3;
          const int kr = kk * 16 + (mi & 1) * 8 + (lane & 7);
          const int c = (warp * 32 + np * 16 + (mi >> 1) * 8) / 8;
          ldmatrix_x4_trans(b[np], smem_u32(wt + (kr * 32 + swz(kr, c)) * 16));
        }
        mma_warp_tile(acc, a, b);
      }
    }
    if (ks == ksteps - 1) {  // chunk complete: store the live rows, restart the accumulators
      if (active) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int row = mt * 16 + g4 + 8 * half;
            const int64_t m = m0 + row;
            if (m >= p.M || (p.flags != nullptr && p.flags[m] != 0)) continue;
            bf16* yr = p.y.ptr + m * p.y.ld;
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
              const int col = n0 + warp * 32 + nt * 8 + 2 * t4;
              if (col < D)
                __stcs(reinterpret_cast<unsigned int*>(yr + col),
                       pack_bf16x2(acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1]));
            }
          }
      }
      zero_acc(acc);
    }
  }
  cp_async_wait_all();
}

template <bool GATED>
cudaError_t launch_block(const RowParams& p, uint8_t* done, cudaStream_t stream) {
  const int64_t blocks = (p.M + kBT - 1) / kBT;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  constexpr size_t smem = sizeof(BlockSmem);
  static_assert(smem <= 113 * 1024, "two CTAs per SM");
  const cudaError_t attr = set_max_dynamic_smem(sparse_block_kernel<GATED>, smem);  // cached per device
  if (attr != cudaSuccess) return attr;
  sparse_block_kernel<GATED><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p, done);
  return cudaGetLastError();
}

}  // namespace

namespace sparse_ffn_experiments {

bool block_supported(const SparseFfnArgs& a) { return sparse_ffn_detail::rows_supported(a.D) && a.H <= kBlockMaxH; }

cudaError_t sparse_ffn_block(const SparseFfnArgs& a, uint8_t* done, cudaStream_t stream) {
  if (!block_supported(a) || done == nullptr) return cudaErrorInvalidValue;
  if (a.M == 0) return cudaSuccess;
  const RowParams p = row_params(a, nullptr);
  return a.w_up.ptr != nullptr ? launch_block<true>(p, done, stream) : launch_block<false>(p, done, stream);
}

cudaError_t sparse_ffn_block_then_rows(const SparseFfnArgs& a, int rows_variant, uint8_t* done, cudaStream_t stream) {
  const cudaError_t e = sparse_ffn_block(a, done, stream);
  return e != cudaSuccess ? e : sparse_ffn_detail::sparse_ffn_rows(a, rows_variant, done, stream);
}

}  // namespace sparse_ffn_experiments
}  // namespace twell
