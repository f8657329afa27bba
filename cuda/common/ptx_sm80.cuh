// PTX wrappers for the sm_80+ instructions twell's kernels share: mma.sync
// m16n8k16 (bf16 in, fp32 accumulate), cp.async (16-byte, with or without
// zero-fill), ldmatrix, streaming loads and L2 prefetch. The sm_90a ones
// (TMA, wgmma, mbarrier) are in common/sm90_ptx.cuh.
//
// Whatever touches shared memory (cp.async, its commit and waits, ldmatrix)
// is `asm volatile` with a "memory" clobber, so the compiler never moves it
// across __syncthreads() or across another of them: the cp.async pipelines
// depend on program order. The register-only mma and the read-only streaming
// load are plain `asm`, free for the compiler to schedule (they have no side
// effect to order).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace twell {
namespace sm80 {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// D += A * B for one m16n8k16 tile: A 16x16 (row-major fragments a0..a3),
// B 16x8 (column-major fragments b0, b1), bf16 inputs, fp32 accumulation.
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// 16-byte global -> shared copy (`dst` a shared-window address, smem_u32).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}

// As cp_async_16 with src_bytes 16 (copy) or 0 (write zeros and read nothing:
// the predicated-off case; `src` must still be a valid address).
__device__ __forceinline__ void cp_async_16_zfill(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// 16 bytes of data read once per call (weight rows): through the read-only
// path and kept out of L1. A template on the element type rather than a
// const void* parameter: the conversion changes how nvcc computes the
// callers' addresses (more registers in gate_decode.cu's kernels).
template <typename T>
__device__ __forceinline__ uint4 ld_stream16(const T* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

}  // namespace sm80
}  // namespace twell
