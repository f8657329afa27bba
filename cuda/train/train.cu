// Training forward/backward orchestration (see train.h and docs/training.md).
#include <algorithm>
#include <vector>

#include "capi/errors.h"
#include "common/cublaslt.h"
#include "common/launch_cache.h"
#include "ffn/ffn_ops.h"
#include "format/pack.h"
#include "gate_gemm/gate_gemm.h"
#include "gate_gemm/gate_dispatch.h"
#include "gate_gemm/gate_portable.h"
#include "train/train.h"
#include "train/train_kernels.cuh"

namespace twell {
namespace {

using namespace train;

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

constexpr int64_t kPartialSlots = 256;  // partial rows for neurons split over several items
constexpr int64_t kMinSegment = 1024;   // entries per weight-gradient item (at least)

struct Taker {
  size_t off = 0;
  size_t operator()(size_t bytes) {
    const size_t at = off;
    off += align256(bytes);
    return at;
  }
};

unsigned grid1(int64_t n, int per) { return static_cast<unsigned>((n + per - 1) / per); }

}  // namespace

SavedLayout train_saved_layout(int64_t M, int W) {
  SavedLayout s;
  Taker t;
  const size_t mw = static_cast<size_t>(M) * static_cast<size_t>(W);
  s.header = t(8 * sizeof(u64));
  s.counts = t(static_cast<size_t>(M) * 4);
  s.flags = t(static_cast<size_t>(M));
  s.tail = t(static_cast<size_t>(M) * 4);
  s.cols = t(mw * 4);
  s.g = t(mw * 4);
  s.u = t(mw * 4);
  s.total = t.off;
  return s;
}

TrainWorkspace train_workspace(const TrainProblem& p) {
  TrainWorkspace w;
  Taker t;
  const size_t M = static_cast<size_t>(p.M), D = static_cast<size_t>(p.D), H = static_cast<size_t>(p.H);
  const size_t C = static_cast<size_t>(std::min<int64_t>(p.chunk, std::max<int64_t>(p.M, 1)));
  const size_t mw = M * static_cast<size_t>(p.W);
  w.lt = t(kLtWorkspaceBytes);
  w.stats = t(kTrainStatsWords * sizeof(u64));
  w.wdt = t(p.w_down_dh ? H * D * 2 : 0);
  const size_t common = t.off;
  // forward
  w.packed = t(M * static_cast<size_t>(tiles_for(p.H)) * p.slots * 4);
  w.gate_chunk = t(gate_portable_workspace_bytes(p.M, p.H));
  w.compact = t(compact_workspace_bytes(p.M));
  w.row_l1 = t(M * 4);
  w.f_xt = t(C * D * 2);
  w.f_g = t(C * H * 4);
  w.f_u = t(C * H * 4);
  w.f_hb = t(C * H * 2);
  w.f_yt = t(C * D * 2);
  w.fwd_total = t.off;
  // backward (reuses the forward's regions)
  t.off = common;
  w.nchunks = (p.M + kChunkRowsSort - 1) / kChunkRowsSort;
  w.hist_len = p.H * w.nchunks + 1;
  w.scan_blocks = (w.hist_len + kScanBlock - 1) / kScanBlock;
  w.partial_slots = kPartialSlots;
  w.max_items = p.H + kPartialSlots;
  w.dg = t(mw * 4);
  w.du = t(mw * 4);
  w.hist = t(static_cast<size_t>(w.hist_len) * 8);
  w.bsum = t(static_cast<size_t>(w.scan_blocks) * 8);
  w.nstart = t((H + 1) * 8);
  w.trans = t(mw * sizeof(WEntry));
  w.items = t(static_cast<size_t>(w.max_items) * sizeof(Item));
  w.fin = t(static_cast<size_t>(kPartialSlots) * sizeof(Fin));
  w.partials = t(static_cast<size_t>(kPartialSlots) * 3 * D * 4);
  w.b_xt = t(C * D * 2);
  w.b_dyt = t(C * D * 2);
  w.b_g = t(C * H * 4);
  w.b_u = t(C * H * 4);
  w.b_dh = t(C * H * 4);
  w.b_dg = t(C * H * 2);
  w.b_du = t(C * H * 2);
  w.b_hb = t(C * H * 2);
  w.b_dxa = t(C * D * 4);
  w.b_dxb = t(C * D * 4);
  w.acc_g = t(H * D * 4);
  w.acc_u = t(H * D * 4);
  w.acc_d = t(H * D * 4);
  w.bwd_total = t.off;
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
  const bf16* wd = w.w_down;
  int64_t ldwd = w.ldw_down;
  if (p.w_down_dh) {
    auto* wt = reinterpret_cast<bf16*>(ws + L.wdt);
    TWELL_CUDA_STEP(transpose_bf16(w.w_down, D, H, w.ldw_down, wt, D, s), "W_d transpose");
    wd = wt;
    ldwd = D;
  }

  {
    // Gate GEMM -> TwELL (+ overflowed-row flags, stats).
    TWELL_CUDA_STEP(cudaMemsetAsync(flags, 0, static_cast<size_t>(M), s), "clearing the row flags");
    auto* packed = reinterpret_cast<uint32_t*>(ws + L.packed);
    GatePackArgs a;
    a.x = w.x;
    a.ldx = w.ldx;
    a.w = w.w_gate;
    a.ldw = w.ldw_gate;
    a.M = M;
    a.D = D;
    a.H = H;
    a.slots = p.slots;
    a.packed = packed;
    a.row_flags = flags;
    a.stats = stats;
    GateRoute r;
    r.use_sm90 = p.use_sm90;
    r.allow_decode = false;  // the decode kernel is not yet GPU-tested inside training
    r.sm_count = p.sm_count;
    r.portable_chunk = ws + L.gate_chunk;
    r.lt_workspace = lt;
    r.lt_bytes = kLtWorkspaceBytes;
    TWELL_TRY(gate_pack_dispatch(a, r, s));
    // TwELL -> ELL rows / tail flags.
    convert_kernel<<<grid1(M, 4), 128, 0, s>>>(packed, M, H, p.slots, W, flags, counts, cols, gv, uv, stats);
    TWELL_CUDA_STEP(cudaGetLastError(), "TwELL -> ELL kernel");
  }
  // Tail list (ascending) and its length -> header[2].
  TWELL_CUDA_STEP(compact_flagged_rows(flags, M, tail, header, ws + L.compact, s), "tail-row compaction");

  // ELL rows.
  {
    EllFwdArgs e;
    e.x = w.x;
    e.ldx = w.ldx;
    e.wu = w.w_up;
    e.ldwu = w.ldw_up;
    e.wd = wd;
    e.ldwd = ldwd;
    e.flags = flags;
    e.counts = counts;
    e.cols = cols;
    e.g = gv;
    e.u = uv;
    e.y = o.y;
    e.ldy = o.ldy;
    e.row_l1 = row_l1;
    e.D = D;
    e.W = W;
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
  if (T > static_cast<u64>(M)) return fail(TWELL_ERROR_INTERNAL, "tail count %llu exceeds M", static_cast<unsigned long long>(T));

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
    gather_rows_kernel<<<static_cast<unsigned>(n), 128, 0, s>>>(w.x, w.ldx, rows, D, xt);
    TWELL_CUDA_STEP(cudaGetLastError(), "tail gather");
    TWELL_TRY(lt_linear(xt, D, w.w_gate, w.ldw_gate, G, H, true, n, H, D, lt, kLtWorkspaceBytes, s));
    TWELL_TRY(lt_linear(xt, D, w.w_up, w.ldw_up, U, H, true, n, H, D, lt, kLtWorkspaceBytes, s));
    tail_forward_act_kernel<<<static_cast<unsigned>(n), 256, 0, s>>>(G, U, H, rows, hb, row_l1, counts, stats, 0);
    TWELL_CUDA_STEP(cudaGetLastError(), "tail activation");
    LtMatmul mm;  // yt[n, D] = hb[n, H] W_d[H, D]
    mm.trans_a = false;
    mm.trans_b = false;
    mm.m = D;
    mm.n = n;
    mm.k = H;
    mm.a = wd;
    mm.lda = ldwd;
    mm.b = hb;
    mm.ldb = H;
    mm.c = yt;
    mm.ldc = D;
    mm.c_is_f32 = false;
    TWELL_TRY(lt_matmul(mm, lt, kLtWorkspaceBytes, s));
    scatter_rows_kernel<<<static_cast<unsigned>(n), 128, 0, s>>>(yt, rows, D, o.y, o.ldy);
    TWELL_CUDA_STEP(cudaGetLastError(), "tail scatter");
  }
  forward_final_kernel<<<1, 1024, 0, s>>>(row_l1, flags, counts, M, header, o.l1, stats, 0, chunks);
  TWELL_CUDA_STEP(cudaGetLastError(), "forward final kernel");
  if (o.active != nullptr) {
    TWELL_CUDA_STEP(cudaMemcpyAsync(o.active, counts, static_cast<size_t>(M) * 4, cudaMemcpyDeviceToDevice, s), "active counts");
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
  TWELL_CUDA_STEP(cudaMemcpyAsync(hdr, saved, sizeof(out->words), cudaMemcpyDeviceToHost, s), "reading the saved header");
  TWELL_CUDA_STEP(cudaStreamSynchronize(s), "waiting for the saved header");
  if (hdr[0] != kSavedMagic || hdr[1] != static_cast<u64>(M) || hdr[3] != static_cast<u64>(W) ||
      hdr[4] != static_cast<u64>(D) || hdr[5] != static_cast<u64>(H) || hdr[2] > static_cast<u64>(M) ||
      (hdr[6] != kRouteHybrid && hdr[6] != kRouteDense)) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT,
                "saved was not written by twell_train_forward for this plan and M = %lld (header: magic %s, M %llu, "
                "W %llu, D %llu, H %llu, route %llu)",
                static_cast<long long>(M), hdr[0] == kSavedMagic ? "ok" : "wrong", static_cast<unsigned long long>(hdr[1]),
                static_cast<unsigned long long>(hdr[3]), static_cast<unsigned long long>(hdr[4]),
                static_cast<unsigned long long>(hdr[5]), static_cast<unsigned long long>(hdr[6]));
  }
  return TWELL_SUCCESS;
}

twell_status train_backward_run(const TrainProblem& p, const TrainWeights& w, const TrainBackwardIO& io,
                                const char* saved, int64_t tail_rows, char* ws, cudaStream_t s) {
  const TrainWorkspace L = train_workspace(p);
  const SavedLayout S = train_saved_layout(p.M, p.W);
  const int64_t M = p.M, D = p.D, H = p.H;
  const int W = p.W;
  const auto* counts = reinterpret_cast<const int32_t*>(saved + S.counts);
  const auto* flags = reinterpret_cast<const uint8_t*>(saved + S.flags);
  const auto* tail = reinterpret_cast<const int32_t*>(saved + S.tail);
  const auto* cols = reinterpret_cast<const int32_t*>(saved + S.cols);
  const auto* gv = reinterpret_cast<const float*>(saved + S.g);
  const auto* uv = reinterpret_cast<const float*>(saved + S.u);
  void* lt = ws + L.lt;

  const int64_t T = tail_rows;  // from the saved header (train_read_saved_header)

  const bf16* wd = w.w_down;
  int64_t ldwd = w.ldw_down;
  if (p.w_down_dh) {
    auto* wt = reinterpret_cast<bf16*>(ws + L.wdt);
    TWELL_CUDA_STEP(transpose_bf16(w.w_down, D, H, w.ldw_down, wt, D, s), "W_d transpose");
    wd = wt;
    ldwd = D;
  }
  auto* dg = reinterpret_cast<float*>(ws + L.dg);
  auto* du = reinterpret_cast<float*>(ws + L.du);

  // ELL rows: dg, du at the active positions and the dx rows.
  if (T < M) {
    EllBwdArgs e;
    e.dy = io.dy;
    e.lddy = io.lddy;
    e.wg = w.w_gate;
    e.ldwg = w.ldw_gate;
    e.wu = w.w_up;
    e.ldwu = w.ldw_up;
    e.wd = wd;
    e.ldwd = ldwd;
    e.flags = flags;
    e.counts = counts;
    e.cols = cols;
    e.g = gv;
    e.u = uv;
    e.dg = dg;
    e.du = du;
    e.dx = io.dx;
    e.lddx = io.lddx;
    e.coef = io.l1_coeff;
    e.coef_scale = io.l1_scale;
    e.D = D;
    e.W = W;
    ell_dh_kernel<<<static_cast<unsigned>(M), kRowThreads, static_cast<size_t>(D) * 2, s>>>(e);
    TWELL_CUDA_STEP(cudaGetLastError(), "ELL backward kernel (dh)");
    ell_dx_kernel<<<static_cast<unsigned>(M), kRowThreads, static_cast<size_t>(W) * 12, s>>>(e);
    TWELL_CUDA_STEP(cudaGetLastError(), "ELL backward kernel (dx)");
  }

  // Neuron-major view of the ELL entries: counting sort (deterministic).
  auto* hist = reinterpret_cast<unsigned long long*>(ws + L.hist);
  auto* bsum = reinterpret_cast<unsigned long long*>(ws + L.bsum);
  auto* nstart = reinterpret_cast<long long*>(ws + L.nstart);
  auto* trans = reinterpret_cast<WEntry*>(ws + L.trans);
  TWELL_CUDA_STEP(cudaMemsetAsync(hist, 0, static_cast<size_t>(L.hist_len) * 8, s), "clearing the histogram");
  if (T < M) {
    hist_kernel<<<grid1(M, 4), 128, 0, s>>>(flags, counts, cols, M, W, L.nchunks, hist);
    TWELL_CUDA_STEP(cudaGetLastError(), "histogram kernel");
  }
  scan_sums_kernel<<<static_cast<unsigned>(L.scan_blocks), 256, 0, s>>>(hist, L.hist_len, bsum);
  scan_block_sums_kernel<<<1, 1024, 0, s>>>(bsum, L.scan_blocks);
  scan_apply_kernel<<<static_cast<unsigned>(L.scan_blocks), 256, 0, s>>>(hist, L.hist_len, bsum);
  TWELL_CUDA_STEP(cudaGetLastError(), "scan kernels");
  nstart_kernel<<<grid1(H + 1, 256), 256, 0, s>>>(hist, H, L.nchunks, nstart);
  TWELL_CUDA_STEP(cudaGetLastError(), "neuron offsets");
  if (T < M) {
    sort_scatter_kernel<<<static_cast<unsigned>(L.nchunks), 256, 0, s>>>(flags, counts, cols, M, W, L.nchunks, hist,
                                                                         dg, du, gv, uv, trans);
    TWELL_CUDA_STEP(cudaGetLastError(), "counting-sort scatter");
  }

  // Host synchronisation #2: per-neuron counts -> the weight-gradient schedule.
  std::vector<long long> ns(static_cast<size_t>(H + 1));
  TWELL_CUDA_STEP(cudaMemcpyAsync(ns.data(), nstart, ns.size() * 8, cudaMemcpyDeviceToHost, s), "reading neuron offsets");
  TWELL_CUDA_STEP(cudaStreamSynchronize(s), "waiting for neuron offsets");
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
  std::vector<Item> items;
  std::vector<Fin> fins;
  items.reserve(static_cast<size_t>(H) + kPartialSlots);
  int64_t slot = 0;
  for (int64_t j = 0; j < H; ++j) {
    const int64_t b = ns[j], n = ns[j + 1] - ns[j];
    const int64_t k = n == 0 ? 1 : (n + seg - 1) / seg;
    if (k == 1) {
      items.push_back(Item{j, b, b + n, -1});
    } else {
      fins.push_back(Fin{j, slot, k, 0});
      for (int64_t q = 0; q < k; ++q) items.push_back(Item{j, b + q * seg, std::min(b + n, b + (q + 1) * seg), slot + q});
      slot += k;
    }
  }
  if (static_cast<int64_t>(items.size()) > L.max_items || slot > kPartialSlots) {
    return fail(TWELL_ERROR_INTERNAL, "weight-gradient schedule exceeds its workspace");
  }
  auto* d_items = reinterpret_cast<Item*>(ws + L.items);
  auto* d_fins = reinterpret_cast<Fin*>(ws + L.fin);
  TWELL_CUDA_STEP(cudaMemcpyAsync(d_items, items.data(), items.size() * sizeof(Item), cudaMemcpyHostToDevice, s), "uploading items");
  if (!fins.empty()) {
    TWELL_CUDA_STEP(cudaMemcpyAsync(d_fins, fins.data(), fins.size() * sizeof(Fin), cudaMemcpyHostToDevice, s), "uploading items");
  }
  // (pageable copies: the host vectors may go once the calls return)

  // Dense tail rows: exact GEMMs over gathered rows, chunk by chunk.
  const int64_t C = std::min<int64_t>(p.chunk, std::max<int64_t>(M, 1));
  int64_t chunks = 0;
  float* acc[3] = {reinterpret_cast<float*>(ws + L.acc_g), reinterpret_cast<float*>(ws + L.acc_u),
                   reinterpret_cast<float*>(ws + L.acc_d)};
  auto* xt = reinterpret_cast<bf16*>(ws + L.b_xt);
  auto* dyt = reinterpret_cast<bf16*>(ws + L.b_dyt);
  auto* G = reinterpret_cast<float*>(ws + L.b_g);
  auto* U = reinterpret_cast<float*>(ws + L.b_u);
  auto* DH = reinterpret_cast<float*>(ws + L.b_dh);
  auto* dG = reinterpret_cast<bf16*>(ws + L.b_dg);
  auto* dU = reinterpret_cast<bf16*>(ws + L.b_du);
  auto* hb = reinterpret_cast<bf16*>(ws + L.b_hb);
  auto* dxa = reinterpret_cast<float*>(ws + L.b_dxa);
  auto* dxb = reinterpret_cast<float*>(ws + L.b_dxb);
  for (int64_t r0 = 0; r0 < T; r0 += C, ++chunks) {
    const int64_t n = std::min<int64_t>(C, T - r0);
    const int32_t* rows = tail + r0;
    gather_rows_kernel<<<static_cast<unsigned>(n), 128, 0, s>>>(w.x, w.ldx, rows, D, xt);
    gather_rows_kernel<<<static_cast<unsigned>(n), 128, 0, s>>>(io.dy, io.lddy, rows, D, dyt);
    TWELL_CUDA_STEP(cudaGetLastError(), "tail gather");
    TWELL_TRY(lt_linear(xt, D, w.w_gate, w.ldw_gate, G, H, true, n, H, D, lt, kLtWorkspaceBytes, s));
    TWELL_TRY(lt_linear(xt, D, w.w_up, w.ldw_up, U, H, true, n, H, D, lt, kLtWorkspaceBytes, s));
    TWELL_TRY(lt_linear(dyt, D, wd, ldwd, DH, H, true, n, H, D, lt, kLtWorkspaceBytes, s));
    tail_backward_elem_kernel<<<static_cast<unsigned>(n), 256, 0, s>>>(G, U, DH, H, io.l1_coeff, io.l1_scale, dG, dU,
                                                                         hb);
    TWELL_CUDA_STEP(cudaGetLastError(), "tail backward elementwise");
    // dx rows = dG W_g + dU W_u
    const bf16* wts[2] = {w.w_gate, w.w_up};
    const int64_t lds[2] = {w.ldw_gate, w.ldw_up};
    const bf16* ops[2] = {dG, dU};
    float* outs[2] = {dxa, dxb};
    for (int q = 0; q < 2; ++q) {
      LtMatmul mm;
      mm.m = D;
      mm.n = n;
      mm.k = H;
      mm.a = wts[q];
      mm.lda = lds[q];
      mm.b = ops[q];
      mm.ldb = H;
      mm.c = outs[q];
      mm.ldc = D;
      mm.c_is_f32 = true;
      TWELL_TRY(lt_matmul(mm, lt, kLtWorkspaceBytes, s));
    }
    scatter_dx_kernel<<<static_cast<unsigned>(n), 256, 0, s>>>(dxa, dxb, rows, D, io.dx, io.lddx);
    TWELL_CUDA_STEP(cudaGetLastError(), "tail dx scatter");
    // weight gradients: acc_q[H, D] (+)= op_q^T in_q
    const bf16* lhs[3] = {dG, dU, hb};
    const bf16* rhs[3] = {xt, xt, dyt};
    for (int q = 0; q < 3; ++q) {
      LtMatmul mm;
      mm.trans_a = false;
      mm.trans_b = true;
      mm.m = D;
      mm.n = H;
      mm.k = n;
      mm.a = rhs[q];
      mm.lda = D;
      mm.b = lhs[q];
      mm.ldb = H;
      mm.c = acc[q];  // later chunks add in place, in chunk order (deterministic)
      mm.ldc = D;
      mm.c_is_f32 = true;
      mm.beta = r0 == 0 ? 0.f : 1.f;
      TWELL_TRY(lt_matmul(mm, lt, kLtWorkspaceBytes, s));
    }
  }

  // Weight gradients: per-neuron gathers over the sorted entries (+ the tail parts).
  WgArgs a;
  a.items = d_items;
  a.fins = d_fins;
  a.trans = trans;
  a.x = w.x;
  a.ldx = w.ldx;
  a.dy = io.dy;
  a.lddy = io.lddy;
  a.D = D;
  a.partials = reinterpret_cast<float*>(ws + L.partials);
  for (int q = 0; q < 3; ++q) a.acc[q] = T > 0 ? acc[q] : nullptr;
  a.out[0] = io.dw_gate;
  a.ld[0] = io.ld_dwg;
  a.out[1] = io.dw_up;
  a.ld[1] = io.ld_dwu;
  a.out[2] = io.dw_down;
  a.ld[2] = io.ld_dwd;
  a.dwd_dh = p.w_down_dh ? 1 : 0;
  a.accumulate = io.accumulate ? 1 : 0;
  const unsigned ycols = static_cast<unsigned>((D + kColsPerBlock - 1) / kColsPerBlock);
  a.ycols = static_cast<int>(ycols);
  a.nwork = static_cast<int64_t>(items.size()) * ycols;
  const auto launch_wgrad = [&](auto kernel) -> twell_status {
    int per_sm = 0;
    TWELL_CUDA_STEP(occupancy_per_sm(&per_sm, kernel, 256, 0), "weight-gradient occupancy");
    const int64_t grid = std::min<int64_t>(a.nwork, static_cast<int64_t>(std::max(per_sm, 1)) * p.sm_count);
    kernel<<<static_cast<unsigned>(grid), 256, 0, s>>>(a);
    TWELL_CUDA_STEP(cudaGetLastError(), "weight-gradient kernel");
    return TWELL_SUCCESS;
  };
  TWELL_TRY(launch_wgrad(wgrad_kernel<0>));  // dW_g, dW_u (gathers x)
  TWELL_TRY(launch_wgrad(wgrad_kernel<1>));  // dW_d (gathers dy)
  if (!fins.empty()) {
    wgrad_finalize_kernel<<<dim3(static_cast<unsigned>(fins.size()), ycols), 256, 0, s>>>(a);
    TWELL_CUDA_STEP(cudaGetLastError(), "weight-gradient finalize kernel");
  }

  if (io.stats != nullptr) {
    StatsVals v{};
    v.v[TWELL_STAT_ROWS] = static_cast<u64>(M);
    v.v[TWELL_STAT_PATH] = T == M && M > 0 ? TWELL_PATH_DENSE
                                                               : (T == 0 ? TWELL_PATH_SPARSE : TWELL_TRAIN_PATH_HYBRID);
    v.v[TWELL_STAT_FORMAT] = TWELL_FORMAT_VERSION;
    v.v[TWELL_TSTAT_TAIL_ROWS] = static_cast<u64>(T);
    v.v[TWELL_TSTAT_ELL_ROWS] = static_cast<u64>(M - T);
    v.v[TWELL_TSTAT_ELL_WIDTH] = static_cast<u64>(W);
    v.v[TWELL_TSTAT_TAIL_CHUNKS] = static_cast<u64>(chunks);
    v.v[TWELL_TSTAT_HOST_SYNCS] = 2;
    v.v[TWELL_TSTAT_ELL_ENTRIES] = static_cast<u64>(ns[H]);
    v.v[TWELL_TSTAT_MAX_NEURON_COUNT] = static_cast<u64>(max_count);
    v.v[TWELL_TSTAT_PHASE] = 2;
    write_stats_kernel<<<1, 32, 0, s>>>(io.stats, v);
    TWELL_CUDA_STEP(cudaGetLastError(), "backward statistics");
  }
  return TWELL_SUCCESS;
}

}  // namespace twell
