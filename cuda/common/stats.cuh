// The last step of a kernel that counts TwELL statistics: the per-warp counts
// (held by lane 0 of each warp) are summed over the block in shared memory and
// thread 0 adds them to the call's statistics, one atomic of each kind per
// block and none for a zero (most blocks of a sparse layer see no overflow).
#pragma once

#include "common/twell_internal.h"

namespace twell {

// Every thread of the block must call it (it has a __syncthreads()); only the
// values of lane 0 of each warp are read. kWarps = warps per block.
template <int kWarps>
__device__ __forceinline__ void block_flush_stats(u64* stats, u64 active, u64 over_tiles, u64 max_tile) {
  __shared__ u64 s_active[kWarps], s_over[kWarps], s_max[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s_active[warp] = active;
    s_over[warp] = over_tiles;
    s_max[warp] = max_tile;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    u64 a = 0, o = 0, m = 0;
    for (int w = 0; w < kWarps; ++w) {
      a += s_active[w];
      o += s_over[w];
      m = max(m, s_max[w]);
    }
    if (a) atomicAdd(&stats[TWELL_STAT_ACTIVE], a);
    if (o) atomicAdd(&stats[TWELL_STAT_OVERFLOW_TILES], o);
    if (m) atomicMax(&stats[TWELL_STAT_MAX_TILE_COUNT], m);
  }
}

}  // namespace twell
