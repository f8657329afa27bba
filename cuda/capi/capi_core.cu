// C ABI: version, build description and device queries.
#include <cstdio>
#include <cstring>

#include "common/errors.h"
#include "gate_gemm/gate_gemm.h"

#ifndef TWELL_CUDA_ARCHS
#define TWELL_CUDA_ARCHS "unknown"
#endif

extern "C" {

TWELL_API int32_t twell_version(void) { return TWELL_VERSION; }

TWELL_API const char* twell_build_info(void) {
  static char info[256];
  static bool once = [] {
    snprintf(info, sizeof(info), "twell %d.%d.%d; CUDA %d.%d; archs %s; sm_90a kernels %s; format v%d",
             TWELL_VERSION_MAJOR, TWELL_VERSION_MINOR, TWELL_VERSION_PATCH, CUDART_VERSION / 1000,
             (CUDART_VERSION % 1000) / 10, TWELL_CUDA_ARCHS, twell::gate_pack_sm90_compiled() ? "yes" : "no",
             TWELL_FORMAT_VERSION);
    return true;
  }();
  (void)once;
  return info;
}

TWELL_API twell_status twell_device_count(int32_t* count) {
  if (count == nullptr) return twell::fail(TWELL_ERROR_INVALID_ARGUMENT, "count is NULL");
  *count = 0;
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state
    return twell::fail_cuda(err, "cudaGetDeviceCount");
  }
  *count = n;
  if (n == 0) return twell::fail(TWELL_ERROR_NO_DEVICE, "no CUDA device is visible");
  return twell::ok();
}

TWELL_API twell_status twell_get_device_info(int32_t device, twell_device_info* info) {
  if (info == nullptr) return twell::fail(TWELL_ERROR_INVALID_ARGUMENT, "info is NULL");
  int32_t n = 0;
  twell_status st = twell_device_count(&n);
  if (st != TWELL_SUCCESS) return st;
  if (device < 0 || device >= n) {
    return twell::fail(TWELL_ERROR_INVALID_ARGUMENT, "device is %d, expected 0..%d", device, n - 1);
  }
  cudaDeviceProp prop;
  cudaError_t err = cudaGetDeviceProperties(&prop, device);
  if (err != cudaSuccess) return twell::fail_cuda(err, "cudaGetDeviceProperties");
  memset(info, 0, sizeof(*info));
  info->device = device;
  info->cc_major = prop.major;
  info->cc_minor = prop.minor;
  info->sm_count = prop.multiProcessorCount;
  info->global_mem_bytes = static_cast<int64_t>(prop.totalGlobalMem);
  info->l2_bytes = prop.l2CacheSize;
  info->smem_per_block_optin = static_cast<int32_t>(prop.sharedMemPerBlockOptin);
  info->has_sm90a_kernels = (twell::gate_pack_sm90_compiled() && prop.major == 9 && prop.minor == 0) ? 1 : 0;
  snprintf(info->name, sizeof(info->name), "%s", prop.name);
  return twell::ok();
}

}  // extern "C"
