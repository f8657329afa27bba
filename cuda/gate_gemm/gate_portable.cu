#include "common/errors.h"
#include "common/cublaslt.h"
#include "format/pack.h"
#include "gate_gemm/gate_portable.h"

namespace twell {

int64_t gate_portable_chunk_rows(int64_t M, int64_t H) {
  const int64_t budget = int64_t(64) << 20;  // bytes of fp32 chunk
  int64_t rows = budget / (H * 4);
  rows = rows / 128 * 128;
  if (rows < 128) rows = 128;
  return rows < M ? rows : M;
}

size_t gate_portable_workspace_bytes(int64_t M, int64_t H) {
  const int64_t rows = gate_portable_chunk_rows(M, H);
  return static_cast<size_t>((rows * H * 4 + 255) / 256 * 256);
}

twell_status gate_pack_portable(const GatePackArgs& a, void* chunk, void* lt_ws, size_t lt_ws_bytes,
                                cudaStream_t stream) {
  const int64_t rows = gate_portable_chunk_rows(a.M, a.H);
  const int64_t words = tiles_for(a.H) * a.slots;
  for (int64_t r0 = 0; r0 < a.M; r0 += rows) {
    const int64_t n = a.M - r0 < rows ? a.M - r0 : rows;
    twell_status st = lt_linear(a.x.ptr + r0 * a.x.ld, a.x.ld, a.w.ptr, a.w.ld, chunk, a.H, /*c_is_f32=*/true, n, a.H,
                                a.D, lt_ws, lt_ws_bytes, stream);
    if (st != TWELL_SUCCESS) return st;
    cudaError_t err = pack_rows(chunk, /*is_f32=*/true, a.H, n, a.H, a.slots, a.packed + r0 * words, a.row_flags + r0,
                                a.stats, stream);
    if (err != cudaSuccess) return fail_cuda(err, "pack kernel (portable gate path)");
  }
  return TWELL_SUCCESS;
}

}  // namespace twell
