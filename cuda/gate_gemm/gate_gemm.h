// Gate GEMM with the TwELL packing epilogue: packed = TwELL(relu(x W^T)).
// Contract shared by every implementation (portable and sm_90a):
//  * entries of a tile in ascending column order, at most slots-1 of them;
//    word 0 = the tile's true count of fp32 accumulator values > 0; unused
//    words zero; value = __float2bfloat16_rn(acc) for acc > 0;
//  * row_flags[m] = 1 for every row with a tile whose count > slots-1
//    (row_flags is zeroed by the caller; kernels only ever store 1);
//  * stats (uint64[TWELL_STATS_WORDS], zeroed by the caller except where
//    noted): atomicAdd TWELL_STAT_ACTIVE += true counts,
//    atomicAdd TWELL_STAT_OVERFLOW_TILES += tiles over capacity,
//    atomicMax TWELL_STAT_MAX_TILE_COUNT.
// Rows and columns outside [M, H] are never written; every packed word of
// every row < M is written (no pre-zeroing needed).
#pragma once

#include "common/matref.h"
#include "common/twell_internal.h"

namespace twell {

struct GatePackArgs {
  MatRef<const bf16> x;  // [M, D]
  MatRef<const bf16> w;  // [H, D] (nn.Linear weight)
  int64_t M = 0, D = 0, H = 0;
  int slots = 32;               // 32, 64 or 128
  uint32_t* packed = nullptr;   // [M, tiles_for(H) * slots], compact
  uint8_t* row_flags = nullptr; // [M]
  u64* stats = nullptr;         // [TWELL_STATS_WORDS]
};

// --- sm_90a path (TMA + wgmma, warp-specialised, persistent) -----------
// True when this build carries the sm_90a kernel.
bool gate_pack_sm90_compiled();
// True when the kernel can run these arguments (alignment of pointers and
// strides for TMA, D and H limits). Cheap, host only.
bool gate_pack_sm90_can_run(const GatePackArgs& args);
// Launches on `stream`; `num_sms` sizes the persistent grid.
cudaError_t gate_pack_sm90(const GatePackArgs& args, int num_sms, cudaStream_t stream);

}  // namespace twell
