// Eight bf16 values in a uint4 (one 16-byte load): unpacking to fp32, dot
// products and axpys in fp32 in element order (fixed, so results are bitwise
// reproducible), and packing back with round-to-nearest-even. Shared by the
// sparse consumers and the training kernels.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace twell {

__device__ __forceinline__ float bf_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf_hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }

__device__ __forceinline__ void unpack8(const uint4 v, float (&f)[8]) {
  f[0] = bf_lo(v.x);
  f[1] = bf_hi(v.x);
  f[2] = bf_lo(v.y);
  f[3] = bf_hi(v.y);
  f[4] = bf_lo(v.z);
  f[5] = bf_hi(v.z);
  f[6] = bf_lo(v.w);
  f[7] = bf_hi(v.w);
}

// s + a . b over 8 bf16 pairs (exact products, fp32 sums in element order).
__device__ __forceinline__ float dot8(const uint4 a, const uint4 b, float s) {
  s = fmaf(bf_lo(a.x), bf_lo(b.x), s);
  s = fmaf(bf_hi(a.x), bf_hi(b.x), s);
  s = fmaf(bf_lo(a.y), bf_lo(b.y), s);
  s = fmaf(bf_hi(a.y), bf_hi(b.y), s);
  s = fmaf(bf_lo(a.z), bf_lo(b.z), s);
  s = fmaf(bf_hi(a.z), bf_hi(b.z), s);
  s = fmaf(bf_lo(a.w), bf_lo(b.w), s);
  s = fmaf(bf_hi(a.w), bf_hi(b.w), s);
  return s;
}

__device__ __forceinline__ void axpy8(float (&acc)[8], float h, const uint4 w) {
  acc[0] = fmaf(h, bf_lo(w.x), acc[0]);
  acc[1] = fmaf(h, bf_hi(w.x), acc[1]);
  acc[2] = fmaf(h, bf_lo(w.y), acc[2]);
  acc[3] = fmaf(h, bf_hi(w.y), acc[3]);
  acc[4] = fmaf(h, bf_lo(w.z), acc[4]);
  acc[5] = fmaf(h, bf_hi(w.z), acc[5]);
  acc[6] = fmaf(h, bf_lo(w.w), acc[6]);
  acc[7] = fmaf(h, bf_hi(w.w), acc[7]);
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

__device__ __forceinline__ uint4 pack8(const float (&a)[8]) {
  uint4 r;
  r.x = pack_bf16x2(a[0], a[1]);
  r.y = pack_bf16x2(a[2], a[3]);
  r.z = pack_bf16x2(a[4], a[5]);
  r.w = pack_bf16x2(a[6], a[7]);
  return r;
}

}  // namespace twell
