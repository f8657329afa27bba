// Exact dense computation of the FFN for a device-side list of rows
// (the rows whose TwELL tiles overflowed), with bounded workspace and no
// host synchronisation: the list length is read on the device.
//   h = relu(x W_g^T) * (x W_u^T)  (gated)   or   h = relu(x W_u^T)  (non-gated)
//   y[rows[i]] = bf16(h W_d)       for i < *count
// Tensor cores (mma.sync, sm_80+), fp32 accumulation; h is rounded to bf16
// in the workspace between the two GEMMs (as a dense bf16 FFN does).
// The launcher issues ceil(max_rows / chunk_rows) chunks; chunk c handles list
// entries [c*chunk_rows, (c+1)*chunk_rows) and its CTAs exit at once when
// c*chunk_rows >= *count, so an empty list costs only the (tiny) launches.
#pragma once

#include "common/matref.h"
#include "common/twell_internal.h"

namespace twell {

struct FallbackArgs {
  MatRef<const bf16> x;       // [M, D]
  MatRef<const bf16> w_gate;  // [H, D]; w_gate.ptr = nullptr = non-gated
  MatRef<const bf16> w_up;    // [H, D]
  MatRef<const bf16> w_down;  // [H, D] (neuron-major)
  MatRef<bf16> y;             // [M, D]
  int64_t M = 0, D = 0, H = 0;
  const int32_t* rows = nullptr; // device list of row indices (< M)
  const u64* count = nullptr;    // device: number of valid entries in rows
  int64_t max_rows = 0;          // host upper bound on *count (e.g. M)
  int64_t chunk_rows = 0;        // rows per chunk (multiple of 128 recommended)
  bf16* h_workspace = nullptr;   // [chunk_rows, H]
  // Launch every kernel as a programmatic dependent of the previous kernel in
  // the stream (cuda/common/pdl.cuh; sm_90+ only): with the device-side count
  // usually 0 at small M, the fallback then costs about one kernel's exit
  // instead of a cooperative launch. Takes the two-launches-per-chunk path.
  bool pdl = false;
};

cudaError_t fallback_rows(const FallbackArgs& args, cudaStream_t stream);

}  // namespace twell
