#include <dlfcn.h>

#include <cstdarg>
#include <cstdio>

#include "common/errors.h"

namespace twell {
namespace {
thread_local char g_last_error[1024] = "";
}

twell_status fail(twell_status status, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(g_last_error, sizeof(g_last_error), fmt, args);
  va_end(args);
  return status;
}

twell_status ok() {
  g_last_error[0] = '\0';
  return TWELL_SUCCESS;
}

twell_status fail_cuda(cudaError_t err, const char* what) {
  twell_status status = TWELL_ERROR_CUDA;
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) status = TWELL_ERROR_NO_DEVICE;
  if (err == cudaErrorMemoryAllocation) status = TWELL_ERROR_OUT_OF_MEMORY;
  if (err == cudaErrorNoKernelImageForDevice) status = TWELL_ERROR_UNSUPPORTED;
  // The CUDA runtime says "driver version is insufficient" also when there is no driver at all:
  // the runtime loads libcuda.so.1 itself, so if it is not loaded now there is none.
  if (err == cudaErrorInsufficientDriver && dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD) == nullptr) {
    return fail(status,
                "%s: no NVIDIA driver found (libcuda.so.1 cannot be loaded; %s): twell's kernels need an "
                "NVIDIA GPU and its driver",
                what, cudaGetErrorName(err));
  }
  return fail(status, "%s: %s: %s", what, cudaGetErrorName(err), cudaGetErrorString(err));
}

}  // namespace twell

extern "C" {

TWELL_API const char* twell_last_error(void) { return twell::g_last_error; }

TWELL_API const char* twell_status_string(twell_status status) {
  switch (status) {
    case TWELL_SUCCESS: return "TWELL_SUCCESS";
    case TWELL_ERROR_INVALID_ARGUMENT: return "TWELL_ERROR_INVALID_ARGUMENT";
    case TWELL_ERROR_UNSUPPORTED: return "TWELL_ERROR_UNSUPPORTED";
    case TWELL_ERROR_NO_DEVICE: return "TWELL_ERROR_NO_DEVICE";
    case TWELL_ERROR_CUDA: return "TWELL_ERROR_CUDA";
    case TWELL_ERROR_OUT_OF_MEMORY: return "TWELL_ERROR_OUT_OF_MEMORY";
    case TWELL_ERROR_WORKSPACE: return "TWELL_ERROR_WORKSPACE";
    case TWELL_ERROR_CUBLAS: return "TWELL_ERROR_CUBLAS";
    case TWELL_ERROR_INTERNAL: return "TWELL_ERROR_INTERNAL";
  }
  return "TWELL_STATUS_UNKNOWN";
}

}  // extern "C"
