// Status plumbing for the C ABI: a thread-local message per failed call.
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

}  // namespace twell
