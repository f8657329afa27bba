// Small kernels of the FFN pipeline: the dense path's activation step and
// the W_d layout transpose.
#pragma once

#include "common/twell_internal.h"

namespace twell {

// In place: g[r, :] <- bf16(relu(g) * u) (gated) or g <- bf16(relu(g)) (u == nullptr),
// for rows [0, rows), H columns, row stride ld. Also gathers the activity
// statistics of relu(g) (per 256-column tile: ACTIVE, OVERFLOW_TILES for
// capacity slots-1, MAX_TILE_COUNT, MAX_ROW_COUNT is not computed).
cudaError_t dense_activation(bf16* g, const bf16* u, int64_t rows, int64_t H, int64_t ld, int slots, u64* stats,
                             cudaStream_t stream);

// out[c, r] = in[r, c] for an [R, C] bf16 matrix (row strides ldi, ldo).
cudaError_t transpose_bf16(const bf16* in, int64_t R, int64_t C, int64_t ldi, bf16* out, int64_t ldo,
                           cudaStream_t stream);

}  // namespace twell
