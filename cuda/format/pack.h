// Reference TwELL packer (dense pre-activations -> TwELL), unpacker, and the
// deterministic overflow-row compaction shared by every producer.
#pragma once

#include "common/twell_internal.h"

namespace twell {

// Zeroes stats and sets the per-call constants (rows, path, format version);
// also zeroes row_flags[0, rows) when row_flags != nullptr (one launch for both).
cudaError_t stats_init(u64* stats, int64_t rows, int path, cudaStream_t stream, uint8_t* row_flags = nullptr);

// Packs rows [0, M) of `pre` (fp32 if is_f32 else bf16; row stride ld
// elements, 16-byte aligned, ld and H multiples of 8) into packed rows of
// tiles_for(H)*slots words (compact). Sets row_flags[m] = 1 for overflowed
// rows (row_flags must be zero beforehand) and accumulates stats.
// pdl: launched as a programmatic dependent of the previous kernel
// (common/pdl.cuh; sm_90+), so it is placed while that kernel finishes.
cudaError_t pack_rows(const void* pre, bool is_f32, int64_t ld, int64_t M, int64_t H, int slots, uint32_t* packed,
                      uint8_t* row_flags, u64* stats, cudaStream_t stream, bool pdl = false);

// rows_out[0..k) = ascending indices m with row_flags[m] != 0; stats[OVERFLOW_ROWS] = k.
// One CTA, no workspace (see pack.cu).
cudaError_t compact_flagged_rows(const uint8_t* row_flags, int64_t M, int32_t* rows_out, u64* stats,
                                 cudaStream_t stream);

// TwELL -> dense bf16 (stored entries only), out row stride ldo elements.
cudaError_t unpack_rows(const uint32_t* packed, int64_t M, int64_t H, int slots, bf16* out, int64_t ldo,
                        cudaStream_t stream);

}  // namespace twell
