// Training forward/backward orchestration (see train.h and docs/training.md).
#include <algorithm>
#include <vector>

#include "common/errors.h"
#include "common/cublaslt.h"
#include "common/graph_cond.h"
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
constexpr int64_t kHotRowsPerChunk = 8192;  // rows per hot-neuron GEMM (the reduction dimension)

unsigned grid1(int64_t n, int per) { return static_cast<unsigned>((n + per - 1) / per); }

// Captured calls: IF nodes over the tail chunks the problem could need. Chunk
// c (tail rows [c C, c C + C)) has a node per size it may run with
// (tail_chunk_rows); at a replay the one matching the saved header's tail
// count runs, or none. body(c, n, stream) is captured into the node of chunk c
// at n rows. Up to kChunksPerGroup chunks are nodes of the call's graph; more
// are grouped, a group's node (run when its first chunk runs) holding its
// chunks' nodes, so a replay launches a few nodes from the host whatever M is.
constexpr int64_t kChunksPerGroup = 8;

// The sizes chunk c may run with (ascending, distinct).
std::vector<ChunkUnit> chunk_units(int64_t M, int64_t C, int64_t c0, int64_t c1) {
  std::vector<ChunkUnit> units;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t r0 = c * C, cap = std::min(C, M - r0);
    int64_t last = 0;
    for (int64_t rem : {int64_t{1}, int64_t{129}, int64_t{257}, cap}) {
      const int64_t n = tail_chunk_rows(std::min(rem, cap), cap);
      if (n != last) units.push_back(ChunkUnit{.r0 = r0, .cap = cap, .n = n});
      last = n;
    }
  }
  return units;
}

// An IF node per unit, each with body(unit, stream) captured into it.
template <class Body>
twell_status capture_unit_ifs(cudaStream_t s, cudaStream_t side, const u64* header, const HeaderCheck& chk,
                              const std::vector<ChunkUnit>& units, Body&& body) {
  cudaGraph_t graph = nullptr;
  TWELL_TRY(capture_graph(s, &graph));
  if (graph == nullptr) return fail(TWELL_ERROR_INTERNAL, "tail chunks: the stream is not capturing");
  for (size_t i0 = 0; i0 < units.size(); i0 += kCondsPerKernel) {
    ChunkConds cc{};
    cc.n = static_cast<int>(std::min<size_t>(kCondsPerKernel, units.size() - i0));
    for (int i = 0; i < cc.n; ++i) cc.u[i] = units[i0 + i];
    TWELL_TRY(make_conditions(graph, cc.n, cc.h));
    chunk_conditions_kernel<<<1, 1, 0, s>>>(cc, header, chk);
    TWELL_CUDA_STEP(cudaGetLastError(), "tail chunk conditions");
    for (int i = 0; i < cc.n; ++i) {
      TWELL_TRY(capture_if(s, side, cc.h[i], 1, "a tail chunk's IF node",
                           [&](int, cudaStream_t on) { return body(cc.u[i], on); }));
    }
  }
  return TWELL_SUCCESS;
}

template <class Body>
twell_status capture_tail_chunks(cudaStream_t s, const CaptureStreams& cs, const u64* header, const HeaderCheck& chk,
                                 int64_t M, int64_t C, Body&& body) {
  const int64_t chunks = (M + C - 1) / C;
  const auto leaf = [&](const ChunkUnit& u, cudaStream_t on) { return body(u.r0 / C, u.n, on); };
  if (chunks <= kChunksPerGroup) return capture_unit_ifs(s, cs.body, header, chk, chunk_units(M, C, 0, chunks), leaf);
  std::vector<ChunkUnit> groups;
  for (int64_t c0 = 0; c0 < chunks; c0 += kChunksPerGroup) groups.push_back(ChunkUnit{.r0 = c0 * C, .cap = 0, .n = 0});
  return capture_unit_ifs(s, cs.body, header, chk, groups, [&](const ChunkUnit& g, cudaStream_t on) {
    const int64_t c0 = g.r0 / C;
    return capture_unit_ifs(on, cs.nested, header, chk, chunk_units(M, C, c0, std::min(chunks, c0 + kChunksPerGroup)),
                            leaf);
  });
}

// The rows eager calls run tail chunk c with (as a captured call would).
int64_t eager_chunk_rows(int64_t T, int64_t M, int64_t C, int64_t c) {
  return tail_chunk_rows(T - c * C, std::min(C, M - c * C));
}
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
  w.lt = t.take(kTrainLtWorkspaceBytes);
  w.stats = t.take(kTrainStatsWords * sizeof(u64));
  w.wdt = t.take(p.w_down_dh ? H * D * 2 : 0);
  const size_t common = t.end;
  // forward
  w.packed = t.take(M * static_cast<size_t>(tiles_for(p.H)) * p.slots * 4);
  w.gate_chunk = t.take(gate_portable_workspace_bytes(p.M, p.H));
  w.row_l1 = t.take(M * 4);
  w.f_xt = t.take(C * D * 2);
  w.f_g = t.take(C * H * 2);
  w.f_u = t.take(C * H * 2);
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
  w.sched = t.take(sizeof(WgSchedule));
  w.b_xt = t.take(C * D * 2);
  w.b_dyt = t.take(C * D * 2);
  w.b_g = t.take(C * H * 2);
  w.b_u = t.take(C * H * 2);
  w.b_dh = t.take(C * H * 2);
  w.b_dx = t.take(C * D * 4);
  w.acc_g = t.take(H * D * 4);
  w.acc_u = t.take(H * D * 4);
  w.acc_d = t.take(H * D * 4);
  w.hot_rank = t.take(H * 4);
  w.hot_set = t.take(sizeof(HotSet));
  w.bwd_total = t.end;
  // Hot neurons: results [3 kHotMax, D] fp32 and operands of up to
  // kHotRowsPerChunk rows inside the tail regions [b_xt, end of b_dx); off
  // when fewer than kHotMinCount rows fit or M is below it (no neuron can be hot).
  const size_t tail_end = w.b_dx + C * D * 4, K = kHotMax;
  const size_t results = (3 * K * D * 4 + 1023) & ~size_t(1023), per_row = 3 * K * 2;
  if (p.M >= kHotMinCount && tail_end > w.b_xt + results + 1024) {
    const int64_t fit = static_cast<int64_t>((tail_end - w.b_xt - results - 1024) / per_row);
    const int64_t rows = std::min<int64_t>({p.M, kHotRowsPerChunk, fit});
    if (rows >= kHotMinCount) {
      WorkspaceRegions h;
      h.end = w.b_xt;
      w.hot_gu = h.take(2 * K * D * 4);
      w.hot_d = h.take(K * D * 4);
      w.hot_agu = h.take(static_cast<size_t>(rows) * 2 * K * 2);
      w.hot_ah = h.take(static_cast<size_t>(rows) * K * 2);
      if (h.end <= tail_end) w.hot_rows = rows;
    }
  }
  w.total = std::max(w.fwd_total, w.bwd_total);
  return w;
}

u64* train_hybrid_stats(const TrainProblem& p, char* ws) {
  return reinterpret_cast<u64*>(ws + train_workspace(p).stats);
}

const u64* train_saved_tail_count(const char* saved) {
  return reinterpret_cast<const u64*>(saved + train_saved_layout(0, 8).header) + 2;
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------
twell_status train_forward_run(const TrainProblem& p, const TrainWeights& w, const TrainForwardOut& o, char* saved,
                               char* ws, cudaStream_t s, const CaptureStreams* capture, TrainForwardInfo* info) {
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
                      .lt_bytes = kTrainLtWorkspaceBytes};
    TWELL_TRY(gate_pack_dispatch(a, r, s));
    // TwELL -> ELL rows / tail flags.
    convert_kernel<<<grid1(M, 4), 128, 0, s>>>(packed, M, H, p.slots, W, flags, counts, cols, gv, uv, stats);
    TWELL_CUDA_STEP(cudaGetLastError(), "TwELL -> ELL kernel");
  }
  // Tail list (ascending) and its length -> header[2].
  TWELL_CUDA_STEP(compact_flagged_rows(flags, M, tail, header, s), "tail-row compaction");

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

  // Dense tail rows, chunk by chunk (chunk c: tail rows [c C, c C + n)).
  const int64_t C = std::min<int64_t>(p.chunk, M);
  auto* xt = reinterpret_cast<bf16*>(ws + L.f_xt);
  auto* G = reinterpret_cast<bf16*>(ws + L.f_g);  // G, then h in place
  auto* U = reinterpret_cast<bf16*>(ws + L.f_u);
  auto* yt = reinterpret_cast<bf16*>(ws + L.f_yt);
  const u64* T_dev = header + 2;
  const auto tail_chunk = [&](int64_t c, int64_t n, cudaStream_t on) -> twell_status {
    const int64_t r0 = c * C;
    gather_rows_kernel<<<static_cast<unsigned>(n), 128, 0, on>>>(w.x.ptr, w.x.ld, tail, T_dev, r0, D, xt);
    TWELL_CUDA_STEP(cudaGetLastError(), "tail gather");
    TWELL_TRY(lt_linear(xt, D, w.w_gate.ptr, w.w_gate.ld, G, H, false, n, H, D, lt, kTrainLtWorkspaceBytes, on));
    TWELL_TRY(lt_linear(xt, D, w.w_up.ptr, w.w_up.ld, U, H, false, n, H, D, lt, kTrainLtWorkspaceBytes, on));
    tail_forward_act_kernel<<<static_cast<unsigned>(n), 256, 0, on>>>(G, U, H, tail, T_dev, r0, row_l1, counts, stats,
                                                                      0);
    TWELL_CUDA_STEP(cudaGetLastError(), "tail activation");
    // yt[n, D] = h[n, H] W_d[H, D]  (h in G's place)
    TWELL_TRY(lt_gemm({.m = n, .n = D, .k = H, .a = {G, H}, .b = wd, .c = {yt, D}}, lt, kTrainLtWorkspaceBytes, on));
    scatter_rows_kernel<<<static_cast<unsigned>(n), 128, 0, on>>>(yt, tail, T_dev, r0, D, o.y.ptr, o.y.ld);
    TWELL_CUDA_STEP(cudaGetLastError(), "tail scatter");
    return TWELL_SUCCESS;
  };
  int host_syncs = 0;
  if (capture == nullptr) {
    // Eager: one host synchronisation, for the tail-row count that sizes the
    // tail GEMMs (cuBLASLt takes M from the host). The active total comes
    // along, for TWELL_PATH_AUTO's next choice.
    u64 T = 0, active = 0;
    TWELL_CUDA_STEP(cudaMemcpyAsync(&T, T_dev, sizeof(u64), cudaMemcpyDeviceToHost, s), "reading the tail count");
    TWELL_CUDA_STEP(cudaMemcpyAsync(&active, stats + TWELL_STAT_ACTIVE, sizeof(u64), cudaMemcpyDeviceToHost, s),
                    "reading the active count");
    TWELL_CUDA_STEP(cudaStreamSynchronize(s), "waiting for the tail count");
    host_syncs = 1;
    if (info != nullptr) {
      info->rows = static_cast<u64>(M);
      info->active = active;
      info->tail_rows = T;
      info->known = true;
    }
    if (T > static_cast<u64>(M))
      return fail(TWELL_ERROR_INTERNAL, "tail count %llu exceeds M", static_cast<unsigned long long>(T));
    for (int64_t c = 0; c * C < static_cast<int64_t>(T); ++c) {
      TWELL_TRY(tail_chunk(c, eager_chunk_rows(static_cast<int64_t>(T), M, C, c), s));
    }
  } else {
    // Captured: every chunk the tail could need, an IF node per size it may
    // run with, set on the device at every replay (rows past T are padding:
    // zeros in, nothing out). Eager chunks run at the same sizes.
    const HeaderCheck chk{.M = M, .D = D, .H = H, .W = W};
    TWELL_TRY(capture_tail_chunks(s, *capture, header, chk, M, C,
                                  [&](int64_t c, int64_t n, cudaStream_t on) { return tail_chunk(c, n, on); }));
  }
  forward_final_kernel<<<1, 1024, 0, s>>>(row_l1, flags, counts, M, header, o.l1, stats, 0, C, host_syncs);
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
twell_status train_write_empty_stats(u64* stats, int phase, int W, cudaStream_t s) {
  StatsVals v{};
  v.v[TWELL_STAT_PATH] = TWELL_PATH_SPARSE;
  v.v[TWELL_STAT_FORMAT] = TWELL_FORMAT_VERSION;
  v.v[TWELL_TSTAT_ELL_WIDTH] = static_cast<u64>(W);
  v.v[TWELL_TSTAT_PHASE] = static_cast<u64>(phase);
  write_stats_kernel<<<1, 32, 0, s>>>(stats, v);
  TWELL_CUDA_STEP(cudaGetLastError(), "writing the statistics");
  return TWELL_SUCCESS;
}

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
  int64_t T;  // tail rows from the saved header (eager), or -1: known on the device only (captured)
  const u64* header;
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
  int64_t chunk;  // tail rows per chunk
};

Backward backward_of(const TrainProblem& p, const TrainWeights& w, const TrainBackwardIO& io, const TrainWorkspace& L,
                     const char* saved, int64_t T, char* ws) {
  const SavedLayout S = train_saved_layout(p.M, p.W);
  const MatRef<const bf16> wd = p.w_down_dh ? MatRef<const bf16>{reinterpret_cast<bf16*>(ws + L.wdt), p.D} : w.w_down;
  return Backward{.p = p,
                  .w = w,
                  .io = io,
                  .L = L,
                  .wd = wd,
                  .T = T,
                  .header = reinterpret_cast<const u64*>(saved + S.header),
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
                  .chunk = std::min<int64_t>(p.chunk, std::max<int64_t>(p.M, 1))};
}

// W_d as [H, D] (written to the workspace when given as [D, H]).
twell_status backward_w_down(const Backward& b, cudaStream_t s) {
  MatRef<const bf16> wd;
  return w_down_rows_hd(b.w.w_down, b.p.w_down_dh, b.p.D, b.p.H, reinterpret_cast<bf16*>(b.ws + b.L.wdt), s, &wd);
}

// ELL rows: dg, du at the active positions and the dx rows.
twell_status ell_backward(const Backward& b, cudaStream_t s) {
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
  ell_dh_kernel<<<static_cast<unsigned>(M), kRowThreads, static_cast<size_t>(D) * 2, s>>>(e);
  TWELL_CUDA_STEP(cudaGetLastError(), "ELL backward kernel (dh)");
  ell_dx_kernel<<<static_cast<unsigned>(M), kRowThreads, static_cast<size_t>(W) * 12, s>>>(e);
  TWELL_CUDA_STEP(cudaGetLastError(), "ELL backward kernel (dx)");
  return TWELL_SUCCESS;
}

// Neuron-major view of the ELL entries: counting sort (deterministic), then
// the weight-gradient schedule from the per-neuron counts, on the device.
twell_status sort_entries_by_neuron(const Backward& b, cudaStream_t s) {
  const TrainWorkspace& L = b.L;
  const int64_t M = b.p.M, H = b.p.H;
  const int W = b.p.W;
  auto* hist = reinterpret_cast<unsigned long long*>(b.ws + L.hist);
  auto* bsum = reinterpret_cast<unsigned long long*>(b.ws + L.bsum);
  auto* nstart = reinterpret_cast<long long*>(b.ws + L.nstart);
  auto* trans = reinterpret_cast<WEntry*>(b.ws + L.trans);
  TWELL_CUDA_STEP(cudaMemsetAsync(hist, 0, static_cast<size_t>(L.hist_len) * 8, s), "clearing the histogram");
  if (b.T < M) {
    hist_kernel<<<grid1(M, 4), 128, 0, s>>>(b.flags, b.counts, b.cols, M, W, L.nchunks, hist);
    TWELL_CUDA_STEP(cudaGetLastError(), "histogram kernel");
  }
  scan_sums_kernel<<<static_cast<unsigned>(L.scan_blocks), 256, 0, s>>>(hist, L.hist_len, bsum);
  scan_block_sums_kernel<<<1, 1024, 0, s>>>(bsum, L.scan_blocks);
  scan_apply_kernel<<<static_cast<unsigned>(L.scan_blocks), 256, 0, s>>>(hist, L.hist_len, bsum);
  TWELL_CUDA_STEP(cudaGetLastError(), "scan kernels");
  nstart_kernel<<<grid1(H + 1, 256), 256, 0, s>>>(hist, H, L.nchunks, nstart);
  TWELL_CUDA_STEP(cudaGetLastError(), "neuron offsets");
  if (b.T < M) {
    if (sort_scatter_fits(H)) {
      const size_t smem = sort_scatter_smem(H);
      TWELL_CUDA_STEP(set_max_dynamic_smem(sort_scatter_kernel, smem), "counting-sort scatter shared memory");
      sort_scatter_kernel<<<static_cast<unsigned>(L.nchunks), 256, smem, s>>>(
          b.flags, b.counts, b.cols, M, W, H, L.nchunks, hist, b.dg, b.du, b.gv, b.uv, trans);
    } else {
      sort_scatter_serial_kernel<<<static_cast<unsigned>(L.nchunks), 256, 0, s>>>(
          b.flags, b.counts, b.cols, M, W, L.nchunks, hist, b.dg, b.du, b.gv, b.uv, trans);
    }
    TWELL_CUDA_STEP(cudaGetLastError(), "counting-sort scatter");
  }
  const int32_t* hot_rank = nullptr;
  if (L.hot_rows > 0) {
    hot_rank = reinterpret_cast<const int32_t*>(b.ws + L.hot_rank);
    hot_select_kernel<<<1, kHotThreads, 0, s>>>(nstart, H, M, reinterpret_cast<int32_t*>(b.ws + L.hot_rank),
                                                reinterpret_cast<HotSet*>(b.ws + L.hot_set));
    TWELL_CUDA_STEP(cudaGetLastError(), "hot-neuron selection");
  }
  schedule_kernel<<<1, kScheduleThreads, 0, s>>>(
      nstart, H, hot_rank, L.partial_slots, L.max_items, reinterpret_cast<Item*>(b.ws + L.items),
      reinterpret_cast<Fin*>(b.ws + L.fin), reinterpret_cast<WgSchedule*>(b.ws + L.sched));
  TWELL_CUDA_STEP(cudaGetLastError(), "weight-gradient schedule");
  return TWELL_SUCCESS;
}

// The dense tail's fp32 weight-gradient parts [H, D], one per weight.
void tail_accumulators(const Backward& b, float* acc[3]) {
  acc[0] = reinterpret_cast<float*>(b.ws + b.L.acc_g);
  acc[1] = reinterpret_cast<float*>(b.ws + b.L.acc_u);
  acc[2] = reinterpret_cast<float*>(b.ws + b.L.acc_d);
}

// Dense tail rows of chunk c (n rows from tail row c C on): exact GEMMs over
// gathered rows; dx rows scattered, weight-gradient parts summed into the
// accumulators (chunk 0 writes them, later chunks add in chunk order:
// deterministic).
twell_status tail_backward_chunk(const Backward& b, int64_t c, int64_t n, cudaStream_t s) {
  const TrainWorkspace& L = b.L;
  const TrainWeights& w = b.w;
  const TrainBackwardIO& io = b.io;
  const int64_t D = b.p.D, H = b.p.H, r0 = c * b.chunk;
  void* lt = b.lt;
  const u64* T_dev = b.header + 2;
  float* acc[3];
  tail_accumulators(b, acc);
  auto* xt = reinterpret_cast<bf16*>(b.ws + L.b_xt);
  auto* dyt = reinterpret_cast<bf16*>(b.ws + L.b_dyt);
  // G, U, dH (bf16, the forward's bits), then dG, dU, h in their places.
  auto* G = reinterpret_cast<bf16*>(b.ws + L.b_g);
  auto* U = reinterpret_cast<bf16*>(b.ws + L.b_u);
  auto* DH = reinterpret_cast<bf16*>(b.ws + L.b_dh);
  const bf16 *dG = G, *dU = U, *hb = DH;
  auto* dxt = reinterpret_cast<float*>(b.ws + L.b_dx);
  gather_rows_kernel<<<static_cast<unsigned>(n), 128, 0, s>>>(w.x.ptr, w.x.ld, b.tail, T_dev, r0, D, xt);
  gather_rows_kernel<<<static_cast<unsigned>(n), 128, 0, s>>>(io.dy.ptr, io.dy.ld, b.tail, T_dev, r0, D, dyt);
  TWELL_CUDA_STEP(cudaGetLastError(), "tail gather");
  TWELL_TRY(lt_linear(xt, D, w.w_gate.ptr, w.w_gate.ld, G, H, false, n, H, D, lt, kTrainLtWorkspaceBytes, s));
  TWELL_TRY(lt_linear(xt, D, w.w_up.ptr, w.w_up.ld, U, H, false, n, H, D, lt, kTrainLtWorkspaceBytes, s));
  TWELL_TRY(lt_linear(dyt, D, b.wd.ptr, b.wd.ld, DH, H, false, n, H, D, lt, kTrainLtWorkspaceBytes, s));
  tail_backward_elem_kernel<<<static_cast<unsigned>(n), 256, 0, s>>>(G, U, DH, H, io.l1_coeff, io.l1_scale);
  TWELL_CUDA_STEP(cudaGetLastError(), "tail backward elementwise");
  // dx rows = dG W_g + dU W_u (fp32, the second GEMM adds in place)
  const MatRef<const bf16> wts[2] = {w.w_gate, w.w_up};
  const bf16* ops[2] = {dG, dU};
  for (int q = 0; q < 2; ++q) {
    TWELL_TRY(lt_gemm({.m = n,
                       .n = D,
                       .k = H,
                       .a = {ops[q], H},
                       .b = wts[q],
                       .c = {dxt, D},
                       .c_is_f32 = true,
                       .beta = q == 0 ? 0.f : 1.f},
                      lt, kTrainLtWorkspaceBytes, s));
  }
  scatter_dx_kernel<<<static_cast<unsigned>(n), 256, 0, s>>>(dxt, b.tail, T_dev, r0, D, io.dx.ptr, io.dx.ld);
  TWELL_CUDA_STEP(cudaGetLastError(), "tail dx scatter");
  // weight gradients: acc_q[H, D] (+)= op_q^T in_q
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
                       .beta = c == 0 ? 0.f : 1.f},
                      lt, kTrainLtWorkspaceBytes, s));
  }
  return TWELL_SUCCESS;
}

// Hot neurons' weight gradients (train_kernels.cuh): per chunk of rows, their
// dense bf16 operands and two GEMMs, summed over the chunks in order (beta = 1).
twell_status hot_weight_gradients(const Backward& b, cudaStream_t s) {
  const TrainWorkspace& L = b.L;
  const int64_t M = b.p.M, D = b.p.D, R = L.hot_rows;
  auto* agu = reinterpret_cast<bf16*>(b.ws + L.hot_agu);
  auto* ah = reinterpret_cast<bf16*>(b.ws + L.hot_ah);
  for (int64_t m0 = 0; m0 < M; m0 += R) {
    const int64_t rows = std::min(R, M - m0);
    hot_operands_kernel<<<grid1(rows, 8), 256, 0, s>>>(b.flags, b.counts, b.cols, b.dg, b.du, b.gv, b.uv,
                                                       reinterpret_cast<const int32_t*>(b.ws + L.hot_rank), m0, rows,
                                                       b.p.W, agu, ah);
    TWELL_CUDA_STEP(cudaGetLastError(), "hot-neuron operands");
    const float beta = m0 == 0 ? 0.f : 1.f;
    TWELL_TRY(lt_gemm({.m = 2 * kHotMax,
                       .n = D,
                       .k = rows,
                       .a = {agu, 2 * kHotMax},
                       .trans_a = true,
                       .b = {b.w.x.ptr + m0 * b.w.x.ld, b.w.x.ld},
                       .c = {b.ws + L.hot_gu, D},
                       .c_is_f32 = true,
                       .beta = beta},
                      b.lt, kTrainLtWorkspaceBytes, s));
    TWELL_TRY(lt_gemm({.m = kHotMax,
                       .n = D,
                       .k = rows,
                       .a = {ah, kHotMax},
                       .trans_a = true,
                       .b = {b.io.dy.ptr + m0 * b.io.dy.ld, b.io.dy.ld},
                       .c = {b.ws + L.hot_d, D},
                       .c_is_f32 = true,
                       .beta = beta},
                      b.lt, kTrainLtWorkspaceBytes, s));
  }
  return TWELL_SUCCESS;
}

// Weight gradients: per-neuron gathers over the sorted entries (+ the tail
// parts), as the device-side schedule says; the grids are fixed (persistent
// CTAs, and one finalize CTA per possible split neuron), so nothing here
// depends on a count the host would have to read.
twell_status weight_gradients(const Backward& b, cudaStream_t s) {
  const TrainWorkspace& L = b.L;
  const TrainBackwardIO& io = b.io;
  const int64_t D = b.p.D;
  float* acc[3];
  tail_accumulators(b, acc);
  const unsigned ycols = static_cast<unsigned>((D + kColsPerBlock - 1) / kColsPerBlock);
  WgArgs a{.items = reinterpret_cast<const Item*>(b.ws + L.items),
           .fins = reinterpret_cast<const Fin*>(b.ws + L.fin),
           .trans = reinterpret_cast<const WEntry*>(b.ws + L.trans),
           .sched = reinterpret_cast<const WgSchedule*>(b.ws + L.sched),
           .tail_count = b.header + 2,
           .ycols = static_cast<int>(ycols),
           .x = b.w.x,
           .dy = io.dy,
           .D = D,
           .partials = reinterpret_cast<float*>(b.ws + L.partials),
           .acc = {acc[0], acc[1], acc[2]},
           .out = {io.dw_gate.ptr, io.dw_up.ptr, io.dw_down.ptr},
           .ld = {io.dw_gate.ld, io.dw_up.ld, io.dw_down.ld},
           .dwd_dh = b.p.w_down_dh ? 1 : 0,
           .accumulate = io.accumulate ? 1 : 0,
           .hot_rank = L.hot_rows > 0 ? reinterpret_cast<const int32_t*>(b.ws + L.hot_rank) : nullptr,
           .hot_gu = reinterpret_cast<const float*>(b.ws + L.hot_gu),
           .hot_d = reinterpret_cast<const float*>(b.ws + L.hot_d),
           .dwd_stage = acc[2]};
  const auto launch_wgrad = [&](auto kernel) -> twell_status {
    int per_sm = 0;
    TWELL_CUDA_STEP(occupancy_per_sm(&per_sm, kernel, 256, 0), "weight-gradient occupancy");
    const int64_t grid = static_cast<int64_t>(std::max(per_sm, 1)) * b.p.sm_count;
    kernel<<<static_cast<unsigned>(grid), 256, 0, s>>>(a);
    TWELL_CUDA_STEP(cudaGetLastError(), "weight-gradient kernel");
    return TWELL_SUCCESS;
  };
  TWELL_TRY(launch_wgrad(wgrad_kernel<0>));  // dW_g, dW_u (gathers x)
  TWELL_TRY(launch_wgrad(wgrad_kernel<1>));  // dW_d (gathers dy)
  wgrad_finalize_kernel<<<dim3(static_cast<unsigned>(L.partial_slots), ycols), 256, 0, s>>>(a);
  TWELL_CUDA_STEP(cudaGetLastError(), "weight-gradient finalize kernel");
  if (b.p.w_down_dh) {
    const dim3 grid(static_cast<unsigned>((D + 31) / 32), static_cast<unsigned>((b.p.H + 31) / 32));
    wgrad_dh_kernel<<<grid, dim3(32, 8), 0, s>>>(acc[2], b.p.H, D, io.dw_down.ptr, io.dw_down.ld, a.accumulate);
    TWELL_CUDA_STEP(cudaGetLastError(), "dW_d transpose kernel");
  }
  return TWELL_SUCCESS;
}

twell_status backward_stats(const Backward& b, int host_syncs, cudaStream_t s) {
  if (b.io.stats == nullptr) return TWELL_SUCCESS;
  backward_stats_kernel<<<1, 32, 0, s>>>(b.io.stats, b.header, reinterpret_cast<const WgSchedule*>(b.ws + b.L.sched),
                                         b.p.M, b.p.W, b.chunk, host_syncs);
  TWELL_CUDA_STEP(cudaGetLastError(), "backward statistics");
  return TWELL_SUCCESS;
}

// The outputs of a captured backward whose saved state this problem's forward
// did not write: NaN (all-ones bf16), so the failure cannot pass unseen.
twell_status fill_outputs_nan(const TrainProblem& p, const TrainBackwardIO& io, cudaStream_t s) {
  const MatRef<bf16> outs[4] = {io.dx, io.dw_gate, io.dw_up, io.dw_down};
  const bool dh = p.w_down_dh;
  const int64_t rows[4] = {p.M, p.H, p.H, dh ? p.D : p.H}, cols[4] = {p.D, p.D, p.D, dh ? p.H : p.D};
  for (int i = 0; i < 4; ++i) {
    TWELL_CUDA_STEP(cudaMemset2DAsync(outs[i].ptr, static_cast<size_t>(outs[i].ld) * 2, 0xFF,
                                      static_cast<size_t>(cols[i]) * 2, static_cast<size_t>(rows[i]), s),
                    "marking the outputs of an invalid saved state");
  }
  return TWELL_SUCCESS;
}

}  // namespace

twell_status train_backward_run(const TrainProblem& p, const TrainWeights& w, const TrainBackwardIO& io,
                                const char* saved, int64_t tail_rows, char* ws, cudaStream_t s) {
  const TrainWorkspace L = train_workspace(p);
  const Backward b = backward_of(p, w, io, L, saved, tail_rows, ws);
  TWELL_TRY(backward_w_down(b, s));
  TWELL_TRY(ell_backward(b, s));
  TWELL_TRY(sort_entries_by_neuron(b, s));
  for (int64_t c = 0; c * b.chunk < tail_rows; ++c) {
    TWELL_TRY(tail_backward_chunk(b, c, eager_chunk_rows(tail_rows, p.M, b.chunk, c), s));
  }
  if (L.hot_rows > 0) TWELL_TRY(hot_weight_gradients(b, s));  // after the tail: it reuses the tail's regions
  TWELL_TRY(weight_gradients(b, s));
  return backward_stats(b, /*host_syncs=*/1, s);
}

twell_status train_backward_captured(const TrainProblem& p, const TrainWeights& w, const TrainBackwardIO& io,
                                     const char* saved, bool hybrid_ok, bool dense_ok, char* ws, size_t ws_bytes,
                                     cudaStream_t s, const CaptureStreams& cs) {
  const cudaStream_t side = cs.body;
  const TrainWorkspace L = train_workspace(p);
  const Backward b = backward_of(p, w, io, L, saved, /*T=*/-1, ws);
  cudaGraph_t graph = nullptr;
  TWELL_TRY(capture_graph(s, &graph));
  if (graph == nullptr) return fail(TWELL_ERROR_INTERNAL, "train_backward_captured: the stream is not capturing");
  RouteConds rc{};
  rc.has_hybrid = hybrid_ok ? 1 : 0;
  rc.has_dense = dense_ok ? 1 : 0;
  if (hybrid_ok) TWELL_TRY(make_conditions(graph, 2, rc.hybrid));
  if (dense_ok) TWELL_TRY(make_conditions(graph, 1, &rc.dense));
  TWELL_TRY(make_conditions(graph, 1, &rc.bad));
  const HeaderCheck chk{.M = p.M, .D = p.D, .H = p.H, .W = p.W};
  route_conditions_kernel<<<1, 1, 0, s>>>(rc, b.header, chk);
  TWELL_CUDA_STEP(cudaGetLastError(), "backward route conditions");
  if (dense_ok) {
    TWELL_TRY(capture_if(s, side, rc.dense, 1, "the dense route's IF node", [&](int, cudaStream_t on) {
      return train_dense_backward_run(p, w, io, saved, ws, ws_bytes, /*host_syncs=*/0, on);
    }));
  }
  if (hybrid_ok) {
    TWELL_TRY(capture_if(s, side, rc.hybrid[0], 1, "the hybrid backward's IF node", [&](int, cudaStream_t on) {
      TWELL_TRY(backward_w_down(b, on));
      TWELL_TRY(ell_backward(b, on));
      return sort_entries_by_neuron(b, on);
    }));
    TWELL_TRY(capture_tail_chunks(s, cs, b.header, chk, p.M, b.chunk, [&](int64_t c, int64_t n, cudaStream_t on) {
      return tail_backward_chunk(b, c, n, on);
    }));
    if (L.hot_rows > 0) {  // after the tail (it reuses the tail's regions), when this replay has hot neurons
      cudaGraphConditionalHandle hot_cond;
      TWELL_TRY(make_conditions(graph, 1, &hot_cond));
      hot_condition_kernel<<<1, 1, 0, s>>>(hot_cond, reinterpret_cast<const HotSet*>(b.ws + L.hot_set), b.header, chk);
      TWELL_CUDA_STEP(cudaGetLastError(), "hot-neuron condition");
      TWELL_TRY(capture_if(s, side, hot_cond, 1, "the hot neurons' IF node",
                           [&](int, cudaStream_t on) { return hot_weight_gradients(b, on); }));
    }
    TWELL_TRY(capture_if(s, side, rc.hybrid[1], 1, "the weight gradients' IF node", [&](int, cudaStream_t on) {
      TWELL_TRY(weight_gradients(b, on));
      return backward_stats(b, /*host_syncs=*/0, on);
    }));
  }
  return capture_if(s, side, rc.bad, 1, "the invalid-state IF node",
                    [&](int, cudaStream_t on) { return fill_outputs_nan(p, io, on); });
}

}  // namespace twell
