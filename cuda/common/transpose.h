// The bf16 transpose and the one place that turns a W_d given as [D, H]
// (TWELL_LAYOUT_DH) into the [H, D] rows the kernels read. Both pipelines
// (ffn/ and train/) need it, and they share code only through lower layers.
#pragma once

#include "common/errors.h"
#include "common/matref.h"
#include "common/twell_internal.h"

namespace twell {

// out[c, r] = in[r, c] for an [R, C] bf16 matrix.
cudaError_t transpose_bf16(MatRef<const bf16> in, int64_t R, int64_t C, MatRef<bf16> out, cudaStream_t stream);

// W_d as the kernels read it, [H, D]: the caller's `w_down` as it is, or
// (`given_dh`: it is [D, H]) its transpose written to `scratch` (H * D bf16).
twell_status w_down_rows_hd(MatRef<const bf16> w_down, bool given_dh, int64_t D, int64_t H, bf16* scratch,
                            cudaStream_t stream, MatRef<const bf16>* out);

}  // namespace twell
