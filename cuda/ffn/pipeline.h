// The inference FFN as a sequence of launches on one stream (no host sync):
//   sparse: stats init -> gate GEMM + TwELL pack (sm_90a or portable) ->
//           overflow-row compaction -> sparse consumer (non-overflowed rows)
//           -> exact dense fallback over the overflow list (device-counted)
//   sparse, decode-sized (M <= 64 on sm_90, sparse_ffn_decode.h): gate GEMM
//           (cuBLASLt + packer, or the fused decode kernel) -> decode
//           consumer (also writes the statistics and the overflow list from
//           the packed count words, so no stats init and no compaction) ->
//           exact dense fallback (two kernels that exit at once when the
//           device-side list is empty); every kernel after the GEMM is a
//           programmatic dependent launch (common/pdl.cuh), placed while the
//           previous kernel runs.
//   dense:  per chunk of rows: two cuBLASLt GEMMs -> activation (+stats)
//           -> cuBLASLt GEMM into y.
// Kernels get plain pointers; the C ABI layer (capi/capi_ffn.cu) validates.
#pragma once

#include "common/matref.h"
#include "common/twell_internal.h"

namespace twell {

struct FfnProblem {
  int64_t M = 0, D = 0, H = 0;
  bool gated = true;
  int slots = 32;
  bool w_down_dh = false;  // W_d given as [D, H]
  bool use_sm90 = false;
  int sm_count = 1;
  int64_t chunk_rows = 4096;
  bool pdl = true;  // the decode-sized chain may use programmatic dependent launch
};

struct FfnTensors {
  MatRef<const bf16> x;       // [M, D]
  MatRef<const bf16> w_gate;  // [H, D]; {nullptr, 0} for non-gated
  MatRef<const bf16> w_up;    // [H, D]
  MatRef<const bf16> w_down;  // [H, D] or [D, H] (see FfnProblem::w_down_dh)
  MatRef<bf16> y;             // [M, D]
  u64* stats = nullptr;       // nullptr: use the workspace's own
};

// Byte offsets of the workspace regions for one problem.
struct FfnWorkspace {
  size_t stats = 0, lt = 0;                                     // common
  size_t flags = 0, rows = 0, packed = 0;          // sparse path
  size_t gate_chunk = 0, w_down_t = 0, fallback_h = 0;
  size_t gate_stats = 0;  // decode-sized path: the gate kernel's (unread) statistics atomics
  size_t dense_g = 0, dense_u = 0;                              // dense path (overlaps the sparse regions)
  size_t total = 0;
};
FfnWorkspace ffn_workspace(const FfnProblem& p);

// Gate GEMM + pack only (caller's packed / overflow list / stats).
twell_status gate_pack_run(const FfnProblem& p, MatRef<const bf16> x, MatRef<const bf16> w, uint32_t* packed,
                           int32_t* overflow_rows, u64* stats, char* ws, cudaStream_t stream);

twell_status ffn_run_sparse(const FfnProblem& p, const FfnTensors& t, char* ws, cudaStream_t stream);
twell_status ffn_run_dense(const FfnProblem& p, const FfnTensors& t, char* ws, cudaStream_t stream);

// TWELL_PATH_AUTO inside a stream capture (ffn/auto_route.h): the decision
// kernel, then an IF/ELSE graph node whose bodies (captured through `side`,
// a stream of the caller's that is not capturing) are the dense and the
// sparse path, then the kernel that records the replay's statistics. Every
// replay decides afresh from the device-side history in `state`.
struct AutoState;
twell_status ffn_run_auto_captured(const FfnProblem& p, const FfnTensors& t, char* ws, cudaStream_t stream,
                                   cudaStream_t side, AutoState* state, double threshold);

}  // namespace twell
