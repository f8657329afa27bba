#include "common/transpose.h"

namespace twell {
namespace {

__global__ void transpose_kernel(const bf16* __restrict__ in, int64_t R, int64_t C, int64_t ldi, bf16* __restrict__ out,
                                 int64_t ldo) {
  __shared__ bf16 tile[32][33];  // +1 column: no bank conflicts on the transposed read
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * 32, c0 = static_cast<int64_t>(blockIdx.x) * 32;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int64_t r = r0 + i, c = c0 + threadIdx.x;
    if (r < R && c < C) tile[i][threadIdx.x] = in[r * ldi + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int64_t c = c0 + i, r = r0 + threadIdx.x;
    if (r < R && c < C) out[c * ldo + r] = tile[threadIdx.x][i];
  }
}

}  // namespace

cudaError_t transpose_bf16(MatRef<const bf16> in, int64_t R, int64_t C, MatRef<bf16> out, cudaStream_t stream) {
  if (R == 0 || C == 0) return cudaSuccess;
  dim3 grid(static_cast<unsigned>((C + 31) / 32), static_cast<unsigned>((R + 31) / 32));
  if (grid.y > 65535) return cudaErrorInvalidConfiguration;
  transpose_kernel<<<grid, dim3(32, 8), 0, stream>>>(in.ptr, R, C, in.ld, out.ptr, out.ld);
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
