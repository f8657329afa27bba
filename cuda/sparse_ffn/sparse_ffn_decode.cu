// Decode-sized sparse consumer: see sparse_ffn_decode.h for the contract and
// the work split. One CTA = 256 threads = 8 warps; a cluster of C CTAs per
// token (blockIdx.x = token * C + rank).
#include "sparse_ffn/sparse_ffn_decode.h"

#include <cooperative_groups.h>

#include <atomic>
#include <cstdint>

#include "common/bf16x8.cuh"
#include "common/launch_cache.h"
#include "common/pack_entry.cuh"
#include "common/pdl.cuh"
#include "common/ptx_sm80.cuh"
#include "common/warp.cuh"
#include "common/workspace.h"

namespace twell {
namespace {

constexpr int kNT = 256;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int kNW = kNT / 32;
constexpr int kMaxTiles = static_cast<int>(kSparseDecodeMaxRowWords / 32);  // <= kNT: one tile per thread
constexpr int kRowsPerWarp = static_cast<int>(kSparseDecodeMaxRows / kNW);   // statistics pass
constexpr int kTilesPerLane = kMaxTiles / 32;
constexpr int kUpChunks = 8;    // 16-byte loads per lane per W_u row in flight (2048 columns per step)
constexpr int kDownPairs = 8;   // W_d row loads per thread in flight
constexpr int kPreload = 4;     // of which loaded before the up phase (registers: 2 CTAs per SM)
constexpr uint32_t kNoNeuron = 0xFFFFFFFFu;
static_assert(kMaxTiles <= kNT && kMaxTiles % 32 == 0, "tiles");
static_assert(kSparseDecodeMaxRows % kNW == 0, "rows");
#endif

struct Params {
  const uint32_t* packed;
  int row_words, slots, log2_slots, tiles;
  int64_t M, D, H;
  MatRef<const bf16> x;
  MatRef<const bf16> wu;
  MatRef<const bf16> wd;
  MatRef<bf16> y;
  u64* stats;
  int32_t* rows;
  int csize;
  uint32_t dense_pairs;  // 0, or: more stored pairs than this in the call -> the dense path (see the header)
  cudaGraphConditionalHandle dense_condition;
};

// Dynamic shared memory (byte offsets, 16-byte aligned): the packed row, x,
// the pair lists (neuron, gate value, h) and the down phase's cross-group
// buffer. h has its own array because peers write into it (see step 5).
struct Layout {
  uint32_t row, x, j, g, h, red, total;
};

__host__ __device__ inline Layout make_layout(int row_words, int tiles, int slots, int64_t D, bool gated) {
  Layout L;
  SmemRegions r;
  const uint64_t pairs = static_cast<uint64_t>(tiles) * (slots - 1);
  L.row = r.take(static_cast<uint64_t>(row_words) * 4);
  L.x = r.take(gated ? static_cast<uint64_t>(D) * 2 : 0);
  L.j = r.take(pairs * 4);
  L.g = r.take(pairs * 4);
  L.h = r.take(gated ? pairs * 4 : 0);
  L.red = r.take(static_cast<uint64_t>(kNT) * 8 * 4);
  L.total = r.end;
  return L;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Statistics and the overflow list from the count words of all M rows (CTA 0
// only; replaces stats_init + the compaction kernels). Integer sums and maxima:
// exact in any order. All the count words are loaded before any is used (one
// round trip). Contains __syncthreads (CTA-uniform call); warps other than 0
// return from it at once after the barrier. go_dense: the call goes to the
// dense path (no row listed; the condition set for the IF node after).
__device__ void write_stats(const Params& p, bool go_dense) {
  __shared__ int s_over_row[kSparseDecodeMaxRows];
  __shared__ u64 s_part[kNW][4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t cap = static_cast<uint32_t>(p.slots - 1);
  uint32_t cw[kRowsPerWarp][kTilesPerLane];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t r = warp + static_cast<int64_t>(kNW) * i;
#pragma unroll
    for (int k = 0; k < kTilesPerLane; ++k) {
      const int t = lane + 32 * k;
      cw[i][k] = (r < p.M && t < p.tiles)
                     ? __ldcg(p.packed + r * p.row_words + (static_cast<int64_t>(t) << p.log2_slots))
                     : 0u;
    }
  }
  u64 active = 0, over_tiles = 0, max_tile = 0, max_row = 0;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t r = warp + static_cast<int64_t>(kNW) * i;
    uint32_t sum = 0, mx = 0, ov = 0;
#pragma unroll
    for (int k = 0; k < kTilesPerLane; ++k) {
      sum += cw[i][k];
      mx = cw[i][k] > mx ? cw[i][k] : mx;
      ov += cw[i][k] > cap ? 1u : 0u;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      sum += __shfl_xor_sync(0xFFFFFFFFu, sum, o);
      ov += __shfl_xor_sync(0xFFFFFFFFu, ov, o);
      mx = max(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));
    }
    if (r < p.M) {
      active += sum;
      over_tiles += ov;
      max_tile = max_tile > mx ? max_tile : mx;
      max_row = max_row > sum ? max_row : sum;
      if (lane == 0) s_over_row[r] = !go_dense && ov > 0 ? 1 : 0;
    }
  }
  if (lane == 0) {
    s_part[warp][0] = active;
    s_part[warp][1] = over_tiles;
    s_part[warp][2] = max_tile;
    s_part[warp][3] = max_row;
  }
  __syncthreads();
  if (warp == 0) {  // the ascending list by ballots (M <= 64 = two rows per lane)
    static_assert(kSparseDecodeMaxRows <= 64, "two ballots");
    const bool f0 = lane < p.M && s_over_row[lane] != 0;
    const bool f1 = lane + 32 < p.M && s_over_row[lane + 32] != 0;
    const unsigned b0 = __ballot_sync(0xFFFFFFFFu, f0), b1 = __ballot_sync(0xFFFFFFFFu, f1);
    const unsigned below = (1u << lane) - 1u;
    if (f0) p.rows[__popc(b0 & below)] = lane;
    if (f1) p.rows[__popc(b0) + __popc(b1 & below)] = lane + 32;
    if (lane != 0) return;
    const int n = __popc(b0) + __popc(b1);
    u64 a = 0, o = 0, mt = 0, mr = 0;
    for (int w = 0; w < kNW; ++w) {
      a += s_part[w][0];
      o += s_part[w][1];
      mt = mt > s_part[w][2] ? mt : s_part[w][2];
      mr = mr > s_part[w][3] ? mr : s_part[w][3];
    }
    p.stats[TWELL_STAT_ROWS] = static_cast<u64>(p.M);
    p.stats[TWELL_STAT_ACTIVE] = a;
    p.stats[TWELL_STAT_OVERFLOW_ROWS] = static_cast<u64>(n);
    p.stats[TWELL_STAT_OVERFLOW_TILES] = o;
    p.stats[TWELL_STAT_MAX_TILE_COUNT] = mt;
    p.stats[TWELL_STAT_MAX_ROW_COUNT] = mr;
    p.stats[TWELL_STAT_PATH] = TWELL_PATH_SPARSE;  // the dense path rewrites every word
    if (p.dense_pairs > 0) cudaGraphSetConditional(p.dense_condition, go_dense ? 1u : 0u);
    p.stats[TWELL_STAT_FORMAT] = TWELL_FORMAT_VERSION;
  }
}

// The stored pairs of the whole call (every row's clamped tile counts), the
// same in every CTA: the device-side dense decision of a captured AUTO call
// (dense_pairs). Contains __syncthreads (CTA-uniform call).
__device__ uint32_t call_pairs(const Params& p) {
  __shared__ uint32_t s_part[kNW];
  const uint32_t cap = static_cast<uint32_t>(p.slots - 1);
  const int64_t n = p.M * p.tiles;
  uint32_t sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += kNT) {
    const int64_t r = i / p.tiles, t = i - r * p.tiles;
    const uint32_t w = __ldcg(p.packed + r * p.row_words + (t << p.log2_slots));
    sum += w < cap ? w : cap;
  }
  sum = __reduce_add_sync(0xFFFFFFFFu, sum);
  if ((threadIdx.x & 31) == 0) s_part[threadIdx.x >> 5] = sum;
  __syncthreads();
  uint32_t total = 0;
#pragma unroll
  for (int w = 0; w < kNW; ++w) total += s_part[w];  // integers: any order
  return total;
}

// Split cluster barrier: every thread arrives at the start and waits before
// its first write into a peer's shared memory, which must not come before the
// peer has started (the wait is free by then: all CTAs start together).
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait;" ::: "memory"); }
#endif

// Two CTAs per SM (<= 128 registers, no spills): at M = 16 the grid is 16
// clusters of 8 CTAs, placed (PDL) while the gate kernel still holds its SMs;
// at one CTA per SM (152 registers without the bound) it would need 128
// otherwise idle SMs to run in one wave.
template <bool GATED>
__global__ void __launch_bounds__(kNT, 2) sparse_decode_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int s_off[kMaxTiles];
  __shared__ int s_scan[kNW];
  const Layout L = make_layout(p.row_words, p.tiles, p.slots, p.D, GATED);
  uint32_t* s_row = reinterpret_cast<uint32_t*>(smem + L.row);
  bf16* s_x = reinterpret_cast<bf16*>(smem + L.x);
  uint32_t* s_j = reinterpret_cast<uint32_t*>(smem + L.j);
  float* s_g = reinterpret_cast<float*>(smem + L.g);
  float* s_h = reinterpret_cast<float*>(smem + L.h);
  float4* red = reinterpret_cast<float4*>(smem + L.red);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int C = p.csize;
  const int rank = static_cast<int>(blockIdx.x % C);
  const int64_t m = blockIdx.x / C;
  const int nch = static_cast<int>(p.D >> 3);  // 16-byte chunks of a D row
  const uint32_t cap = static_cast<uint32_t>(p.slots - 1);
  const bool exchange = GATED && C > 1;  // CTA-uniform

  // The packed rows come from the previous kernel (the gate GEMM).
  pdl_wait();
  pdl_launch_dependents();  // the fallback's CTAs may now be placed; they wait for this grid
  if (exchange) cluster_arrive_relaxed();

  // 1. The token's packed row and x row into shared memory (one round trip).
  {
    const uint32_t* prow = p.packed + m * p.row_words;
    for (int i = tid; i < (p.row_words >> 2); i += kNT) sm80::cp_async_16(sm80::smem_u32(s_row + 4 * i), prow + 4 * i);
    if (GATED) {
      const bf16* xr = p.x.ptr + m * p.x.ld;
      for (int i = tid; i < nch; i += kNT) sm80::cp_async_16(sm80::smem_u32(s_x + 8 * i), xr + 8 * i);
    }
    sm80::cp_async_commit();
  }
  // A captured AUTO call goes dense when it holds more pairs than dense_pairs:
  // decided here, from this replay's gate output, the same in every CTA.
  const bool go_dense = p.dense_pairs > 0 && call_pairs(p) > p.dense_pairs;  // CTA- and grid-uniform
  if (blockIdx.x == 0) write_stats(p, go_dense);  // overlaps the copies above
  sm80::cp_async_wait_all();
  __syncthreads();

  // 2. Stored entries per tile (clamped counts), their offsets, overflow.
  int c = 0;
  bool over = false;
  if (tid < p.tiles) {
    const uint32_t w = s_row[tid << p.log2_slots];
    over = w > cap;
    c = static_cast<int>(w < cap ? w : cap);
  }
  const bool flagged = (__syncthreads_or(over) != 0) || go_dense;  // CTA- and cluster-uniform (same row)
  const int incl = warp_incl_scan(c, lane);
  if (lane == 31) s_scan[warp] = incl;
  __syncthreads();
  int before = 0, total = 0;
#pragma unroll
  for (int w = 0; w < kNW; ++w) {
    before += w < warp ? s_scan[w] : 0;
    total += s_scan[w];
  }
  if (tid < p.tiles) s_off[tid] = before + incl - c;
  if (flagged) total = 0;  // the fallback computes this row
  __syncthreads();

  // 3. Decode the entries into pair order (tile-major, ascending columns).
  if (!flagged) {
    const int words = p.tiles << p.log2_slots;
    for (int w = tid; w < words; w += kNT) {
      const int t = w >> p.log2_slots;
      const int k = w - (t << p.log2_slots) - 1;
      if (k < 0) continue;
      const uint32_t cw = s_row[t << p.log2_slots];
      if (k >= static_cast<int>(cw < cap ? cw : cap)) continue;
      const int q = s_off[t] + k;
      const uint32_t word = s_row[w];
      const uint32_t col = static_cast<uint32_t>(entry_col(word));
      const int64_t j = static_cast<int64_t>(t) * kTileCols + col;
      const bool valid = col < static_cast<uint32_t>(kTileCols) && j < p.H;
      s_j[q] = valid ? static_cast<uint32_t>(j) : kNoNeuron;
      s_g[q] = valid ? entry_value(word) : 0.0f;
    }
  }
  __syncthreads();

  // 4. This rank's column slice for the down phase; the first batch of its
  //    W_d loads starts now, in flight together with the up phase's W_u loads
  //    (it needs the neurons only, not h).
  const int ca = static_cast<int>((static_cast<int64_t>(nch) * rank) / C);
  const int cz = static_cast<int>((static_cast<int64_t>(nch) * (rank + 1)) / C);
  uint4 pre[kPreload];
  {
    const int n = cz - ca < kNT ? cz - ca : kNT;
    const int groups = n > 0 ? kNT / n : 0;
    const int grp = n > 0 ? tid / n : 0, cl = tid - grp * n;
#pragma unroll
    for (int u = 0; u < kPreload; ++u) {
      const int qq = grp + u * groups;
      const uint32_t j = grp < groups && qq < total ? s_j[qq] : kNoNeuron;
      pre[u] = j != kNoNeuron
                   ? sm80::ld_stream16(reinterpret_cast<const uint4*>(p.wd.ptr + static_cast<int64_t>(j) * p.wd.ld) +
                                       ca + cl)
                   : make_uint4(0u, 0u, 0u, 0u);
    }
  }

  // 5. Up phase on this rank's share of the pairs: one warp per pair, two
  //    pairs per warp at a time (all their 16-byte loads in flight), lanes
  //    over D; W_d's rows start on their way to L2 for the later batches.
  //    Each h goes straight into every rank's s_h (distributed shared
  //    memory stores), so one cluster barrier publishes all of them.
  const int qa = static_cast<int>((static_cast<int64_t>(total) * rank) / C);
  const int qb = static_cast<int>((static_cast<int64_t>(total) * (rank + 1)) / C);
  if (exchange) cluster_wait();  // every peer has started: its shared memory may be written
  for (int q0 = qa + 2 * warp; q0 < qb; q0 += 2 * kNW) {
    const int q1 = q0 + 1;
    const uint32_t j0 = s_j[q0];
    const uint32_t j1 = q1 < qb ? s_j[q1] : kNoNeuron;
    const bool v0 = j0 != kNoNeuron, v1 = j1 != kNoNeuron;
    const bf16* d0 = p.wd.ptr + static_cast<int64_t>(v0 ? j0 : 0) * p.wd.ld;
    const bf16* d1 = p.wd.ptr + static_cast<int64_t>(v1 ? j1 : 0) * p.wd.ld;
    for (int64_t e = static_cast<int64_t>(lane) * 64; e < p.D; e += 32 * 64) {  // 128-byte lines
      if (v0) sm80::prefetch_l2(d0 + e);
      if (v1) sm80::prefetch_l2(d1 + e);
    }
    if constexpr (GATED) {
      const uint4* a0 = reinterpret_cast<const uint4*>(p.wu.ptr + static_cast<int64_t>(v0 ? j0 : 0) * p.wu.ld);
      const uint4* a1 = reinterpret_cast<const uint4*>(p.wu.ptr + static_cast<int64_t>(v1 ? j1 : 0) * p.wu.ld);
      const uint4* xs = reinterpret_cast<const uint4*>(s_x);
      // Four partial sums (load slot u feeds sum u % 4: dependent FMA chains
      // a quarter as long), added in a fixed tree order at the end.
      constexpr int kSums = 4;
      float s0[kSums], s1[kSums];
#pragma unroll
      for (int u = 0; u < kSums; ++u) s0[u] = s1[u] = 0.0f;
      for (int cb = 0; cb < nch; cb += 32 * kUpChunks) {
        uint4 ra[kUpChunks], rb[kUpChunks];
#pragma unroll
        for (int u = 0; u < kUpChunks; ++u) {
          const int ch = cb + lane + 32 * u;
          ra[u] = make_uint4(0u, 0u, 0u, 0u);
          rb[u] = make_uint4(0u, 0u, 0u, 0u);
          if (ch < nch && v0) ra[u] = sm80::ld_stream16(a0 + ch);
          if (ch < nch && v1) rb[u] = sm80::ld_stream16(a1 + ch);
        }
#pragma unroll
        for (int u = 0; u < kUpChunks; ++u) {
          const int ch = cb + lane + 32 * u;
          if (ch < nch) {
            const uint4 xv = xs[ch];
            s0[u % kSums] = dot8(xv, ra[u], s0[u % kSums]);
            s1[u % kSums] = dot8(xv, rb[u], s1[u % kSums]);
          }
        }
      }
      static_assert(kUpChunks % kSums == 0, "sums");
      float u0 = (s0[0] + s0[1]) + (s0[2] + s0[3]);
      float u1 = (s1[0] + s1[1]) + (s1[2] + s1[3]);
      u0 = warp_sum(u0);
      u1 = warp_sum(u1);
      // h = g * u (g is the TwELL bf16 value); lanes r < C store into rank r.
      const float h0 = s_g[q0] * u0;
      const float h1 = q1 < qb ? s_g[q1] * u1 : 0.0f;
      if (exchange) {
        cg::cluster_group cluster = cg::this_cluster();
        if (lane < C) {
          float* dst = cluster.map_shared_rank(s_h, lane);
          dst[q0] = h0;
          if (q1 < qb) dst[q1] = h1;
        }
      } else if (lane == 0) {
        s_h[q0] = h0;
        if (q1 < qb) s_h[q1] = h1;
      }
    }
  }
  if (exchange) {
    cg::this_cluster().sync();  // release/acquire: every rank's h stores are visible; no DSMEM after this
  } else {
    __syncthreads();
  }

  // 6. Down phase on this rank's column slice: thread (group g, chunk cl)
  //    sums the pairs g, g + groups, ... in ascending order; the groups'
  //    partial sums are then added in group order.
  if (flagged) return;  // CTA-uniform, after the last cluster barrier
  const float* hv = GATED ? s_h : s_g;
  uint4* yrow = reinterpret_cast<uint4*>(p.y.ptr + m * p.y.ld);
  for (int c0 = ca; c0 < cz; c0 += kNT) {
    const int n = cz - c0 < kNT ? cz - c0 : kNT;
    const int groups = kNT / n;
    const int grp = tid / n, cl = tid - grp * n;
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
    if (grp < groups) {
      const int ch = c0 + cl;
      for (int q = grp; q < total; q += groups * kDownPairs) {
        const bool first = c0 == ca && q == grp;  // the batch loaded in step 4
        uint4 v[kDownPairs];
        bool ok[kDownPairs];
#pragma unroll
        for (int u = 0; u < kDownPairs; ++u) {
          const int qq = q + u * groups;
          const uint32_t j = qq < total ? s_j[qq] : kNoNeuron;
          ok[u] = j != kNoNeuron;
          if (u < kPreload && first) {
            v[u] = pre[u < kPreload ? u : 0];
          } else {
            v[u] = ok[u] ? sm80::ld_stream16(
                               reinterpret_cast<const uint4*>(p.wd.ptr + static_cast<int64_t>(j) * p.wd.ld) + ch)
                         : make_uint4(0u, 0u, 0u, 0u);
          }
        }
#pragma unroll
        for (int u = 0; u < kDownPairs; ++u)
          if (ok[u]) axpy8(acc, hv[q + u * groups], v[u]);
      }
    }
    if (groups > 1) {
      if (grp < groups) {
        red[2 * tid] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        red[2 * tid + 1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
      }
      __syncthreads();
      if (tid < n) {
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
        for (int g = 0; g < groups; ++g) {
          const float4 a = red[2 * (g * n + tid)];
          const float4 b = red[2 * (g * n + tid) + 1];
          acc[0] += a.x;
          acc[1] += a.y;
          acc[2] += a.z;
          acc[3] += a.w;
          acc[4] += b.x;
          acc[5] += b.y;
          acc[6] += b.z;
          acc[7] += b.w;
        }
      }
      __syncthreads();  // the next slice step overwrites red
    }
    if (tid < n) yrow[c0 + tid] = pack8(acc);
  }
#endif
}

// ---- host side --------------------------------------------------------------
constexpr int kMaxDevices = 64;

int current_device() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    (void)cudaGetLastError();
    return -1;
  }
  return dev;
}

// Whether the kernels run here (not from compute_80 PTX, where their bodies
// are empty).
bool device_ok() { return sm90_code_loaded(sparse_decode_kernel<true>); }

bool ld_ok(int64_t ld, int64_t D) { return ld >= D && ld % 8 == 0; }
bool al16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

int log2_of(int v) {
  int l = 0;
  while ((1 << l) < v) ++l;
  return l;
}

cudaError_t launch(const SparseFfnDecodeArgs& a, int cluster, cudaStream_t stream) {
  if (!sparse_ffn_decode_can_run(a)) return cudaErrorInvalidValue;
  if (cluster != 1 && cluster != 2 && cluster != 4 && cluster != 8) return cudaErrorInvalidValue;
  const bool gated = a.w_up.ptr != nullptr;
  const int tiles = static_cast<int>(tiles_for(a.H));
  Params p{.packed = a.packed,
           .row_words = tiles * a.slots,
           .slots = a.slots,
           .log2_slots = log2_of(a.slots),
           .tiles = tiles,
           .M = a.M,
           .D = a.D,
           .H = a.H,
           .x = a.x,
           .wu = a.w_up,
           .wd = a.w_down,
           .y = a.y,
           .stats = a.stats,
           .rows = a.overflow_rows,
           .csize = 1,
           .dense_pairs = static_cast<uint32_t>(a.dense_pairs),
           .dense_condition = a.dense_condition};
  const Layout L = make_layout(p.row_words, p.tiles, p.slots, p.D, gated);
  auto kern = gated ? sparse_decode_kernel<true> : sparse_decode_kernel<false>;
  // At most 16 + 32 + 2 * 16 + 8 KiB (kSparseDecodeMaxRowWords, D <= 16384).
  // The whole L1/shared carveout goes to shared memory, as for the gate kernel
  // before and the fallback after (no data goes through L1 here), so the SMs
  // need no reconfiguration between the kernels of the chain.
  {
    static std::atomic<uint32_t> allowed[2][kMaxDevices];  // 0 = attributes not set yet
    const int dev = current_device();
    if (dev < 0 || allowed[gated][dev].load(std::memory_order_relaxed) < L.total) {
      TWELL_CUDA_TRY(
          cudaFuncSetAttribute(kern, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
      TWELL_CUDA_TRY(
          cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(L.total)));
      if (dev >= 0) {
        uint32_t cur = allowed[gated][dev].load(std::memory_order_relaxed);
        while (cur < L.total && !allowed[gated][dev].compare_exchange_weak(cur, L.total)) {
        }
      }
    }
  }
  for (;;) {
    p.csize = cluster;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(a.M * cluster), 1, 1);
    cfg.blockDim = dim3(kNT, 1, 1);
    cfg.dynamicSmemBytes = L.total;
    cfg.stream = stream;
    cudaLaunchAttribute attr[2];
    int n = 0;
    if (gated && cluster > 1) {  // only the gated kernel exchanges data between ranks
      attr[n].id = cudaLaunchAttributeClusterDimension;
      attr[n].val.clusterDim.x = static_cast<unsigned>(cluster);
      attr[n].val.clusterDim.y = 1;
      attr[n].val.clusterDim.z = 1;
      ++n;
    }
    if (a.pdl) pdl_attribute(&attr[n++]);
    cfg.attrs = attr;
    cfg.numAttrs = static_cast<unsigned>(n);
    const cudaError_t err = cudaLaunchKernelEx(&cfg, kern, p);
    if (err == cudaSuccess || cluster == 1 || !gated) return err;
    // A cluster shape the device refuses: clear the error, one CTA per token.
    (void)cudaGetLastError();
    cluster = 1;
  }
}

}  // namespace

bool sparse_ffn_decode_can_run(const SparseFfnDecodeArgs& a) {
  if (a.M < 1 || a.M > kSparseDecodeMaxRows) return false;
  if (a.D <= 0 || a.H <= 0 || a.D % 8 != 0 || a.H % 8 != 0 || a.D > 16384) return false;
  if (a.slots != 32 && a.slots != 64 && a.slots != 128) return false;
  if (tiles_for(a.H) * a.slots > kSparseDecodeMaxRowWords) return false;
  if (a.dense_pairs < 0 || a.dense_pairs > INT32_MAX) return false;
  if (a.packed == nullptr || a.w_down.ptr == nullptr || a.y.ptr == nullptr || a.stats == nullptr ||
      a.overflow_rows == nullptr)
    return false;
  const bool gated = a.w_up.ptr != nullptr;
  if (gated &&
      (a.x.ptr == nullptr || !ld_ok(a.x.ld, a.D) || !ld_ok(a.w_up.ld, a.D) || !al16(a.x.ptr) || !al16(a.w_up.ptr)))
    return false;
  if (!ld_ok(a.w_down.ld, a.D) || !ld_ok(a.y.ld, a.D) || !al16(a.w_down.ptr) || !al16(a.y.ptr) || !al16(a.packed))
    return false;
  return device_ok();
}

cudaError_t sparse_ffn_decode(const SparseFfnDecodeArgs& a, int sm_count, cudaStream_t stream) {
  // The most CTAs per token (up to the portable cluster size 8) while the
  // grid stays within one CTA per SM: M = 1..16 -> 8, 17..33 -> 4, 34..64 -> 2
  // on an H100 (132 SMs). The CTAs are small, so the grid is one wave.
  int cluster = 1;
  while (cluster < 8 && a.M * cluster * 2 <= static_cast<int64_t>(sm_count)) cluster *= 2;
  return launch(a, cluster, stream);
}

cudaError_t sparse_ffn_decode_cluster(const SparseFfnDecodeArgs& a, int cluster, cudaStream_t stream) {
  return launch(a, cluster, stream);
}

}  // namespace twell
