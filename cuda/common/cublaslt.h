// cuBLASLt, loaded with dlopen at first use: libtwell loads (and its
// argument checks work) where cuBLAS is absent; a call that needs it then
// fails with TWELL_ERROR_UNSUPPORTED and says how to install it.
// Used for the portable gate GEMM and the dense path (host-known shapes).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "common/matref.h"
#include "common/twell_internal.h"
#include "twell/twell.h"

namespace twell {

// Recommended cuBLASLt workspace (bytes) carved out of twell's workspace.
constexpr size_t kLtWorkspaceBytes = size_t(32) << 20;

// Row-major C[m, n] = op(A) op(B) + beta C: bf16 A and B, fp32 accumulation,
// C bf16 or fp32. op(A) is [m, k] and op(B) [k, n]; trans_a means A is stored
// as [k, m] (and trans_b: B as [n, k]). beta = 1 adds to C in stream order,
// so sums over several calls stay deterministic.
struct LtGemm {
  int64_t m = 0, n = 0, k = 0;
  MatRef<const bf16> a;
  bool trans_a = false;
  MatRef<const bf16> b;
  bool trans_b = false;
  MatRef<void> c;
  bool c_is_f32 = false;
  float beta = 0.0f;
  // Take an algorithm that needs no workspace when the heuristic's first choice needs some, and
  // hand it none (given workspace, cuBLASLt uses and zeroes it even then). A call that zeroes
  // workspace puts a memset node into every CUDA graph, each about 1.3 us of a replay's host
  // time (H200). On the dense FFN's GEMMs the workspace-free choice was within 5% per GEMM and
  // the whole dense FFN as fast or 1-2% faster (bench/probe_lt.cu, 2026-12-03f).
  bool avoid_workspace = false;
};

twell_status lt_gemm(const LtGemm& g, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// C[M, N] = A[M, K] B^T where B is [N, K] (an nn.Linear weight): lt_gemm with trans_b.
twell_status lt_linear(const void* a, int64_t lda, const void* b, int64_t ldb, void* c, int64_t ldc, bool c_is_f32,
                       int64_t M, int64_t N, int64_t K, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace twell
