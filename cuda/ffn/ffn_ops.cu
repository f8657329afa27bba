#include "ffn/ffn_ops.h"

namespace twell {
namespace {

constexpr int kWarps = 8;

// One warp per (row, 256-column tile); lane l owns 8 contiguous columns.
__global__ void __launch_bounds__(kWarps * 32) dense_activation_kernel(bf16* __restrict__ g, const bf16* __restrict__ u,
                                                                       int64_t rows, int64_t H, int64_t ld, int cap,
                                                                       u64* __restrict__ stats) {
  const int lane = threadIdx.x % 32;
  const int64_t tiles = tiles_for(H);
  u64 active = 0, over = 0, max_tile = 0;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; item < rows * tiles;
       item += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t row = item / tiles, tile = item - row * tiles;
    const int64_t col = tile * kTileCols + lane * 8;
    int n = 0;
    if (col < H) {
      uint4 gv = *reinterpret_cast<const uint4*>(g + row * ld + col);
      uint4 uv = make_uint4(0, 0, 0, 0);
      if (u != nullptr) uv = *reinterpret_cast<const uint4*>(u + row * ld + col);
      bf16* gp = reinterpret_cast<bf16*>(&gv);
      const bf16* up = reinterpret_cast<const bf16*>(&uv);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float a = __bfloat162float(gp[k]);
        n += a > 0.0f ? 1 : 0;
        const float r = a > 0.0f ? a : 0.0f;
        gp[k] = __float2bfloat16_rn(u != nullptr ? r * __bfloat162float(up[k]) : r);
      }
      *reinterpret_cast<uint4*>(g + row * ld + col) = gv;
    }
#pragma unroll
    for (int d = 16; d > 0; d /= 2) n += __shfl_xor_sync(0xffffffffu, n, d);
    active += n;
    over += n > cap ? 1 : 0;
    max_tile = max(max_tile, static_cast<u64>(n));
  }
  if (lane == 0) {  // rare enough per warp (grid-stride aggregated) to go straight to atomics
    if (active) atomicAdd(&stats[TWELL_STAT_ACTIVE], active);
    if (over) atomicAdd(&stats[TWELL_STAT_OVERFLOW_TILES], over);
    if (max_tile) atomicMax(&stats[TWELL_STAT_MAX_TILE_COUNT], max_tile);
  }
}

}  // namespace

cudaError_t dense_activation(bf16* g, const bf16* u, int64_t rows, int64_t H, int64_t ld, int slots, u64* stats,
                             cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  int64_t blocks = (rows * tiles_for(H) + kWarps - 1) / kWarps;
  if (blocks > 2048) blocks = 2048;
  dense_activation_kernel<<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(g, u, rows, H, ld, slots - 1,
                                                                                     stats);
  return cudaGetLastError();
}

}  // namespace twell
