#include "common/errors.h"
#include "common/cublaslt.h"
#include "common/graph_cond.h"
#include "common/transpose.h"
#include "common/workspace.h"
#include "fallback/fallback.h"
#include "ffn/auto_route.h"
#include "ffn/ffn_ops.h"
#include "ffn/pipeline.h"
#include "format/pack.h"
#include "gate_gemm/gate_dispatch.h"
#include "gate_gemm/gate_gemm.h"
#include "gate_gemm/gate_portable.h"  // workspace size of the portable path
#include "sparse_ffn/sparse_ffn.h"
#include "sparse_ffn/sparse_ffn_decode.h"

namespace twell {
FfnWorkspace ffn_workspace(const FfnProblem& p) {
  FfnWorkspace w;
  WorkspaceRegions r;
  auto take = [&r](size_t bytes) { return r.take(bytes); };
  w.stats = take(TWELL_STATS_WORDS * sizeof(u64));
  w.lt = take(kLtWorkspaceBytes);
  const size_t common_end = r.end;

  const int64_t chunk = p.chunk_rows < p.M ? p.chunk_rows : p.M;
  w.flags = take(static_cast<size_t>(p.M) + 16);
  w.rows = take(static_cast<size_t>(p.M) * 4);
  w.packed = take(static_cast<size_t>(p.M) * tiles_for(p.H) * p.slots * 4);
  // Reserved on sm_90a too: the portable path takes over where TMA cannot run.
  w.gate_chunk = take(gate_portable_workspace_bytes(p.M, p.H));
  w.w_down_t = take(p.w_down_dh ? static_cast<size_t>(p.H * p.D) * 2 : 0);
  w.fallback_h = take(static_cast<size_t>(chunk * p.H) * 2);
  w.gate_stats = take(TWELL_STATS_WORDS * sizeof(u64));
  const size_t sparse_end = r.end;

  r.end = common_end;  // the dense path reuses the sparse path's regions
  w.dense_g = take(static_cast<size_t>(chunk * p.H) * 2);
  w.dense_u = take(static_cast<size_t>(chunk * p.H) * 2);
  const size_t dense_end = r.end;
  w.total = sparse_end > dense_end ? sparse_end : dense_end;
  return w;
}

static twell_status gate_pack_into(const FfnProblem& p, const FfnWorkspace& w, MatRef<const bf16> x,
                                   MatRef<const bf16> wt, uint32_t* packed, uint8_t* flags, u64* stats, char* ws,
                                   cudaStream_t stream, bool pdl = false) {
  // Row flags were zeroed by stats_init.
  const GatePackArgs a{.x = x,
                       .w = wt,
                       .M = p.M,
                       .D = p.D,
                       .H = p.H,
                       .slots = p.slots,
                       .packed = packed,
                       .row_flags = flags,
                       .stats = stats};
  const GateRoute r{.use_sm90 = p.use_sm90,
                    .pdl = pdl,
                    .sm_count = p.sm_count,
                    .portable_chunk = ws + w.gate_chunk,
                    .lt_workspace = ws + w.lt,
                    .lt_bytes = kLtWorkspaceBytes};
  return gate_pack_dispatch(a, r, stream);
}

twell_status gate_pack_run(const FfnProblem& p, MatRef<const bf16> x, MatRef<const bf16> wt, uint32_t* packed,
                           int32_t* overflow_rows, u64* stats, char* ws, cudaStream_t stream) {
  const FfnWorkspace w = ffn_workspace(p);
  auto* flags = reinterpret_cast<uint8_t*>(ws + w.flags);
  TWELL_CUDA_STEP(stats_init(stats, p.M, TWELL_PATH_SPARSE, stream, flags), "stats init");
  TWELL_TRY(gate_pack_into(p, w, x, wt, packed, flags, stats, ws, stream));
  TWELL_CUDA_STEP(compact_flagged_rows(flags, p.M, overflow_rows, stats, stream), "overflow compaction");
  return TWELL_SUCCESS;
}

namespace {

// W_d as the kernels read it, [H, D] (common/transpose.h).
twell_status w_down_hd(const FfnProblem& p, const FfnTensors& t, const FfnWorkspace& w, char* ws, cudaStream_t stream,
                       MatRef<const bf16>* w_down) {
  return w_down_rows_hd(t.w_down, p.w_down_dh, p.D, p.H, reinterpret_cast<bf16*>(ws + w.w_down_t), stream, w_down);
}

FallbackArgs fallback_args(const FfnProblem& p, const FfnTensors& t, const FfnWorkspace& w, char* ws,
                           MatRef<const bf16> w_down, const int32_t* rows, const u64* stats, bool pdl = false) {
  return FallbackArgs{.x = t.x,
                      .w_gate = {p.gated ? t.w_gate.ptr : nullptr, t.w_gate.ld},
                      .w_up = t.w_up,
                      .w_down = w_down,
                      .y = t.y,
                      .M = p.M,
                      .D = p.D,
                      .H = p.H,
                      .rows = rows,
                      .count = stats + TWELL_STAT_OVERFLOW_ROWS,
                      .max_rows = p.M,
                      .chunk_rows = p.chunk_rows < p.M ? p.chunk_rows : p.M,
                      .h_workspace = reinterpret_cast<bf16*>(ws + w.fallback_h),
                      .pdl = pdl};
}

SparseFfnDecodeArgs decode_args(const FfnProblem& p, const FfnTensors& t, const uint32_t* packed,
                                MatRef<const bf16> w_down, int32_t* rows, u64* stats, int64_t dense_pairs = 0,
                                cudaGraphConditionalHandle dense_condition = 0) {
  return SparseFfnDecodeArgs{.packed = packed,
                             .slots = p.slots,
                             .M = p.M,
                             .D = p.D,
                             .H = p.H,
                             .x = {p.gated ? t.x.ptr : nullptr, t.x.ld},
                             .w_up = {p.gated ? t.w_up.ptr : nullptr, t.w_up.ld},
                             .w_down = w_down,
                             .y = t.y,
                             .stats = stats,
                             .overflow_rows = rows,
                             .pdl = p.pdl,
                             .dense_pairs = dense_pairs,
                             .dense_condition = dense_condition};
}

// Gate route of decode-sized calls, from the gate GEMM + pack timings of
// tests/cuda/test_gate_decode.cu on an H100 (us, decode kernel / cuBLASLt +
// packer / sm_90a wgmma):
//   D=2048 H=5632:  M=1 16.9/16.8/25.3  M=16 18.2/16.7/25.8  M=32 20.3/16.9/25.9  M=64 24.8/17.3/25.9
//   D=4096 H=14336: M=1 51.0/48.5/53.3  M=16 52.4/50.3/51.6  M=32 56.1/51.4/51.2  M=64 62.3/52.5/51.4
//   D=896 H=4864:   M=1 11.3/11.9/15.7  M=16 12.5/12.0/16.0  M=32 14.3/12.3/16.1  M=64 18.4/12.4/16.2
// Up to 16 tokens the fused decode kernel is within ~1.5 us of cuBLASLt +
// the packer, and it is one kernel that places the consumer early (PDL)
// instead of two with a launch gap between them, so it stays there (the
// whole FFN measured 27.2-28.6 us at M = 1..16 this way; the two routes were
// not timed against each other end to end); above 16 tokens cuBLASLt + the
// packer is clearly faster (M = 32: 28.4 us, M = 64: 33.4 us end to end).
bool decode_gate_via_cublas(const FfnProblem& p) { return p.M > 16; }

// Decode-sized calls (see pipeline.h): the consumer replaces stats init and
// compaction, and every kernel after the gate GEMM is launched while the
// previous one runs. The gate's row flags and statistics atomics go to
// scratch nobody reads (the consumer derives both from the count words), so
// they need no zeroing. dense_pairs, dense_condition: see SparseFfnDecodeArgs
// (0 = never dense).
twell_status ffn_run_sparse_decode(const FfnProblem& p, const FfnTensors& t, char* ws, cudaStream_t stream,
                                   int64_t dense_pairs = 0, cudaGraphConditionalHandle dense_condition = 0) {
  const FfnWorkspace w = ffn_workspace(p);
  u64* stats = t.stats != nullptr ? t.stats : reinterpret_cast<u64*>(ws + w.stats);
  auto* flags = reinterpret_cast<uint8_t*>(ws + w.flags);
  auto* rows = reinterpret_cast<int32_t*>(ws + w.rows);
  auto* packed = reinterpret_cast<uint32_t*>(ws + w.packed);
  auto* gate_stats = reinterpret_cast<u64*>(ws + w.gate_stats);
  const MatRef<const bf16> gate_w = p.gated ? t.w_gate : t.w_up;
  if (decode_gate_via_cublas(p)) {
    // gate_pack_portable's two steps (M <= 64: one chunk), the packer placed
    // while the GEMM finishes.
    void* pre = ws + w.gate_chunk;
    TWELL_TRY(lt_linear(t.x.ptr, t.x.ld, gate_w.ptr, gate_w.ld, pre, p.H, /*c_is_f32=*/true, p.M, p.H, p.D, ws + w.lt,
                        kLtWorkspaceBytes, stream));
    TWELL_CUDA_STEP(pack_rows(pre, /*is_f32=*/true, p.H, p.M, p.H, p.slots, packed, flags, gate_stats, stream,
                              /*pdl=*/p.pdl),
                    "pack kernel (decode-sized gate)");
  } else {
    TWELL_TRY(gate_pack_into(p, w, t.x, gate_w, packed, flags, gate_stats, ws, stream, /*pdl=*/p.pdl));
  }

  MatRef<const bf16> w_down;
  TWELL_TRY(w_down_hd(p, t, w, ws, stream, &w_down));
  TWELL_CUDA_STEP(sparse_ffn_decode(decode_args(p, t, packed, w_down, rows, stats, dense_pairs, dense_condition),
                                    p.sm_count, stream),
                  "sparse consumer (decode)");
  TWELL_CUDA_STEP(fallback_rows(fallback_args(p, t, w, ws, w_down, rows, stats, /*pdl=*/p.pdl), stream),
                  "dense fallback");
  return TWELL_SUCCESS;
}

// Whether the decode-sized pipeline runs this call (shape and device checks
// only; any pointer of the call would do for the alignment checks).
bool decode_pipeline_ok(const FfnProblem& p, const FfnTensors& t, char* ws) {
  if (!p.use_sm90 || p.M < 1 || p.M > kSparseDecodeMaxRows) return false;
  const FfnWorkspace w = ffn_workspace(p);
  const SparseFfnDecodeArgs c = decode_args(
      p, t, reinterpret_cast<const uint32_t*>(ws + w.packed), {t.w_down.ptr, p.w_down_dh ? p.D : t.w_down.ld},
      reinterpret_cast<int32_t*>(ws + w.rows), reinterpret_cast<u64*>(ws + w.stats));
  return sparse_ffn_decode_can_run(c);
}

}  // namespace

twell_status ffn_run_sparse(const FfnProblem& p, const FfnTensors& t, char* ws, cudaStream_t stream) {
  if (decode_pipeline_ok(p, t, ws)) return ffn_run_sparse_decode(p, t, ws, stream);
  const FfnWorkspace w = ffn_workspace(p);
  u64* stats = t.stats != nullptr ? t.stats : reinterpret_cast<u64*>(ws + w.stats);
  auto* flags = reinterpret_cast<uint8_t*>(ws + w.flags);
  auto* rows = reinterpret_cast<int32_t*>(ws + w.rows);
  auto* packed = reinterpret_cast<uint32_t*>(ws + w.packed);
  TWELL_CUDA_STEP(stats_init(stats, p.M, TWELL_PATH_SPARSE, stream, flags), "stats init");

  // Non-gated: the "gate" GEMM packs h = relu(x W_u^T) itself.
  TWELL_TRY(gate_pack_into(p, w, t.x, p.gated ? t.w_gate : t.w_up, packed, flags, stats, ws, stream));
  TWELL_CUDA_STEP(compact_flagged_rows(flags, p.M, rows, stats, stream), "overflow compaction");

  MatRef<const bf16> w_down;
  TWELL_TRY(w_down_hd(p, t, w, ws, stream, &w_down));
  const SparseFfnArgs c{.packed = packed,
                        .slots = p.slots,
                        .M = p.M,
                        .D = p.D,
                        .H = p.H,
                        .x = {p.gated ? t.x.ptr : nullptr, t.x.ld},
                        .w_up = {p.gated ? t.w_up.ptr : nullptr, t.w_up.ld},
                        .w_down = w_down,
                        .y = t.y,
                        .row_flags = flags,
                        .stats = stats};
  TWELL_CUDA_STEP(sparse_ffn(c, p.sm_count, stream), "sparse consumer");

  TWELL_CUDA_STEP(fallback_rows(fallback_args(p, t, w, ws, w_down, rows, stats), stream), "dense fallback");
  return TWELL_SUCCESS;
}

twell_status ffn_run_dense(const FfnProblem& p, const FfnTensors& t, char* ws, cudaStream_t stream) {
  const FfnWorkspace w = ffn_workspace(p);
  u64* stats = t.stats != nullptr ? t.stats : reinterpret_cast<u64*>(ws + w.stats);
  TWELL_CUDA_STEP(stats_init(stats, p.M, TWELL_PATH_DENSE, stream), "stats init");
  auto* g = reinterpret_cast<bf16*>(ws + w.dense_g);
  auto* u = reinterpret_cast<bf16*>(ws + w.dense_u);
  void* lt = ws + w.lt;
  const int64_t chunk = p.chunk_rows < p.M ? p.chunk_rows : p.M;
  // x[n, D] W^T -> out[n, H] for an nn.Linear weight W [H, D]; workspace-free algorithms (no
  // memset node per GEMM in the path's graphs: see LtGemm::avoid_workspace).
  auto linear = [&](const MatRef<const bf16>& x, const MatRef<const bf16>& w, bf16* out, int64_t n) {
    return lt_gemm(
        {.m = n, .n = p.H, .k = p.D, .a = x, .b = w, .trans_b = true, .c = {out, p.H}, .avoid_workspace = true}, lt,
        kLtWorkspaceBytes, stream);
  };
  for (int64_t r0 = 0; r0 < p.M; r0 += chunk) {
    const int64_t n = p.M - r0 < chunk ? p.M - r0 : chunk;
    const MatRef<const bf16> x = t.x.rows_from(r0);
    if (p.gated) {
      TWELL_TRY(linear(x, t.w_gate, g, n));
      TWELL_TRY(linear(x, t.w_up, u, n));
      TWELL_CUDA_STEP(dense_activation(g, u, n, p.H, p.H, p.slots, stats, stream), "dense activation");
    } else {
      TWELL_TRY(linear(x, t.w_up, g, n));
      TWELL_CUDA_STEP(dense_activation(g, nullptr, n, p.H, p.H, p.slots, stats, stream), "dense activation");
    }
    // y[n, D] = h[n, H] W_d, W_d [H, D] as is or [D, H] transposed.
    const MatRef<bf16> y = t.y.rows_from(r0);
    TWELL_TRY(lt_gemm({.m = n,
                       .n = p.D,
                       .k = p.H,
                       .a = {g, p.H},
                       .b = t.w_down,
                       .trans_b = p.w_down_dh,
                       .c = {y.ptr, y.ld},
                       .avoid_workspace = true},
                      lt, kLtWorkspaceBytes, stream));
  }
  return TWELL_SUCCESS;
}

// Captured AUTO at decode sizes: the decode pipeline, then an IF node whose
// body is the dense path. The decode consumer takes the decision from this
// replay's own gate output: above 2 H stored pairs (about where the sparse
// consumer's W_u / W_d row reads cost more than the dense GEMMs, measured on
// an H200 at M = 16 and 64) it computes nothing and sets the condition. No
// decision or record kernel before or after, and the body is launched only
// when taken: at M <= 64 the IF/ELSE form below costs more than the FFN's
// sparse kernels save.
static int64_t decode_dense_pairs(const FfnProblem& p) { return 2 * p.H; }

static twell_status ffn_run_auto_captured_decode(const FfnProblem& p, const FfnTensors& t, char* ws,
                                                 cudaStream_t stream, cudaStream_t side, cudaGraph_t graph) {
  cudaGraphConditionalHandle dense;
  TWELL_TRY(make_conditions(graph, 1, &dense));
  TWELL_TRY(ffn_run_sparse_decode(p, t, ws, stream, decode_dense_pairs(p), dense));
  return capture_if(stream, side, dense, 1, "the decode AUTO IF node",
                    [&](int, cudaStream_t on) { return ffn_run_dense(p, t, ws, on); });
}

twell_status ffn_run_auto_captured(const FfnProblem& p, const FfnTensors& t, char* ws, cudaStream_t stream,
                                   cudaStream_t side, AutoState* state, double threshold) {
  const FfnWorkspace w = ffn_workspace(p);
  const u64* stats = t.stats != nullptr ? t.stats : reinterpret_cast<const u64*>(ws + w.stats);
  cudaGraph_t graph = nullptr;
  TWELL_TRY(capture_graph(stream, &graph));
  if (graph == nullptr)
    return fail(TWELL_ERROR_INTERNAL, "ffn_run_auto_captured called on a stream that is not capturing");
  if (decode_pipeline_ok(p, t, ws))  // H <= 32768 there: 2 H fits dense_pairs' int32 range
    return ffn_run_auto_captured_decode(p, t, ws, stream, side, graph);
  cudaGraphConditionalHandle condition;
  TWELL_TRY(make_conditions(graph, 1, &condition));
  TWELL_CUDA_STEP(auto_decide(condition, state, threshold, p.H, stream), "AUTO decision kernel");
  // IF/ELSE after the decision kernel: body 0 when the condition is 1 (dense), body 1 otherwise (sparse).
  TWELL_TRY(capture_if(stream, side, condition, 2, "the AUTO IF/ELSE node", [&](int b, cudaStream_t on) {
    return b == 0 ? ffn_run_dense(p, t, ws, on) : ffn_run_sparse(p, t, ws, on);
  }));
  TWELL_CUDA_STEP(auto_record(stats, state, stream), "AUTO record kernel");
  return TWELL_SUCCESS;
}

}  // namespace twell
