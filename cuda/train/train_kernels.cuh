// Kernels of the training forward/backward (launched from train.cu).
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common/bf16x8.cuh"
#include "common/warp.cuh"
#include "train/train.h"

namespace twell {
namespace train {

constexpr int kRowThreads = 128;     // per-row kernels: 4 warps
constexpr int kChunkRowsSort = 256;  // rows per counting-sort chunk
constexpr int kScanBlock = 2048;     // elements per scan block (256 threads x 8)
constexpr int kColsPerBlock = 256;   // weight-gradient kernels: columns per CTA

struct Item {   // weight-gradient work item: entries [e0, e1) of neuron j
  int64_t j, e0, e1, slot;  // slot < 0: final; else partial slot
};
struct Fin {    // neurons split over several items: sum slots [slot0, slot0 + nseg)
  int64_t j, slot0, nseg, pad;
};
// One ELL entry in the neuron-major (transposed) view, with everything the
// weight gradients need from it, so that kernel reads 16 contiguous bytes per
// entry instead of five scattered words: token, dg, du, h = g * u.
struct alignas(16) WEntry {
  int32_t m;
  float dg, du, h;
};

// ---- forward ----------------------------------------------------------------

__global__ void init_kernel(u64* stats, u64* header, int64_t M, int W, int64_t D, int64_t H, int path) {
  const int t = threadIdx.x;
  if (t < kTrainStatsWords) stats[t] = 0;
  __syncthreads();
  if (t == 0) {
    stats[TWELL_STAT_ROWS] = static_cast<u64>(M);
    stats[TWELL_STAT_PATH] = static_cast<u64>(path);
    stats[TWELL_STAT_FORMAT] = TWELL_FORMAT_VERSION;
    stats[TWELL_TSTAT_ELL_WIDTH] = static_cast<u64>(W);
    stats[TWELL_TSTAT_PHASE] = 1;
    header[0] = kSavedMagic;
    header[1] = static_cast<u64>(M);
    header[2] = 0;
    header[3] = static_cast<u64>(W);
    header[4] = static_cast<u64>(D);
    header[5] = static_cast<u64>(H);
    header[6] = kRouteHybrid;
    header[7] = 0;
  }
}

// TwELL row -> ELL row (warp per row). A row goes to the tail when a tile
// overflowed or its true count exceeds W.
__global__ void convert_kernel(const uint32_t* __restrict__ packed, int64_t M, int64_t H, int slots, int W,
                               uint8_t* __restrict__ flags, int32_t* __restrict__ counts, int32_t* __restrict__ cols,
                               float* __restrict__ gv, float* __restrict__ uv, u64* __restrict__ stats) {
  const int lane = threadIdx.x % 32;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (m >= M) return;
  const int tiles = static_cast<int>(tiles_for(H));
  const uint32_t* pr = packed + m * static_cast<int64_t>(tiles) * slots;
  int total = 0;
  bool over = false;
  for (int t0 = 0; t0 < tiles; t0 += 32) {
    const int t = t0 + lane;
    const int c = t < tiles ? static_cast<int>(pr[static_cast<int64_t>(t) * slots]) : 0;
    over |= c > slots - 1;
    total += c;
  }
#pragma unroll
  for (int d = 16; d > 0; d /= 2) total += __shfl_xor_sync(0xffffffffu, total, d);
  over = __any_sync(0xffffffffu, over);
  const bool tail = over || total > W || flags[m] != 0;
  const int64_t base = m * W;
  if (lane == 0) {
    counts[m] = total;
    flags[m] = tail ? 1 : 0;
    if (total > 0) atomicMax(&stats[TWELL_STAT_MAX_ROW_COUNT], static_cast<u64>(total));
    if (over) atomicAdd(&stats[TWELL_STAT_OVERFLOW_ROWS], 1ull);
  }
  int stored = 0;
  if (!tail) {
    int carry = 0;
    for (int t0 = 0; t0 < tiles; t0 += 32) {
      const int t = t0 + lane;
      const int c = t < tiles ? static_cast<int>(pr[static_cast<int64_t>(t) * slots]) : 0;
      int incl = c;
#pragma unroll
      for (int d = 1; d < 32; d *= 2) {
        const int o = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += o;
      }
      const int off = carry + incl - c;
      for (int i = 0; i < c; ++i) {
        const uint32_t e = pr[static_cast<int64_t>(t) * slots + 1 + i];
        const int col = t * kTileCols + static_cast<int>(e & 0xFFFFu);
        const float v = __uint_as_float((e >> 16) << 16);
        cols[base + off + i] = col;
        gv[base + off + i] = v;
      }
      carry += __shfl_sync(0xffffffffu, incl, 31);
    }
    stored = total;
  }
  for (int k = stored + lane; k < W; k += 32) {
    cols[base + k] = 0;
    gv[base + k] = 0.f;
    uv[base + k] = 0.f;
  }
}

struct EllFwdArgs {
  MatRef<const bf16> x;
  MatRef<const bf16> wu;
  MatRef<const bf16> wd;  // [H, D]
  const uint8_t* flags;
  const int32_t* counts;
  const int32_t* cols;
  const float* g;
  float* u;
  MatRef<bf16> y;
  float* row_l1;
  int64_t D;
  int W;
};

// One CTA per ELL row: u at the active columns, h = g * u, y = h W_d, L1.
__global__ void __launch_bounds__(kRowThreads) ell_forward_kernel(EllFwdArgs a) {
  extern __shared__ uint4 smem[];
  const int nv = static_cast<int>(a.D / 8);
  uint4* xs = smem;
  float* hs = reinterpret_cast<float*>(xs + nv);
  int* js = reinterpret_cast<int*>(hs + a.W);
  const int64_t m = blockIdx.x;
  if (a.flags[m] != 0) return;
  const int n = a.counts[m];
  const int64_t base = m * a.W;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, nwarps = blockDim.x / 32;
  const uint4* xr = reinterpret_cast<const uint4*>(a.x.ptr + m * a.x.ld);
  for (int v = tid; v < nv; v += blockDim.x) xs[v] = xr[v];
  for (int k = tid; k < n; k += blockDim.x) js[k] = a.cols[base + k];
  __syncthreads();
  for (int k = warp; k < n; k += nwarps) {
    const uint4* wr = reinterpret_cast<const uint4*>(a.wu.ptr + static_cast<int64_t>(js[k]) * a.wu.ld);
    float s = 0.f;
    for (int v = lane; v < nv; v += 32) s += dot8(xs[v], wr[v], 0.f);
    s = warp_sum(s);
    if (lane == 0) {
      a.u[base + k] = s;
      hs[k] = a.g[base + k] * s;
    }
  }
  __syncthreads();
  uint4* yr = reinterpret_cast<uint4*>(a.y.ptr + m * a.y.ld);
  for (int v = tid; v < nv; v += blockDim.x) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int k = 0; k < n; ++k) {
      float w[8];
      unpack8(reinterpret_cast<const uint4*>(a.wd.ptr + static_cast<int64_t>(js[k]) * a.wd.ld)[v], w);
      const float h = hs[k];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = fmaf(h, w[i], acc[i]);
    }
    yr[v] = pack8(acc);
  }
  if (tid == 0) {
    float s = 0.f;
    for (int k = 0; k < n; ++k) s += fabsf(hs[k]);
    a.row_l1[m] = s;
  }
}

// Tail chunks: block i of a chunk takes tail row r0 + i, which exists when it
// is below the device-side tail count T (header[2]). A chunk of a captured
// call has the size the graph was built with, so its rows past T are padding:
// gathered as zeros (so the GEMMs give exact zeros for them) and never
// scattered back or counted.
__device__ __forceinline__ bool tail_row_valid(const u64* tail_count, int64_t r0) {
  return static_cast<u64>(r0) + blockIdx.x < *tail_count;
}

__global__ void gather_rows_kernel(const bf16* __restrict__ src, int64_t ld, const int32_t* __restrict__ rows,
                                   const u64* __restrict__ tail_count, int64_t r0, int64_t D, bf16* __restrict__ out) {
  const int64_t i = blockIdx.x;
  uint4* o = reinterpret_cast<uint4*>(out + i * D);
  if (!tail_row_valid(tail_count, r0)) {
    for (int v = threadIdx.x; v < D / 8; v += blockDim.x) o[v] = make_uint4(0, 0, 0, 0);
    return;
  }
  const int64_t r = rows[r0 + i];
  const uint4* s = reinterpret_cast<const uint4*>(src + r * ld);
  for (int v = threadIdx.x; v < D / 8; v += blockDim.x) o[v] = s[v];
}

__global__ void scatter_rows_kernel(const bf16* __restrict__ src, const int32_t* __restrict__ rows,
                                    const u64* __restrict__ tail_count, int64_t r0, int64_t D, bf16* __restrict__ dst,
                                    int64_t ld) {
  const int64_t i = blockIdx.x;
  if (!tail_row_valid(tail_count, r0)) return;
  const int64_t r = rows[r0 + i];
  const uint4* s = reinterpret_cast<const uint4*>(src + i * D);
  uint4* o = reinterpret_cast<uint4*>(dst + r * ld);
  for (int v = threadIdx.x; v < D / 8; v += blockDim.x) o[v] = s[v];
}

__device__ __forceinline__ float block_sum_fixed(float v, float* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  const float r = sh[0];
  __syncthreads();
  return r;
}

// Dense tail rows (forward). One CTA per tail row of the chunk: h = relu(G) U
// written over G (bf16, the y GEMM's operand; G and U are the bf16 GEMM
// outputs), the row's L1 (fp32 |relu(g) u| in a fixed order) and L0.
__global__ void __launch_bounds__(256) tail_forward_act_kernel(bf16* G_then_h, const bf16* __restrict__ U, int64_t H,
                                                               const int32_t* __restrict__ rows,
                                                               const u64* __restrict__ tail_count, int64_t r0,
                                                               float* __restrict__ row_l1, int32_t* __restrict__ counts,
                                                               u64* __restrict__ stats, int count_active) {
  __shared__ float sh[256];
  const int64_t i = blockIdx.x;
  float l1 = 0.f;
  int cnt = 0;
  for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
    const int64_t o = i * H + c;
    const float g = __bfloat162float(G_then_h[o]), u = __bfloat162float(U[o]);
    const float h = g > 0.f ? g * u : 0.f;
    cnt += g > 0.f ? 1 : 0;
    G_then_h[o] = __float2bfloat16_rn(h);
    l1 += fabsf(h);
  }
  const float tot = block_sum_fixed(l1, sh);
  const float ctot = block_sum_fixed(static_cast<float>(cnt), sh);  // exact: < 2^24
  if (threadIdx.x == 0 && tail_row_valid(tail_count, r0)) {
    const int64_t r = rows[r0 + i];
    row_l1[r] = tot;
    const int n = static_cast<int>(ctot);
    if (count_active) {
      counts[r] = n;
      if (n > 0) {
        atomicAdd(&stats[TWELL_STAT_ACTIVE], static_cast<u64>(n));
        atomicMax(&stats[TWELL_STAT_MAX_ROW_COUNT], static_cast<u64>(n));
      }
    }
  }
}

// L1 sum (fixed order, double accumulation) and the forward's final statistics.
__global__ void __launch_bounds__(1024) forward_final_kernel(const float* __restrict__ row_l1,
                                                             const uint8_t* __restrict__ flags,
                                                             const int32_t* __restrict__ counts, int64_t M,
                                                             const u64* __restrict__ header, float* l1_out, u64* stats,
                                                             int force_dense, int64_t chunk_rows, int host_syncs) {
  __shared__ double sd[1024];
  __shared__ long long sl[1024];
  double s = 0.0;
  long long e = 0;
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    s += static_cast<double>(row_l1[i]);
    if (flags[i] == 0) e += counts[i];
  }
  sd[threadIdx.x] = s;
  sl[threadIdx.x] = e;
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k /= 2) {
    if (threadIdx.x < k) {
      sd[threadIdx.x] += sd[threadIdx.x + k];
      sl[threadIdx.x] += sl[threadIdx.x + k];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (l1_out != nullptr) *l1_out = static_cast<float>(sd[0]);
    const u64 T = header[2];
    const u64 Mu = static_cast<u64>(M);
    stats[TWELL_TSTAT_TAIL_ROWS] = T;
    stats[TWELL_TSTAT_ELL_ROWS] = Mu - T;
    stats[TWELL_TSTAT_TAIL_CHUNKS] = (T + static_cast<u64>(chunk_rows) - 1) / static_cast<u64>(chunk_rows);
    stats[TWELL_TSTAT_HOST_SYNCS] = static_cast<u64>(host_syncs);
    stats[TWELL_TSTAT_ELL_ENTRIES] = static_cast<u64>(sl[0]);
    stats[TWELL_STAT_PATH] =
        force_dense ? TWELL_PATH_DENSE
                    : (T == 0 ? TWELL_PATH_SPARSE : (T == Mu ? TWELL_PATH_DENSE : TWELL_TRAIN_PATH_HYBRID));
  }
}

// ---- backward ---------------------------------------------------------------

struct EllBwdArgs {
  MatRef<const bf16> dy;
  MatRef<const bf16> wg;
  MatRef<const bf16> wu;
  MatRef<const bf16> wd;  // [H, D]
  const uint8_t* flags;
  const int32_t* counts;
  const int32_t* cols;
  const float* g;
  const float* u;
  float* dg;
  float* du;
  MatRef<bf16> dx;
  float coef;
  const float* coef_scale;  // device float or nullptr (coefficient = coef * *coef_scale)
  int64_t D;
  int W;
};

// The L1 coefficient of a backward: a host value, times a device value when
// one is given (the gradient of the forward's L1 output, so that autograd
// never has to bring it to the host).
__device__ __forceinline__ float l1_coefficient(float coef, const float* scale) {
  return scale != nullptr ? coef * *scale : coef;
}

// The ELL backward is two passes so that each one's weight rows stay in L2
// (W_d alone, then W_g and W_u: 23 + 46 MB at D = 2048, H = 5632, where the
// three together would not fit the H100's 50 MB).
// Pass 1, one CTA per ELL row: dh at the active columns (+ L1 term), dg, du.
__global__ void __launch_bounds__(kRowThreads) ell_dh_kernel(EllBwdArgs a) {
  extern __shared__ uint4 smem[];
  const int nv = static_cast<int>(a.D / 8);
  uint4* ys = smem;
  const int64_t m = blockIdx.x;
  if (a.flags[m] != 0) return;
  const int n = a.counts[m];
  const int64_t base = m * a.W;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, nwarps = blockDim.x / 32;
  const uint4* yr = reinterpret_cast<const uint4*>(a.dy.ptr + m * a.dy.ld);
  for (int v = tid; v < nv; v += blockDim.x) ys[v] = yr[v];
  const float coef = l1_coefficient(a.coef, a.coef_scale);
  __syncthreads();
  for (int k = warp; k < n; k += nwarps) {
    const uint4* wr = reinterpret_cast<const uint4*>(a.wd.ptr + static_cast<int64_t>(a.cols[base + k]) * a.wd.ld);
    float s = 0.f;
    for (int v = lane; v < nv; v += 32) s += dot8(ys[v], wr[v], 0.f);
    s = warp_sum(s);
    if (lane == 0) {
      const float uu = a.u[base + k], gg = a.g[base + k];
      const float h = gg * uu;
      const float sg = h > 0.f ? 1.f : (h < 0.f ? -1.f : 0.f);
      const float dh = s + coef * sg;
      a.dg[base + k] = dh * uu;
      a.du[base + k] = dh * gg;
    }
  }
}

// Pass 2, one CTA per ELL row: dx row = sum over the active columns of
// dg W_g[j] + du W_u[j], in column order.
__global__ void __launch_bounds__(kRowThreads) ell_dx_kernel(EllBwdArgs a) {
  extern __shared__ uint4 smem[];
  const int nv = static_cast<int>(a.D / 8);
  float* dgs = reinterpret_cast<float*>(smem);
  float* dus = dgs + a.W;
  int* js = reinterpret_cast<int*>(dus + a.W);
  const int64_t m = blockIdx.x;
  if (a.flags[m] != 0) return;
  const int n = a.counts[m];
  const int64_t base = m * a.W;
  const int tid = threadIdx.x;
  for (int k = tid; k < n; k += blockDim.x) {
    js[k] = a.cols[base + k];
    dgs[k] = a.dg[base + k];
    dus[k] = a.du[base + k];
  }
  __syncthreads();
  uint4* xr = reinterpret_cast<uint4*>(a.dx.ptr + m * a.dx.ld);
  for (int v = tid; v < nv; v += blockDim.x) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int k = 0; k < n; ++k) {
      float w[8], w2[8];
      unpack8(reinterpret_cast<const uint4*>(a.wg.ptr + static_cast<int64_t>(js[k]) * a.wg.ld)[v], w);
      unpack8(reinterpret_cast<const uint4*>(a.wu.ptr + static_cast<int64_t>(js[k]) * a.wu.ld)[v], w2);
      const float p = dgs[k], q = dus[k];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = fmaf(q, w2[i], fmaf(p, w[i], acc[i]));
    }
    xr[v] = pack8(acc);
  }
}

// Counting sort, step 1: hist[j * nchunks + chunk(m)] += 1 for every ELL entry (warp per row).
__global__ void hist_kernel(const uint8_t* __restrict__ flags, const int32_t* __restrict__ counts,
                            const int32_t* __restrict__ cols, int64_t M, int W, int64_t nchunks,
                            unsigned long long* __restrict__ hist) {
  const int lane = threadIdx.x % 32;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (m >= M || flags[m] != 0) return;
  const int n = counts[m];
  const int64_t c = m / kChunkRowsSort;
  for (int k = lane; k < n; k += 32) {
    const int64_t j = cols[m * W + k];
    atomicAdd(&hist[j * nchunks + c], 1ull);
  }
}

// Exclusive scan of n uint64 in place: block sums, scan of the sums, apply.
__global__ void __launch_bounds__(256) scan_sums_kernel(const unsigned long long* __restrict__ v, int64_t n,
                                                        unsigned long long* __restrict__ bsum) {
  __shared__ unsigned long long sh[256];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kScanBlock + threadIdx.x * 8;
  unsigned long long s = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) s += (i0 + i < n) ? v[i0 + i] : 0ull;
  sh[threadIdx.x] = s;
  __syncthreads();
  for (int k = 128; k > 0; k /= 2) {
    if (threadIdx.x < k) sh[threadIdx.x] += sh[threadIdx.x + k];
    __syncthreads();
  }
  if (threadIdx.x == 0) bsum[blockIdx.x] = sh[0];
}

__global__ void __launch_bounds__(1024) scan_block_sums_kernel(unsigned long long* bsum, int64_t nb) {
  using Scan = cub::BlockScan<unsigned long long, 1024>;
  __shared__ typename Scan::TempStorage tmp;
  unsigned long long carry = 0;
  for (int64_t b0 = 0; b0 < nb; b0 += 1024) {
    const int64_t i = b0 + threadIdx.x;
    const unsigned long long v = i < nb ? bsum[i] : 0ull;
    unsigned long long out, total;
    Scan(tmp).ExclusiveSum(v, out, total);
    if (i < nb) bsum[i] = out + carry;
    carry += total;
    __syncthreads();
  }
}

__global__ void __launch_bounds__(256) scan_apply_kernel(unsigned long long* __restrict__ v, int64_t n,
                                                         const unsigned long long* __restrict__ bsum) {
  using Scan = cub::BlockScan<unsigned long long, 256>;
  __shared__ typename Scan::TempStorage tmp;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kScanBlock + threadIdx.x * 8;
  unsigned long long loc[8];
  unsigned long long s = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    loc[i] = s;
    s += (i0 + i < n) ? v[i0 + i] : 0ull;
  }
  unsigned long long off;
  Scan(tmp).ExclusiveSum(s, off);
  const unsigned long long b = bsum[blockIdx.x] + off;
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (i0 + i < n) v[i0 + i] = b + loc[i];
}

__global__ void nstart_kernel(const unsigned long long* __restrict__ scan, int64_t H, int64_t nchunks,
                              long long* __restrict__ nstart) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j <= H) nstart[j] = static_cast<long long>(scan[j * nchunks]);
}

// Counting sort, step 3: one CTA per chunk of rows; an entry of row m and
// neuron j goes to scan[j, chunk] + (entries of j in the chunk's rows before
// m), so every neuron's list is in ascending token order (deterministic).
//
// The chunk's rows are taken a stage at a time: their columns are staged in
// shared memory (coalesced), the offsets within the chunk come from per-neuron
// counters in shared memory, row after row (only shared memory on that serial
// path), and the entries are then written out in parallel. Needs
// sort_scatter_smem(H) bytes of dynamic shared memory (sort_scatter_fits).
constexpr int kSortStageEntries = 8192;  // row slots staged at a time (rows = this / W)
inline size_t sort_scatter_smem(int64_t H) {
  return static_cast<size_t>(kSortStageEntries) * (4 + 2) + ((static_cast<size_t>(H) * 2 + 15) & ~size_t(15));
}
inline bool sort_scatter_fits(int64_t H) { return sort_scatter_smem(H) <= size_t(160) << 10; }

__global__ void __launch_bounds__(256) sort_scatter_kernel(
    const uint8_t* __restrict__ flags, const int32_t* __restrict__ counts, const int32_t* __restrict__ cols, int64_t M,
    int W, int64_t H, int64_t nchunks, const unsigned long long* __restrict__ start, const float* __restrict__ dg,
    const float* __restrict__ du, const float* __restrict__ g, const float* __restrict__ u,
    WEntry* __restrict__ trans) {
  extern __shared__ uint4 smem_u4[];
  int32_t* scol = reinterpret_cast<int32_t*>(smem_u4);                // [stage rows * W], -1 = no entry
  uint16_t* soff = reinterpret_cast<uint16_t*>(scol + kSortStageEntries);  // offset within the chunk
  uint16_t* seen = soff + kSortStageEntries;                          // [H]: entries of j so far in the chunk
  const int t = threadIdx.x;
  const int64_t c = blockIdx.x;
  for (int64_t j = t; j < H; j += blockDim.x) seen[j] = 0;
  const int stage_rows = kSortStageEntries / W;
  for (int r0 = 0; r0 < kChunkRowsSort; r0 += stage_rows) {
    const int64_t m0 = c * kChunkRowsSort + r0;
    if (m0 >= M) break;
    int rows = min(stage_rows, kChunkRowsSort - r0);
    if (M - m0 < rows) rows = static_cast<int>(M - m0);
    __syncthreads();  // seen zeroed / the previous stage written out
    for (int i = t; i < rows * W; i += blockDim.x) {
      const int64_t m = m0 + i / W;
      const int k = i % W;
      scol[i] = (flags[m] == 0 && k < counts[m]) ? cols[m * W + k] : -1;
    }
    __syncthreads();
    for (int r = 0; r < rows; ++r) {  // W <= 256 = blockDim: one slot per thread
      if (t < W) {
        const int j = scol[r * W + t];
        if (j >= 0) {
          const uint16_t o = seen[j];
          seen[j] = static_cast<uint16_t>(o + 1);
          soff[r * W + t] = o;
        }
      }
      __syncthreads();
    }
    for (int i = t; i < rows * W; i += blockDim.x) {
      const int j = scol[i];
      if (j < 0) continue;
      const int64_t m = m0 + i / W, p = m * W + i % W;
      const unsigned long long pos = start[static_cast<int64_t>(j) * nchunks + c] + soff[i];
      trans[pos] = WEntry{static_cast<int32_t>(m), dg[p], du[p], g[p] * u[p]};
    }
  }
}

// The same for H past sort_scatter_fits: row after row through global memory.
__global__ void __launch_bounds__(256) sort_scatter_serial_kernel(
    const uint8_t* __restrict__ flags, const int32_t* __restrict__ counts, const int32_t* __restrict__ cols, int64_t M,
    int W, int64_t nchunks, unsigned long long* cursor, const float* __restrict__ dg, const float* __restrict__ du,
    const float* __restrict__ g, const float* __restrict__ u, WEntry* __restrict__ trans) {
  const int64_t c = blockIdx.x;
  for (int r = 0; r < kChunkRowsSort; ++r) {
    const int64_t m = c * kChunkRowsSort + r;
    if (m >= M) break;
    if (flags[m] == 0) {
      const int n = counts[m];
      if (static_cast<int>(threadIdx.x) < n) {
        const int64_t j = cols[m * W + threadIdx.x];
        const int64_t idx = j * nchunks + c;
        const unsigned long long pos = cursor[idx];
        cursor[idx] = pos + 1;
        const int64_t p = m * W + threadIdx.x;
        trans[pos] = WEntry{static_cast<int32_t>(m), dg[p], du[p], g[p] * u[p]};
      }
    }
    __syncthreads();
  }
}

// Dense tail rows (backward), in place per element of the chunk: G -> dG,
// U -> dU, dH -> h (bf16: the dx and weight-gradient GEMMs' operands), with
// dh = dH + c sign(h).
__global__ void __launch_bounds__(256) tail_backward_elem_kernel(bf16* G_then_dg, bf16* U_then_du, bf16* DH_then_h,
                                                                 int64_t H, float coef_host,
                                                                 const float* __restrict__ coef_scale) {
  const int64_t i = blockIdx.x;
  const float coef = l1_coefficient(coef_host, coef_scale);
  for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
    const int64_t o = i * H + c;
    const float g = __bfloat162float(G_then_dg[o]), u = __bfloat162float(U_then_du[o]);
    const bool on = g > 0.f;
    const float h = on ? g * u : 0.f;
    const float sg = h > 0.f ? 1.f : (h < 0.f ? -1.f : 0.f);
    const float dh = __bfloat162float(DH_then_h[o]) + coef * sg;
    G_then_dg[o] = __float2bfloat16_rn(on ? dh * u : 0.f);
    U_then_du[o] = __float2bfloat16_rn(on ? dh * g : 0.f);
    DH_then_h[o] = __float2bfloat16_rn(h);
  }
}

__global__ void scatter_dx_kernel(const float* __restrict__ a, const int32_t* __restrict__ rows,
                                  const u64* __restrict__ tail_count, int64_t r0, int64_t D, bf16* __restrict__ dx,
                                  int64_t ld) {
  const int64_t i = blockIdx.x;
  if (!tail_row_valid(tail_count, r0)) return;
  const int64_t r = rows[r0 + i];
  for (int64_t c = threadIdx.x; c < D; c += blockDim.x) dx[r * ld + c] = __float2bfloat16_rn(a[i * D + c]);
}

// ---- hot neurons of the weight gradients (tensor cores) ----
// A trained model's activity is concentrated: a few neurons are active in a
// large share of the tokens, and gathering a token row per entry for them is
// the weight gradients' main cost. Neurons with at least
// max(kHotMinCount, M / kHotFraction) ELL entries -- at most kHotMax of them,
// the busiest (the threshold is raised until they fit) -- take their weight
// gradients from dense GEMMs over every row instead:
//   [dW_g; dW_u][hot] (2 kHotMax x D) = [dG_hot | dU_hot]^T X,
//   dW_d[hot] (kHotMax x D) = H_hot^T dY,
// where dG_hot, dU_hot, H_hot hold those neurons' columns of dg, du, h as bf16
// (zeros elsewhere and on tail rows), built per chunk of rows. The gather
// kernel leaves hot neurons out (count 0 in the schedule) and adds the GEMMs'
// rows when it stores. Deterministic: fixed GEMM shapes, every operand element
// written by one entry.
constexpr int kHotMax = 128;
constexpr int64_t kHotMinCount = 256;
constexpr int64_t kHotFraction = 64;
constexpr int kHotThreads = 1024;

struct HotSet {
  int32_t n;  // hot neurons (rank 0 .. n-1, in neuron order)
  int32_t pad[3];
};

// One CTA: the hot set from the per-neuron entry offsets nstart[H + 1].
__global__ void __launch_bounds__(kHotThreads) hot_select_kernel(const long long* __restrict__ nstart, int64_t H,
                                                                 int64_t M, int32_t* __restrict__ rank,
                                                                 HotSet* __restrict__ out) {
  using Reduce = cub::BlockReduce<long long, kHotThreads>;
  using Scan = cub::BlockScan<int, kHotThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ long long shared_value;
  const int t = threadIdx.x;
  const int64_t per = (H + kHotThreads - 1) / kHotThreads;
  const int64_t j0 = min(H, t * per), j1 = min(H, j0 + per);
  const auto count = [&](int64_t j) { return nstart[j + 1] - nstart[j]; };
  const auto block_sum = [&](long long v) {  // the same value in every thread
    const long long r = Reduce(tmp.reduce).Sum(v);
    if (t == 0) shared_value = r;
    __syncthreads();
    const long long out_v = shared_value;
    __syncthreads();
    return out_v;
  };
  const auto over = [&](long long tau) {
    long long c = 0;
    for (int64_t j = j0; j < j1; ++j) c += count(j) >= tau ? 1 : 0;
    return block_sum(c);
  };
  // The smallest threshold >= the floor with at most kHotMax neurons at or over it.
  long long lo = max(kHotMinCount, M / kHotFraction);
  if (over(lo) > kHotMax) {
    long long hi = M + 1;  // over(M + 1) = 0
    while (hi - lo > 1) {
      const long long mid = lo + (hi - lo) / 2;
      if (over(mid) > kHotMax) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    lo = hi;
  }
  int mine = 0;
  for (int64_t j = j0; j < j1; ++j) mine += count(j) >= lo ? 1 : 0;
  int r = 0, total = 0;
  Scan(tmp.scan).ExclusiveSum(mine, r, total);
  for (int64_t j = j0; j < j1; ++j) rank[j] = count(j) >= lo ? r++ : -1;
  if (t == 0) out->n = total;
}

// One warp per row m0 + i (i < rows): that row of dG_hot | dU_hot ([rows, 2 kHotMax])
// and H_hot ([rows, kHotMax]), zeros but at the row's hot ELL entries.
__global__ void hot_operands_kernel(const uint8_t* __restrict__ flags, const int32_t* __restrict__ counts,
                                    const int32_t* __restrict__ cols, const float* __restrict__ dg,
                                    const float* __restrict__ du, const float* __restrict__ g,
                                    const float* __restrict__ u, const int32_t* __restrict__ rank, int64_t m0,
                                    int64_t rows, int W, bf16* __restrict__ a_gu, bf16* __restrict__ a_h) {
  const int lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (i >= rows) return;
  uint4* gu = reinterpret_cast<uint4*>(a_gu + i * 2 * kHotMax);  // 2 kHotMax bf16 = 32 x 16 bytes
  uint4* hh = reinterpret_cast<uint4*>(a_h + i * kHotMax);       // 16 x 16 bytes
  gu[lane] = make_uint4(0, 0, 0, 0);
  if (lane < kHotMax / 8) hh[lane] = make_uint4(0, 0, 0, 0);
  __syncwarp();
  const int64_t m = m0 + i;
  if (flags[m] != 0) return;
  const int n = counts[m];
  const int64_t base = m * W;
  for (int k = lane; k < n; k += 32) {
    const int r = rank[cols[base + k]];
    if (r < 0) continue;
    a_gu[i * 2 * kHotMax + r] = __float2bfloat16_rn(dg[base + k]);
    a_gu[i * 2 * kHotMax + kHotMax + r] = __float2bfloat16_rn(du[base + k]);
    a_h[i * kHotMax + r] = __float2bfloat16_rn(g[base + k] * u[base + k]);
  }
}

// The weight-gradient schedule, built on the device from the per-neuron
// counts (schedule_kernel) so that no host needs to see them.
struct WgSchedule {
  int64_t items, fins;      // work items and split neurons
  int64_t entries;          // ELL entries over all neurons
  int64_t max_count;        // entries of the busiest neuron
  int64_t segment;          // entries per item of a split neuron
  int64_t pad[3];
};

struct WgArgs {
  const Item* items;
  const Fin* fins;
  const WEntry* trans;
  const WgSchedule* sched;  // items x ycols work units
  const u64* tail_count;    // the dense-tail parts are added when the tail has rows
  int ycols;                // column slices of kColsPerBlock
  MatRef<const bf16> x;
  MatRef<const bf16> dy;
  int64_t D;
  float* partials;  // [slots][3][D]
  const float* acc[3];  // dense-tail parts [H, D]
  bf16* out[3];
  int64_t ld[3];
  int dwd_dh;   // dW_d written as [D, H]
  int accumulate;
  // Hot neurons (below): rank of each neuron among them (-1: gathered here), and
  // their GEMM results, dW_g | dW_u as [2 kHotMax, D] and dW_d as [kHotMax, D]; nullptr: none.
  const int32_t* hot_rank;
  const float* hot_gu;
  const float* hot_d;
  // dW_d as [D, H]: its final sums are staged here as [H, D] fp32 (the dense
  // tail's accumulator, read and rewritten element by element) and
  // wgrad_dh_kernel transposes them, so no store is a column walk.
  float* dwd_stage;
};

__device__ __forceinline__ void wg_store(const WgArgs& a, bool tail, int q, int64_t j, int64_t col, float v) {
  if (tail) v += a.acc[q][j * a.D + col];
  if (a.hot_rank != nullptr) {
    const int r = a.hot_rank[j];
    if (r >= 0) v += q == 2 ? a.hot_d[r * a.D + col] : a.hot_gu[(q * kHotMax + r) * a.D + col];
  }
  if (q == 2 && a.dwd_dh) {
    a.dwd_stage[j * a.D + col] = v;  // wgrad_dh_kernel adds the old value and writes dW_d[col, j]
    return;
  }
  bf16* p = a.out[q] + j * a.ld[q] + col;
  if (a.accumulate) v += __bfloat162float(*p);
  *p = __float2bfloat16_rn(v);
}

// dW_g[j] += sum dg x_m, dW_u[j] += sum du x_m (pass 0), dW_d[j] += sum h dy_m
// (pass 1) over one item's entries of neuron j (ascending tokens). Two passes,
// so that the rows gathered at a time come from one matrix (x, then dy) and
// their window fits L2 better. Work unit = (item, slice of 256 columns):
// 8 warps, warp w takes entries e0 + w, e0 + w + 8, ... in that order; warps
// are summed in order. The entries are fetched 32 at a time, one per lane, and
// broadcast by shuffles, so the row loads of 4 entries issue without waiting
// on each entry's own load. Persistent grid: CTA b takes units b, b + grid, ...
// (slices fastest), so the CTAs resident at any time start their units
// together and walk their token-sorted lists at a similar pace: the rows they
// read at a moment come from a window of tokens, which L2 can hold.
template <int kPass>
__global__ void __launch_bounds__(256) wgrad_kernel(WgArgs a) {
  constexpr int kOut = kPass == 0 ? 2 : 1;  // outputs of this pass
  __shared__ float red[kOut][8][kColsPerBlock];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const bf16* src = kPass == 0 ? a.x.ptr : a.dy.ptr;
  const int64_t ld = kPass == 0 ? a.x.ld : a.dy.ld;
  const bool tail = *a.tail_count > 0;
  const int64_t nwork = a.sched->items * a.ycols;
  for (int64_t unit = blockIdx.x; unit < nwork; unit += gridDim.x) {
    const Item it = a.items[unit / a.ycols];
    const int64_t c0 = (unit % a.ycols) * kColsPerBlock;
    if (it.e0 >= it.e1) {  // no entries (a neuron no token activated, or a hot one): a store per column
      const int64_t oc = c0 + threadIdx.x;  // the same branch for the whole CTA: no barrier skipped unevenly
      if (oc < a.D) {
#pragma unroll
        for (int o = 0; o < kOut; ++o) {
          const int q = kPass == 0 ? o : 2;
          if (it.slot < 0) {
            wg_store(a, tail, q, it.j, oc, 0.f);
          } else {
            a.partials[(it.slot * 3 + q) * a.D + oc] = 0.f;
          }
        }
      }
      continue;
    }
    const int64_t col = c0 + lane * 8;
    const bool act = col < a.D;
    float acc[kOut][8];
#pragma unroll
    for (int o = 0; o < kOut; ++o)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[o][i] = 0.f;
    for (int64_t base = it.e0 + warp; base < it.e1; base += 8 * 32) {
      const int64_t mine = base + 8 * lane;
      WEntry en{0, 0.f, 0.f, 0.f};
      if (mine < it.e1) en = a.trans[mine];
      const int64_t left = (it.e1 - base + 7) / 8;  // this warp's entries from base on
      const int n = left < 32 ? static_cast<int>(left) : 32;
      for (int k0 = 0; k0 < n; k0 += 4) {
        float c[4][kOut];
        uint4 rv[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int k = k0 + q;
          const int32_t m = __shfl_sync(0xffffffffu, en.m, k & 31);
          if (kPass == 0) {
            c[q][0] = __shfl_sync(0xffffffffu, en.dg, k & 31);
            c[q][kOut - 1] = __shfl_sync(0xffffffffu, en.du, k & 31);
          } else {
            c[q][0] = __shfl_sync(0xffffffffu, en.h, k & 31);
          }
          rv[q] = make_uint4(0, 0, 0, 0);
          if (k < n && act) rv[q] = *reinterpret_cast<const uint4*>(src + static_cast<int64_t>(m) * ld + col);
          if (k >= n) {
#pragma unroll
            for (int o = 0; o < kOut; ++o) c[q][o] = 0.f;
          }
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float f[8];
          unpack8(rv[q], f);
#pragma unroll
          for (int o = 0; o < kOut; ++o)
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[o][i] = fmaf(c[q][o], f[i], acc[o][i]);
        }
      }
    }
#pragma unroll
    for (int o = 0; o < kOut; ++o)
#pragma unroll
      for (int i = 0; i < 8; ++i) red[o][warp][lane * 8 + i] = acc[o][i];
    __syncthreads();
    const int t = threadIdx.x;
    const int64_t oc = c0 + t;
    if (oc < a.D) {
#pragma unroll
      for (int o = 0; o < kOut; ++o) {
        const int q = kPass == 0 ? o : 2;  // 0: dW_g, 1: dW_u, 2: dW_d
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < 8; ++w) s += red[o][w][t];
        if (it.slot < 0) {
          wg_store(a, tail, q, it.j, oc, s);
        } else {
          a.partials[(it.slot * 3 + q) * a.D + oc] = s;
        }
      }
    }
    __syncthreads();  // red is rewritten by the next unit
  }
}

// Grid (partial slots, ycols): CTAs past the schedule's split neurons exit.
__global__ void __launch_bounds__(256) wgrad_finalize_kernel(WgArgs a) {
  if (static_cast<int64_t>(blockIdx.x) >= a.sched->fins) return;
  const Fin f = a.fins[blockIdx.x];
  const int64_t oc = static_cast<int64_t>(blockIdx.y) * kColsPerBlock + threadIdx.x;
  if (oc >= a.D) return;
  const bool tail = *a.tail_count > 0;
#pragma unroll
  for (int q = 0; q < 3; ++q) {
    float s = 0.f;
    for (int64_t k = 0; k < f.nseg; ++k) s += a.partials[((f.slot0 + k) * 3 + q) * a.D + oc];
    wg_store(a, tail, q, f.j, oc, s);
  }
}

// dW_d [D, H] from the staged [H, D] fp32 sums (WgArgs::dwd_stage): 32 x 32
// tiles through shared memory, the old value added when accumulating, one
// rounding to bf16 (as wg_store rounds for the other layouts).
__global__ void __launch_bounds__(256) wgrad_dh_kernel(const float* __restrict__ stage, int64_t H, int64_t D,
                                                       bf16* __restrict__ out, int64_t ld, int accumulate) {
  __shared__ float tile[32][33];
  const int tx = threadIdx.x;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * 32, c0 = static_cast<int64_t>(blockIdx.x) * 32;
#pragma unroll
  for (int s4 = 0; s4 < 4; ++s4) {
    const int i = threadIdx.y + 8 * s4;
    if (j0 + i < H && c0 + tx < D) tile[i][tx] = stage[(j0 + i) * D + c0 + tx];
  }
  __syncthreads();
#pragma unroll
  for (int s4 = 0; s4 < 4; ++s4) {
    const int i = threadIdx.y + 8 * s4;
    const int64_t col = c0 + i, j = j0 + tx;
    if (col < D && j < H) {
      bf16* p = out + col * ld + j;
      float v = tile[tx][i];
      if (accumulate) v += __bfloat162float(*p);
      *p = __float2bfloat16_rn(v);
    }
  }
}

// The weight-gradient schedule from the per-neuron entry offsets nstart[H+1]
// (one CTA of kScheduleThreads, thread t owning a contiguous run of neurons,
// so items come out in neuron order): a neuron with more entries than one
// segment is split over ceil(n / segment) items whose partial sums a finalize
// CTA adds; the segment is the smallest of kMinSegment * 2^k for which the
// split neurons fit `partial_slots`. Deterministic: a function of the counts.
constexpr int kScheduleThreads = 1024;
constexpr int64_t kMinSegment = 1024;  // entries per weight-gradient item (at least)

// Hot neurons (hot_rank[j] >= 0; hot_rank may be nullptr) count as empty.
__global__ void __launch_bounds__(kScheduleThreads) schedule_kernel(const long long* __restrict__ nstart, int64_t H,
                                                                    const int32_t* __restrict__ hot_rank,
                                                                    int64_t partial_slots, int64_t max_items,
                                                                    Item* __restrict__ items, Fin* __restrict__ fins,
                                                                    WgSchedule* __restrict__ out) {
  using Scan = cub::BlockScan<long long, kScheduleThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ long long red[kScheduleThreads / 32];
  __shared__ long long shared_value;
  const int t = threadIdx.x;
  const int64_t per = (H + kScheduleThreads - 1) / kScheduleThreads;
  const int64_t j0 = min(H, t * per), j1 = min(H, j0 + per);
  // A block-wide sum (op 0) or max (op 1), in a fixed order.
  const auto reduce = [&](long long v, int op) {
    for (int o = 16; o > 0; o /= 2) {
      const long long w = __shfl_xor_sync(0xffffffffu, v, o);
      v = op == 0 ? v + w : max(v, w);
    }
    if (t % 32 == 0) red[t / 32] = v;
    __syncthreads();
    if (t == 0) {
      long long r = red[0];
      for (int w = 1; w < kScheduleThreads / 32; ++w) r = op == 0 ? r + red[w] : max(r, red[w]);
      shared_value = r;
    }
    __syncthreads();
    const long long r = shared_value;
    __syncthreads();
    return r;
  };
  // Entries the gather kernel takes for neuron j (none for a hot neuron).
  const auto gathered = [&](int64_t j) -> long long {
    return hot_rank != nullptr && hot_rank[j] >= 0 ? 0 : nstart[j + 1] - nstart[j];
  };
  long long mx = 0;
  for (int64_t j = j0; j < j1; ++j) mx = max(mx, nstart[j + 1] - nstart[j]);
  const long long max_count = reduce(mx, 1);
  long long seg = kMinSegment;
  for (;; seg *= 2) {
    long long slots = 0;
    for (int64_t j = j0; j < j1; ++j) {
      const long long n = gathered(j);
      const long long k = n == 0 ? 1 : (n + seg - 1) / seg;
      if (k > 1) slots += k;
    }
    if (reduce(slots, 0) <= partial_slots) break;
  }
  long long my_items = 0, my_slots = 0, my_fins = 0;
  for (int64_t j = j0; j < j1; ++j) {
    const long long n = gathered(j);
    const long long k = n == 0 ? 1 : (n + seg - 1) / seg;
    my_items += k;
    if (k > 1) {
      my_slots += k;
      my_fins += 1;
    }
  }
  long long item = 0, slot = 0, fin = 0, total_items = 0, total_fins = 0;
  Scan(scan_tmp).ExclusiveSum(my_items, item, total_items);
  __syncthreads();
  Scan(scan_tmp).ExclusiveSum(my_slots, slot);
  __syncthreads();
  Scan(scan_tmp).ExclusiveSum(my_fins, fin, total_fins);
  for (int64_t j = j0; j < j1; ++j) {
    const long long e0 = nstart[j], n = gathered(j);
    const long long k = n == 0 ? 1 : (n + seg - 1) / seg;
    if (k == 1) {
      if (item < max_items) items[item] = Item{j, e0, e0 + n, -1};
      ++item;
    } else {
      if (fin < partial_slots) fins[fin] = Fin{j, slot, k, 0};
      ++fin;
      for (long long q = 0; q < k; ++q, ++item) {
        if (item < max_items) items[item] = Item{j, e0 + q * seg, min(e0 + n, e0 + (q + 1) * seg), slot + q};
      }
      slot += k;
    }
  }
  if (t == 0) {
    // (items <= H + partial_slots = max_items by the choice of the segment)
    out->items = min(static_cast<long long>(max_items), total_items);
    out->fins = min(static_cast<long long>(partial_slots), total_fins);
    out->entries = nstart[H];
    out->max_count = max_count;
    out->segment = seg;
  }
}

// ---- conditions of a captured call (common/graph_cond.h) ----------------------

// The saved header a backward may read: the one the forward of this problem wrote.
struct HeaderCheck {
  int64_t M, D, H;
  int W;
};
__device__ __forceinline__ bool saved_header_ok(const u64* h, const HeaderCheck& c) {
  return h[0] == kSavedMagic && h[1] == static_cast<u64>(c.M) && h[3] == static_cast<u64>(c.W) &&
         h[4] == static_cast<u64>(c.D) && h[5] == static_cast<u64>(c.H) && h[2] <= static_cast<u64>(c.M) &&
         (h[6] == kRouteHybrid || h[6] == kRouteDense);
}

// Rows a tail chunk runs with, eager or captured (the same sizes both ways, so
// both give the same bits): `rem` tail rows from the chunk's first row on,
// `cap` = min(chunk rows, M - first row). A whole chunk runs at cap; the last,
// partial one at the smallest of 128, 256, 512 rows that holds its rows (cap
// past 512), rows past the tail count being padding (zeros in, nothing out).
// So a captured call's padding is at most max(127, rem) rows, not cap - 1.
__host__ __device__ inline int64_t tail_chunk_rows(int64_t rem, int64_t cap) {
  if (rem >= cap) return cap;
  int64_t s = 128;
  while (s < rem && s < 512) s *= 2;
  if (rem > s) return cap;
  return s < cap ? s : cap;
}

// One IF node over the tail chunks: it runs when the saved state is a valid
// hybrid one with more than r0 tail rows, and, for a chunk (n > 0), when the
// chunk's rows (tail_chunk_rows) are n; a group of chunks has n = 0.
struct ChunkUnit {
  int64_t r0, cap, n;
};
constexpr int kCondsPerKernel = 64;
struct ChunkConds {
  cudaGraphConditionalHandle h[kCondsPerKernel];
  ChunkUnit u[kCondsPerKernel];
  int n;
};
__global__ void chunk_conditions_kernel(ChunkConds c, const u64* header, HeaderCheck chk) {
  const bool hybrid = saved_header_ok(header, chk) && header[6] == kRouteHybrid;
  const int64_t T = static_cast<int64_t>(header[2]);
  for (int i = 0; i < c.n; ++i) {
    const ChunkUnit& u = c.u[i];
    const bool run = hybrid && T > u.r0 && (u.n == 0 || tail_chunk_rows(T - u.r0, u.cap) == u.n);
    cudaGraphSetConditional(c.h[i], run ? 1u : 0u);
  }
}

// The backward's route from the saved header: the hybrid steps (two nodes),
// the dense route (when the plan captured one), or, for a header this
// problem's forward did not write, the node that fills the outputs with NaN.
struct RouteConds {
  cudaGraphConditionalHandle hybrid[2], dense, bad;
  int has_hybrid, has_dense;
};
__global__ void route_conditions_kernel(RouteConds c, const u64* header, HeaderCheck chk) {
  const bool ok = saved_header_ok(header, chk);
  const bool hybrid = ok && header[6] == kRouteHybrid && c.has_hybrid;
  const bool dense = ok && header[6] == kRouteDense && c.has_dense;
  if (c.has_hybrid) {
    cudaGraphSetConditional(c.hybrid[0], hybrid ? 1u : 0u);
    cudaGraphSetConditional(c.hybrid[1], hybrid ? 1u : 0u);
  }
  if (c.has_dense) cudaGraphSetConditional(c.dense, dense ? 1u : 0u);
  cudaGraphSetConditional(c.bad, hybrid || dense ? 0u : 1u);
}

// The hot GEMMs' IF node: it runs when the saved header is a valid hybrid one
// (so this replay's selection ran) and the replay has hot neurons.
__global__ void hot_condition_kernel(cudaGraphConditionalHandle h, const HotSet* hot, const u64* header,
                                     HeaderCheck chk) {
  const bool hybrid = saved_header_ok(header, chk) && header[6] == kRouteHybrid;
  cudaGraphSetConditional(h, hybrid && hot->n > 0 ? 1u : 0u);
}

// The hybrid backward's statistics, from the saved header and the schedule.
__global__ void backward_stats_kernel(u64* stats, const u64* header, const WgSchedule* sched, int64_t M, int W,
                                      int64_t chunk_rows, int host_syncs) {
  const int t = threadIdx.x;
  if (t < kTrainStatsWords) stats[t] = 0;
  __syncthreads();
  if (t != 0) return;
  const u64 T = header[2], Mu = static_cast<u64>(M);
  stats[TWELL_STAT_ROWS] = Mu;
  stats[TWELL_STAT_PATH] = T == Mu && M > 0 ? TWELL_PATH_DENSE : (T == 0 ? TWELL_PATH_SPARSE : TWELL_TRAIN_PATH_HYBRID);
  stats[TWELL_STAT_FORMAT] = TWELL_FORMAT_VERSION;
  stats[TWELL_TSTAT_TAIL_ROWS] = T;
  stats[TWELL_TSTAT_ELL_ROWS] = Mu - T;
  stats[TWELL_TSTAT_ELL_WIDTH] = static_cast<u64>(W);
  stats[TWELL_TSTAT_TAIL_CHUNKS] = (T + static_cast<u64>(chunk_rows) - 1) / static_cast<u64>(chunk_rows);
  stats[TWELL_TSTAT_HOST_SYNCS] = static_cast<u64>(host_syncs);
  stats[TWELL_TSTAT_ELL_ENTRIES] = static_cast<u64>(sched->entries);
  stats[TWELL_TSTAT_MAX_NEURON_COUNT] = static_cast<u64>(sched->max_count);
  stats[TWELL_TSTAT_PHASE] = 2;
}

struct StatsVals {
  u64 v[kTrainStatsWords];
};

__global__ void write_stats_kernel(u64* stats, StatsVals s) {
  if (threadIdx.x < kTrainStatsWords) stats[threadIdx.x] = s.v[threadIdx.x];
}

}  // namespace train
}  // namespace twell
