// Per-device caches of the host-side queries a kernel launch needs, so that
// the steady state of a call costs launches only (docs/pytorch.md: host time).
//   set_max_dynamic_smem: cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
//     only when a (device, kernel) pair needs more than it was given before;
//   occupancy_per_sm: cudaOccupancyMaxActiveBlocksPerMultiprocessor, once
//     per (device, kernel, threads, dynamic smem);
//   device_attribute: cudaDeviceGetAttribute, once per (device, attribute).
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

template <typename K>
cudaError_t set_max_dynamic_smem(K* kernel, size_t bytes) {
  return set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}
template <typename K>
cudaError_t occupancy_per_sm(int* blocks, K* kernel, int threads, size_t dynamic_smem) {
  return occupancy_per_sm(blocks, reinterpret_cast<const void*>(kernel), threads, dynamic_smem);
}

}  // namespace twell
