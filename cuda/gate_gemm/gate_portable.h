// Portable gate GEMM + packing (any GPU cuBLASLt supports): the GEMM runs
// through cuBLASLt into an fp32 chunk of bounded size, then the reference
// packer (format/pack.cu) packs it, so the bits are those of the spec for
// cuBLAS's fp32 accumulators. Costs one extra write+read of the fp32 chunk
// compared with the fused sm_90a epilogue.
#pragma once

#include "gate_gemm/gate_gemm.h"

namespace twell {

// Rows per fp32 chunk: bounded so the chunk stays under ~64 MiB.
int64_t gate_portable_chunk_rows(int64_t M, int64_t H);
size_t gate_portable_workspace_bytes(int64_t M, int64_t H);

// `chunk` is gate_portable_workspace_bytes(M, H) bytes; `lt_ws` is the cuBLASLt workspace.
twell_status gate_pack_portable(const GatePackArgs& args, void* chunk, void* lt_ws, size_t lt_ws_bytes,
                                cudaStream_t stream);

}  // namespace twell
