// Per-device caches of the host-side queries a kernel launch needs, so that
// the steady state of a call costs launches only (docs/pytorch.md: host time).
//   set_max_dynamic_smem: cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
//     only when a (device, kernel) pair needs more than it was given before;
//   occupancy_per_sm: cudaOccupancyMaxActiveBlocksPerMultiprocessor, once
//     per (device, kernel, threads, dynamic smem);
//   device_attribute: cudaDeviceGetAttribute, once per (device, attribute);
//   sm90_code_loaded: whether a kernel runs sm_90 code on the current device,
//     once per (device, kernel).
// Every answer is a function of the kernel and the device alone, so a cached
// value never goes stale while the process runs. Thread-safe (one mutex; a
// lookup costs well under a microsecond).
#pragma once

#include <cstddef>

#include <cuda_runtime.h>

namespace twell {

cudaError_t set_max_dynamic_smem(const void* kernel, size_t bytes);
cudaError_t occupancy_per_sm(int* blocks, const void* kernel, int threads, size_t dynamic_smem);
cudaError_t device_attribute(int* value, cudaDeviceAttr attr, int device);
// True when the current device has compute capability 9.0 or more and runs
// `kernel` from sm_90+ code. A build for sm_80 + sm_90a runs compute_80 PTX,
// JIT-compiled, on other new GPUs, and there the bodies of the sm_90-only
// kernels are empty. False when a query fails (its error is cleared, so it
// cannot surface in a later launch check).
bool sm90_code_loaded(const void* kernel);

template <typename K>
cudaError_t set_max_dynamic_smem(K* kernel, size_t bytes) {
  return set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}
template <typename K>
bool sm90_code_loaded(K* kernel) {
  return sm90_code_loaded(reinterpret_cast<const void*>(kernel));
}
template <typename K>
cudaError_t occupancy_per_sm(int* blocks, K* kernel, int threads, size_t dynamic_smem) {
  return occupancy_per_sm(blocks, reinterpret_cast<const void*>(kernel), threads, dynamic_smem);
}

}  // namespace twell
