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

#include <climits>

#include "common/launch_cache.h"
#include "common/pack_entry.cuh"
#include "common/ptx_sm80.cuh"
#include "common/warp.cuh"
#include "common/workspace.h"
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
  MatRef<const bf16> x;
  MatRef<const bf16> wu;
  MatRef<const bf16> wd;
  MatRef<bf16> y;
  const uint8_t* flags;
  u64* stats;
  int csize;  // CTAs per token (cluster size), 1 = no cluster
};

// Dynamic shared memory layout (byte offsets, 16-byte aligned).
struct Layout {
  uint32_t xs, ybuf, tok_true, act, offs, scan, tm_pw, tm_g, s_pw, s_g, s_h, red, total;
};

__host__ __device__ inline Layout make_layout(int nt, int tb, bool gated, int64_t D, int csize) {
  Layout L;
  SmemRegions r;
  L.xs = r.take(gated ? static_cast<uint64_t>(tb) * D * 2 : 0);
  L.ybuf = r.take(csize > 1 ? static_cast<uint64_t>(tb) * D * 4 : 0);
  L.tok_true = r.take(static_cast<uint64_t>(tb) * 8);
  L.act = r.take(static_cast<uint64_t>(tb) * 4);
  L.offs = r.take((kCountSlots + 1) * 4);
  L.scan = r.take(32 * 4);
  L.tm_pw = r.take(tb > 1 ? kPairsMax * 4 : 0);
  L.tm_g = r.take(tb > 1 ? kPairsMax * 4 : 0);
  L.s_pw = r.take(kPairsMax * 4);
  L.s_g = r.take(kPairsMax * 4);
  L.s_h = r.take(gated ? kPairsMax * 4 : 0);
  L.red = r.take(gated ? static_cast<uint64_t>(nt / 32) * kPairsMax * 4 : 0);
  L.total = r.end;
  return L;
}

// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------
// acc[t] += h * v with a CTA-uniform runtime t: a branch tree keeps every
// register index a compile-time constant.
template <int LO, int HI, int TB, int CH>
__device__ __forceinline__ void axpy_token(float (&acc)[TB][CH][8], int t, float h, const uint4 (&v)[CH]) {
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
__device__ __forceinline__ void load_rows(uint4 (&w)[G][CH], const uint32_t (&pw)[G], uint32_t prevj, const bf16* base,
                                          int64_t ld, const int (&ck)[CH], const bool (&ok)[CH]) {
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
__device__ __forceinline__ void prefetch_rows(const uint32_t (&pw)[G], uint32_t prevj, const bf16* base, int64_t ld,
                                              const int (&ck)[CH], const bool (&ok)[CH]) {
#pragma unroll
  for (int pp = 0; pp < G; ++pp) {
    const uint32_t j = pw[pp] >> 4;
    const bool load = pw[pp] != kPairSentinel && j != prevj;
    prevj = j;
    const uint4* row = reinterpret_cast<const uint4*>(base + static_cast<int64_t>(j) * ld);
#pragma unroll
    for (int k = 0; k < CH; ++k)
      if (load && ok[k]) sm80::prefetch_l2(row + ck[k]);
  }
}

template <int G>
__device__ __forceinline__ uint32_t read_group(uint32_t (&pw)[G], const uint32_t* s_pw, int g0, int nb) {
#pragma unroll
  for (int pp = 0; pp < G; ++pp) pw[pp] = g0 + pp < nb ? s_pw[g0 + pp] : kPairSentinel;
  return g0 > 0 ? (s_pw[g0 - 1] >> 4) : kNoRow;
}

// ---------------------------------------------------------------------------
// Kernel phases, in the order the kernel runs them
// ---------------------------------------------------------------------------
// Register arrays (the per-thread arrays that unrolled loops keep in
// registers: cnt, cfrag, the row chunks v / w, part, the output sums) are
// declared by the kernel and passed to the phases by reference. Declared
// inside an inlined phase, such an array lands elsewhere in the kernel's list
// of locals and ptxas then assigns registers and schedules the phase
// differently (with them inside the phases, none of the 72 kernels kept its
// SASS); declared here, they keep the single-function kernel's code.

// The CTA's shared-memory arrays (byte offsets from make_layout).
struct SmemArrays {
  uint4* xs;        // [TB][nch] the block's x rows (gated)
  u64* s_true;      // [TB] sum of the true counts of each token (statistics)
  int* s_act;       // [TB] 1 = the token exists and is not flagged
  int* s_offs;      // [kCountSlots + 1] first pair of each (token, tile) slot
  int* s_scan;      // [32] per-warp totals of the count scan
  uint32_t* tm_pw;  // [kPairsMax] the batch's pairs in token-major order (TB > 1)
  float* tm_g;      // [kPairsMax] their gate values (TB > 1)
  uint32_t* s_pw;   // [kPairsMax] the batch's pairs sorted by (neuron, token)
  float* s_g;       // [kPairsMax] their gate values
  float* s_h;       // [kPairsMax] their h = g * u (gated)
  float* red;       // [NW][kPairsMax] per-warp partial up dot products (gated)
};

__device__ __forceinline__ SmemArrays carve_smem(unsigned char* smem, const Layout& L) {
  SmemArrays s;
  s.xs = reinterpret_cast<uint4*>(smem + L.xs);
  s.s_true = reinterpret_cast<u64*>(smem + L.tok_true);
  s.s_act = reinterpret_cast<int*>(smem + L.act);
  s.s_offs = reinterpret_cast<int*>(smem + L.offs);
  s.s_scan = reinterpret_cast<int*>(smem + L.scan);
  s.tm_pw = reinterpret_cast<uint32_t*>(smem + L.tm_pw);
  s.tm_g = reinterpret_cast<float*>(smem + L.tm_g);
  s.s_pw = reinterpret_cast<uint32_t*>(smem + L.s_pw);
  s.s_g = reinterpret_cast<float*>(smem + L.s_g);
  s.s_h = reinterpret_cast<float*>(smem + L.s_h);
  s.red = reinterpret_cast<float*>(smem + L.red);
  return s;
}

// What every phase needs to know about its thread, read once at the start (a
// kernel parameter read again after a barrier is a new load).
struct ThreadPos {
  int tid, lane, warp;
  int cs;        // CTAs per token (cluster size), 1 = no cluster
  int rank;      // the CTA's rank in its cluster (0 without a cluster)
  int64_t m0;    // the block's first token
  int nch;       // 16-byte chunks in a row of D
  int S;         // slots per tile
  uint32_t cap;  // entries a tile can hold, S - 1
  uint32_t H32;  // H
};

// Start of the block: mark which of its tokens are live (inside M and not
// flagged), zero their statistics, and for small M start the packed row on
// its way to L2. The caller's barrier publishes s_act / s_true.
template <int NT, int TB>
__device__ __forceinline__ void start_block(const KParams& p, const SmemArrays& s, const ThreadPos& at) {
  if constexpr (TB == 1) {
    // Latency-bound (small M): bring the whole packed row towards L2 now, so
    // that the entry words read after the count scan do not wait for DRAM.
    if (at.m0 < p.M) {
      const uint32_t* prow = p.packed + at.m0 * p.row_words;
      for (int64_t i = static_cast<int64_t>(at.tid) * 32; i < p.row_words; i += NT * 32) sm80::prefetch_l2(prow + i);
    }
  }
  if (at.tid < TB) {
    const int64_t m = at.m0 + at.tid;
    s.s_act[at.tid] = (m < p.M && (p.flags == nullptr || p.flags[m] == 0)) ? 1 : 0;
    s.s_true[at.tid] = 0;
  }
}

// Phase 1a: read the count words of the window's (token, tile) slots, EPT
// consecutive slots per thread (slot f = token * wt + tile - w0), 0 past the
// window or past M. Streamed (read once).
template <int NT, int TB>
__device__ __forceinline__ void load_count_words(uint32_t (&cw)[kCountSlots / NT], const KParams& p,
                                                 const ThreadPos& at, int w0, int wt) {
  constexpr int EPT = kCountSlots / NT;
  const int F = TB * wt;
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
    const int f = at.tid * EPT + e;
    cw[e] = 0;
    if (f < F) {
      const int t = f / wt;
      const int tile = w0 + (f - t * wt);
      const int64_t m = at.m0 + t;
      if (m < p.M) cw[e] = __ldcs(p.packed + m * p.row_words + static_cast<int64_t>(tile) * at.S);
    }
  }
}

// Phase 1b (gated, first window only): the block's x rows into shared memory,
// zeros for tokens that are not live. Issued right after the count words so
// that both are in flight together.
template <int CH, int TB>
__device__ __forceinline__ void stage_x_rows(const KParams& p, const SmemArrays& s, const ThreadPos& at,
                                             const int (&ck)[CH], const bool (&ok)[CH]) {
#pragma unroll
  for (int t = 0; t < TB; ++t) {
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      if (ok[k]) {
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (s.s_act[t]) v = __ldcs(reinterpret_cast<const uint4*>(p.x.ptr + (at.m0 + t) * p.x.ld) + ck[k]);
        s.xs[t * at.nch + ck[k]] = v;
      }
    }
  }
}

// Phase 1c: counts -> offsets. Each count is clamped to the entries a tile
// can hold (slots - 1; 0 for a token that is not live), then a block-wide
// exclusive scan turns them into s_offs[slot] = the slot's first pair, with
// s_offs[kCountSlots] = the window's pair total, which is returned. The true
// counts are summed per token for the statistics on the way. cnt[] holds the
// clamped counts between the two (a register array of the caller's).
template <int NT, int TB>
__device__ __forceinline__ int scan_counts(const SmemArrays& s, const uint32_t (&cw)[kCountSlots / NT],
                                           int (&cnt)[kCountSlots / NT], const KParams& p, const ThreadPos& at,
                                           int wt) {
  constexpr int NW = NT / 32;
  constexpr int EPT = kCountSlots / NT;
  const int F = TB * wt;
  int run = 0;
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
    const int f = at.tid * EPT + e;
    cnt[e] = 0;
    if (f < F) {
      const int t = f / wt;
      if (at.m0 + t < p.M) {
        if (p.stats != nullptr) atomicAdd(&s.s_true[t], static_cast<u64>(cw[e]));
        if (s.s_act[t]) cnt[e] = static_cast<int>(min(cw[e], at.cap));
      }
    }
    run += cnt[e];
  }
  const int incl = warp_incl_scan(run, at.lane);
  if (at.lane == 31) s.s_scan[at.warp] = incl;
  __syncthreads();
  if (at.warp == 0) {
    int v = at.lane < NW ? s.s_scan[at.lane] : 0;
    v = warp_incl_scan(v, at.lane);
    if (at.lane < NW) s.s_scan[at.lane] = v;
  }
  __syncthreads();
  int base = incl - run + (at.warp > 0 ? s.s_scan[at.warp - 1] : 0);
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
    s.s_offs[at.tid * EPT + e] = base;
    base += cnt[e];
  }
  if (at.tid == NT - 1) s.s_offs[kCountSlots] = base;
  __syncthreads();
  return s.s_offs[kCountSlots];
}

// Phase 2a: locate and read the batch's entries (pairs b0 .. b0+nb-1 of the
// window, token-major). Pair q's slot is found by binary search in s_offs;
// only words 1..min(count, slots-1) of a tile are ever read. Each entry
// becomes a pair word (j << 4) | t and its gate value, or the sentinel for
// a column outside its tile or outside H. With one token per CTA the
// token-major order is already (neuron, token) order, so the pairs go
// straight to s_pw / s_g; otherwise to tm_pw / tm_g for the sort.
template <int NT, int TB>
__device__ __forceinline__ void read_entries(const SmemArrays& s, const KParams& p, const ThreadPos& at, int w0, int wt,
                                             int b0, int nb) {
  for (int i = at.tid; i < kPairsMax; i += NT) {
    uint32_t pw = kPairSentinel;
    float g = 0.f;
    if (i < nb) {
      const int q = b0 + i;
      int lo = 0, hi = kCountSlots;  // s_offs[lo] <= q < s_offs[hi]
      while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (s.s_offs[mid] <= q) {
          lo = mid;
        } else {
          hi = mid;
        }
      }
      const int t = lo / wt;
      const int tile = w0 + (lo - t * wt);
      const int k = q - s.s_offs[lo];  // < min(count, slots-1)
      const uint32_t word = __ldcs(p.packed + (at.m0 + t) * p.row_words + static_cast<int64_t>(tile) * at.S + 1 + k);
      const uint32_t col = static_cast<uint32_t>(entry_col(word));
      const uint32_t j = static_cast<uint32_t>(tile) * kTileCols + col;
      if (col < static_cast<uint32_t>(kTileCols) && j < at.H32) {
        pw = (j << 4) | static_cast<uint32_t>(t);
        g = entry_value(word);
      }
    }
    if constexpr (TB == 1) {
      s.s_pw[i] = pw;
      s.s_g[i] = g;
    } else {
      s.tm_pw[i] = pw;
      s.tm_g[i] = g;
    }
  }
}

// Phase 2b (TB > 1): sort the batch's pairs by (neuron, token), so that the
// pairs of a neuron that several tokens share are adjacent and its W rows are
// loaded once for all of them. A pair's rank is the number of pairs before it
// in (word, token-major position) order: a permutation for any input, even
// with repeated words.
template <int NT>
__device__ __forceinline__ void sort_pairs(const SmemArrays& s, int nb, int tid) {
  const int nb4 = (nb + 3) & ~3;  // padding words: sentinels past nb, never counted
  const uint4* pw4 = reinterpret_cast<const uint4*>(s.tm_pw);
  for (int i = tid; i < nb; i += NT) {
    const uint32_t key = s.tm_pw[i];
    int r = 0;
    for (int q4 = 0; q4 < nb4; q4 += 4) {
      const uint4 kq = pw4[q4 >> 2];
      r += (kq.x < key) | ((kq.x == key) & (q4 + 0 < i));
      r += (kq.y < key) | ((kq.y == key) & (q4 + 1 < i));
      r += (kq.z < key) | ((kq.z == key) & (q4 + 2 < i));
      r += (kq.w < key) | ((kq.w == key) & (q4 + 3 < i));
    }
    s.s_pw[r] = key;
    s.s_g[r] = s.tm_g[i];
  }
}

// W_u row loads in flight per thread in the tensor-core up phase.
constexpr int mma_rows_in_flight(int tb, int ch) { return tb * ch >= 8 ? 4 : 8; }

// Phase 3, tensor-core variant: each warp's partial dot products x[t] . W_u[j]
// over its share of D, written to red[warp][pair].
//
// mma.sync m16n8k16, bf16 in, fp32 accumulate: per group of 8 pairs a warp
// computes C[token][pair] = x[token] . W_u[j_pair] over its share of D for all
// the block's tokens at once, then keeps the entries C[t_pair][pair]. Lane
// (n, q) = (lane / 4, lane % 4) loads 16 bytes of pair n's row and of token
// n's x at 32-column block b, columns 32b + 8q .. +8: the reduction index k of
// the mma is permuted identically for A and B (k = 2q + {0,1} <-> 8q + 4s +
// {0,1}, k = 2q + 8 + {0,1} <-> 8q + 4s + 2 + {0,1} in step s), which leaves
// the dot products unchanged. Pairs that share a neuron load the same
// addresses in the same instruction (one request).
template <int NT, int CH, int TB>
__device__ __forceinline__ void up_partials_mma(float (&cfrag)[4], uint4 (&w)[mma_rows_in_flight(TB, CH)],
                                                const SmemArrays& s, const KParams& p, const ThreadPos& at, int nb) {
  constexpr int NW = NT / 32;
  const int warp = at.warp;
  const int nch = at.nch;
  const int n = at.lane >> 2;
  const int q = at.lane & 3;
  const int nkb = (nch + 3) >> 2;                      // 32-column blocks
  const int my_blocks = (nkb - warp + NW - 1) / NW;    // warp-uniform
  const uint4* xrow = s.xs + min(n, TB - 1) * nch;     // A row n (rows >= TB unused)
  for (int g0 = 0; g0 < nb; g0 += 8) {
    const uint32_t mypw = g0 + n < nb ? s.s_pw[g0 + n] : kPairSentinel;
    const bool myvalid = mypw != kPairSentinel;
    const uint4* wrow = reinterpret_cast<const uint4*>(p.wu.ptr + static_cast<int64_t>(mypw >> 4) * p.wu.ld);
    if constexpr (TB == 1) {
      // Latency-bound (small M): start W_d's rows on their way to L2.
      const uint4* drow = reinterpret_cast<const uint4*>(p.wd.ptr + static_cast<int64_t>(mypw >> 4) * p.wd.ld);
      for (int i = 0; i < my_blocks; ++i) {
        const int c = (warp + i * NW) * 4 + q;
        if (myvalid && c < nch) sm80::prefetch_l2(drow + c);
      }
    }
    // Only the A rows 0..7 are used (a1 = a3 = 0); cfrag[2], cfrag[3] (rows 8..15) stay 0.
#pragma unroll
    for (int e = 0; e < 4; ++e) cfrag[e] = 0.f;
    constexpr int KB = mma_rows_in_flight(TB, CH);
    for (int kb0 = 0; kb0 < my_blocks; kb0 += KB) {
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
          sm80::mma_m16n8k16_bf16(cfrag, xv.x, 0u, xv.y, 0u, w[i].x, w[i].y);
          sm80::mma_m16n8k16_bf16(cfrag, xv.z, 0u, xv.w, 0u, w[i].z, w[i].w);
        }
      }
    }
    // C[n][2q], C[n][2q+1] are in cfrag[0], cfrag[1]: keep the pairs whose token is n.
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int idx = g0 + 2 * q + e;
      if (idx < nb) {
        const uint32_t pwe = s.s_pw[idx];
        if (pwe != kPairSentinel && static_cast<int>(pwe & 15u) == n) s.red[warp * kPairsMax + idx] = cfrag[e];
      }
    }
  }
}

// Phase 3, FFMA variant, one group of G sorted pairs: this thread's partial
// dot products x[t] . W_u[j] over its chunks, part[pp] for pair pw[pp]. w holds
// the group's rows as load_rows left them (a neuron's row only at its first
// pair); v carries the current neuron's row from pair to pair and group to
// group. The caller reduces part[] over the warp.
template <int G, int CH>
__device__ __forceinline__ void dot_group(float (&part)[G], uint4 (&v)[CH], const uint4 (&w)[G][CH],
                                          const uint32_t (&pw)[G], uint32_t prevj, const uint4* xs, int nch,
                                          const int (&ck)[CH], const bool (&ok)[CH]) {
  uint32_t pj = prevj;
#pragma unroll
  for (int pp = 0; pp < G; ++pp) {
    const uint32_t j = pw[pp] >> 4;
    if (j != pj) {
#pragma unroll
      for (int k = 0; k < CH; ++k) v[k] = w[pp][k];
    }
    pj = j;
    float sum = 0.f;
    if (pw[pp] != kPairSentinel) {
      const uint4* xr = xs + (pw[pp] & 15u) * nch;
#pragma unroll
      for (int k = 0; k < CH; ++k)
        if (ok[k]) sum = dot8(xr[ck[k]], v[k], sum);
    }
    part[pp] = sum;
  }
}

// Phase 3 end: h = g * u, u the sum of the warps' partials in warp order (a
// fixed order: deterministic).
template <int NT>
__device__ __forceinline__ void gate_products(const SmemArrays& s, int nb, int tid) {
  constexpr int NW = NT / 32;
  for (int i = tid; i < nb; i += NT) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) sum += s.red[w * kPairsMax + i];
    s.s_h[i] = s.s_g[i] * sum;
  }
}

// Phase 4, one group of G sorted pairs: acc[t] += h * W_d[j] for each pair,
// h = hv[pp]. w and v as in dot_group. Pairs run in sorted order, so each
// token's sum runs in ascending neuron order.
template <int G, int CH, int TB>
__device__ __forceinline__ void axpy_group(float (&acc)[TB][CH][8], uint4 (&v)[CH], const uint4 (&w)[G][CH],
                                           const uint32_t (&pw)[G], uint32_t prevj, const float* hv) {
  uint32_t pj = prevj;
#pragma unroll
  for (int pp = 0; pp < G; ++pp) {
    const uint32_t j = pw[pp] >> 4;
    if (j != pj) {
#pragma unroll
      for (int k = 0; k < CH; ++k) v[k] = w[pp][k];
    }
    pj = j;
    if (pw[pp] != kPairSentinel) axpy_token<0, TB>(acc, static_cast<int>(pw[pp] & 15u), hv[pp], v);
  }
}

// Output without a cluster: each live token's row of y, rounded to bf16.
template <int CH, int TB>
__device__ __forceinline__ void store_rows(const float (&acc)[TB][CH][8], const KParams& p, const SmemArrays& s,
                                           const ThreadPos& at, const int (&ck)[CH], const bool (&ok)[CH]) {
#pragma unroll
  for (int t = 0; t < TB; ++t) {
    if (s.s_act[t]) {
      uint4* yr = reinterpret_cast<uint4*>(p.y.ptr + (at.m0 + t) * p.y.ld);
#pragma unroll
      for (int k = 0; k < CH; ++k)
        if (ok[k]) __stcs(yr + ck[k], pack8(acc[t][k]));
    }
  }
}

// Output of a cluster (sm_90, TB == 1: the launcher only clusters
// single-token CTAs): each CTA writes its partial row to its own shared
// memory (yb, [nch][2] float4); after a cluster barrier CTA r sums D-slice r
// over the cluster's CTAs in rank order through distributed shared memory (a
// fixed order: deterministic) and writes it. Nothing on sm_80 (no clusters).
template <int NT, int CH>
__device__ __forceinline__ void store_row_cluster(const float (&acc)[CH][8], float (&sum)[8], float4* yb,
                                                  const KParams& p, const SmemArrays& s, const ThreadPos& at,
                                                  const int (&ck)[CH], const bool (&ok)[CH]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int cs = at.cs;
#pragma unroll
  for (int k = 0; k < CH; ++k) {
    if (ok[k]) {
      yb[2 * ck[k]] = make_float4(acc[k][0], acc[k][1], acc[k][2], acc[k][3]);
      yb[2 * ck[k] + 1] = make_float4(acc[k][4], acc[k][5], acc[k][6], acc[k][7]);
    }
  }
  cluster.sync();
  if (s.s_act[0]) {
    const int lo = static_cast<int>((static_cast<int64_t>(at.nch) * at.rank) / cs);
    const int hi = static_cast<int>((static_cast<int64_t>(at.nch) * (at.rank + 1)) / cs);
    uint4* yr = reinterpret_cast<uint4*>(p.y.ptr + at.m0 * p.y.ld);
    for (int c = lo + at.tid; c < hi; c += NT) {
#pragma unroll
      for (int e = 0; e < 8; ++e) sum[e] = 0.f;
      for (int r = 0; r < cs; ++r) {
        const float4* rb = cluster.map_shared_rank(yb, r);
        const float4 a = rb[2 * c];
        const float4 b = rb[2 * c + 1];
        sum[0] += a.x;
        sum[1] += a.y;
        sum[2] += a.z;
        sum[3] += a.w;
        sum[4] += b.x;
        sum[5] += b.y;
        sum[6] += b.z;
        sum[7] += b.w;
      }
      __stcs(yr + c, pack8(sum));
    }
  }
  cluster.sync();  // keep this CTA's shared memory alive until all have read it
#else
  (void)acc, (void)sum, (void)yb, (void)p, (void)s, (void)at, (void)ck, (void)ok;
#endif
}

// Statistics: the largest true row count of the block's tokens, one atomic
// per block (cluster rank 0 only).
template <int TB>
__device__ __forceinline__ void record_max_count(const KParams& p, const SmemArrays& s, const ThreadPos& at) {
  if (p.stats != nullptr && at.tid == 0 && at.rank == 0) {
    u64 mx = 0;
#pragma unroll
    for (int t = 0; t < TB; ++t)
      if (at.m0 + t < p.M) mx = s.s_true[t] > mx ? s.s_true[t] : mx;
    if (mx != 0) atomicMax(p.stats + TWELL_STAT_MAX_ROW_COUNT, mx);
  }
}

// ---------------------------------------------------------------------------
// The kernel: phases 1-4 per window and batch (see the top of the file), the
// barriers that hand each phase's shared-memory results to the next.
// ---------------------------------------------------------------------------
template <int NT, int CH, int TB, int G_REQ, bool GATED, bool MMA>
__global__ void __launch_bounds__(NT, 65536 / (NT * 128)) sparse_ffn_kernel(const KParams p) {
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

  extern __shared__ __align__(16) unsigned char smem[];
  const Layout L = make_layout(NT, TB, GATED, p.D, p.csize);
  const SmemArrays s = carve_smem(smem, L);

  ThreadPos at;
  at.tid = threadIdx.x;
  at.lane = at.tid & 31;
  at.warp = at.tid >> 5;
  at.cs = p.csize;
  at.rank = at.cs > 1 ? static_cast<int>(blockIdx.x % at.cs) : 0;
  at.m0 = static_cast<int64_t>(blockIdx.x / at.cs) * TB;
  at.nch = static_cast<int>(p.D >> 3);
  at.S = p.slots;
  at.cap = static_cast<uint32_t>(at.S - 1);
  at.H32 = static_cast<uint32_t>(p.H);

  // This thread's 16-byte chunks of a D row: tid, tid + NT, ...
  int ck[CH];
  bool ok[CH];
#pragma unroll
  for (int k = 0; k < CH; ++k) {
    ck[k] = at.tid + k * NT;
    ok[k] = ck[k] < at.nch;
  }

  start_block<NT, TB>(p, s, at);
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

    // 1. counts -> offsets (ends with a barrier).
    uint32_t cw[kCountSlots / NT];
    load_count_words<NT, TB>(cw, p, at, w0, wt);
    if constexpr (GATED) {
      if (w0 == 0) stage_x_rows<CH, TB>(p, s, at, ck, ok);
    }
    int cnt[kCountSlots / NT];
    const int total = scan_counts<NT, TB>(s, cw, cnt, p, at, wt);

    // This CTA's share of the window's pairs (the whole window unless split
    // over a cluster), in batches of up to kPairsMax.
    const int qa = static_cast<int>((static_cast<int64_t>(total) * at.rank) / at.cs);
    const int qb = static_cast<int>((static_cast<int64_t>(total) * (at.rank + 1)) / at.cs);
    for (int b0 = qa; b0 < qb; b0 += kPairsMax) {
      const int nb = min(kPairsMax, qb - b0);

      // 2. the batch's pairs, sorted by (neuron, token).
      read_entries<NT, TB>(s, p, at, w0, wt, b0, nb);
      __syncthreads();
      if constexpr (TB > 1) {
        sort_pairs<NT>(s, nb, at.tid);
        __syncthreads();
      }

      // 3. up phase: h = g * (x . W_u[j]) for every pair.
      if constexpr (GATED) {
        if constexpr (MMA) {
          float cfrag[4];
          uint4 w[mma_rows_in_flight(TB, CH)];
          up_partials_mma<NT, CH, TB>(cfrag, w, s, p, at, nb);
        } else {
          // Per group of G pairs the G row loads of a thread are in flight
          // together; the lanes' partial sums are reduced with a
          // reduce-scatter butterfly, lane i < G keeping pair g0 + i.
          uint4 v[CH];
#pragma unroll
          for (int k = 0; k < CH; ++k) v[k] = make_uint4(0u, 0u, 0u, 0u);
          for (int g0 = 0; g0 < nb; g0 += G) {
            uint32_t pw[G];
            const uint32_t prevj = read_group<G>(pw, s.s_pw, g0, nb);
            uint4 w[G][CH];
            load_rows<G, CH>(w, pw, prevj, p.wu.ptr, p.wu.ld, ck, ok);
            if constexpr (TB == 1) {
              // Latency-bound (small M): start W_d's rows on their way to L2.
              prefetch_rows<G, CH>(pw, prevj, p.wd.ptr, p.wd.ld, ck, ok);
            }
            float part[G];
            dot_group<G, CH>(part, v, w, pw, prevj, s.xs, at.nch, ck, ok);
            const float r = warp_sum_scatter<G>(part, at.lane);
            if (at.lane < G) s.red[at.warp * kPairsMax + g0 + at.lane] = r;
          }
        }
        __syncthreads();
        gate_products<NT>(s, nb, at.tid);
        __syncthreads();
      }

      // 4. down phase: acc[t] += h * W_d[j].
      {
        const float* hv = GATED ? s.s_h : s.s_g;
        uint4 v[CH];
#pragma unroll
        for (int k = 0; k < CH; ++k) v[k] = make_uint4(0u, 0u, 0u, 0u);
        for (int g0 = 0; g0 < nb; g0 += G) {
          uint32_t pw[G];
          const uint32_t prevj = read_group<G>(pw, s.s_pw, g0, nb);
          uint4 w[G][CH];
          load_rows<G, CH>(w, pw, prevj, p.wd.ptr, p.wd.ld, ck, ok);
          axpy_group<G, CH, TB>(acc, v, w, pw, prevj, hv + g0);
        }
      }
      __syncthreads();  // the next batch overwrites the pair arrays
    }
    __syncthreads();  // the next window overwrites s_offs / s_scan
  }

  if (at.cs == 1) {
    store_rows<CH, TB>(acc, p, s, at, ck, ok);
  } else {
    float sum[8];
    store_row_cluster<NT, CH>(acc[0], sum, reinterpret_cast<float4*>(smem + L.ybuf), p, s, at, ck, ok);
  }
  record_max_count<TB>(p, s, at);
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

// Whether single-token CTAs may be split over thread-block clusters on the
// current device: the kernels loaded there come from sm_90 code (a compute_80
// PTX JIT on a newer GPU has no cluster code).
bool clusters_usable() { return sm90_code_loaded(sparse_ffn_kernel<256, 1, 1, 16, true, true>); }

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
cudaError_t launch_bucket(int bucket, int tb, bool mma, const KParams& kp, int csize, cudaStream_t s) {
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
    default: break;
  }
  return cudaErrorInvalidValue;
}

bool ld_ok(int64_t ld, int64_t D) { return ld >= D && ld % 8 == 0; }

}  // namespace

namespace sparse_ffn_detail {

int tokens_per_cta_options(int64_t D, int* out) {
  switch (bucket_of(D)) {
    case 0:
    case 1: out[0] = 8, out[1] = 4, out[2] = 1; return 3;
    case 2: out[0] = 4, out[1] = 2, out[2] = 1; return 3;
    case 3: out[0] = 2, out[1] = 1; return 2;
    case 4: out[0] = 1; return 1;
    default: return 0;
  }
}

void default_config(const SparseFfnArgs& a, int sm_count, int* tokens_per_cta, int* cluster, int* up_mma) {
  // The CTA consumer (below the row consumer's range, or D > 2048), tuned on
  // an H100 SXM (132 SMs) at D = 2048, H = 5632, gated, slots = 32, GPU
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
  // The row consumer (one warp per token) from 4 warps per SM: measured on an
  // H200 (2026-12-02, weights out of L2) it takes 466 us at M = 16384 uniform
  // 0.5% where 8 tokens per CTA take 735 us, 95 us vs 201 us on the zipf
  // pattern, 44-47 us vs 55 us at M = 1024; at M = 256 it is slower (45 vs
  // 27 us). Sub-variant 1 (16 warps per SM) is the fastest from M = 2048
  // (whole FFN at M = 2048: 0.162 ms, sub-variant 0 0.174 ms), 0 below.
  if (rows_supported(a.D) && a.M >= 4 * sms) {
    *tokens_per_cta = kRowsKernel;
    *cluster = 1;
    *up_mma = a.M >= 8 * sms ? 1 : 0;
    return;
  }
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

cudaError_t sparse_ffn_config(const SparseFfnArgs& a, int tokens_per_cta, int cluster, int up_mma,
                              cudaStream_t stream) {
  if (a.M < 0 || a.D <= 0 || a.H <= 0 || a.D % 8 != 0 || a.H % 8 != 0) return cudaErrorInvalidValue;
  const int bucket = bucket_of(a.D);
  if (bucket < 0) return cudaErrorInvalidValue;
  if (a.slots != 32 && a.slots != 64 && a.slots != 128) return cudaErrorInvalidValue;
  const int64_t tiles = tiles_for(a.H);
  if (tiles > kMaxTiles) return cudaErrorInvalidValue;
  const bool gated = a.w_up.ptr != nullptr;
  if (a.packed == nullptr || a.w_down.ptr == nullptr || a.y.ptr == nullptr) return cudaErrorInvalidValue;
  if (gated && (a.x.ptr == nullptr || !ld_ok(a.x.ld, a.D) || !ld_ok(a.w_up.ld, a.D))) return cudaErrorInvalidValue;
  if (!ld_ok(a.w_down.ld, a.D) || !ld_ok(a.y.ld, a.D)) return cudaErrorInvalidValue;
  if (cluster != 1 && cluster != 2 && cluster != 4 && cluster != 8) return cudaErrorInvalidValue;
  if (a.M == 0) return cudaSuccess;
  if (tokens_per_cta == kRowsKernel)
    return cluster == 1 ? sparse_ffn_rows(a, up_mma, nullptr, stream) : cudaErrorInvalidValue;

  const KParams kp{.packed = a.packed,
                   .row_words = tiles * a.slots,
                   .slots = a.slots,
                   .tiles = static_cast<int>(tiles),
                   .M = a.M,
                   .D = a.D,
                   .H = a.H,
                   .x = a.x,
                   .wu = a.w_up,
                   .wd = a.w_down,
                   .y = a.y,
                   .flags = a.row_flags,
                   .stats = a.stats,
                   .csize = 1};
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
