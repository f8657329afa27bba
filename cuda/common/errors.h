// Status plumbing for the C ABI: a thread-local message per failed call.
// It lives in common/ because every layer reports failures this way: the
// launchers below the C ABI return a twell_status with its message set.
#pragma once

#include <cuda_runtime.h>

#include "twell/twell.h"

namespace twell {

// Records `status` with a printf-style message and returns it.
twell_status fail(twell_status status, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
// Clears the message (after a successful call) and returns TWELL_SUCCESS.
twell_status ok();
// Maps a CUDA error to a status and records "<what>: <cudaGetErrorName>: <string>".
twell_status fail_cuda(cudaError_t err, const char* what);

// Returns the status of a twell call when it is not TWELL_SUCCESS.
#define TWELL_TRY(expr)                 \
  do {                                  \
    twell_status s_ = (expr);           \
    if (s_ != TWELL_SUCCESS) return s_; \
  } while (0)

// Returns a recorded TWELL_ERROR_CUDA-family status when a CUDA call or launch fails.
#define TWELL_CUDA_STEP(expr, what)                                         \
  do {                                                                      \
    cudaError_t twell_e_ = (expr);                                          \
    if (twell_e_ != cudaSuccess) return ::twell::fail_cuda(twell_e_, what); \
  } while (0)

}  // namespace twell
