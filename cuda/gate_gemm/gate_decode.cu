// Decode-sized gate GEMM + TwELL pack: split-K over a thread-block cluster,
// partials reduced through distributed shared memory in a fixed order.
// See gate_decode.h for the design and the contract.
//
// Per CTA (512 threads = 16 warps): one 256-column tile, one K-slice of D.
// Warp w owns tile rows (W_g rows) [16w, 16w+16) and walks the K-slice in
// blocks of 32: lane (g = lane/4, t = lane%4) loads 16 contiguous bytes of
// W_g rows g and g+8 at k = 8t (so a warp reads 16 rows x 64 B per block,
// four blocks = eight 16-byte loads in flight per lane), and 16 bytes of x
// (token g of each group of 8 tokens) at the same k from shared memory (x is
// staged there by cp.async, zero-filled past M and past the slice). Both operands use the same
// permutation of k inside the block, so the fragments of
// mma.m16n8k16.row.col (A = W rows, B = x^T) are the loaded words as they
// are: words 0-1 feed the first k16 step, words 2-3 the second.
#include <cooperative_groups.h>

#include <atomic>

#include "common/launch_cache.h"
#include "common/pack_entry.cuh"
#include "common/pdl.cuh"
#include "common/ptx_sm80.cuh"
#include "common/stats.cuh"
#include "common/warp.cuh"
#include "gate_gemm/gate_decode.h"

namespace twell {
namespace {

constexpr int kThreads = 512;
constexpr int kXPad = 32;          // bf16 of padding per staged x row (64 B: conflict-free 16 B reads)
constexpr int kPartStride = 260;   // floats per partial row (conflict-free fragment stores, 16 B aligned)
constexpr int kMaxCluster = 8;     // portable cluster size
constexpr size_t kXBudget = 112 * 1024;

struct DecodeParams {
  MatRef<const bf16> x;
  MatRef<const bf16> w;
  int64_t M, D, H;
  int slots;
  uint32_t* packed;
  uint8_t* row_flags;
  u64* stats;
  int k;          // CTAs per tile (cluster size)
  int64_t slice;  // K elements per rank (multiple of 32)
  int ks;         // K elements per staged x chunk (multiple of 32)
  int xrow;       // staged x row stride in bf16 (ks + padding)
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int kWarps = kThreads / 32;

#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Loads G K-blocks of W rows a and b (zeros past the slice, no access).
template <int G>
__device__ __forceinline__ void load_group(uint4 (&ra)[G], uint4 (&rb)[G], const bf16* pa, const bf16* pb, bool va,
                                           bool vb, int kb0, int nkb, int len, int t) {
#pragma unroll
  for (int u = 0; u < G; ++u) {
    const int off = (kb0 + u) * 32 + 8 * t;
    const bool ok = kb0 + u < nkb && off < len;
    ra[u] = make_uint4(0, 0, 0, 0);
    rb[u] = make_uint4(0, 0, 0, 0);
    if (ok && va) ra[u] = sm80::ld_stream16(pa + off);
    if (ok && vb) rb[u] = sm80::ld_stream16(pb + off);
  }
}

template <int NB, int G>
__device__ __forceinline__ void mma_group(float (&acc)[NB][4], const uint4 (&ra)[G], const uint4 (&rb)[G],
                                          const bf16* xs, int xrow, int kb0, int nkb, int g, int t) {
#pragma unroll
  for (int u = 0; u < G; ++u) {
    if (kb0 + u < nkb) {  // warp-uniform
      const int off = (kb0 + u) * 32 + 8 * t;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        const uint4 xb = *reinterpret_cast<const uint4*>(xs + (nb * 8 + g) * xrow + off);
        sm80::mma_m16n8k16_bf16(acc[nb], ra[u].x, rb[u].x, ra[u].y, rb[u].y, xb.x, xb.y);
        sm80::mma_m16n8k16_bf16(acc[nb], ra[u].z, rb[u].z, ra[u].w, rb[u].w, xb.z, xb.w);
      }
    }
  }
}
#endif

// NB = groups of 8 tokens (M <= 8 * NB). G = K-blocks per load group; PF:
// double-buffered groups (the next group's loads are in flight while the
// current one feeds the tensor cores).
template <int NB, int G, bool PF>
__global__ void __launch_bounds__(kThreads, 1) gate_decode_kernel(const DecodeParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  constexpr int kMpad = NB * 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ks = p.ks;
  const int xrow = p.xrow;  // staged x row stride (bf16), = 64 B mod 128 B: conflict-free 16 B reads
  bf16* xs = reinterpret_cast<bf16*>(smem_raw);
  float* part = reinterpret_cast<float*>(smem_raw + static_cast<size_t>(kMpad) * xrow * 2);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t tile = blockIdx.x / p.k;
  const int64_t kbeg = static_cast<int64_t>(rank) * p.slice;
  const int64_t kend = kbeg + p.slice < p.D ? kbeg + p.slice : p.D;

  // Programmatic dependent launch (no-ops otherwise): x may come from the
  // previous kernel; the next kernel's CTAs may be placed as soon as every
  // CTA here runs (they wait for this grid to complete before reading).
  pdl_wait();
  pdl_launch_dependents();

  const int64_t row_a = tile * kTileCols + warp * 16 + g;
  const int64_t row_b = row_a + 8;
  const bool va = row_a < p.H, vb = row_b < p.H;
  const bool warp_live = tile * kTileCols + warp * 16 < p.H;  // warp-uniform
  const bf16* pa = p.w.ptr + (va ? row_a : 0) * p.w.ld;
  const bf16* pb = p.w.ptr + (vb ? row_b : 0) * p.w.ld;

  float acc[NB][4];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.0f;

  for (int64_t k0 = kbeg; k0 < kend; k0 += ks) {
    const int len = static_cast<int>(kend - k0 < ks ? kend - k0 : ks);
    const int nkb = (len + 31) / 32;
    const bf16* qa = pa + k0;
    const bf16* qb = pb + k0;
    __syncthreads();  // the previous chunk's readers are done
    {  // stage x[:, k0 : k0 + ks) (zero-filled past M and past the slice) with cp.async
      const int vecs = ks / 8;
      for (int idx = threadIdx.x; idx < kMpad * vecs; idx += kThreads) {
        const int m = idx / vecs, c = idx - m * vecs;
        const bool ok = m < p.M && c * 8 < len;
        const bf16* src = ok ? p.x.ptr + m * p.x.ld + k0 + c * 8 : p.x.ptr;
        const uint32_t dst = sm80::smem_u32(xs + m * xrow + c * 8);
        sm80::cp_async_16_zfill(dst, src, ok ? 16 : 0);
      }
      sm80::cp_async_commit();
    }
    if (!PF) {
      sm80::cp_async_wait_all();
      __syncthreads();
      if (warp_live) {
        for (int kb0 = 0; kb0 < nkb; kb0 += G) {
          uint4 ra[G], rb[G];
          load_group<G>(ra, rb, qa, qb, va, vb, kb0, nkb, len, t);
          mma_group<NB, G>(acc, ra, rb, xs, xrow, kb0, nkb, g, t);
        }
      }
    } else {
      uint4 a0[G], b0[G], a1[G], b1[G];
      if (warp_live) load_group<G>(a0, b0, qa, qb, va, vb, 0, nkb, len, t);  // overlaps the x staging
      sm80::cp_async_wait_all();
      __syncthreads();
      if (warp_live) {
        for (int kb0 = 0; kb0 < nkb; kb0 += 2 * G) {
          load_group<G>(a1, b1, qa, qb, va, vb, kb0 + G, nkb, len, t);
          mma_group<NB, G>(acc, a0, b0, xs, xrow, kb0, nkb, g, t);
          load_group<G>(a0, b0, qa, qb, va, vb, kb0 + 2 * G, nkb, len, t);
          mma_group<NB, G>(acc, a1, b1, xs, xrow, kb0 + G, nkb, g, t);
        }
      }
    }
  }

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
    for (int q = 0; q < p.k; ++q) {
      const float* src = cluster.map_shared_rank(part, q) + m * kPartStride + lane * 8;
      const float4 a = *reinterpret_cast<const float4*>(src);
      const float4 b = *reinterpret_cast<const float4*>(src + 4);
      v[0] += a.x;
      v[1] += a.y;
      v[2] += a.z;
      v[3] += a.w;
      v[4] += b.x;
      v[5] += b.y;
      v[6] += b.z;
      v[7] += b.w;
    }
    unsigned mask = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) mask |= (lane * 8 + j < width && v[j] > 0.0f ? 1u : 0u) << j;
    const int mine = __popc(mask);
    const int incl = warp_incl_scan(mine, lane);
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
  block_flush_stats<kWarps>(p.stats, active, over_tiles, max_tile);
  cluster.sync();  // no CTA leaves while others still read its partials
#endif
}

int nb_for(int64_t M) { return M <= 8 ? 1 : (M <= 16 ? 2 : (M <= 32 ? 4 : 8)); }

// Largest staged-x footprint + partials for NB token groups (upper bound of
// what any launch of that NB asks for).
size_t max_smem_for(int nb) {
  const size_t mpad = static_cast<size_t>(nb) * 8;
  return kXBudget + mpad * kXPad * 2 + mpad * kPartStride * 4;
}

using KernelFn = void (*)(DecodeParams);

// variant: 0 = plain groups of 4 K-blocks; 1 = double-buffered groups of 2;
// 2 = double-buffered groups of 4 (NB <= 2 only; else as 1).
KernelFn kernel_for(int nb, int variant) {
  switch (nb) {
    case 1:
      return variant == 0 ? gate_decode_kernel<1, 4, false>
                          : (variant == 1 ? gate_decode_kernel<1, 2, true> : gate_decode_kernel<1, 4, true>);
    case 2:
      return variant == 0 ? gate_decode_kernel<2, 4, false>
                          : (variant == 1 ? gate_decode_kernel<2, 2, true> : gate_decode_kernel<2, 4, true>);
    case 4: return variant == 0 ? gate_decode_kernel<4, 4, false> : gate_decode_kernel<4, 2, true>;
    default: return variant == 0 ? gate_decode_kernel<8, 4, false> : gate_decode_kernel<8, 2, true>;
  }
}

// Default variant per NB. Measured on an H100 (test_gate_decode, median of 50,
// W_g rotated): the three variants tie within noise for M <= 16, and the plain
// one is faster at M = 32..64 (128 registers in the double-buffered ones), e.g.
// D=4096 H=14336 M=64: 62.8 us (plain) vs 71.7 us.
int default_variant(int nb) {
  (void)nb;
  return 0;
}

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
  return sm90_code_loaded(gate_decode_kernel<1, 4, false>);
}

// How many clusters of k CTAs fit on the device at once (GPCs do not divide
// evenly by every k: on an H100, 22 clusters of 6 need two waves).
cudaError_t max_clusters(int dev, int k, int* out) {
  const int known = g_max_clusters[dev][k].load(std::memory_order_relaxed);
  if (known != 0) {
    *out = known - 1;
    return cudaSuccess;
  }
  KernelFn kern = kernel_for(8, 0);  // the largest footprint: one CTA per SM like every variant
  const size_t smem = max_smem_for(8);
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
  if (a.x.ld < a.D || a.w.ld < a.D || a.x.ld % 8 != 0 || a.w.ld % 8 != 0) return false;
  if (a.slots != 32 && a.slots != 64 && a.slots != 128) return false;
  if (a.x.ptr == nullptr || a.w.ptr == nullptr || a.packed == nullptr || a.row_flags == nullptr || a.stats == nullptr)
    return false;
  if ((reinterpret_cast<uintptr_t>(a.x.ptr) | reinterpret_cast<uintptr_t>(a.w.ptr)) % 16 != 0) return false;
  if (tiles_for(a.H) * kMaxCluster > 0x7fffffffLL) return false;
  return device_ok(nullptr);
}

namespace {

cudaError_t launch_decode(const GatePackArgs& a, int sm_count, cudaStream_t stream, int variant, bool pdl) {
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
  p.w = a.w;
  p.M = a.M;
  p.D = a.D;
  p.H = a.H;
  p.slots = a.slots;
  p.packed = a.packed;
  p.row_flags = a.row_flags;
  p.stats = a.stats;
  p.k = static_cast<int>(k);
  p.slice = slice_blocks * 32;
  const int nb = nb_for(a.M);
  const int64_t mpad = nb * 8;
  int64_t ks = static_cast<int64_t>(kXBudget) / (mpad * 2);
  ks = ks / 32 * 32;
  ks = ks < p.slice ? ks : p.slice;
  p.ks = static_cast<int>(ks);
  p.xrow = static_cast<int>(ks % 64 == 0 ? ks + kXPad : ks);  // row stride = 64 B (mod 128 B)
  const size_t smem = static_cast<size_t>(mpad) * p.xrow * 2 + static_cast<size_t>(mpad) * kPartStride * 4;
  if (variant < 0) variant = default_variant(nb);
  KernelFn kern = kernel_for(nb, variant);
  TWELL_CUDA_TRY(set_max_dynamic_smem(kern, smem));  // once per device and size (common/launch_cache.h)
  cudaLaunchAttribute attr[2];
  cudaLaunchConfig_t cfg = make_config(static_cast<unsigned>(tiles * k), static_cast<int>(k), smem, stream, attr, pdl);
  return cudaLaunchKernelEx(&cfg, kern, p);
}

}  // namespace

cudaError_t gate_pack_decode_variant(const GatePackArgs& a, int sm_count, cudaStream_t stream, int variant) {
  return launch_decode(a, sm_count, stream, variant, false);
}

bool gate_pack_decode_preferred(const GatePackArgs& a, int sm_count) {
  if (a.M > 64 || !gate_pack_decode_can_run(a)) return false;
  if (a.M <= 16) return true;
  const bool few_tiles = tiles_for(a.H) * 4 <= static_cast<int64_t>(sm_count);
  if (a.M <= 32) return few_tiles;
  return few_tiles && a.D >= 2048;
}

cudaError_t gate_pack_decode(const GatePackArgs& a, int sm_count, cudaStream_t stream) {
  return launch_decode(a, sm_count, stream, -1, false);
}

cudaError_t gate_pack_decode_pdl(const GatePackArgs& a, int sm_count, cudaStream_t stream) {
  return launch_decode(a, sm_count, stream, -1, true);
}

}  // namespace twell
