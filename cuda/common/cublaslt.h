// cuBLASLt, loaded with dlopen at first use: libtwell loads (and its
// argument checks work) where cuBLAS is absent; a call that needs it then
// fails with TWELL_ERROR_UNSUPPORTED and says how to install it.
// Used for the portable gate GEMM and the dense path (host-known shapes).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "twell/twell.h"

namespace twell {

// Column-major D = op(A) op(B), bf16 inputs, fp32 accumulation; output bf16
// or fp32. (Row-major callers swap operands: see the call sites.)
struct LtMatmul {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  void* c = nullptr;
  int64_t ldc = 0;
  bool c_is_f32 = false;
  // D = op(A) op(B) + beta * D (in place; beta = 1 accumulates in stream
  // order, so sums over several calls stay deterministic).
  float beta = 0.0f;
};

// Recommended cuBLASLt workspace (bytes) carved out of twell's workspace.
constexpr size_t kLtWorkspaceBytes = size_t(32) << 20;

twell_status lt_matmul(const LtMatmul& g, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Row-major C[m, n] (ld ldc) = op(A) op(B) + beta C, bf16 A and B (row-major,
// leading dimensions lda / ldb), op(A) [m, k], op(B) [k, n]; C bf16 or fp32.
twell_status lt_gemm_rm(bool trans_a, const void* a, int64_t lda, bool trans_b, const void* b, int64_t ldb, void* c,
                        int64_t ldc, bool c_is_f32, int64_t m, int64_t n, int64_t k, float beta, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream);

// Row-major helper: C[M, N] = A[M, K] * B^T where B is [N, K] (nn.Linear weight).
twell_status lt_linear(const void* a, int64_t lda, const void* b, int64_t ldb, void* c, int64_t ldc, bool c_is_f32,
                       int64_t M, int64_t N, int64_t K, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream);

}  // namespace twell
