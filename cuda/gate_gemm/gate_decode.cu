// Decode-sized gate GEMM + TwELL pack: split-K over a thread-block cluster,
// partials reduced through distributed shared memory in a fixed order.
// See gate_decode.h for the design and the contract.
//
// Per CTA (512 threads = 16 warps): one 256-column tile, one K-slice of D.
// At small M the kernel is a stream over W_g, and what limits it is how many
// bytes are in flight per SM: the slice is copied into shared memory by
// cp.async (no registers held) through a ring of kStages stages of
// kStageCols columns, every stage of the ring issued before the first is
// consumed, so nearly the whole slice (200 KB per SM) is requested in one
// round trip (an L2 prefetch of the slice issued before the PDL wait was
// measured slower: the bulk prefetches queue behind each other). A stage holds the tile's 256 W_g rows and the M (padded) x rows
// of its columns, zero-filled past H, M and the slice (cp.async src-size 0).
//
// Warp w owns tile rows [16w, 16w+16) and walks a stage in K-blocks of 32:
// lane (g = lane/4, t = lane%4) reads 16 bytes of rows g and g+8 at k = 8t
// and 16 bytes of x (token g of each group of 8) at the same k. Both operands
// use the same permutation of k inside the block, so the fragments of
// mma.m16n8k16.row.col (A = W rows, B = x^T) are the loaded words as they are:
// words 0-1 feed the first k16 step, words 2-3 the second. Staged rows are
// 256 B with the 16-byte chunks of odd rows XOR-swizzled by 4, so the eight
// lanes of each quarter-warp hit eight different bank groups.
#include <cooperative_groups.h>

#include <atomic>

#include "common/pack_entry.cuh"
#include "ffn/pdl.cuh"
#include "gate_gemm/gate_decode.h"

namespace twell {
namespace {

constexpr int kThreads = 512;
constexpr int kMaxCluster = 8;     // portable cluster size
constexpr int kStageCols = 128;    // K elements per stage (4 K-blocks)
constexpr int kRowBytes = kStageCols * 2;

struct DecodeParams {
  const bf16* x;
  int64_t ldx;
  const bf16* w;
  int64_t ldw;
  int64_t M, D, H;
  int slots;
  uint32_t* packed;
  uint8_t* row_flags;
  u64* stats;
  int k;          // CTAs per tile (cluster size)
  int64_t slice;  // K elements per rank (multiple of 32)
  RowPrefetch next;  // rows the next kernel reads for each active neuron (hint)
};

// Rows of one stage and its bytes, for NB groups of 8 tokens.
__host__ __device__ constexpr int stage_rows(int nb) { return kTileCols + nb * 8; }
__host__ __device__ constexpr int stage_bytes(int nb) { return stage_rows(nb) * kRowBytes; }
// Stages in the ring: as many as fit in 227 KB of shared memory, up to 3.
__host__ __device__ constexpr int stages_for(int nb) { return 3 * stage_bytes(nb) <= 227 * 1024 ? 3 : 2; }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int kWarps = kThreads / 32;
constexpr int kPartStride = 260;  // floats per partial row (conflict-free fragment stores, 16 B aligned)
constexpr int kChunksPerRow = kRowBytes / 16;

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Byte offset of 16-byte chunk c of staged row r.
__device__ __forceinline__ int staged(int r, int c) { return r * kRowBytes + ((c ^ ((r & 1) << 2)) << 4); }

__device__ __forceinline__ uint4 lds16(const unsigned char* p) { return *reinterpret_cast<const uint4*>(p); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// L2 prefetch of rows a[n] and b[n] (D elements each) for every neuron n of
// this tile whose bit is set in some lane's mask (lane l: columns 8l..8l+7):
// the whole warp walks the neurons one at a time, a 128-byte line per lane.
__device__ __forceinline__ void prefetch_row(const bf16* row, int64_t D, int lane) {
  for (int64_t e = static_cast<int64_t>(lane) * 64; e < D; e += 32 * 64)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(row + e));
  if (lane == 0) asm volatile("prefetch.global.L2 [%0];" ::"l"(row + D - 1));  // an unaligned row's last line
}

__device__ __forceinline__ void prefetch_next_rows(const DecodeParams& p, int64_t tile, unsigned mask, int lane) {
  unsigned lanes = __ballot_sync(0xffffffffu, mask != 0);
  while (lanes != 0) {
    const int src = __ffs(lanes) - 1;
    lanes &= lanes - 1;
    unsigned bits = __shfl_sync(0xffffffffu, mask, src);
    while (bits != 0) {
      const int j = __ffs(bits) - 1;
      bits &= bits - 1;
      const int64_t n = tile * kTileCols + src * 8 + j;
      prefetch_row(p.next.a + n * p.next.lda, p.D, lane);
      if (p.next.b != nullptr) prefetch_row(p.next.b + n * p.next.ldb, p.D, lane);
    }
  }
}

// Issues stage st of this CTA's slice into ring buffer st % S (zero-filled
// past H, M and the slice end), then commits a group (also when st is past
// the last stage, so that group counting stays uniform).
template <int NB, int S>
__device__ __forceinline__ void issue_stage(const DecodeParams& p, unsigned char* ring, int st, int nst, int64_t tile,
                                            int64_t kbeg, int64_t kend) {
  if (st < nst) {
    unsigned char* buf = ring + (st % S) * stage_bytes(NB);
    const int64_t k0 = kbeg + static_cast<int64_t>(st) * kStageCols;
    const int len = static_cast<int>(kend - k0 < kStageCols ? kend - k0 : kStageCols);
    for (int idx = threadIdx.x; idx < stage_rows(NB) * kChunksPerRow; idx += kThreads) {
      const int r = idx / kChunksPerRow, c = idx % kChunksPerRow;
      const bool in_k = c * 8 < len;
      const bf16* src;
      bool ok;
      if (r < kTileCols) {
        const int64_t row = tile * kTileCols + r;
        ok = in_k && row < p.H;
        src = ok ? p.w + row * p.ldw + k0 + c * 8 : p.w;
      } else {
        const int m = r - kTileCols;
        ok = in_k && m < p.M;
        src = ok ? p.x + m * p.ldx + k0 + c * 8 : p.x;
      }
      const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(buf + staged(r, c)));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0)
                   : "memory");
    }
  }
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
#endif

// NB = groups of 8 tokens (M <= 8 * NB); S = stages in the ring.
template <int NB, int S>
__global__ void __launch_bounds__(kThreads, 1) gate_decode_kernel(const DecodeParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ __align__(128) unsigned char smem_raw[];
  float* part = reinterpret_cast<float*>(smem_raw);  // after the main loop, over the ring
  static_assert(NB * 8 * kPartStride * 4 <= S * stage_bytes(NB), "the partials fit in the ring");
  __shared__ u64 s_active[kWarps], s_over[kWarps], s_max[kWarps];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t tile = blockIdx.x / p.k;
  const int64_t kbeg = static_cast<int64_t>(rank) * p.slice;
  const int64_t kend = kbeg + p.slice < p.D ? kbeg + p.slice : p.D;
  const int nst = kend > kbeg ? static_cast<int>((kend - kbeg + kStageCols - 1) / kStageCols) : 0;

  // Programmatic dependent launch (no-ops otherwise): x may come from the
  // previous kernel; the next kernel's CTAs may be placed as soon as every
  // CTA here runs (they wait for this grid to complete before reading).
  pdl_wait();
  pdl_launch_dependents();

  const bool warp_live = tile * kTileCols + warp * 16 < p.H;  // warp-uniform
  const int ra = warp * 16 + g, rb = ra + 8;                   // this lane's two tile rows

  float acc[NB][4];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.0f;

#pragma unroll
  for (int st = 0; st < S; ++st) issue_stage<NB, S>(p, smem_raw, st, nst, tile, kbeg, kend);
  for (int st = 0; st < nst; ++st) {
    cp_async_wait<S - 1>();  // S + st groups committed: all but the last S - 1, stage st included, landed
    __syncthreads();
    if (warp_live) {
      const unsigned char* buf = smem_raw + (st % S) * stage_bytes(NB);
      const int64_t left = kend - kbeg - static_cast<int64_t>(st) * kStageCols;
      const int nkb = left >= kStageCols ? kStageCols / 32 : static_cast<int>((left + 31) / 32);
#pragma unroll
      for (int kb = 0; kb < kStageCols / 32; ++kb) {
        if (kb < nkb) {  // warp-uniform
          const int c = kb * 4 + t;
          const uint4 a = lds16(buf + staged(ra, c));
          const uint4 b = lds16(buf + staged(rb, c));
#pragma unroll
          for (int nb = 0; nb < NB; ++nb) {
            const uint4 xb = lds16(buf + staged(kTileCols + nb * 8 + g, c));
            mma_bf16_16816(acc[nb], a.x, b.x, a.y, b.y, xb.x, xb.y);
            mma_bf16_16816(acc[nb], a.z, b.z, a.w, b.w, xb.z, xb.w);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with this buffer before it is refilled
    issue_stage<NB, S>(p, smem_raw, st + S, nst, tile, kbeg, kend);
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");  // only empty groups remain
  __syncthreads();

  // Partials: part[token][tile column] (C fragment: rows = W rows, cols = tokens).
  {
    const int h = warp * 16 + g;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      const int n0 = nb * 8 + 2 * t;
      part[n0 * kPartStride + h] = acc[nb][0];
      part[(n0 + 1) * kPartStride + h] = acc[nb][1];
      part[n0 * kPartStride + h + 8] = acc[nb][2];
      part[(n0 + 1) * kPartStride + h + 8] = acc[nb][3];
    }
  }
  cluster.sync();  // every rank's partials are visible cluster-wide

  // Reduce (ranks 0..k-1 in order) and pack: rank r owns tokens r, r+k, ...;
  // lane l owns tile columns [8l, 8l+8).
  const int64_t tiles = tiles_for(p.H);
  const int64_t row_words = tiles * p.slots;
  const int cap = p.slots - 1;
  const int64_t width64 = p.H - tile * kTileCols;
  const int width = static_cast<int>(width64 < kTileCols ? width64 : kTileCols);
  u64 active = 0, over_tiles = 0, max_tile = 0;
  for (int64_t m = rank + static_cast<int64_t>(warp) * p.k; m < p.M; m += static_cast<int64_t>(kWarps) * p.k) {
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = 0.0f;
    // Every rank's partials are requested before the first is added (one
    // distributed-shared-memory round trip, not k), then added in rank order.
    float4 pa[kMaxCluster], pb[kMaxCluster];
#pragma unroll
    for (int q = 0; q < kMaxCluster; ++q) {
      if (q < p.k) {
        const float* src = cluster.map_shared_rank(part, q) + m * kPartStride + lane * 8;
        pa[q] = *reinterpret_cast<const float4*>(src);
        pb[q] = *reinterpret_cast<const float4*>(src + 4);
      }
    }
#pragma unroll
    for (int q = 0; q < kMaxCluster; ++q) {
      if (q < p.k) {
        v[0] += pa[q].x; v[1] += pa[q].y; v[2] += pa[q].z; v[3] += pa[q].w;
        v[4] += pb[q].x; v[5] += pb[q].y; v[6] += pb[q].z; v[7] += pb[q].w;
      }
    }
    unsigned mask = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) mask |= (lane * 8 + j < width && v[j] > 0.0f ? 1u : 0u) << j;
    const int mine = __popc(mask);
    int incl = mine;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int up = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += up;
    }
    const int count = __shfl_sync(0xffffffffu, incl, 31);
    int slot = incl - mine;
    uint32_t* out = p.packed + m * row_words + tile * p.slots;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (mask & (1u << j)) {
        if (slot < cap) out[1 + slot] = pack_entry(lane * 8 + j, v[j]);
        ++slot;
      }
    }
    if (p.next.a != nullptr && count <= cap) prefetch_next_rows(p, tile, mask, lane);
    const int stored = count < cap ? count : cap;
    for (int wd = lane; wd < p.slots; wd += 32) {
      if (wd == 0) out[0] = static_cast<uint32_t>(count);
      else if (wd > stored) out[wd] = 0u;
    }
    if (lane == 0) {
      active += static_cast<u64>(count);
      max_tile = max_tile > static_cast<u64>(count) ? max_tile : static_cast<u64>(count);
      if (count > cap) {
        ++over_tiles;
        p.row_flags[m] = 1;
      }
    }
  }
  if (lane == 0) {
    s_active[warp] = active;
    s_over[warp] = over_tiles;
    s_max[warp] = max_tile;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    u64 a = 0, o = 0, mx = 0;
    for (int w = 0; w < kWarps; ++w) {
      a += s_active[w];
      o += s_over[w];
      mx = mx > s_max[w] ? mx : s_max[w];
    }
    if (a) atomicAdd(&p.stats[TWELL_STAT_ACTIVE], a);
    if (o) atomicAdd(&p.stats[TWELL_STAT_OVERFLOW_TILES], o);
    if (mx) atomicMax(&p.stats[TWELL_STAT_MAX_TILE_COUNT], mx);
  }
  cluster.sync();  // no CTA leaves while others still read its partials
#endif
}

int nb_for(int64_t M) { return M <= 8 ? 1 : (M <= 16 ? 2 : (M <= 32 ? 4 : 8)); }

using KernelFn = void (*)(DecodeParams);

// variant: 0 = the ring of stages_for(NB) stages; 1 = a ring of 2 stages.
// Both give bitwise the same results.
int stages_of(int nb, int variant) { return variant == 1 ? 2 : stages_for(nb); }

template <int NB>
KernelFn kernel_with_stages(int stages) {
  if constexpr (stages_for(NB) == 3) {
    if (stages == 3) return gate_decode_kernel<NB, 3>;
  }
  return gate_decode_kernel<NB, 2>;
}

KernelFn kernel_for(int nb, int variant) {
  const int stages = stages_of(nb, variant);
  switch (nb) {
    case 1: return kernel_with_stages<1>(stages);
    case 2: return kernel_with_stages<2>(stages);
    case 4: return kernel_with_stages<4>(stages);
    default: return kernel_with_stages<8>(stages);
  }
}

size_t smem_for(int nb, int variant) { return static_cast<size_t>(stages_of(nb, variant)) * stage_bytes(nb); }

cudaLaunchConfig_t make_config(unsigned grid, int k, size_t smem, cudaStream_t stream, cudaLaunchAttribute* attr,
                               bool pdl = false) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid, 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(k);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (pdl) {
    pdl_attribute(&attr[1]);
    cfg.numAttrs = 2;
  }
  return cfg;
}

constexpr int kMaxDevices = 64;
// 0 unknown, 1 the kernel runs on this device, 2 it does not.
std::atomic<int> g_device_ok[kMaxDevices];
// Clusters of k CTAs that can be resident at once (+1; 0 unknown).
std::atomic<int> g_max_clusters[kMaxDevices][kMaxCluster + 1];

bool device_ok(int* dev_out) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (dev < 0 || dev >= kMaxDevices) return false;
  if (dev_out) *dev_out = dev;
  const int known = g_device_ok[dev].load(std::memory_order_relaxed);
  if (known != 0) return known == 1;
  bool ok = false;
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9) {
    // The code that would run must come from sm_90+ code (not compute_80 PTX
    // JIT-compiled on a newer GPU, whose body is empty).
    cudaFuncAttributes fa{};
    if (cudaFuncGetAttributes(&fa, gate_decode_kernel<1, stages_for(1)>) == cudaSuccess) {
      ok = fa.binaryVersion >= 90 && fa.ptxVersion >= 90;
    }
  }
  (void)cudaGetLastError();  // a failed query must not leak into later launch checks
  g_device_ok[dev].store(ok ? 1 : 2, std::memory_order_relaxed);
  return ok;
}

// How many clusters of k CTAs fit on the device at once (GPCs do not divide
// evenly by every k: on an H100, 22 clusters of 6 need two waves).
cudaError_t max_clusters(int dev, int k, int* out) {
  const int known = g_max_clusters[dev][k].load(std::memory_order_relaxed);
  if (known != 0) {
    *out = known - 1;
    return cudaSuccess;
  }
  KernelFn kern = kernel_for(8, 0);  // one CTA per SM, like every instance
  const size_t smem = smem_for(8, 0);
  TWELL_CUDA_TRY(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t cfg = make_config(static_cast<unsigned>(k), k, smem, nullptr, attr);
  int n = 0;
  TWELL_CUDA_TRY(cudaOccupancyMaxActiveClusters(&n, kern, &cfg));
  g_max_clusters[dev][k].store(n + 1, std::memory_order_relaxed);
  *out = n;
  return cudaSuccess;
}

}  // namespace

bool gate_pack_decode_can_run(const GatePackArgs& a) {
  if (a.M < 1 || a.M > kGateDecodeMaxRows) return false;
  if (a.D <= 0 || a.H <= 0 || a.D % 8 != 0 || a.H % 8 != 0) return false;
  if (a.ldx < a.D || a.ldw < a.D || a.ldx % 8 != 0 || a.ldw % 8 != 0) return false;
  if (a.slots != 32 && a.slots != 64 && a.slots != 128) return false;
  if (a.x == nullptr || a.w == nullptr || a.packed == nullptr || a.row_flags == nullptr || a.stats == nullptr)
    return false;
  if ((reinterpret_cast<uintptr_t>(a.x) | reinterpret_cast<uintptr_t>(a.w)) % 16 != 0) return false;
  if (tiles_for(a.H) * kMaxCluster > 0x7fffffffLL) return false;
  return device_ok(nullptr);
}

namespace {

cudaError_t launch_decode(const GatePackArgs& a, int sm_count, cudaStream_t stream, int variant, bool pdl,
                          const RowPrefetch& next) {
  if (a.M == 0) return cudaSuccess;
  int dev = 0;
  if (!gate_pack_decode_can_run(a) || !device_ok(&dev)) return cudaErrorInvalidValue;
  const int64_t tiles = tiles_for(a.H);
  const int64_t kblocks = (a.D + 31) / 32;
  // Pick the cluster size k: fewest (waves x K-blocks per CTA), where a wave is
  // as many clusters as fit at once; ties go to the smaller k.
  int64_t best_k = 1, best_cost = -1;
  for (int64_t k = 1; k <= kMaxCluster && k <= kblocks; ++k) {
    const int64_t sb = (kblocks + k - 1) / k;
    if ((kblocks + sb - 1) / sb != k) continue;  // some rank would be idle: a smaller k does the same
    int fit = 0;
    TWELL_CUDA_TRY(max_clusters(dev, static_cast<int>(k), &fit));
    if (fit <= 0) continue;
    const int64_t waves = (tiles + fit - 1) / fit;
    const int64_t cost = waves * sb;
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best_k = k;
    }
  }
  (void)sm_count;  // the occupancy query already accounts for the SMs
  const int64_t k = best_k;
  const int64_t slice_blocks = (kblocks + k - 1) / k;

  DecodeParams p;
  p.x = a.x;
  p.ldx = a.ldx;
  p.w = a.w;
  p.ldw = a.ldw;
  p.M = a.M;
  p.D = a.D;
  p.H = a.H;
  p.slots = a.slots;
  p.packed = a.packed;
  p.row_flags = a.row_flags;
  p.stats = a.stats;
  p.k = static_cast<int>(k);
  p.slice = slice_blocks * 32;
  p.next = next;
  const int nb = nb_for(a.M);
  if (variant < 0) variant = 0;
  KernelFn kern = kernel_for(nb, variant);
  const size_t smem = smem_for(nb, variant);
  TWELL_CUDA_TRY(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  cudaLaunchAttribute attr[2];
  cudaLaunchConfig_t cfg =
      make_config(static_cast<unsigned>(tiles * k), static_cast<int>(k), smem, stream, attr, pdl);
  return cudaLaunchKernelEx(&cfg, kern, p);
}

}  // namespace

cudaError_t gate_pack_decode_variant(const GatePackArgs& a, int sm_count, cudaStream_t stream, int variant) {
  return launch_decode(a, sm_count, stream, variant, false, RowPrefetch{});
}

bool gate_pack_decode_preferred(const GatePackArgs& a, int sm_count) {
  if (a.M > 64 || !gate_pack_decode_can_run(a)) return false;
  if (a.M <= 16) return true;
  const bool few_tiles = tiles_for(a.H) * 4 <= static_cast<int64_t>(sm_count);
  if (a.M <= 32) return few_tiles;
  return few_tiles && a.D >= 2048;
}

cudaError_t gate_pack_decode(const GatePackArgs& a, int sm_count, cudaStream_t stream) {
  return launch_decode(a, sm_count, stream, -1, false, RowPrefetch{});
}

cudaError_t gate_pack_decode_pdl(const GatePackArgs& a, int sm_count, cudaStream_t stream, const RowPrefetch& next) {
  return launch_decode(a, sm_count, stream, -1, true, next);
}

}  // namespace twell
