// Device helpers of the decode-sized sparse consumer (sparse_ffn_decode.cu):
// bf16x8 dot products and axpys in fp32, bf16 packing, cp.async and the
// programmatic-dependent-launch controls. Every fp32 chain runs in a fixed
// order, so results are bitwise reproducible.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace twell {
namespace sparse_decode {

__device__ __forceinline__ float bf_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf_hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }

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

// Weight rows are read once per call: keep them out of L1.
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

__device__ __forceinline__ int warp_incl_scan(int v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(0xFFFFFFFFu, v, o);
    if (lane >= o) v += n;
  }
  return v;
}

// Butterfly sum: every lane gets the same total, in the same order each run.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

}  // namespace sparse_decode
}  // namespace twell
