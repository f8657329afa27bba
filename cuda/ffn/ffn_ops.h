// The dense path's activation step (the W_d transpose is common/transpose.h).
#pragma once

#include "common/twell_internal.h"

namespace twell {

// In place: g[r, :] <- bf16(relu(g) * u) (gated) or g <- bf16(relu(g)) (u == nullptr),
// for rows [0, rows), H columns, row stride ld. Also gathers the activity
// statistics of relu(g) (per 256-column tile: ACTIVE, OVERFLOW_TILES for
// capacity slots-1, MAX_TILE_COUNT, MAX_ROW_COUNT is not computed).
cudaError_t dense_activation(bf16* g, const bf16* u, int64_t rows, int64_t H, int64_t ld, int slots, u64* stats,
                             cudaStream_t stream);

}  // namespace twell
