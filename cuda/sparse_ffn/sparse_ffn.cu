// Fused sparse consumers of a TwELL matrix (see sparse_ffn.h for the contract).
//
// Work decomposition
// ------------------
// A CTA owns a block of TB consecutive tokens (TB = 8 for large M at D <= 2048,
// 1 for small M), and covers the whole D range of its tokens: thread `tid` owns
// the 16-byte chunks (8 bf16 columns) tid, tid + NT, ..., tid + (CH-1)*NT.
// So a neuron row j of W_u / W_d is read by the CTA as NT*CH coalesced 16-byte
// loads, and every load of a row is independent of the others.
//
// Per window of tiles (all tiles unless H is very large):
//  1. read the TB*tiles count words, clamp each to min(count, slots-1) (0 for a
//     flagged row), block-wide exclusive scan -> the (token, tile) -> pair
//     offset table; the true counts are summed for the statistics;
//  2. in batches of up to 512 (token, neuron) pairs: every thread locates its
//     pair by binary search in the offset table and reads the entry word (only
//     words 1..min(count, slots-1) of a tile are ever read); pairs are then
//     sorted by (neuron, token) with a counting rank (a permutation for any
//     input), so the pairs of a neuron that several tokens of the block share
//     are adjacent and its W_u / W_d rows are loaded once for all of them;
//  3. up phase (gated), two tested implementations:
//     FFMA (default): per group of G pairs, G independent row loads are in
//     flight per thread; each thread's fp32 partial dot products are reduced
//     over the warp with a reduce-scatter butterfly (G-1 + 5-log2(G) shuffles
//     for G pairs);
//     MMA (used for cluster-split small-M launches): per group of 8 pairs each
//     warp computes the dot products of all the block's tokens with the 8
//     pairs' W_u rows over its share of D on tensor cores (mma.sync m16n8k16:
//     bf16 products are exact in fp32 and accumulated in fp32) and keeps the
//     (token of the pair, pair) entries. It issues far fewer instructions, but
//     the kernel is bound by memory latency, not issue: measured on an H100 it
//     is 0-8% slower than FFMA at large M (fewer row loads in flight per
//     thread next to the 8-token accumulators).
//     Either way the warps' partial sums are added in smem in a fixed order;
//     h = g * u in fp32;
//  4. down phase: y[t] += h * W_d[j] in fp32 registers (acc[TB][CH][8]); the
//     token index is CTA-uniform, so the register slot is picked by a
//     uniform branch tree (no local memory).
// Per token the sum over neurons runs in ascending column order; the dot
// products' order is fixed by the thread/lane/warp (and mma) structure:
// deterministic. No float atomics; h never leaves the SM.
//
// Small M: a token's pairs are split over a thread-block cluster of up to 8
// CTAs (sm_90): each CTA accumulates its share in registers, writes it to its
// shared memory, and after a cluster barrier CTA r sums the D-slice r over the
// cluster's CTAs in rank order through distributed shared memory (fixed order,
// no workspace, one launch). Elsewhere (sm_80 code) one CTA per token.
#include "sparse_ffn/sparse_ffn.h"

#include <cooperative_groups.h>

#include <atomic>
#include <climits>

#include "common/launch_cache.h"
#include "common/pack_entry.cuh"
#include "common/bf16x8.cuh"
#include "sparse_ffn/sparse_ffn_internal.cuh"

namespace twell {
namespace {

constexpr int kPairsMax = 512;     // (token, neuron) pairs per batch
constexpr int kCountSlots = 2048;  // (token, tile) count words per window
constexpr int kMaxTiles = 65536;  // H <= 2^24: j fits the pair word

struct KParams {
  const uint32_t* packed;
  int64_t row_words;
  int slots;
  int tiles;
  int64_t M, D, H;
  const bf16* x;
  int64_t ldx;
  const bf16* wu;
  int64_t ldwu;
  const bf16* wd;
  int64_t ldwd;
  bf16* y;
  int64_t ldy;
  const uint8_t* flags;
  u64* stats;
  int csize;  // CTAs per token (cluster size), 1 = no cluster
};

// Dynamic shared memory layout (byte offsets, 16-byte aligned).
struct Layout {
  uint32_t xs, ybuf, tok_true, act, offs, scan, tm_pw, tm_g, s_pw, s_g, s_h, red,
      total;
};

__host__ __device__ inline uint32_t take(uint32_t& o, uint64_t bytes) {
  const uint32_t r = o;
  o = static_cast<uint32_t>((o + bytes + 15) & ~static_cast<uint64_t>(15));
  return r;
}

__host__ __device__ inline Layout make_layout(int nt, int tb, bool gated, int64_t D, int csize) {
  Layout L;
  uint32_t o = 0;
  L.xs = take(o, gated ? static_cast<uint64_t>(tb) * D * 2 : 0);
  L.ybuf = take(o, csize > 1 ? static_cast<uint64_t>(tb) * D * 4 : 0);
  L.tok_true = take(o, static_cast<uint64_t>(tb) * 8);
  L.act = take(o, static_cast<uint64_t>(tb) * 4);
  L.offs = take(o, (kCountSlots + 1) * 4);
  L.scan = take(o, 32 * 4);
  L.tm_pw = take(o, tb > 1 ? kPairsMax * 4 : 0);
  L.tm_g = take(o, tb > 1 ? kPairsMax * 4 : 0);
  L.s_pw = take(o, kPairsMax * 4);
  L.s_g = take(o, kPairsMax * 4);
  L.s_h = take(o, gated ? kPairsMax * 4 : 0);
  L.red = take(o, gated ? static_cast<uint64_t>(nt / 32) * kPairsMax * 4 : 0);
  L.total = o;
  return L;
}

// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------
__device__ __forceinline__ void prefetch_l2(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr));
}

// D += A * B for one m16n8k16 tile, bf16 inputs, fp32 accumulation. Only the
// A rows 0..7 are used (a1 = a3 = 0); c2, c3 (rows 8..15) stay 0.
__device__ __forceinline__ void mma_bf16_16x8x16(float& c0, float& c1, float& c2, float& c3,
                                                 uint32_t a0, uint32_t a2, uint32_t b0,
                                                 uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3)
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

// acc[t] += h * v with a CTA-uniform runtime t: a branch tree keeps every
// register index a compile-time constant.
template <int LO, int HI, int TB, int CH>
__device__ __forceinline__ void axpy_token(float (&acc)[TB][CH][8], int t, float h,
                                           const uint4 (&v)[CH]) {
  if constexpr (HI - LO == 1) {
#pragma unroll
    for (int k = 0; k < CH; ++k) axpy8(acc[LO][k], h, v[k]);
  } else {
    constexpr int MID = (LO + HI) / 2;
    if (t < MID) {
      axpy_token<LO, MID>(acc, t, h, v);
    } else {
      axpy_token<MID, HI>(acc, t, h, v);
    }
  }
}

// One reduce-scatter step of warp_sum_scatter (offset O), then the next.
template <int O, int G>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[G], int lane) {
  if constexpr (O >= 1) {
    const bool upper = (lane & O) != 0;
#pragma unroll
    for (int i = 0; i < O; ++i) {
      const float send = upper ? v[i] : v[i + O];
      const float keep = upper ? v[i + O] : v[i];
      v[i] = keep + __shfl_xor_sync(0xFFFFFFFFu, send, O);
    }
    reduce_scatter_step<O / 2, G>(v, lane);
  }
}

// Sum over the 32 lanes of v[0..G-1]: a reduce-scatter butterfly halves the
// vector at each step (G-1 shuffles in all), then 5-log2(G) plain steps.
// Returns, in every lane, the warp total of entry (lane & (G-1)).
template <int G>
__device__ __forceinline__ float warp_sum_scatter(float (&v)[G], int lane) {
  reduce_scatter_step<G / 2, G>(v, lane);
  float r = v[0];
#pragma unroll
  for (int o = G; o < 32; o *= 2) r += __shfl_xor_sync(0xFFFFFFFFu, r, o);
  return r;
}

__device__ __forceinline__ int warp_incl_scan(int v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(0xFFFFFFFFu, v, o);
    if (lane >= o) v += n;
  }
  return v;
}

// A pair is one 32-bit word, (j << 4) | t: neuron j (< 2^24), token t of the
// CTA's block (< 16). Sorting the words orders pairs by (neuron, token).
// Entries whose column lies outside its tile or outside H become the
// sentinel (sorted last, never used).
constexpr uint32_t kPairSentinel = 0xFFFFFFFFu;
constexpr uint32_t kNoRow = 0xFFFFFFFFu;  // "no previous neuron" (no j >> 4 equals it)

// Loads this thread's chunks of W[j] for the G sorted pairs pw[]; only the
// first pair of each neuron loads (the others reuse its registers). `prevj`
// is the neuron of the pair before the group.
template <int G, int CH>
__device__ __forceinline__ void load_rows(uint4 (&w)[G][CH], const uint32_t (&pw)[G],
                                          uint32_t prevj, const bf16* base, int64_t ld,
                                          const int (&ck)[CH], const bool (&ok)[CH]) {
#pragma unroll
  for (int pp = 0; pp < G; ++pp) {
    const uint32_t j = pw[pp] >> 4;
    const bool load = pw[pp] != kPairSentinel && j != prevj;
    prevj = j;
    const uint4* row = reinterpret_cast<const uint4*>(base + static_cast<int64_t>(j) * ld);
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      w[pp][k] = make_uint4(0u, 0u, 0u, 0u);
      if (load && ok[k]) w[pp][k] = __ldg(row + ck[k]);
    }
  }
}

template <int G, int CH>
__device__ __forceinline__ void prefetch_rows(const uint32_t (&pw)[G], uint32_t prevj,
                                              const bf16* base, int64_t ld, const int (&ck)[CH],
                                              const bool (&ok)[CH]) {
#pragma unroll
  for (int pp = 0; pp < G; ++pp) {
    const uint32_t j = pw[pp] >> 4;
    const bool load = pw[pp] != kPairSentinel && j != prevj;
    prevj = j;
    const uint4* row = reinterpret_cast<const uint4*>(base + static_cast<int64_t>(j) * ld);
#pragma unroll
    for (int k = 0; k < CH; ++k)
      if (load && ok[k]) prefetch_l2(row + ck[k]);
  }
}

template <int G>
__device__ __forceinline__ uint32_t read_group(uint32_t (&pw)[G], const uint32_t* s_pw, int g0,
                                               int nb) {
#pragma unroll
  for (int pp = 0; pp < G; ++pp) pw[pp] = g0 + pp < nb ? s_pw[g0 + pp] : kPairSentinel;
  return g0 > 0 ? (s_pw[g0 - 1] >> 4) : kNoRow;
}

// ---------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------
template <int NT, int CH, int TB, int G_REQ, bool GATED, bool MMA>
__global__ void __launch_bounds__(NT, 65536 / (NT * 128))
    sparse_ffn_kernel(const KParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  // sm_80's register allocation spills two gated variants at the sm_90 G.
  constexpr int G = (GATED && ((TB >= 8 && G_REQ > 4) || (TB == 1 && G_REQ > 8))) ? G_REQ / 2 : G_REQ;
#else
  constexpr int G = G_REQ;
#endif
  static_assert(NT % 32 == 0 && kCountSlots % NT == 0, "NT");
  static_assert(G >= 1 && G <= 32 && (G & (G - 1)) == 0 && kPairsMax % G == 0, "G");
  static_assert(TB >= 1 && TB <= 8 && kCountSlots % TB == 0, "TB");
  static_assert(GATED || !MMA, "MMA is the gated up phase");
  constexpr int NW = NT / 32;
  constexpr int EPT = kCountSlots / NT;

  extern __shared__ __align__(16) unsigned char smem[];
  const Layout L = make_layout(NT, TB, GATED, p.D, p.csize);
  uint4* xs = reinterpret_cast<uint4*>(smem + L.xs);
  u64* s_true = reinterpret_cast<u64*>(smem + L.tok_true);
  int* s_act = reinterpret_cast<int*>(smem + L.act);
  int* s_offs = reinterpret_cast<int*>(smem + L.offs);
  int* s_scan = reinterpret_cast<int*>(smem + L.scan);
  uint32_t* tm_pw = reinterpret_cast<uint32_t*>(smem + L.tm_pw);
  float* tm_g = reinterpret_cast<float*>(smem + L.tm_g);
  uint32_t* s_pw = reinterpret_cast<uint32_t*>(smem + L.s_pw);
  float* s_g = reinterpret_cast<float*>(smem + L.s_g);
  float* s_h = reinterpret_cast<float*>(smem + L.s_h);
  float* red = reinterpret_cast<float*>(smem + L.red);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int cs = p.csize;
  const int rank = cs > 1 ? static_cast<int>(blockIdx.x % cs) : 0;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x / cs) * TB;
  const int nch = static_cast<int>(p.D >> 3);
  const int S = p.slots;
  const uint32_t cap = static_cast<uint32_t>(S - 1);
  const uint32_t H32 = static_cast<uint32_t>(p.H);

  int ck[CH];
  bool ok[CH];
#pragma unroll
  for (int k = 0; k < CH; ++k) {
    ck[k] = tid + k * NT;
    ok[k] = ck[k] < nch;
  }

  if constexpr (TB == 1) {
    // Latency-bound (small M): bring the whole packed row towards L2 now, so
    // that the entry words read after the count scan do not wait for DRAM.
    if (m0 < p.M) {
      const uint32_t* prow = p.packed + m0 * p.row_words;
      for (int64_t i = static_cast<int64_t>(tid) * 32; i < p.row_words; i += NT * 32)
        prefetch_l2(prow + i);
    }
  }
  if (tid < TB) {
    const int64_t m = m0 + tid;
    s_act[tid] = (m < p.M && (p.flags == nullptr || p.flags[m] == 0)) ? 1 : 0;
    s_true[tid] = 0;
  }
  __syncthreads();

  float acc[TB][CH][8];
#pragma unroll
  for (int t = 0; t < TB; ++t)
#pragma unroll
    for (int k = 0; k < CH; ++k)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[t][k][e] = 0.f;

  const int T = p.tiles;
  constexpr int kWindowTilesMax = kCountSlots / TB;
  for (int w0 = 0; w0 < T; w0 += kWindowTilesMax) {
    const int wt = min(kWindowTilesMax, T - w0);
    const int F = TB * wt;

    // 1. counts -> offsets (exclusive scan over the (token, tile) slots).
    uint32_t cw[EPT];
#pragma unroll
    for (int e = 0; e < EPT; ++e) {
      const int f = tid * EPT + e;
      cw[e] = 0;
      if (f < F) {
        const int t = f / wt;
        const int tile = w0 + (f - t * wt);
        const int64_t m = m0 + t;
        if (m < p.M) cw[e] = __ldcs(p.packed + m * p.row_words + static_cast<int64_t>(tile) * S);
      }
    }
    if constexpr (GATED) {
      // x rows of the block into shared memory (once), in flight together with
      // the count words above.
      if (w0 == 0) {
#pragma unroll
        for (int t = 0; t < TB; ++t) {
#pragma unroll
          for (int k = 0; k < CH; ++k) {
            if (ok[k]) {
              uint4 v = make_uint4(0u, 0u, 0u, 0u);
              if (s_act[t])
                v = __ldcs(reinterpret_cast<const uint4*>(p.x + (m0 + t) * p.ldx) + ck[k]);
              xs[t * nch + ck[k]] = v;
            }
          }
        }
      }
    }
    int cnt[EPT];
    int run = 0;
#pragma unroll
    for (int e = 0; e < EPT; ++e) {
      const int f = tid * EPT + e;
      cnt[e] = 0;
      if (f < F) {
        const int t = f / wt;
        if (m0 + t < p.M) {
          if (p.stats != nullptr) atomicAdd(&s_true[t], static_cast<u64>(cw[e]));
          if (s_act[t]) cnt[e] = static_cast<int>(min(cw[e], cap));
        }
      }
      run += cnt[e];
    }
    const int incl = warp_incl_scan(run, lane);
    if (lane == 31) s_scan[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int v = lane < NW ? s_scan[lane] : 0;
      v = warp_incl_scan(v, lane);
      if (lane < NW) s_scan[lane] = v;
    }
    __syncthreads();
    {
      int base = incl - run + (warp > 0 ? s_scan[warp - 1] : 0);
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
        s_offs[tid * EPT + e] = base;
        base += cnt[e];
      }
      if (tid == NT - 1) s_offs[kCountSlots] = base;
    }
    __syncthreads();
    const int total = s_offs[kCountSlots];

    // This CTA's share of the window's pairs (the whole window unless split
    // over a cluster).
    const int qa = static_cast<int>((static_cast<int64_t>(total) * rank) / cs);
    const int qb = static_cast<int>((static_cast<int64_t>(total) * (rank + 1)) / cs);
    for (int b0 = qa; b0 < qb; b0 += kPairsMax) {
      const int nb = min(kPairsMax, qb - b0);

      // 2a. locate and read the entries (token-major order).
      for (int i = tid; i < kPairsMax; i += NT) {
        uint32_t pw = kPairSentinel;
        float g = 0.f;
        if (i < nb) {
          const int q = b0 + i;
          int lo = 0, hi = kCountSlots;  // s_offs[lo] <= q < s_offs[hi]
          while (hi - lo > 1) {
            const int mid = (lo + hi) >> 1;
            if (s_offs[mid] <= q) {
              lo = mid;
            } else {
              hi = mid;
            }
          }
          const int t = lo / wt;
          const int tile = w0 + (lo - t * wt);
          const int k = q - s_offs[lo];  // < min(count, slots-1)
          const uint32_t word =
              __ldcs(p.packed + (m0 + t) * p.row_words + static_cast<int64_t>(tile) * S + 1 + k);
          const uint32_t col = static_cast<uint32_t>(entry_col(word));
          const uint32_t j = static_cast<uint32_t>(tile) * kTileCols + col;
          if (col < static_cast<uint32_t>(kTileCols) && j < H32) {
            pw = (j << 4) | static_cast<uint32_t>(t);
            g = entry_value(word);
          }
        }
        if constexpr (TB == 1) {
          s_pw[i] = pw;
          s_g[i] = g;
        } else {
          tm_pw[i] = pw;
          tm_g[i] = g;
        }
      }
      __syncthreads();

      // 2b. sort by (neuron, token): rank = number of pairs before it in
      // (word, token-major position) order -- a permutation for any input.
      if constexpr (TB > 1) {
        const int nb4 = (nb + 3) & ~3;  // padding words: sentinels past nb, never counted
        const uint4* pw4 = reinterpret_cast<const uint4*>(tm_pw);
        for (int i = tid; i < nb; i += NT) {
          const uint32_t key = tm_pw[i];
          int r = 0;
          for (int q4 = 0; q4 < nb4; q4 += 4) {
            const uint4 kq = pw4[q4 >> 2];
            r += (kq.x < key) | ((kq.x == key) & (q4 + 0 < i));
            r += (kq.y < key) | ((kq.y == key) & (q4 + 1 < i));
            r += (kq.z < key) | ((kq.z == key) & (q4 + 2 < i));
            r += (kq.w < key) | ((kq.w == key) & (q4 + 3 < i));
          }
          s_pw[r] = key;
          s_g[r] = tm_g[i];
        }
        __syncthreads();
      }

      // 3. up phase: h = g * (x . W_u[j]) for every pair.
      if constexpr (MMA) {
        // Tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate): per
        // group of 8 pairs a warp computes C[token][pair] = x[token] . W_u[j_pair]
        // over its share of D for all the block's tokens at once, then keeps
        // the entries C[t_pair][pair]. Lane (n, q) = (lane / 4, lane % 4) loads
        // 16 bytes of pair n's row and of token n's x at 32-column block b,
        // columns 32b + 8q .. +8: the reduction index k of the mma is permuted
        // identically for A and B (k = 2q + {0,1} <-> 8q + 4s + {0,1},
        // k = 2q + 8 + {0,1} <-> 8q + 4s + 2 + {0,1} in step s), which leaves the
        // dot products unchanged. Pairs that share a neuron load the same
        // addresses in the same instruction (one request).
        const int n = lane >> 2;
        const int q = lane & 3;
        const int nkb = (nch + 3) >> 2;                         // 32-column blocks
        const int my_blocks = (nkb - warp + NW - 1) / NW;       // warp-uniform
        const uint4* xrow = xs + min(n, TB - 1) * nch;         // A row n (rows >= TB unused)
        for (int g0 = 0; g0 < nb; g0 += 8) {
          const uint32_t mypw = g0 + n < nb ? s_pw[g0 + n] : kPairSentinel;
          const bool myvalid = mypw != kPairSentinel;
          const uint4* wrow =
              reinterpret_cast<const uint4*>(p.wu + static_cast<int64_t>(mypw >> 4) * p.ldwu);
          if constexpr (TB == 1) {
            // Latency-bound (small M): start W_d's rows on their way to L2.
            const uint4* drow =
                reinterpret_cast<const uint4*>(p.wd + static_cast<int64_t>(mypw >> 4) * p.ldwd);
            for (int i = 0; i < my_blocks; ++i) {
              const int c = (warp + i * NW) * 4 + q;
              if (myvalid && c < nch) prefetch_l2(drow + c);
            }
          }
          float c0 = 0.f, c1 = 0.f, c2 = 0.f, c3 = 0.f;
          constexpr int KB = TB * CH >= 8 ? 4 : 8;  // row loads in flight per thread
          for (int kb0 = 0; kb0 < my_blocks; kb0 += KB) {
            uint4 w[KB];
#pragma unroll
            for (int i = 0; i < KB; ++i) {
              const int c = (warp + (kb0 + i) * NW) * 4 + q;
              w[i] = make_uint4(0u, 0u, 0u, 0u);
              if (kb0 + i < my_blocks && myvalid && c < nch) w[i] = __ldg(wrow + c);
            }
#pragma unroll
            for (int i = 0; i < KB; ++i) {
              if (kb0 + i < my_blocks) {  // warp-uniform
                const int c = (warp + (kb0 + i) * NW) * 4 + q;
                const uint4 xv = c < nch ? xrow[c] : make_uint4(0u, 0u, 0u, 0u);
                mma_bf16_16x8x16(c0, c1, c2, c3, xv.x, xv.y, w[i].x, w[i].y);
                mma_bf16_16x8x16(c0, c1, c2, c3, xv.z, xv.w, w[i].z, w[i].w);
              }
            }
          }
          (void)c2;
          (void)c3;
          // C[n][2q], C[n][2q+1] are in c0, c1: keep the pairs whose token is n.
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int idx = g0 + 2 * q + e;
            if (idx < nb) {
              const uint32_t pwe = s_pw[idx];
              if (pwe != kPairSentinel && static_cast<int>(pwe & 15u) == n)
                red[warp * kPairsMax + idx] = e == 0 ? c0 : c1;
            }
          }
        }
        __syncthreads();
        for (int i = tid; i < nb; i += NT) {
          float s = 0.f;
#pragma unroll
          for (int w = 0; w < NW; ++w) s += red[w * kPairsMax + i];
          s_h[i] = s_g[i] * s;
        }
        __syncthreads();
      } else if constexpr (GATED) {
        uint4 v[CH];
#pragma unroll
        for (int k = 0; k < CH; ++k) v[k] = make_uint4(0u, 0u, 0u, 0u);
        for (int g0 = 0; g0 < nb; g0 += G) {
          uint32_t pw[G];
          const uint32_t prevj = read_group<G>(pw, s_pw, g0, nb);
          uint4 w[G][CH];
          load_rows<G, CH>(w, pw, prevj, p.wu, p.ldwu, ck, ok);
          if constexpr (TB == 1) {
            // Latency-bound (small M): start W_d's rows on their way to L2.
            prefetch_rows<G, CH>(pw, prevj, p.wd, p.ldwd, ck, ok);
          }
          float part[G];
          uint32_t pj = prevj;
#pragma unroll
          for (int pp = 0; pp < G; ++pp) {
            const uint32_t j = pw[pp] >> 4;
            if (j != pj) {
#pragma unroll
              for (int k = 0; k < CH; ++k) v[k] = w[pp][k];
            }
            pj = j;
            float s = 0.f;
            if (pw[pp] != kPairSentinel) {
              const uint4* xr = xs + (pw[pp] & 15u) * nch;
#pragma unroll
              for (int k = 0; k < CH; ++k)
                if (ok[k]) s = dot8(xr[ck[k]], v[k], s);
            }
            part[pp] = s;
          }
          const float r = warp_sum_scatter<G>(part, lane);
          if (lane < G) red[warp * kPairsMax + g0 + lane] = r;
        }
        __syncthreads();
        for (int i = tid; i < nb; i += NT) {
          float s = 0.f;
#pragma unroll
          for (int w = 0; w < NW; ++w) s += red[w * kPairsMax + i];
          s_h[i] = s_g[i] * s;
        }
        __syncthreads();
      }

      // 4. down phase: acc[t] += h * W_d[j].
      {
        const float* hv = GATED ? s_h : s_g;
        uint4 v[CH];
#pragma unroll
        for (int k = 0; k < CH; ++k) v[k] = make_uint4(0u, 0u, 0u, 0u);
        for (int g0 = 0; g0 < nb; g0 += G) {
          uint32_t pw[G];
          const uint32_t prevj = read_group<G>(pw, s_pw, g0, nb);
          uint4 w[G][CH];
          load_rows<G, CH>(w, pw, prevj, p.wd, p.ldwd, ck, ok);
          uint32_t pj = prevj;
#pragma unroll
          for (int pp = 0; pp < G; ++pp) {
            const uint32_t j = pw[pp] >> 4;
            if (j != pj) {
#pragma unroll
              for (int k = 0; k < CH; ++k) v[k] = w[pp][k];
            }
            pj = j;
            if (pw[pp] != kPairSentinel)
              axpy_token<0, TB>(acc, static_cast<int>(pw[pp] & 15u), hv[g0 + pp], v);
          }
        }
      }
      __syncthreads();  // the next batch overwrites the pair arrays
    }
    __syncthreads();  // the next window overwrites s_offs / s_scan
  }

  // Output.
  if (cs == 1) {
#pragma unroll
    for (int t = 0; t < TB; ++t) {
      if (s_act[t]) {
        uint4* yr = reinterpret_cast<uint4*>(p.y + (m0 + t) * p.ldy);
#pragma unroll
        for (int k = 0; k < CH; ++k)
          if (ok[k]) __stcs(yr + ck[k], pack8(acc[t][k]));
      }
    }
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // TB == 1 here (the launcher only clusters single-token CTAs).
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    float4* yb = reinterpret_cast<float4*>(smem + L.ybuf);  // [nch][2]
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      if (ok[k]) {
        yb[2 * ck[k]] = make_float4(acc[0][k][0], acc[0][k][1], acc[0][k][2], acc[0][k][3]);
        yb[2 * ck[k] + 1] = make_float4(acc[0][k][4], acc[0][k][5], acc[0][k][6], acc[0][k][7]);
      }
    }
    cluster.sync();
    if (s_act[0]) {
      const int lo = static_cast<int>((static_cast<int64_t>(nch) * rank) / cs);
      const int hi = static_cast<int>((static_cast<int64_t>(nch) * (rank + 1)) / cs);
      uint4* yr = reinterpret_cast<uint4*>(p.y + m0 * p.ldy);
      for (int c = lo + tid; c < hi; c += NT) {
        float s[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) s[e] = 0.f;
        for (int r = 0; r < cs; ++r) {
          const float4* rb = cluster.map_shared_rank(yb, r);
          const float4 a = rb[2 * c];
          const float4 b = rb[2 * c + 1];
          s[0] += a.x;
          s[1] += a.y;
          s[2] += a.z;
          s[3] += a.w;
          s[4] += b.x;
          s[5] += b.y;
          s[6] += b.z;
          s[7] += b.w;
        }
        __stcs(yr + c, pack8(s));
      }
    }
    cluster.sync();  // keep this CTA's shared memory alive until all have read it
#endif
  }

  if (p.stats != nullptr && tid == 0 && rank == 0) {
    u64 mx = 0;
#pragma unroll
    for (int t = 0; t < TB; ++t)
      if (m0 + t < p.M) mx = s_true[t] > mx ? s_true[t] : mx;
    if (mx != 0) atomicMax(p.stats + TWELL_STAT_MAX_ROW_COUNT, mx);
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------
// D buckets: threads per CTA and 16-byte chunks per thread.
//   0: D <= 1024  (128 x 1)   1: D <= 2048  (256 x 1)   2: D <= 4096 (256 x 2)
//   3: D <= 8192  (256 x 4)   4: D <= 16384 (512 x 4)
int bucket_of(int64_t D) {
  if (D <= 1024) return 0;
  if (D <= 2048) return 1;
  if (D <= 4096) return 2;
  if (D <= 8192) return 3;
  if (D <= 16384) return 4;
  return -1;
}

constexpr int kMaxDevices = 64;

int current_device() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return -1;
  return dev;
}

// Whether single-token CTAs may be split over thread-block clusters on the
// current device: compute capability 9.0+ and the kernels loaded there come
// from sm_90 code (a compute_80 PTX JIT on a newer GPU has no cluster code).
// Cached per device (the answer cannot change while the process runs).
bool clusters_usable() {
  static std::atomic<int> cache[kMaxDevices];  // 0 unknown, 1 yes, 2 no
  const int dev = current_device();
  if (dev < 0) return false;
  const int c = cache[dev].load(std::memory_order_relaxed);
  if (c != 0) return c == 1;
  int major = 0;
  cudaFuncAttributes fa;
  const bool yes =
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
      major >= 9 &&
      cudaFuncGetAttributes(&fa, sparse_ffn_kernel<256, 1, 1, 16, true, true>) == cudaSuccess &&
      fa.ptxVersion >= 90;
  cache[dev].store(yes ? 1 : 2, std::memory_order_relaxed);
  return yes;
}

template <int NT, int CH, int TB, int G, bool GATED, bool MMA>
cudaError_t launch_variant(KParams kp, int csize, cudaStream_t stream) {
  auto kern = sparse_ffn_kernel<NT, CH, TB, G, GATED, MMA>;
  if (TB != 1) csize = 1;
  if (csize > 1 && !clusters_usable()) csize = 1;
  const int64_t blocks = (kp.M + TB - 1) / TB;
  for (;;) {
    kp.csize = csize;
    const Layout L = make_layout(NT, TB, GATED, kp.D, csize);
    const uint32_t smem = L.total;
    if (blocks * csize > INT_MAX) return cudaErrorInvalidValue;
    TWELL_CUDA_TRY(set_max_dynamic_smem(kern, smem));  // once per device and size (common/launch_cache.h)
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(blocks * csize), 1, 1);
    cfg.blockDim = dim3(NT, 1, 1);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    if (csize > 1) {
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = static_cast<unsigned>(csize);
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
    }
    const cudaError_t err = cudaLaunchKernelEx(&cfg, kern, kp);
    if (err == cudaSuccess || csize == 1) return err;
    // A cluster launch the device refuses (e.g. no room for the cluster):
    // clear the error and run one CTA per token instead.
    (void)cudaGetLastError();
    csize = 1;
  }
}

// The up phase runs on FFMA or on tensor cores (MMA); both accumulate the
// exact bf16 products in fp32 and both are tested on every shape.
template <int NT, int CH, int TB, int G, bool GATED>
cudaError_t launch_up(bool mma, const KParams& kp, int csize, cudaStream_t s) {
  if constexpr (GATED) {
    if (mma) return launch_variant<NT, CH, TB, G, true, true>(kp, csize, s);
    return launch_variant<NT, CH, TB, G, true, false>(kp, csize, s);
  } else {
    (void)mma;
    return launch_variant<NT, CH, TB, G, false, false>(kp, csize, s);
  }
}

template <bool GATED>
cudaError_t launch_bucket(int bucket, int tb, bool mma, const KParams& kp, int csize,
                          cudaStream_t s) {
  switch (bucket) {
    case 0:
      if (tb == 8) return launch_up<128, 1, 8, 8, GATED>(mma, kp, 1, s);
      if (tb == 4) return launch_up<128, 1, 4, 8, GATED>(mma, kp, 1, s);
      if (tb == 1) return launch_up<128, 1, 1, 16, GATED>(mma, kp, csize, s);
      break;
    case 1:
      if (tb == 8) return launch_up<256, 1, 8, 8, GATED>(mma, kp, 1, s);
      if (tb == 4) return launch_up<256, 1, 4, 8, GATED>(mma, kp, 1, s);
      if (tb == 1) return launch_up<256, 1, 1, 16, GATED>(mma, kp, csize, s);
      break;
    case 2:
      if (tb == 4) return launch_up<256, 2, 4, 4, GATED>(mma, kp, 1, s);
      if (tb == 2) return launch_up<256, 2, 2, 4, GATED>(mma, kp, 1, s);
      if (tb == 1) return launch_up<256, 2, 1, 4, GATED>(mma, kp, csize, s);
      break;
    case 3:
      if (tb == 2) return launch_up<256, 4, 2, 1, GATED>(mma, kp, 1, s);
      if (tb == 1) return launch_up<256, 4, 1, 2, GATED>(mma, kp, csize, s);
      break;
    case 4:
      if (tb == 1) return launch_up<512, 4, 1, 2, GATED>(mma, kp, csize, s);
      break;
    default:
      break;
  }
  return cudaErrorInvalidValue;
}

bool ld_ok(int64_t ld, int64_t D) { return ld >= D && ld % 8 == 0; }

}  // namespace

namespace sparse_ffn_detail {

int tokens_per_cta_options(int64_t D, int* out) {
  switch (bucket_of(D)) {
    case 0:
    case 1:
      out[0] = 8, out[1] = 4, out[2] = 1;
      return 3;
    case 2:
      out[0] = 4, out[1] = 2, out[2] = 1;
      return 3;
    case 3:
      out[0] = 2, out[1] = 1;
      return 2;
    case 4:
      out[0] = 1;
      return 1;
    default:
      return 0;
  }
}

void default_config(const SparseFfnArgs& a, int sm_count, int* tokens_per_cta, int* cluster,
                    int* up_mma) {
  // Tuned on an H100 SXM (132 SMs) at D = 2048, H = 5632, gated, slots = 32, GPU
  // time with the weights out of L2 (tests/cuda/test_sparse_ffn.cu, 2026-11):
  //  * 8 tokens per CTA once that still gives >= 2 CTAs per SM: the W rows of
  //    neurons shared in a block are read once, which saves 9-16% against 4
  //    tokens on a trained-model-like pattern (5 active/token, 5% live neurons,
  //    M = 4096..65536) and costs 0.4-4% on uniform / hot synthetic patterns;
  //  * 4 tokens from >= 1.5 CTAs per SM (M = 1024: 30-48% faster than
  //    single-token CTAs);
  //  * below that, single-token CTAs, split over a cluster of up to 8 CTAs while
  //    M * cluster <= SMs / 2: M = 1 takes 12.9 us instead of 17.0 us (28-35
  //    active), M = 16 14.3 us instead of 17.7 us; at M = 64 and above the
  //    split does not pay. Clustered launches use the MMA up phase (the only
  //    one timed there); the others FFMA (equal or 1-8% faster everywhere).
  const int64_t sms = sm_count > 0 ? sm_count : 1;
  int opts[3] = {1, 1, 1};
  const int n = tokens_per_cta_options(a.D, opts);
  *up_mma = 0;
  *cluster = 1;
  for (int i = 0; i < n; ++i) {
    const int tb = opts[i];
    if (tb == 1) break;
    const int64_t ctas = (a.M + tb - 1) / tb;
    if ((tb >= 8 && ctas >= 2 * sms) || (tb < 8 && 2 * ctas >= 3 * sms)) {
      *tokens_per_cta = tb;
      return;
    }
  }
  int cs = 1;
  while (cs < 8 && a.M * cs * 2 * 2 <= sms) cs *= 2;
  *tokens_per_cta = 1;
  *cluster = cs;
  *up_mma = cs > 1 ? 1 : 0;
}

int usable_cluster(const SparseFfnArgs& a, int requested) {
  (void)a;
  if (requested <= 1 || !clusters_usable()) return 1;
  return requested;
}

cudaError_t sparse_ffn_config(const SparseFfnArgs& a, int tokens_per_cta, int cluster,
                              int up_mma, cudaStream_t stream) {
  if (a.M < 0 || a.D <= 0 || a.H <= 0 || a.D % 8 != 0 || a.H % 8 != 0)
    return cudaErrorInvalidValue;
  const int bucket = bucket_of(a.D);
  if (bucket < 0) return cudaErrorInvalidValue;
  if (a.slots != 32 && a.slots != 64 && a.slots != 128) return cudaErrorInvalidValue;
  const int64_t tiles = tiles_for(a.H);
  if (tiles > kMaxTiles) return cudaErrorInvalidValue;
  const bool gated = a.w_up != nullptr;
  if (a.packed == nullptr || a.w_down == nullptr || a.y == nullptr) return cudaErrorInvalidValue;
  if (gated && (a.x == nullptr || !ld_ok(a.ldx, a.D) || !ld_ok(a.ldw_up, a.D)))
    return cudaErrorInvalidValue;
  if (!ld_ok(a.ldw_down, a.D) || !ld_ok(a.ldy, a.D)) return cudaErrorInvalidValue;
  if (cluster != 1 && cluster != 2 && cluster != 4 && cluster != 8) return cudaErrorInvalidValue;
  if (a.M == 0) return cudaSuccess;

  KParams kp;
  kp.packed = a.packed;
  kp.row_words = tiles * a.slots;
  kp.slots = a.slots;
  kp.tiles = static_cast<int>(tiles);
  kp.M = a.M;
  kp.D = a.D;
  kp.H = a.H;
  kp.x = a.x;
  kp.ldx = a.ldx;
  kp.wu = a.w_up;
  kp.ldwu = a.ldw_up;
  kp.wd = a.w_down;
  kp.ldwd = a.ldw_down;
  kp.y = a.y;
  kp.ldy = a.ldy;
  kp.flags = a.row_flags;
  kp.stats = a.stats;
  kp.csize = 1;
  return gated ? launch_bucket<true>(bucket, tokens_per_cta, up_mma != 0, kp, cluster, stream)
               : launch_bucket<false>(bucket, tokens_per_cta, false, kp, cluster, stream);
}

}  // namespace sparse_ffn_detail

cudaError_t sparse_ffn(const SparseFfnArgs& args, int sm_count, cudaStream_t stream) {
  int tb = 1, cs = 1, mma = 1;
  sparse_ffn_detail::default_config(args, sm_count, &tb, &cs, &mma);
  return sparse_ffn_detail::sparse_ffn_config(args, tb, cs, mma, stream);
}

}  // namespace twell
