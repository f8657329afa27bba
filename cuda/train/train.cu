// Training forward/backward orchestration (see train.h and docs/training.md).
#include <algorithm>
#include <vector>

#include "common/errors.h"
#include "common/cublaslt.h"
#include "common/launch_cache.h"
#include "common/transpose.h"
#include "common/workspace.h"
#include "format/pack.h"
#include "gate_gemm/gate_gemm.h"
#include "gate_gemm/gate_dispatch.h"
#include "gate_gemm/gate_portable.h"
#include "train/train.h"
#include "train/train_kernels.cuh"

namespace twell {
namespace {

using namespace train;

constexpr int64_t kPartialSlots = 256;  // partial rows for neurons split over several items
constexpr int64_t kMinSegment = 1024;   // entries per weight-gradient item (at least)

unsigned grid1(int64_t n, int per) { return static_cast<unsigned>((n + per - 1) / per); }

}  // namespace

SavedLayout train_saved_layout(int64_t M, int W) {
  SavedLayout s;
  WorkspaceRegions t;
  const size_t mw = static_cast<size_t>(M) * static_cast<size_t>(W);
  s.header = t.take(8 * sizeof(u64));
  s.counts = t.take(static_cast<size_t>(M) * 4);
  s.flags = t.take(static_cast<size_t>(M));
  s.tail = t.take(static_cast<size_t>(M) * 4);
  s.cols = t.take(mw * 4);
  s.g = t.take(mw * 4);
  s.u = t.take(mw * 4);
  s.total = t.end;
  return s;
}

TrainWorkspace train_workspace(const TrainProblem& p) {
  TrainWorkspace w;
  WorkspaceRegions t;
  const size_t M = static_cast<size_t>(p.M), D = static_cast<size_t>(p.D), H = static_cast<size_t>(p.H);
  const size_t C = static_cast<size_t>(std::min<int64_t>(p.chunk, std::max<int64_t>(p.M, 1)));
  const size_t mw = M * static_cast<size_t>(p.W);
  w.lt = t.take(kLtWorkspaceBytes);
  w.stats = t.take(kTrainStatsWords * sizeof(u64));
  w.wdt = t.take(p.w_down_dh ? H * D * 2 : 0);
  const size_t common = t.end;
  // forward
  w.packed = t.take(M * static_cast<size_t>(tiles_for(p.H)) * p.slots * 4);
  w.gate_chunk = t.take(gate_portable_workspace_bytes(p.M, p.H));
  w.compact = t.take(compact_workspace_bytes(p.M));
  w.row_l1 = t.take(M * 4);
  w.f_xt = t.take(C * D * 2);
  w.f_g = t.take(C * H * 4);
  w.f_u = t.take(C * H * 4);
  w.f_hb = t.take(C * H * 2);
  w.f_yt = t.take(C * D * 2);
  w.fwd_total = t.end;
  // backward (reuses the forward's regions)
  t.end = common;
  w.nchunks = (p.M + kChunkRowsSort - 1) / kChunkRowsSort;
  w.hist_len = p.H * w.nchunks + 1;
  w.scan_blocks = (w.hist_len + kScanBlock - 1) / kScanBlock;
  w.partial_slots = kPartialSlots;
  w.max_items = p.H + kPartialSlots;
  w.dg = t.take(mw * 4);
  w.du = t.take(mw * 4);
  w.hist = t.take(static_cast<size_t>(w.hist_len) * 8);
  w.bsum = t.take(static_cast<size_t>(w.scan_blocks) * 8);
  w.nstart = t.take((H + 1) * 8);
  w.trans = t.take(mw * sizeof(WEntry));
  w.items = t.take(static_cast<size_t>(w.max_items) * sizeof(Item));
  w.fin = t.take(static_cast<size_t>(kPartialSlots) * sizeof(Fin));
  w.partials = t.take(static_cast<size_t>(kPartialSlots) * 3 * D * 4);
  w.b_xt = t.take(C * D * 2);
  w.b_dyt = t.take(C * D * 2);
  w.b_g = t.take(C * H * 4);
  w.b_u = t.take(C * H * 4);
  w.b_dh = t.take(C * H * 4);
  w.b_dg = t.take(C * H * 2);
  w.b_du = t.take(C * H * 2);
  w.b_hb = t.take(C * H * 2);
  w.b_dxa = t.take(C * D * 4);
  w.b_dxb = t.take(C * D * 4);
  w.acc_g = t.take(H * D * 4);
  w.acc_u = t.take(H * D * 4);
  w.acc_d = t.take(H * D * 4);
  w.bwd_total = t.end;
  w.total = std::max(w.fwd_total, w.bwd_total);
  return w;
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------
twell_status train_forward_run(const TrainProblem& p, const TrainWeights& w, const TrainForwardOut& o, char* saved,
                               char* ws, cudaStream_t s, TrainForwardInfo* info) {
  const TrainWorkspace L = train_workspace(p);
  const SavedLayout S = train_saved_layout(p.M, p.W);
  const int64_t M = p.M, D = p.D, H = p.H;
  const int W = p.W;
  u64* stats = o.stats != nullptr ? o.stats : reinterpret_cast<u64*>(ws + L.stats);
  auto* header = reinterpret_cast<u64*>(saved + S.header);
  auto* counts = reinterpret_cast<int32_t*>(saved + S.counts);
  auto* flags = reinterpret_cast<uint8_t*>(saved + S.flags);
  auto* tail = reinterpret_cast<int32_t*>(saved + S.tail);
  auto* cols = reinterpret_cast<int32_t*>(saved + S.cols);
  auto* gv = reinterpret_cast<float*>(saved + S.g);
  auto* uv = reinterpret_cast<float*>(saved + S.u);
  auto* row_l1 = reinterpret_cast<float*>(ws + L.row_l1);
  void* lt = ws + L.lt;

  init_kernel<<<1, 32, 0, s>>>(stats, header, M, W, D, H, TWELL_PATH_SPARSE);
  TWELL_CUDA_STEP(cudaGetLastError(), "training init kernel");
  if (M == 0) {
    if (o.l1 != nullptr) TWELL_CUDA_STEP(cudaMemsetAsync(o.l1, 0, sizeof(float), s), "l1 init");
    return TWELL_SUCCESS;
  }

  // W_d as [H, D] for the kernels.
  MatRef<const bf16> wd;
  TWELL_TRY(w_down_rows_hd(w.w_down, p.w_down_dh, D, H, reinterpret_cast<bf16*>(ws + L.wdt), s, &wd));

  {
    // Gate GEMM -> TwELL (+ overflowed-row flags, stats).
    TWELL_CUDA_STEP(cudaMemsetAsync(flags, 0, static_cast<size_t>(M), s), "clearing the row flags");
    auto* packed = reinterpret_cast<uint32_t*>(ws + L.packed);
    const GatePackArgs a{.x = w.x,
                         .w = w.w_gate,
                         .M = M,
                         .D = D,
                         .H = H,
                         .slots = p.slots,
                         .packed = packed,
                         .row_flags = flags,
                         .stats = stats};
    // The decode kernel is not yet GPU-tested inside training.
    const GateRoute r{.use_sm90 = p.use_sm90,
                      .allow_decode = false,
                      .sm_count = p.sm_count,
                      .portable_chunk = ws + L.gate_chunk,
                      .lt_workspace = lt,
                      .lt_bytes = kLtWorkspaceBytes};
    TWELL_TRY(gate_pack_dispatch(a, r, s));
    // TwELL -> ELL rows / tail flags.
    convert_kernel<<<grid1(M, 4), 128, 0, s>>>(packed, M, H, p.slots, W, flags, counts, cols, gv, uv, stats);
    TWELL_CUDA_STEP(cudaGetLastError(), "TwELL -> ELL kernel");
  }
  // Tail list (ascending) and its length -> header[2].
  TWELL_CUDA_STEP(compact_flagged_rows(flags, M, tail, header, ws + L.compact, s), "tail-row compaction");

  // ELL rows.
  {
    const EllFwdArgs e{.x = w.x,
                       .wu = w.w_up,
                       .wd = wd,
                       .flags = flags,
                       .counts = counts,
                       .cols = cols,
                       .g = gv,
                       .u = uv,
                       .y = o.y,
                       .row_l1 = row_l1,
                       .D = D,
                       .W = W};
    const size_t smem = static_cast<size_t>(D) * 2 + static_cast<size_t>(W) * 8;
    ell_forward_kernel<<<static_cast<unsigned>(M), kRowThreads, smem, s>>>(e);
    TWELL_CUDA_STEP(cudaGetLastError(), "ELL forward kernel");
  }

  // Host synchronisation #1: the tail-row count sizes the dense tail GEMMs.
  // The active total comes along (for TWELL_PATH_AUTO's next choice).
  u64 T = 0, active = 0;
  TWELL_CUDA_STEP(cudaMemcpyAsync(&T, header + 2, sizeof(u64), cudaMemcpyDeviceToHost, s), "reading the tail count");
  TWELL_CUDA_STEP(cudaMemcpyAsync(&active, stats + TWELL_STAT_ACTIVE, sizeof(u64), cudaMemcpyDeviceToHost, s),
                  "reading the active count");
  TWELL_CUDA_STEP(cudaStreamSynchronize(s), "waiting for the tail count");
  if (info != nullptr) {
    info->rows = static_cast<u64>(M);
    info->active = active;
    info->tail_rows = T;
  }
  if (T > static_cast<u64>(M))
    return fail(TWELL_ERROR_INTERNAL, "tail count %llu exceeds M", static_cast<unsigned long long>(T));

  const int64_t C = std::min<int64_t>(p.chunk, M);
  int64_t chunks = 0;
  auto* xt = reinterpret_cast<bf16*>(ws + L.f_xt);
  auto* G = reinterpret_cast<float*>(ws + L.f_g);
  auto* U = reinterpret_cast<float*>(ws + L.f_u);
  auto* hb = reinterpret_cast<bf16*>(ws + L.f_hb);
  auto* yt = reinterpret_cast<bf16*>(ws + L.f_yt);
  for (int64_t r0 = 0; r0 < static_cast<int64_t>(T); r0 += C, ++chunks) {
    const int64_t n = std::min<int64_t>(C, static_cast<int64_t>(T) - r0);
    const int32_t* rows = tail + r0;
    gather_rows_kernel<<<static_cast<unsigned>(n), 128, 0, s>>>(w.x.ptr, w.x.ld, rows, D, xt);
    TWELL_CUDA_STEP(cudaGetLastError(), "tail gather");
    TWELL_TRY(lt_linear(xt, D, w.w_gate.ptr, w.w_gate.ld, G, H, true, n, H, D, lt, kLtWorkspaceBytes, s));
    TWELL_TRY(lt_linear(xt, D, w.w_up.ptr, w.w_up.ld, U, H, true, n, H, D, lt, kLtWorkspaceBytes, s));
    tail_forward_act_kernel<<<static_cast<unsigned>(n), 256, 0, s>>>(G, U, H, rows, hb, row_l1, counts, stats, 0);
    TWELL_CUDA_STEP(cudaGetLastError(), "tail activation");
    // yt[n, D] = hb[n, H] W_d[H, D]
    TWELL_TRY(lt_gemm({.m = n, .n = D, .k = H, .a = {hb, H}, .b = wd, .c = {yt, D}}, lt, kLtWorkspaceBytes, s));
    scatter_rows_kernel<<<static_cast<unsigned>(n), 128, 0, s>>>(yt, rows, D, o.y.ptr, o.y.ld);
    TWELL_CUDA_STEP(cudaGetLastError(), "tail scatter");
  }
  forward_final_kernel<<<1, 1024, 0, s>>>(row_l1, flags, counts, M, header, o.l1, stats, 0, chunks);
  TWELL_CUDA_STEP(cudaGetLastError(), "forward final kernel");
  if (o.active != nullptr) {
    TWELL_CUDA_STEP(cudaMemcpyAsync(o.active, counts, static_cast<size_t>(M) * 4, cudaMemcpyDeviceToDevice, s),
                    "active counts");
  }
  return TWELL_SUCCESS;
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------
twell_status train_read_saved_header(const TrainProblem& p, const char* saved, cudaStream_t s, SavedHeader* out) {
  const int64_t M = p.M, D = p.D, H = p.H;
  const int W = p.W;
  u64* hdr = out->words;
  TWELL_CUDA_STEP(cudaMemcpyAsync(hdr, saved, sizeof(out->words), cudaMemcpyDeviceToHost, s),
                  "reading the saved header");
  TWELL_CUDA_STEP(cudaStreamSynchronize(s), "waiting for the saved header");
  if (hdr[0] != kSavedMagic || hdr[1] != static_cast<u64>(M) || hdr[3] != static_cast<u64>(W) ||
      hdr[4] != static_cast<u64>(D) || hdr[5] != static_cast<u64>(H) || hdr[2] > static_cast<u64>(M) ||
      (hdr[6] != kRouteHybrid && hdr[6] != kRouteDense)) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT,
                "saved was not written by twell_train_forward for this plan and M = %lld (header: magic %s, M %llu, "
                "W %llu, D %llu, H %llu, route %llu)",
                static_cast<long long>(M), hdr[0] == kSavedMagic ? "ok" : "wrong",
                static_cast<unsigned long long>(hdr[1]), static_cast<unsigned long long>(hdr[3]),
                static_cast<unsigned long long>(hdr[4]), static_cast<unsigned long long>(hdr[5]),
                static_cast<unsigned long long>(hdr[6]));
  }
  return TWELL_SUCCESS;
}

namespace {

// What the backward's steps share: the problem, the caller's tensors, W_d as
// [H, D], and the saved state and the workspace as typed regions.
struct Backward {
  const TrainProblem& p;
  const TrainWeights& w;
  const TrainBackwardIO& io;
  const TrainWorkspace& L;
  MatRef<const bf16> wd;
  int64_t T;  // tail rows, from the saved header (train_read_saved_header)
  const int32_t* counts;
  const uint8_t* flags;
  const int32_t* tail;
  const int32_t* cols;
  const float* gv;
  const float* uv;
  float* dg;
  float* du;
  char* ws;
  void* lt;
  cudaStream_t s;
};

// The weight-gradient work list the host builds from the per-neuron counts.
struct WgradSchedule {
  std::vector<Item> items;
  std::vector<Fin> fins;
  long long entries = 0;    // ELL entries over all neurons
  long long max_count = 0;  // entries of the busiest neuron
};

// ELL rows: dg, du at the active positions and the dx rows.
twell_status ell_backward(const Backward& b) {
  const int64_t M = b.p.M, D = b.p.D;
  const int W = b.p.W;
  if (b.T >= M) return TWELL_SUCCESS;
  const EllBwdArgs e{.dy = b.io.dy,
                     .wg = b.w.w_gate,
                     .wu = b.w.w_up,
                     .wd = b.wd,
                     .flags = b.flags,
                     .counts = b.counts,
                     .cols = b.cols,
                     .g = b.gv,
                     .u = b.uv,
                     .dg = b.dg,
                     .du = b.du,
                     .dx = b.io.dx,
                     .coef = b.io.l1_coeff,
                     .coef_scale = b.io.l1_scale,
                     .D = D,
                     .W = W};
  ell_dh_kernel<<<static_cast<unsigned>(M), kRowThreads, static_cast<size_t>(D) * 2, b.s>>>(e);
  TWELL_CUDA_STEP(cudaGetLastError(), "ELL backward kernel (dh)");
  ell_dx_kernel<<<static_cast<unsigned>(M), kRowThreads, static_cast<size_t>(W) * 12, b.s>>>(e);
  TWELL_CUDA_STEP(cudaGetLastError(), "ELL backward kernel (dx)");
  return TWELL_SUCCESS;
}

// Neuron-major view of the ELL entries: counting sort (deterministic).
twell_status sort_entries_by_neuron(const Backward& b) {
  const TrainWorkspace& L = b.L;
  const int64_t M = b.p.M, H = b.p.H;
  const int W = b.p.W;
  auto* hist = reinterpret_cast<unsigned long long*>(b.ws + L.hist);
  auto* bsum = reinterpret_cast<unsigned long long*>(b.ws + L.bsum);
  auto* nstart = reinterpret_cast<long long*>(b.ws + L.nstart);
  auto* trans = reinterpret_cast<WEntry*>(b.ws + L.trans);
  TWELL_CUDA_STEP(cudaMemsetAsync(hist, 0, static_cast<size_t>(L.hist_len) * 8, b.s), "clearing the histogram");
  if (b.T < M) {
    hist_kernel<<<grid1(M, 4), 128, 0, b.s>>>(b.flags, b.counts, b.cols, M, W, L.nchunks, hist);
    TWELL_CUDA_STEP(cudaGetLastError(), "histogram kernel");
  }
  scan_sums_kernel<<<static_cast<unsigned>(L.scan_blocks), 256, 0, b.s>>>(hist, L.hist_len, bsum);
  scan_block_sums_kernel<<<1, 1024, 0, b.s>>>(bsum, L.scan_blocks);
  scan_apply_kernel<<<static_cast<unsigned>(L.scan_blocks), 256, 0, b.s>>>(hist, L.hist_len, bsum);
  TWELL_CUDA_STEP(cudaGetLastError(), "scan kernels");
  nstart_kernel<<<grid1(H + 1, 256), 256, 0, b.s>>>(hist, H, L.nchunks, nstart);
  TWELL_CUDA_STEP(cudaGetLastError(), "neuron offsets");
  if (b.T < M) {
    sort_scatter_kernel<<<static_cast<unsigned>(L.nchunks), 256, 0, b.s>>>(b.flags, b.counts, b.cols, M, W, L.nchunks,
                                                                           hist, b.dg, b.du, b.gv, b.uv, trans);
    TWELL_CUDA_STEP(cudaGetLastError(), "counting-sort scatter");
  }
  return TWELL_SUCCESS;
}

// Host synchronisation #2: per-neuron counts -> the weight-gradient schedule
// (neurons with more entries than one segment are split over several items
// whose partial sums a finalize kernel adds), uploaded to the workspace.
twell_status schedule_weight_gradients(const Backward& b, WgradSchedule* out) {
  const int64_t H = b.p.H;
  const auto* nstart = reinterpret_cast<const long long*>(b.ws + b.L.nstart);
  std::vector<long long> ns(static_cast<size_t>(H + 1));
  TWELL_CUDA_STEP(cudaMemcpyAsync(ns.data(), nstart, ns.size() * 8, cudaMemcpyDeviceToHost, b.s),
                  "reading neuron offsets");
  TWELL_CUDA_STEP(cudaStreamSynchronize(b.s), "waiting for neuron offsets");
  int64_t seg = kMinSegment;
  long long max_count = 0;
  for (int64_t j = 0; j < H; ++j) max_count = std::max(max_count, ns[j + 1] - ns[j]);
  for (;; seg *= 2) {
    int64_t slots = 0;
    for (int64_t j = 0; j < H; ++j) {
      const int64_t n = ns[j + 1] - ns[j];
      const int64_t k = n == 0 ? 1 : (n + seg - 1) / seg;
      if (k > 1) slots += k;
    }
    if (slots <= kPartialSlots) break;
  }
  std::vector<Item>& items = out->items;
  std::vector<Fin>& fins = out->fins;
  items.reserve(static_cast<size_t>(H) + kPartialSlots);
  int64_t slot = 0;
  for (int64_t j = 0; j < H; ++j) {
    const int64_t e0 = ns[j], n = ns[j + 1] - ns[j];
    const int64_t k = n == 0 ? 1 : (n + seg - 1) / seg;
    if (k == 1) {
      items.push_back(Item{j, e0, e0 + n, -1});
    } else {
      fins.push_back(Fin{j, slot, k, 0});
      for (int64_t q = 0; q < k; ++q)
        items.push_back(Item{j, e0 + q * seg, std::min(e0 + n, e0 + (q + 1) * seg), slot + q});
      slot += k;
    }
  }
  if (static_cast<int64_t>(items.size()) > b.L.max_items || slot > kPartialSlots) {
    return fail(TWELL_ERROR_INTERNAL, "weight-gradient schedule exceeds its workspace");
  }
  auto* d_items = reinterpret_cast<Item*>(b.ws + b.L.items);
  auto* d_fins = reinterpret_cast<Fin*>(b.ws + b.L.fin);
  TWELL_CUDA_STEP(cudaMemcpyAsync(d_items, items.data(), items.size() * sizeof(Item), cudaMemcpyHostToDevice, b.s),
                  "uploading items");
  if (!fins.empty()) {
    TWELL_CUDA_STEP(cudaMemcpyAsync(d_fins, fins.data(), fins.size() * sizeof(Fin), cudaMemcpyHostToDevice, b.s),
                    "uploading items");
  }
  // (pageable copies: the host vectors may go once the calls return)
  out->entries = ns[H];
  out->max_count = max_count;
  return TWELL_SUCCESS;
}

// The dense tail's fp32 weight-gradient parts [H, D], one per weight.
void tail_accumulators(const Backward& b, float* acc[3]) {
  acc[0] = reinterpret_cast<float*>(b.ws + b.L.acc_g);
  acc[1] = reinterpret_cast<float*>(b.ws + b.L.acc_u);
  acc[2] = reinterpret_cast<float*>(b.ws + b.L.acc_d);
}

// Dense tail rows: exact GEMMs over gathered rows, chunk by chunk; dx rows
// scattered, weight-gradient parts summed into the accumulators.
twell_status tail_backward(const Backward& b, int64_t* chunks_out) {
  const TrainWorkspace& L = b.L;
  const TrainWeights& w = b.w;
  const TrainBackwardIO& io = b.io;
  const int64_t M = b.p.M, D = b.p.D, H = b.p.H, T = b.T;
  const cudaStream_t s = b.s;
  void* lt = b.lt;
  const int64_t C = std::min<int64_t>(b.p.chunk, std::max<int64_t>(M, 1));
  int64_t chunks = 0;
  float* acc[3];
  tail_accumulators(b, acc);
  auto* xt = reinterpret_cast<bf16*>(b.ws + L.b_xt);
  auto* dyt = reinterpret_cast<bf16*>(b.ws + L.b_dyt);
  auto* G = reinterpret_cast<float*>(b.ws + L.b_g);
  auto* U = reinterpret_cast<float*>(b.ws + L.b_u);
  auto* DH = reinterpret_cast<float*>(b.ws + L.b_dh);
  auto* dG = reinterpret_cast<bf16*>(b.ws + L.b_dg);
  auto* dU = reinterpret_cast<bf16*>(b.ws + L.b_du);
  auto* hb = reinterpret_cast<bf16*>(b.ws + L.b_hb);
  auto* dxa = reinterpret_cast<float*>(b.ws + L.b_dxa);
  auto* dxb = reinterpret_cast<float*>(b.ws + L.b_dxb);
  for (int64_t r0 = 0; r0 < T; r0 += C, ++chunks) {
    const int64_t n = std::min<int64_t>(C, T - r0);
    const int32_t* rows = b.tail + r0;
    gather_rows_kernel<<<static_cast<unsigned>(n), 128, 0, s>>>(w.x.ptr, w.x.ld, rows, D, xt);
    gather_rows_kernel<<<static_cast<unsigned>(n), 128, 0, s>>>(io.dy.ptr, io.dy.ld, rows, D, dyt);
    TWELL_CUDA_STEP(cudaGetLastError(), "tail gather");
    TWELL_TRY(lt_linear(xt, D, w.w_gate.ptr, w.w_gate.ld, G, H, true, n, H, D, lt, kLtWorkspaceBytes, s));
    TWELL_TRY(lt_linear(xt, D, w.w_up.ptr, w.w_up.ld, U, H, true, n, H, D, lt, kLtWorkspaceBytes, s));
    TWELL_TRY(lt_linear(dyt, D, b.wd.ptr, b.wd.ld, DH, H, true, n, H, D, lt, kLtWorkspaceBytes, s));
    tail_backward_elem_kernel<<<static_cast<unsigned>(n), 256, 0, s>>>(G, U, DH, H, io.l1_coeff, io.l1_scale, dG, dU,
                                                                       hb);
    TWELL_CUDA_STEP(cudaGetLastError(), "tail backward elementwise");
    // dx rows = dG W_g + dU W_u
    const MatRef<const bf16> wts[2] = {w.w_gate, w.w_up};
    const bf16* ops[2] = {dG, dU};
    float* outs[2] = {dxa, dxb};
    for (int q = 0; q < 2; ++q) {
      TWELL_TRY(lt_gemm({.m = n, .n = D, .k = H, .a = {ops[q], H}, .b = wts[q], .c = {outs[q], D}, .c_is_f32 = true},
                        lt, kLtWorkspaceBytes, s));
    }
    scatter_dx_kernel<<<static_cast<unsigned>(n), 256, 0, s>>>(dxa, dxb, rows, D, io.dx.ptr, io.dx.ld);
    TWELL_CUDA_STEP(cudaGetLastError(), "tail dx scatter");
    // weight gradients: acc_q[H, D] (+)= op_q^T in_q; later chunks add in
    // place, in chunk order (deterministic)
    const bf16* lhs[3] = {dG, dU, hb};
    const bf16* rhs[3] = {xt, xt, dyt};
    for (int q = 0; q < 3; ++q) {
      TWELL_TRY(lt_gemm({.m = H,
                         .n = D,
                         .k = n,
                         .a = {lhs[q], H},
                         .trans_a = true,
                         .b = {rhs[q], D},
                         .c = {acc[q], D},
                         .c_is_f32 = true,
                         .beta = r0 == 0 ? 0.f : 1.f},
                        lt, kLtWorkspaceBytes, s));
    }
  }
  *chunks_out = chunks;
  return TWELL_SUCCESS;
}

// Weight gradients: per-neuron gathers over the sorted entries (+ the tail parts).
twell_status weight_gradients(const Backward& b, const WgradSchedule& sched) {
  const TrainWorkspace& L = b.L;
  const TrainBackwardIO& io = b.io;
  const int64_t D = b.p.D;
  float* acc[3];
  tail_accumulators(b, acc);
  const unsigned ycols = static_cast<unsigned>((D + kColsPerBlock - 1) / kColsPerBlock);
  WgArgs a{.items = reinterpret_cast<const Item*>(b.ws + L.items),
           .fins = reinterpret_cast<const Fin*>(b.ws + L.fin),
           .trans = reinterpret_cast<const WEntry*>(b.ws + L.trans),
           .nwork = static_cast<int64_t>(sched.items.size()) * ycols,
           .ycols = static_cast<int>(ycols),
           .x = b.w.x,
           .dy = io.dy,
           .D = D,
           .partials = reinterpret_cast<float*>(b.ws + L.partials),
           .acc = {b.T > 0 ? acc[0] : nullptr, b.T > 0 ? acc[1] : nullptr, b.T > 0 ? acc[2] : nullptr},
           .out = {io.dw_gate.ptr, io.dw_up.ptr, io.dw_down.ptr},
           .ld = {io.dw_gate.ld, io.dw_up.ld, io.dw_down.ld},
           .dwd_dh = b.p.w_down_dh ? 1 : 0,
           .accumulate = io.accumulate ? 1 : 0};
  const auto launch_wgrad = [&](auto kernel) -> twell_status {
    int per_sm = 0;
    TWELL_CUDA_STEP(occupancy_per_sm(&per_sm, kernel, 256, 0), "weight-gradient occupancy");
    const int64_t grid = std::min<int64_t>(a.nwork, static_cast<int64_t>(std::max(per_sm, 1)) * b.p.sm_count);
    kernel<<<static_cast<unsigned>(grid), 256, 0, b.s>>>(a);
    TWELL_CUDA_STEP(cudaGetLastError(), "weight-gradient kernel");
    return TWELL_SUCCESS;
  };
  TWELL_TRY(launch_wgrad(wgrad_kernel<0>));  // dW_g, dW_u (gathers x)
  TWELL_TRY(launch_wgrad(wgrad_kernel<1>));  // dW_d (gathers dy)
  if (!sched.fins.empty()) {
    wgrad_finalize_kernel<<<dim3(static_cast<unsigned>(sched.fins.size()), ycols), 256, 0, b.s>>>(a);
    TWELL_CUDA_STEP(cudaGetLastError(), "weight-gradient finalize kernel");
  }
  return TWELL_SUCCESS;
}

twell_status write_backward_stats(const Backward& b, const WgradSchedule& sched, int64_t chunks) {
  const int64_t M = b.p.M, T = b.T;
  StatsVals v{};
  v.v[TWELL_STAT_ROWS] = static_cast<u64>(M);
  v.v[TWELL_STAT_PATH] = T == M && M > 0 ? TWELL_PATH_DENSE : (T == 0 ? TWELL_PATH_SPARSE : TWELL_TRAIN_PATH_HYBRID);
  v.v[TWELL_STAT_FORMAT] = TWELL_FORMAT_VERSION;
  v.v[TWELL_TSTAT_TAIL_ROWS] = static_cast<u64>(T);
  v.v[TWELL_TSTAT_ELL_ROWS] = static_cast<u64>(M - T);
  v.v[TWELL_TSTAT_ELL_WIDTH] = static_cast<u64>(b.p.W);
  v.v[TWELL_TSTAT_TAIL_CHUNKS] = static_cast<u64>(chunks);
  v.v[TWELL_TSTAT_HOST_SYNCS] = 2;
  v.v[TWELL_TSTAT_ELL_ENTRIES] = static_cast<u64>(sched.entries);
  v.v[TWELL_TSTAT_MAX_NEURON_COUNT] = static_cast<u64>(sched.max_count);
  v.v[TWELL_TSTAT_PHASE] = 2;
  write_stats_kernel<<<1, 32, 0, b.s>>>(b.io.stats, v);
  TWELL_CUDA_STEP(cudaGetLastError(), "backward statistics");
  return TWELL_SUCCESS;
}

}  // namespace

twell_status train_backward_run(const TrainProblem& p, const TrainWeights& w, const TrainBackwardIO& io,
                                const char* saved, int64_t tail_rows, char* ws, cudaStream_t s) {
  const TrainWorkspace L = train_workspace(p);
  const SavedLayout S = train_saved_layout(p.M, p.W);
  MatRef<const bf16> wd;
  TWELL_TRY(w_down_rows_hd(w.w_down, p.w_down_dh, p.D, p.H, reinterpret_cast<bf16*>(ws + L.wdt), s, &wd));
  const Backward b{.p = p,
                   .w = w,
                   .io = io,
                   .L = L,
                   .wd = wd,
                   .T = tail_rows,
                   .counts = reinterpret_cast<const int32_t*>(saved + S.counts),
                   .flags = reinterpret_cast<const uint8_t*>(saved + S.flags),
                   .tail = reinterpret_cast<const int32_t*>(saved + S.tail),
                   .cols = reinterpret_cast<const int32_t*>(saved + S.cols),
                   .gv = reinterpret_cast<const float*>(saved + S.g),
                   .uv = reinterpret_cast<const float*>(saved + S.u),
                   .dg = reinterpret_cast<float*>(ws + L.dg),
                   .du = reinterpret_cast<float*>(ws + L.du),
                   .ws = ws,
                   .lt = ws + L.lt,
                   .s = s};
  TWELL_TRY(ell_backward(b));
  TWELL_TRY(sort_entries_by_neuron(b));
  WgradSchedule sched;
  TWELL_TRY(schedule_weight_gradients(b, &sched));
  int64_t chunks = 0;
  TWELL_TRY(tail_backward(b, &chunks));
  TWELL_TRY(weight_gradients(b, sched));
  if (io.stats != nullptr) TWELL_TRY(write_backward_stats(b, sched, chunks));
  return TWELL_SUCCESS;
}

}  // namespace twell
