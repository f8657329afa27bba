// Reference TwELL packer, unpacker and overflow-row compaction.
//
// One warp packs one (row, tile): lane l owns the 8 contiguous columns
// [8l, 8l+8) of the tile, so a warp reads the tile with one coalesced 1 KiB
// (fp32) or 512 B (bf16) access, and a warp-wide exclusive scan of the lanes'
// positive counts gives every entry its slot in ascending column order
// (deterministic: no atomic tickets).
#include "common/pack_entry.cuh"
#include "common/pdl.cuh"
#include "common/stats.cuh"
#include "common/warp.cuh"
#include "format/pack.h"

namespace twell {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kMaxBlocks = 4096;

__device__ __forceinline__ void load8(const void* base, bool is_f32, int64_t offset, float (&v)[8]) {
  if (is_f32) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + offset);
    const float4 a = p[0], b = p[1];
    v[0] = a.x;
    v[1] = a.y;
    v[2] = a.z;
    v[3] = a.w;
    v[4] = b.x;
    v[5] = b.y;
    v[6] = b.z;
    v[7] = b.w;
  } else {
    const uint4 q = *reinterpret_cast<const uint4*>(static_cast<const bf16*>(base) + offset);
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
}

__global__ void __launch_bounds__(kWarpsPerBlock * 32) pack_kernel(const void* __restrict__ pre, bool is_f32,
                                                                   int64_t ld, int64_t M, int64_t H, int slots,
                                                                   uint32_t* __restrict__ packed,
                                                                   uint8_t* __restrict__ row_flags,
                                                                   u64* __restrict__ stats) {
  // A programmatically dependent next kernel (the decode-sized consumer) may
  // be placed while this one runs (no-ops otherwise; common/pdl.cuh).
  pdl_wait();
  pdl_launch_dependents();
  const int lane = threadIdx.x % 32;
  const int64_t tiles = tiles_for(H);
  const int64_t row_words = tiles * slots;
  const int cap = slots - 1;
  const int64_t total = M * tiles;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  u64 active = 0, over_tiles = 0, max_tile = 0;

  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; item < total;
       item += warp_stride) {
    const int64_t row = item / tiles;
    const int64_t tile = item - row * tiles;
    const int64_t col0 = tile * kTileCols + lane * 8;
    float v[8];
    unsigned mask = 0;
    if (col0 < H) {
      load8(pre, is_f32, row * ld + col0, v);
#pragma unroll
      for (int k = 0; k < 8; ++k) mask |= (v[k] > 0.0f ? 1u : 0u) << k;
    }
    const int mine = __popc(mask);
    const int incl = warp_incl_scan(mine, lane);
    const int count = __shfl_sync(0xffffffffu, incl, 31);
    int slot = incl - mine;  // entries before this lane's first one
    uint32_t* out = packed + row * row_words + tile * slots;
#pragma unroll
    for (int k = 0; k < 8; ++k) {  // unrolled: v[] must stay in registers
      if (mask & (1u << k)) {
        if (slot < cap) out[1 + slot] = pack_entry(lane * 8 + k, v[k]);
        ++slot;
      }
    }
    const int stored = min(count, cap);
    for (int w = lane; w < slots; w += 32) {
      if (w == 0) out[0] = static_cast<uint32_t>(count);
      else if (w > stored) out[w] = 0u;
    }
    if (lane == 0) {
      active += count;
      max_tile = max(max_tile, static_cast<u64>(count));
      if (count > cap) {
        ++over_tiles;
        row_flags[row] = 1;
      }
    }
  }
  block_flush_stats<kWarpsPerBlock>(stats, active, over_tiles, max_tile);
}

__global__ void stats_init_kernel(u64* stats, int64_t rows, int path, uint8_t* __restrict__ row_flags) {
  if (row_flags != nullptr) {  // 16-byte stores over the 256-byte aligned flag buffer
    const int64_t vecs = (rows + 15) / 16;
    for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < vecs;
         v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      reinterpret_cast<uint4*>(row_flags)[v] = make_uint4(0, 0, 0, 0);
    }
  }
  const int i = threadIdx.x;
  if (blockIdx.x == 0 && i < TWELL_STATS_WORDS) {
    u64 v = 0;
    if (i == TWELL_STAT_ROWS) v = static_cast<u64>(rows);
    if (i == TWELL_STAT_PATH) v = static_cast<u64>(path);
    if (i == TWELL_STAT_FORMAT) v = TWELL_FORMAT_VERSION;
    stats[i] = v;
  }
}

// ---- compaction: flags -> ascending row list ------------------------------
// One CTA of 1024 threads walks the flags in rounds of 64 Ki rows, each
// thread taking 64 consecutive rows as four 16-byte loads. A round with no
// flagged row (the common case) costs the loads and one barrier; otherwise a
// block-wide exclusive scan of the per-thread counts places each thread's rows
// in ascending order. One launch and no workspace: at M = 16384 this replaces
// a count kernel and an emit kernel that took 15 us together (H200, ncu).
constexpr int kCompactThreads = 1024;
constexpr int kCompactRowsPerThread = 64;
constexpr int64_t kCompactRowsPerRound = static_cast<int64_t>(kCompactThreads) * kCompactRowsPerThread;

// Flags [r0, r0 + 16) as 16 bytes, 0xFF where the flag is set (rows >= M read as clear).
__device__ __forceinline__ uint4 load_flags16(const uint8_t* __restrict__ flags, int64_t r0, int64_t M, bool vec) {
  uint32_t w[4] = {0, 0, 0, 0};
  if (vec && r0 + 16 <= M) {
    const uint4 v = __ldcg(reinterpret_cast<const uint4*>(flags + r0));
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else {
    for (int b = 0; b < 16 && r0 + b < M; ++b) w[b / 4] |= static_cast<uint32_t>(flags[r0 + b]) << (8 * (b % 4));
  }
  return make_uint4(__vcmpne4(w[0], 0u), __vcmpne4(w[1], 0u), __vcmpne4(w[2], 0u), __vcmpne4(w[3], 0u));
}

__global__ void __launch_bounds__(kCompactThreads) compact_rows_kernel(const uint8_t* __restrict__ flags, int64_t M,
                                                                       int32_t* __restrict__ rows_out,
                                                                       u64* __restrict__ stats) {
  __shared__ int s_warp[kCompactThreads / 32];
  __shared__ int s_total;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const bool vec = (reinterpret_cast<uintptr_t>(flags) % 16) == 0;
  int64_t offset = 0;
  for (int64_t base = 0; base < M; base += kCompactRowsPerRound) {
    const int64_t r0 = base + static_cast<int64_t>(threadIdx.x) * kCompactRowsPerThread;
    uint4 f[kCompactRowsPerThread / 16];
    int c = 0;
#pragma unroll
    for (int i = 0; i < kCompactRowsPerThread / 16; ++i) {
      f[i] = load_flags16(flags, r0 + 16 * i, M, vec);
      c += (__popc(f[i].x) + __popc(f[i].y) + __popc(f[i].z) + __popc(f[i].w)) / 8;
    }
    if (__syncthreads_or(c) == 0) continue;  // block-uniform
    const int incl = warp_incl_scan(c, lane);
    if (lane == 31) s_warp[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      const int t = s_warp[lane];
      const int t_incl = warp_incl_scan(t, lane);
      s_warp[lane] = t_incl - t;
      if (lane == 31) s_total = t_incl;
    }
    __syncthreads();
    if (c != 0) {
      int64_t pos = offset + s_warp[warp] + (incl - c);
#pragma unroll
      for (int i = 0; i < kCompactRowsPerThread / 16; ++i) {
        const uint32_t w[4] = {f[i].x, f[i].y, f[i].z, f[i].w};
        for (int b = 0; b < 16; ++b)
          if ((w[b / 4] >> (8 * (b % 4))) & 1u) rows_out[pos++] = static_cast<int32_t>(r0 + 16 * i + b);
      }
    }
    offset += s_total;
    __syncthreads();  // s_warp and s_total are rewritten next round
  }
  if (threadIdx.x == 0) stats[TWELL_STAT_OVERFLOW_ROWS] = static_cast<u64>(offset);
}

// ---- unpack -----------------------------------------------------------------
__global__ void __launch_bounds__(kWarpsPerBlock * 32) unpack_kernel(const uint32_t* __restrict__ packed, int64_t M,
                                                                     int64_t H, int slots, bf16* __restrict__ out,
                                                                     int64_t ldo) {
  const int lane = threadIdx.x % 32;
  const int64_t tiles = tiles_for(H);
  const int64_t total = M * tiles;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; item < total;
       item += warp_stride) {
    const int64_t row = item / tiles;
    const int64_t tile = item - row * tiles;
    const int64_t col0 = tile * kTileCols;
    const int width = static_cast<int>(H - col0 < kTileCols ? H - col0 : kTileCols);
    bf16* dst = out + row * ldo + col0;
    if (lane * 8 < width) *reinterpret_cast<uint4*>(dst + lane * 8) = make_uint4(0, 0, 0, 0);
    __syncwarp();
    const uint32_t* src = packed + row * tiles * slots + tile * slots;
    const uint32_t count = src[0];
    const int n = count < static_cast<uint32_t>(slots - 1) ? static_cast<int>(count) : slots - 1;
    for (int e = lane; e < n; e += 32) {
      const uint32_t word = src[1 + e];
      const int col = entry_col(word);
      if (col < width) dst[col] = __ushort_as_bfloat16(static_cast<unsigned short>(word >> 16));
    }
    __syncwarp();
  }
}

int grid_for(int64_t warps) {
  const int64_t blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

}  // namespace

cudaError_t stats_init(u64* stats, int64_t rows, int path, cudaStream_t stream, uint8_t* row_flags) {
  // row_flags (when given) must be 16-byte aligned with room rounded up to 16 bytes.
  int64_t blocks = row_flags != nullptr ? (rows + 16 * 256 - 1) / (16 * 256) : 1;
  blocks = blocks < 1 ? 1 : (blocks > 256 ? 256 : blocks);
  stats_init_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(stats, rows, path, row_flags);
  return cudaGetLastError();
}

cudaError_t pack_rows(const void* pre, bool is_f32, int64_t ld, int64_t M, int64_t H, int slots, uint32_t* packed,
                      uint8_t* row_flags, u64* stats, cudaStream_t stream, bool pdl) {
  if (M == 0) return cudaSuccess;
  if (!pdl) {
    pack_kernel<<<grid_for(M * tiles_for(H)), kWarpsPerBlock * 32, 0, stream>>>(pre, is_f32, ld, M, H, slots, packed,
                                                                                row_flags, stats);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(grid_for(M * tiles_for(H))));
  cfg.blockDim = dim3(kWarpsPerBlock * 32);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  pdl_attribute(&attr[0]);
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, pack_kernel, pre, is_f32, ld, M, H, slots, packed, row_flags, stats);
}

cudaError_t compact_flagged_rows(const uint8_t* row_flags, int64_t M, int32_t* rows_out, u64* stats,
                                 cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  compact_rows_kernel<<<1, kCompactThreads, 0, stream>>>(row_flags, M, rows_out, stats);
  return cudaGetLastError();
}

cudaError_t unpack_rows(const uint32_t* packed, int64_t M, int64_t H, int slots, bf16* out, int64_t ldo,
                        cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  unpack_kernel<<<grid_for(M * tiles_for(H)), kWarpsPerBlock * 32, 0, stream>>>(packed, M, H, slots, out, ldo);
  return cudaGetLastError();
}

}  // namespace twell
