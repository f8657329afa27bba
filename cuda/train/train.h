// Training forward and backward of the gated ReLU FFN over the hybrid
// ELL + dense-tail format (see docs/training.md for the design, the saved
// state's layout and the limits). Kernels get plain pointers; the C ABI layer
// (capi/capi_train.cu) validates every argument first.
#pragma once

#include "common/twell_internal.h"

namespace twell {

constexpr uint64_t kSavedMagic = 0x315254'6c6c657774ull;  // "twellTR1" (little-endian bytes)
constexpr int kTrainStatsWords = TWELL_TRAIN_STATS_WORDS;

struct TrainProblem {
  int64_t M = 0, D = 0, H = 0;
  int W = 64;               // ELL width
  int slots = 32;           // TwELL slots of the gate output
  bool w_down_dh = false;   // W_d given as [D, H]
  bool force_dense = false; // every row through the dense tail
  bool use_sm90 = false;
  int sm_count = 1;
  int64_t chunk = 1024;     // tail rows per chunk
};

// Byte offsets inside the caller's saved-state buffer (all 256-aligned).
//   header  uint64[8]: magic, M, T (tail rows), W, D, H, 0, 0
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
  size_t packed = 0, gate_chunk = 0, compact = 0, row_l1 = 0;
  size_t f_xt = 0, f_g = 0, f_u = 0, f_hb = 0, f_yt = 0;
  size_t fwd_total = 0;
  // backward
  size_t dg = 0, du = 0, hist = 0, bsum = 0, nstart = 0, trans = 0, items = 0, fin = 0, partials = 0;
  size_t b_xt = 0, b_dyt = 0, b_g = 0, b_u = 0, b_dh = 0, b_dg = 0, b_du = 0, b_hb = 0, b_dxa = 0, b_dxb = 0;
  size_t acc_g = 0, acc_u = 0, acc_d = 0, acc_tmp = 0;
  size_t bwd_total = 0;
  int64_t nchunks = 0, hist_len = 0, scan_blocks = 0;
  int64_t partial_slots = 0, max_items = 0;
  size_t total = 0;
};
TrainWorkspace train_workspace(const TrainProblem& p);

struct TrainWeights {
  const bf16* x = nullptr;
  int64_t ldx = 0;
  const bf16* w_gate = nullptr;
  int64_t ldw_gate = 0;
  const bf16* w_up = nullptr;
  int64_t ldw_up = 0;
  const bf16* w_down = nullptr;  // [H, D] or [D, H] per TrainProblem::w_down_dh
  int64_t ldw_down = 0;
};

struct TrainForwardOut {
  bf16* y = nullptr;
  int64_t ldy = 0;
  float* l1 = nullptr;       // or nullptr
  int32_t* active = nullptr; // or nullptr
  u64* stats = nullptr;      // or nullptr (workspace scratch then)
};

struct TrainBackwardIO {
  const bf16* dy = nullptr;
  int64_t lddy = 0;
  float l1_coeff = 0.f;
  bf16* dx = nullptr;
  int64_t lddx = 0;
  bf16* dw_gate = nullptr;
  int64_t ld_dwg = 0;
  bf16* dw_up = nullptr;
  int64_t ld_dwu = 0;
  bf16* dw_down = nullptr;  // layout per TrainProblem::w_down_dh
  int64_t ld_dwd = 0;
  bool accumulate = false;
  u64* stats = nullptr;
};

twell_status train_forward_run(const TrainProblem& p, const TrainWeights& w, const TrainForwardOut& o, char* saved,
                               char* ws, cudaStream_t stream);
twell_status train_backward_run(const TrainProblem& p, const TrainWeights& w, const TrainBackwardIO& io,
                                const char* saved, char* ws, cudaStream_t stream);

}  // namespace twell
