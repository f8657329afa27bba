// Training forward and backward of the gated ReLU FFN over the hybrid
// ELL + dense-tail format (see docs/training.md for the design, the saved
// state's layout and the limits). Kernels get plain pointers; the C ABI layer
// (capi/capi_train.cu) validates every argument first.
#pragma once

#include "common/matref.h"
#include "common/twell_internal.h"

namespace twell {

constexpr uint64_t kSavedMagic = 0x315254'6c6c657774ull;  // "twellTR1" (little-endian bytes)
constexpr int kTrainStatsWords = TWELL_TRAIN_STATS_WORDS;
// cuBLASLt workspace of the hybrid route, half of kLtWorkspaceBytes: it counts
// against the step's memory, and its GEMMs need little (the tail chunk's have
// more output tiles than SMs; the hot neurons' [256 | 128, D] fp32 outputs
// are 2 MiB, so a split-K over several slices fits). The dense route keeps
// kLtWorkspaceBytes.
constexpr size_t kTrainLtWorkspaceBytes = size_t(16) << 20;

struct TrainProblem {
  int64_t M = 0, D = 0, H = 0;
  int W = 64;               // ELL width
  int slots = 32;           // TwELL slots of the gate output
  bool w_down_dh = false;   // W_d given as [D, H]
  bool use_sm90 = false;
  int sm_count = 1;
  int64_t chunk = 1024;     // tail rows per chunk
};

// Byte offsets inside the caller's saved-state buffer (all 256-aligned).
//   header  uint64[8]: magic, M, T (tail rows), W, D, H, route (1 hybrid, 2 dense), 0
//   counts  int32[M]   true active count per row (L0)
//   flags   uint8[M]   1 = tail row
//   tail    int32[M]   tail rows, ascending (first T valid)
//   cols    int32[M*W] ELL columns (neuron ids), ascending per row; 0 past the count
//   g       f32[M*W]   relu(g) values (bf16-rounded gate outputs) at those columns
//   u       f32[M*W]   u = x . W_u[col] (fp32) at those columns
struct SavedLayout {
  size_t header = 0, counts = 0, flags = 0, tail = 0, cols = 0, g = 0, u = 0, total = 0;
};
SavedLayout train_saved_layout(int64_t M, int W);

// Workspace regions (forward and backward share the buffer; total = max).
struct TrainWorkspace {
  // common
  size_t lt = 0, stats = 0, wdt = 0;
  // forward
  size_t packed = 0, gate_chunk = 0, row_l1 = 0;
  size_t f_xt = 0, f_g = 0, f_u = 0, f_yt = 0;  // f_g: G, then h in place (bf16)
  size_t fwd_total = 0;
  // backward
  size_t dg = 0, du = 0, hist = 0, bsum = 0, nstart = 0, trans = 0, items = 0, fin = 0, partials = 0, sched = 0;
  // tail chunk: b_g, b_u, b_dh are bf16 G, U, dH, then dG, dU, h in place; b_dx is fp32 dx rows
  size_t b_xt = 0, b_dyt = 0, b_g = 0, b_u = 0, b_dh = 0, b_dx = 0;
  size_t acc_g = 0, acc_u = 0, acc_d = 0;
  // Hot neurons' weight gradients (train_kernels.cuh): ranks and count, and the
  // GEMMs' operands and results, which share the dense tail's regions (the hot
  // GEMMs run after the tail chunks). hot_rows: rows per hot chunk, 0 = off.
  size_t hot_rank = 0, hot_set = 0, hot_gu = 0, hot_d = 0, hot_agu = 0, hot_ah = 0;
  int64_t hot_rows = 0;
  size_t bwd_total = 0;
  int64_t nchunks = 0, hist_len = 0, scan_blocks = 0;
  int64_t partial_slots = 0, max_items = 0;
  size_t total = 0;
};
TrainWorkspace train_workspace(const TrainProblem& p);

struct TrainWeights {
  MatRef<const bf16> x;       // [M, D]
  MatRef<const bf16> w_gate;  // [H, D]
  MatRef<const bf16> w_up;    // [H, D]
  MatRef<const bf16> w_down;  // [H, D] or [D, H] per TrainProblem::w_down_dh
};

struct TrainForwardOut {
  MatRef<bf16> y;             // [M, D]
  float* l1 = nullptr;        // or nullptr
  int32_t* active = nullptr;  // or nullptr
  u64* stats = nullptr;       // or nullptr (workspace scratch then)
};

struct TrainBackwardIO {
  MatRef<const bf16> dy;  // [M, D]
  float l1_coeff = 0.f;
  const float* l1_scale = nullptr;  // device float or nullptr: the L1 coefficient is l1_coeff * *l1_scale
  MatRef<bf16> dx;        // [M, D]
  MatRef<bf16> dw_gate;   // [H, D]
  MatRef<bf16> dw_up;     // [H, D]
  MatRef<bf16> dw_down;   // layout per TrainProblem::w_down_dh
  bool accumulate = false;
  u64* stats = nullptr;
};

// What an eager hybrid forward learned on the host (it waits for the tail
// count anyway): feeds TWELL_PATH_AUTO's choice of route for the next call.
// `known` is false where the forward was captured (nothing was read).
struct TrainForwardInfo {
  u64 rows = 0, active = 0, tail_rows = 0;
  bool known = false;
};
// The hybrid forward's statistics words inside `ws` (when the caller gave
// none), and the tail count in a saved state's header: what AUTO reads back
// after a forward whose numbers the host did not see.
u64* train_hybrid_stats(const TrainProblem& p, char* ws);
const u64* train_saved_tail_count(const char* saved);

// The streams a captured call captures its conditional nodes' bodies on
// (nothing else may use them): `body` for the nodes of the call's graph,
// `nested` for nodes inside those bodies.
struct CaptureStreams {
  cudaStream_t body = nullptr, nested = nullptr;
};

// `capture` nullptr: an eager call (one host wait, for the tail count). Else
// `stream` is capturing a graph: the tail chunks become IF nodes decided on
// the device (no host wait; `info` is not written).
twell_status train_forward_run(const TrainProblem& p, const TrainWeights& w, const TrainForwardOut& o, char* saved,
                               char* ws, cudaStream_t stream, const CaptureStreams* capture, TrainForwardInfo* info);

// The saved state's header (both routes): magic, M, T (tail rows), W, D, H,
// route, 0. Reading it is an eager backward's one host wait (a captured
// backward decides from it on the device).
constexpr u64 kRouteHybrid = 1, kRouteDense = 2;
struct SavedHeader {
  u64 words[8] = {};
  u64 tail_rows() const { return words[2]; }
  u64 route() const { return words[6]; }
};
// The statistics of a call over no rows (phase 1 forward, 2 backward), by a kernel (capturable).
twell_status train_write_empty_stats(u64* stats, int phase, int W, cudaStream_t stream);
twell_status train_read_saved_header(const TrainProblem& p, const char* saved, cudaStream_t stream, SavedHeader* h);

// Eager hybrid backward (`tail_rows` from the saved header).
twell_status train_backward_run(const TrainProblem& p, const TrainWeights& w, const TrainBackwardIO& io,
                                const char* saved, int64_t tail_rows, char* ws, cudaStream_t stream);
// A backward captured on `stream` (which must be capturing), with no host
// wait: the route and the tail chunks are IF nodes decided on the device from
// the saved header at every replay. `hybrid_ok` / `dense_ok`: which routes the
// caller's buffers can hold (at least one); a header that is not this
// problem's, or names a route not captured, makes the replay fill dx and the
// weight gradients with NaN.
twell_status train_backward_captured(const TrainProblem& p, const TrainWeights& w, const TrainBackwardIO& io,
                                     const char* saved, bool hybrid_ok, bool dense_ok, char* ws, size_t ws_bytes,
                                     cudaStream_t stream, const CaptureStreams& capture);

// ---------------------------------------------------------------------------
// The dense route (TWELL_PATH_DENSE, or AUTO when activity is high): the nine
// GEMMs of a dense FFN step through cuBLASLt, chunked over rows, with g and u
// saved in bf16 so the backward recomputes nothing (train_dense.cu).
//   saved: header uint64[8] (route 2), counts int32[M], g bf16[M*H], u bf16[M*H]
// The chunk (rows per GEMM) is the largest that fits the caller's workspace,
// at most kDenseChunkMax; weight gradients of several chunks are summed in
// fp32 accumulators (in chunk order), one chunk writes them directly.
constexpr int64_t kDenseChunkMax = 8192;
constexpr int64_t kDenseChunkMin = 128;
struct DenseSavedLayout {
  size_t header = 0, counts = 0, g = 0, u = 0, total = 0;
};
DenseSavedLayout train_dense_saved_layout(int64_t M, int64_t H);
// Workspace bytes the dense route needs with `chunk` rows per GEMM.
size_t train_dense_workspace_bytes(const TrainProblem& p, int64_t chunk);
// Rows per chunk that fit `workspace_bytes` (0 if not even kDenseChunkMin do).
int64_t train_dense_chunk(const TrainProblem& p, size_t workspace_bytes);

twell_status train_dense_forward_run(const TrainProblem& p, const TrainWeights& w, const TrainForwardOut& o,
                                     char* saved, char* ws, size_t ws_bytes, cudaStream_t stream);
twell_status train_dense_backward_run(const TrainProblem& p, const TrainWeights& w, const TrainBackwardIO& io,
                                      const char* saved, char* ws, size_t ws_bytes, int host_syncs,
                                      cudaStream_t stream);
// Device address, inside `ws`, of the dense forward's count of rows with more
// than W active neurons (the rows a hybrid forward would send to the tail),
// which TWELL_PATH_AUTO reads back asynchronously.
const u64* train_dense_over_width(const TrainProblem& p, const char* ws);
// The dense route's statistics words inside `ws` (when the caller gave none).
u64* train_dense_stats(const TrainProblem& p, char* ws);

}  // namespace twell
