// Private hooks into the dense fallback, for its test and benchmark only
// (tests/cuda/test_fallback.cu). Library code calls fallback_rows().
#pragma once

#include "fallback/fallback.h"

namespace twell {
namespace fallback_detail {

enum GemmMask : unsigned {
  kDual = 1u,  // GEMM 1: h_workspace = act(x[rows] W_g^T, x[rows] W_u^T)
  kDown = 2u,  // GEMM 2: y[rows] = h_workspace W_d
  kBoth = 3u,
};

enum Path : int {
  kPathAuto = 0,         // cooperative where the device supports it and both GEMMs run
  kPathLaunches = 1,     // two launches per chunk (ceil(max_rows/chunk_rows) chunks)
  kPathCooperative = 2,  // one cooperative launch for every chunk (grid-wide barriers)
};

// fallback_rows() with a forced pipeline depth (stages: 0 = automatic, as
// fallback_rows() picks; else 2, 3 or 4), a subset of the two GEMMs (a
// subset other than kBoth needs kPathLaunches or kPathAuto) and a forced path.
// Running kDual alone leaves the last chunk's h in the workspace.
cudaError_t fallback_rows_ex(const FallbackArgs& args, cudaStream_t stream, int stages, unsigned gemm_mask,
                             int path = kPathAuto);

// Whether the current device supports cooperative launches (kPathCooperative).
bool cooperative_available();

// The pipeline depth fallback_rows() uses on the current device (2, 3 or 4),
// or 0 when the device's shared memory cannot hold even two stages.
int auto_stages();

// Attributes (registers, local memory, ...) of one kernel instantiation:
// gemm = kDual or kDown (the per-chunk kernels; gated only matters for kDual)
// or kBoth (the cooperative kernel that runs both).
cudaError_t kernel_attributes(unsigned gemm, bool gated, int stages, cudaFuncAttributes* out);

}  // namespace fallback_detail
}  // namespace twell
