// The sm_90a gate GEMM's experiment variants, for the test program only: they
// are defined in experiments/gate_gemm_sm90_variants.cu, which CMake builds
// into test_gate_gemm_sm90 and never into libtwell (the library dispatches
// through gate_pack_sm90() in gate_gemm.h, the default variant alone).
#pragma once

#include "gate_gemm/gate_gemm.h"

namespace twell {

// Compile-time configurations of the sm_90a kernel that can be launched.
struct GatePackSm90Variant {
  // 1: every CTA loads its own x and W tiles; 2: CTA pairs along M share each
  // W tile through TMA multicast (falls back to 1 if the device cannot
  // co-schedule such a cluster).
  int cluster = 1;
  // Consumer warpgroups = CTA rows / 64: only 2 (128 x 256 tiles) is built.
  int consumers = 2;
  // 0: packed slots staged in shared memory, one TMA store per warpgroup
  //    (consumers == 2 only);
  // 1: each quad writes its rows' slots to global memory with 16-byte stores;
  // 2: no packing at all (benchmark of the main loop; output undefined,
  //    slots == 32 only);
  // 3: as 1, but each thread stages its row values as bf16 in shared memory
  //    and loops over its positive values only (fewer instructions per warp).
  int epilogue = 1;
  // wgmma groups left in flight when a stage is released: 1 (release stage k
  // once the MMAs of stage k+1 are issued and those of k retired) or 0
  // (wait for stage k's MMAs right away, release it one step earlier).
  int inflight = 1;
  // Column tiles per schedule band (tiles run column-fastest within a band).
  int group_n = 8;
};

// The variant gate_pack_sm90() uses (cluster 1, epilogue 3, inflight 1, group_n 8).
GatePackSm90Variant gate_pack_sm90_default_variant();

// gate_pack_sm90() with an explicit variant; cudaErrorInvalidValue for a
// combination that is not built. `grid_ctas` (optional) receives the number
// of CTAs launched.
cudaError_t gate_pack_sm90_variant(const GatePackArgs& args, int num_sms, cudaStream_t stream,
                                   const GatePackSm90Variant& variant, int* grid_ctas = nullptr);

}  // namespace twell
