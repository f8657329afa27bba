// Device helpers for the TwELL word layout (see include/twell/twell.h).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace twell {

// One TwELL entry: column within the tile in bits 0-15, bf16 bits of the
// value in bits 16-31. `value` must be > 0 (the caller has applied ReLU).
__device__ __forceinline__ uint32_t pack_entry(int local_col, float value) {
  const __nv_bfloat16 b = __float2bfloat16_rn(value);
  const uint32_t bits = static_cast<uint32_t>(__bfloat16_as_ushort(b));
  return (bits << 16) | static_cast<uint32_t>(local_col);
}

__device__ __forceinline__ int entry_col(uint32_t word) { return static_cast<int>(word & 0xFFFFu); }

__device__ __forceinline__ float entry_value(uint32_t word) {
  return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(word >> 16)));
}

}  // namespace twell
