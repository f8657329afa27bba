// Internal declarations shared by the kernels and the C ABI layer.
// Kernels never see DLTensor: the C ABI layer (cuda/capi/) validates
// arguments and hands plain pointers, leading dimensions and sizes down here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "twell/twell.h"

namespace twell {

using bf16 = __nv_bfloat16;
using u64 = unsigned long long;  // the type CUDA's 64-bit atomics take

constexpr int kTileCols = TWELL_TILE_COLS;  // columns per TwELL tile

// Tiles in a row of `hidden` columns (the last may be partial).
inline __host__ __device__ int64_t tiles_for(int64_t hidden) { return (hidden + kTileCols - 1) / kTileCols; }

// Returns early with the CUDA error of an expression.
#define TWELL_CUDA_TRY(expr)                          \
  do {                                                \
    cudaError_t twell_err_ = (expr);                  \
    if (twell_err_ != cudaSuccess) return twell_err_; \
  } while (0)

// The launch error of the kernel just launched (configuration errors).
#define TWELL_LAUNCH_CHECK() TWELL_CUDA_TRY(cudaGetLastError())

}  // namespace twell
