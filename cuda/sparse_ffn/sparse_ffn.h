// Sparse consumers of a TwELL matrix (no h in global memory).
//   gated:     y[m] = sum_j g[m,j] * (x[m] . W_u[j]) * W_d[j]   (g from the packed gate)
//   non-gated: y[m] = sum_j h[m,j] * W_d[j]                      (h from the packed matrix)
// for the stored entries of every row m < M whose row_flags[m] == 0. Rows
// with row_flags[m] != 0 are left untouched (the exact fallback writes them).
// fp32 accumulation, y rounded to bf16 once. Deterministic: the summation
// order is fixed by the (sorted) packed order. A count word larger than the
// tile capacity is clamped to slots-1 (only stored entries are read).
// Also atomicMax(stats[TWELL_STAT_MAX_ROW_COUNT], sum of the row's true counts)
// for every row (flagged or not), when stats != nullptr.
#pragma once

#include "common/matref.h"
#include "common/twell_internal.h"

namespace twell {

struct SparseFfnArgs {
  const uint32_t* packed = nullptr;  // [M, tiles_for(H) * slots]
  int slots = 32;
  int64_t M = 0, D = 0, H = 0;
  MatRef<const bf16> x;       // [M, D] (gated only; x.ptr = nullptr for non-gated)
  MatRef<const bf16> w_up;    // [H, D] (gated only)
  MatRef<const bf16> w_down;  // [H, D]
  MatRef<bf16> y;             // [M, D]
  const uint8_t* row_flags = nullptr;  // [M] or nullptr (no row skipped)
  u64* stats = nullptr;                // or nullptr
};

// `sm_count` lets the launcher size grids for small M (decode).
cudaError_t sparse_ffn(const SparseFfnArgs& args, int sm_count, cudaStream_t stream);

}  // namespace twell
