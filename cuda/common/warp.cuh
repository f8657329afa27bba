// Warp-wide scans and reductions over the 32 lanes (full mask). Each runs its
// adds in a fixed order, so results are bitwise reproducible run to run.
#pragma once

namespace twell {

// Inclusive prefix sum: lane i gets v(0) + ... + v(i).
__device__ __forceinline__ int warp_incl_scan(int v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(0xFFFFFFFFu, v, o);
    if (lane >= o) v += n;
  }
  return v;
}

// Butterfly sum: every lane gets the same total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

}  // namespace twell
