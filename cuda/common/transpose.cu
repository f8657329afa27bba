#include "common/transpose.h"

namespace twell {
namespace {

// 64 x 64 tiles; with `pairs` (even strides, 4-byte aligned pointers) every
// access moves two bf16 as one 32-bit word, so a warp reads and writes 128
// contiguous bytes and a 256-thread CTA keeps 8 KiB of loads in flight (the
// 32 x 32 tile of single bf16 reached about 1.2 TB/s on an H200 for W_d at
// 2048 x 5632). tile[i][w] holds input row i, columns 2w and 2w + 1 (+1 word
// of padding per row: the transposed reads meet at most two-way conflicts).
__device__ __forceinline__ uint16_t half_of(uint32_t w, int k) { return static_cast<uint16_t>(k ? w >> 16 : w); }

__global__ void transpose_kernel(const bf16* __restrict__ in, int64_t R, int64_t C, int64_t ldi, bf16* __restrict__ out,
                                 int64_t ldo, bool pairs) {
  __shared__ uint32_t tile[64][33];
  const auto* src = reinterpret_cast<const uint16_t*>(in);
  auto* dst = reinterpret_cast<uint16_t*>(out);
  const int tx = threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * 64, c0 = static_cast<int64_t>(blockIdx.x) * 64;
  const int64_t c = c0 + 2 * tx;
#pragma unroll
  for (int s8 = 0; s8 < 8; ++s8) {
    const int i = threadIdx.y + 8 * s8;
    const int64_t r = r0 + i;
    uint32_t w = 0;
    if (r < R) {
      const uint16_t* p = src + r * ldi + c;
      if (pairs && c + 1 < C) {
        w = *reinterpret_cast<const uint32_t*>(p);
      } else {
        if (c < C) w = p[0];
        if (c + 1 < C) w |= static_cast<uint32_t>(p[1]) << 16;
      }
    }
    tile[i][tx] = w;
  }
  __syncthreads();
  const int64_t r = r0 + 2 * tx;
#pragma unroll
  for (int s8 = 0; s8 < 8; ++s8) {
    const int k = threadIdx.y + 8 * s8;
    const int64_t oc = c0 + k;  // output row
    if (oc >= C) continue;
    const uint16_t lo = half_of(tile[2 * tx][k / 2], k % 2), hi = half_of(tile[2 * tx + 1][k / 2], k % 2);
    uint16_t* p = dst + oc * ldo + r;
    if (pairs && r + 1 < R) {
      *reinterpret_cast<uint32_t*>(p) = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
    } else {
      if (r < R) p[0] = lo;
      if (r + 1 < R) p[1] = hi;
    }
  }
}

}  // namespace

cudaError_t transpose_bf16(MatRef<const bf16> in, int64_t R, int64_t C, MatRef<bf16> out, cudaStream_t stream) {
  if (R == 0 || C == 0) return cudaSuccess;
  dim3 grid(static_cast<unsigned>((C + 63) / 64), static_cast<unsigned>((R + 63) / 64));
  if (grid.y > 65535) return cudaErrorInvalidConfiguration;
  const bool pairs = in.ld % 2 == 0 && out.ld % 2 == 0 && reinterpret_cast<uintptr_t>(in.ptr) % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(out.ptr) % 4 == 0;
  transpose_kernel<<<grid, dim3(32, 8), 0, stream>>>(in.ptr, R, C, in.ld, out.ptr, out.ld, pairs);
  return cudaGetLastError();
}

twell_status w_down_rows_hd(MatRef<const bf16> w_down, bool given_dh, int64_t D, int64_t H, bf16* scratch,
                            cudaStream_t stream, MatRef<const bf16>* out) {
  *out = w_down;
  if (given_dh) {
    TWELL_CUDA_STEP(transpose_bf16(w_down, D, H, MatRef<bf16>{scratch, D}, stream), "W_d transpose");
    *out = MatRef<const bf16>{scratch, D};
  }
  return TWELL_SUCCESS;
}

}  // namespace twell
