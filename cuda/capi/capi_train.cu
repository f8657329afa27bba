// C ABI: the training plan (hybrid ELL + dense-tail forward and backward).
// Every argument is checked before any CUDA call; device properties are read
// lazily at the first run.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <new>

#include "capi/device_guard.h"
#include "common/errors.h"
#include "capi/plan_common.h"
#include "capi/replay_cache.h"
#include "capi/tensor_check.h"
#include "gate_gemm/gate_gemm.h"
#include "train/train.h"

using namespace twell;

struct twell_train_plan {
  int64_t D = 0, H = 0;
  twell_train_options opt{};
  int device = 0;
  PlanDevice dev;  // read at the first run
  bool device_ready = false;
  int64_t l2_bytes = 0;
  // TWELL_PATH_AUTO: the route the next forward over kAutoDenseRows rows or
  // more takes (hybrid until a forward shows that dense pays; fewer rows take
  // the dense route), and the asynchronous read-back of a dense
  // forward's activity (pinned host words, completed when `readback` is).
  // (mutable: twell_train_saved_size takes in a finished read-back too, so
  // that it answers for the route the next forward will take.)
  mutable bool prefer_dense = false;
  u64* readback_host = nullptr;  // [active, rows over W, rows]
  cudaEvent_t readback = nullptr;
  mutable bool readback_pending = false;
  // Captured calls: the streams their IF nodes' bodies are captured on.
  CaptureStreams capture;
  // Eager calls replayed as CUDA graphs (replay_cache.h) from a call's second
  // sighting on: the graph is the captured form of the call (tail chunks and
  // the backward's route decided on the device), so a replayed step has no
  // host synchronisation. `replay_side`: the stream those captures run on.
  ReplayCache replay;
  cudaStream_t replay_side = nullptr;
  int32_t last_route = 0;  // TWELL_PATH_SPARSE (hybrid) or TWELL_PATH_DENSE: the last forward's route
};

namespace {

#define TRY TWELL_TRY

twell_status check_options(int64_t D, int64_t H, const twell_train_options* o) {
  if (o == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "options is NULL (use twell_train_options_default)");
  TRY(check_plan_dims(D, H));
  if (o->ell_width < 8 || o->ell_width > 256 || o->ell_width % 8 != 0) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "options.ell_width is %d, expected a multiple of 8 in [8, 256]",
                o->ell_width);
  }
  TRY(check_plan_options(o->slots, o->w_down_layout, o->path, o->kernels));
  if (o->tail_chunk_rows < 0 || (o->tail_chunk_rows > 0 && o->tail_chunk_rows < 16)) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "options.tail_chunk_rows is %d, expected 0 (default) or >= 16",
                o->tail_chunk_rows);
  }
  return TWELL_SUCCESS;
}

TrainProblem problem_of(const twell_train_plan* plan, int64_t M) {
  return TrainProblem{
      .M = M,
      .D = plan->D,
      .H = plan->H,
      .W = plan->opt.ell_width,
      .slots = plan->opt.slots,
      .w_down_dh = plan->opt.w_down_layout == TWELL_LAYOUT_DH,
      .use_sm90 = plan->dev.use_sm90,
      .sm_count = plan->dev.sm_count,
      .chunk = plan->opt.tail_chunk_rows > 0 ? plan->opt.tail_chunk_rows : TWELL_TRAIN_TAIL_CHUNK_DEFAULT};
}

// TWELL_PATH_AUTO's cost model: the dense route pays once more than a quarter
// of the rows would go to the tail, or the mean activity exceeds 1.1% of H
// (0.65% where W_u and W_d do not fit in L2 together, so the hybrid's row
// gathers come from HBM). Fitted to the H200 records of 2026-12-03
// (bench/results/2026-12-03d_*): at 2048 x 5632 the hybrid step is 0.49 of
// dense at 0.5% and 1.44 at 2% (W = 256), linear in between, so even at 1.25%;
// at 4096 x 14336 (not in L2) 0.73 at 0.5%, with the same fixed share (0.18)
// even near 0.75%. Both thresholds sit about 5-10% short of break-even.
bool dense_pays(const twell_train_plan* p, u64 rows, u64 active, u64 tail_rows) {
  if (rows == 0) return p->prefer_dense;
  const double tail_share = static_cast<double>(tail_rows) / static_cast<double>(rows);
  const double density = static_cast<double>(active) / (static_cast<double>(rows) * static_cast<double>(p->H));
  const bool in_l2 = 4.0 * static_cast<double>(p->H) * static_cast<double>(p->D) <= static_cast<double>(p->l2_bytes);
  return tail_share > 0.25 || density > (in_l2 ? 0.011 : 0.0065);
}

// AUTO below kAutoDenseRows rows: the dense route, whatever the activity.
// The hybrid step has a part that M does not shrink (the weight-gradient pass
// over every neuron's [D] rows, the counting sort's and the schedule's
// passes, the ELL kernels' per-row latency), and below a few thousand tokens
// it costs more than sparsity saves: H200, 2026-12-03, 2048 x 5632
// (bench/results/2026-12-03e_h200_small_m_bench_train.md), uniform 0.5%:
// hybrid 0.92 ms against the dense route's 0.62 at M = 2048, even at 4096
// (1.19 / 1.21); trained activity 0.65 / 0.62 at 2048, 0.81 / 1.19 at 4096.
// The fixed part and the dense step's per-token cost both scale with H * D,
// so the crossover in tokens moves little with the shape.
constexpr int64_t kAutoDenseRows = 3072;

// Whether an AUTO plan's next forward over M rows prefers the dense route.
bool auto_prefers_dense(const twell_train_plan* p, int64_t M) {
  return p->opt.path == TWELL_PATH_AUTO && (p->prefer_dense || M < kAutoDenseRows);
}

enum class Route { kHybrid, kDense };

// The route a forward over M rows takes with these buffers (host state only).
Route forward_route(const twell_train_plan* plan, const TrainProblem& prob, size_t saved_bytes,
                    size_t workspace_bytes) {
  if (plan->opt.path == TWELL_PATH_DENSE) return Route::kDense;
  if (plan->opt.path == TWELL_PATH_SPARSE || !auto_prefers_dense(plan, prob.M)) return Route::kHybrid;
  // AUTO preferring dense: only if the caller's buffers were sized for it.
  const bool fits =
      saved_bytes >= train_dense_saved_layout(prob.M, prob.H).total && train_dense_chunk(prob, workspace_bytes) > 0;
  return fits ? Route::kDense : Route::kHybrid;
}

size_t saved_need(const twell_train_plan* plan, int64_t M, Route r) {
  return r == Route::kDense ? train_dense_saved_layout(M, plan->H).total
                            : train_saved_layout(M, plan->opt.ell_width).total;
}

// Workspace of the dense route with up to `rows` rows per chunk (all M rows if fewer).
size_t dense_workspace_rows(const TrainProblem& prob, int64_t rows) {
  return train_dense_workspace_bytes(prob, std::min(std::max<int64_t>(prob.M, 1), rows));
}

// Workspace a call needs at least: its route's, or for AUTO enough for the
// hybrid route and for the dense one with at least min(M, 1024) rows per chunk.
size_t workspace_need(const twell_train_plan* plan, const TrainProblem& prob) {
  const size_t hybrid = train_workspace(prob).total;
  switch (plan->opt.path) {
    case TWELL_PATH_SPARSE: return hybrid;
    case TWELL_PATH_DENSE: return dense_workspace_rows(prob, kDenseChunkMax);
    default: return std::max(hybrid, dense_workspace_rows(prob, 1024));
  }
}

// What twell_train_workspace_size asks for: the need, and for an AUTO plan
// whose next forward takes the dense route, room for min(M, 4096) dense rows
// per chunk. (The hybrid's workspace alone gives the dense route fewer rows
// per chunk: more GEMMs and fp32 accumulator passes; at M = 16384, skewed,
// 5.70 ms for 2540-row chunks against 5.39 for 4840, H200, 2026-12-03.)
size_t workspace_ask(const twell_train_plan* plan, const TrainProblem& prob) {
  const size_t need = workspace_need(plan, prob);
  if (!auto_prefers_dense(plan, prob.M)) return need;
  return std::max(need, dense_workspace_rows(prob, 4096));
}

// AUTO: take in a finished read-back of an earlier forward (never waits). It
// may run while the caller captures a stream (twell_train_saved_size and the
// forward come before the capture check): the query is made in relaxed mode,
// which keeps it from invalidating a global-mode capture.
void poll_readback(const twell_train_plan* plan) {
  if (!plan->readback_pending) return;
  const RelaxedCapture relaxed;
  if (relaxed.status() != cudaSuccess) {
    (void)cudaGetLastError();
    return;  // taken in by a later poll
  }
  const cudaError_t q = cudaEventQuery(plan->readback);
  if (q == cudaSuccess) {
    plan->readback_pending = false;
    const u64* h = plan->readback_host;
    plan->prefer_dense = dense_pays(plan, h[2], h[0], h[1]);
  } else if (q == cudaErrorNotReady) {
    if (cudaPeekAtLastError() == cudaErrorNotReady) (void)cudaGetLastError();  // not an error: clear it
  } else {
    plan->readback_pending = false;  // reported by the next CUDA step that checks
  }
}

// AUTO bookkeeping after a forward was enqueued (never waits for the GPU): an
// eager hybrid forward's numbers are on the host already; those of a dense or
// a replayed forward (`active` and `over` below, device words: the active
// count, and the rows over the ELL width or in the tail) are copied back
// asynchronously and taken in by a later poll_readback.
void update_preference(twell_train_plan* plan, Route r, const TrainProblem& prob, const TrainForwardInfo& info,
                       const u64* active, const u64* over, cudaStream_t s) {
  if (plan->opt.path != TWELL_PATH_AUTO) return;
  poll_readback(plan);
  if (r == Route::kHybrid && info.known) {
    plan->readback_pending = false;  // older than what the hybrid forward just read
    plan->prefer_dense = dense_pays(plan, info.rows, info.active, info.tail_rows);
    return;
  }
  if (plan->readback_pending) return;  // the host words are still in use
  if (plan->readback_host == nullptr) {
    void* hp = nullptr;
    if (cudaHostAlloc(&hp, 4 * sizeof(u64), cudaHostAllocDefault) != cudaSuccess) {
      (void)cudaGetLastError();
      return;  // no read-back: AUTO keeps the dense route
    }
    plan->readback_host = static_cast<u64*>(hp);
    if (cudaEventCreateWithFlags(&plan->readback, cudaEventDisableTiming) != cudaSuccess) {
      (void)cudaGetLastError();
      plan->readback = nullptr;
      return;
    }
  }
  if (plan->readback == nullptr) return;
  plan->readback_host[2] = static_cast<u64>(prob.M);
  if (cudaMemcpyAsync(plan->readback_host, active, sizeof(u64), cudaMemcpyDeviceToHost, s) == cudaSuccess &&
      cudaMemcpyAsync(plan->readback_host + 1, over, sizeof(u64), cudaMemcpyDeviceToHost, s) == cudaSuccess &&
      cudaEventRecord(plan->readback, s) == cudaSuccess) {
    plan->readback_pending = true;
  } else {
    (void)cudaGetLastError();
  }
}

// Training statistics: optional (NULL allowed).
twell_status check_stats(const DLTensor* stats, Mat* out) {
  return check_stats_tensor(stats, TWELL_TRAIN_STATS_WORDS, /*required=*/false, out);
}

// A raw buffer [ptr, ptr + bytes) must not overlap a tensor.
twell_status check_buffer_alias(const void* ptr, size_t bytes, const char* name, const Mat& m, const char* mname) {
  if (ptr == nullptr || m.ptr == nullptr) return TWELL_SUCCESS;
  const char* a0 = static_cast<const char*>(ptr);
  const char* a1 = a0 + bytes;
  const char* b0 = m.ptr;
  const char* b1 = m.ptr + m.bytes_span();
  if (a0 < b1 && b0 < a1) return fail(TWELL_ERROR_INVALID_ARGUMENT, "%s overlaps %s in memory", name, mname);
  return TWELL_SUCCESS;
}

twell_status check_weights(const twell_train_plan* plan, const DLTensor* w_gate, const DLTensor* w_up,
                           const DLTensor* w_down, Mat* mg, Mat* mu, Mat* md) {
  const int64_t D = plan->D, H = plan->H;
  TRY(check_weight(w_gate, "w_gate", H, D, mg));
  TRY(check_weight(w_up, "w_up", H, D, mu));
  return check_w_down(w_down, /*gradient=*/false, plan->opt.w_down_layout == TWELL_LAYOUT_DH, D, H, md);
}

twell_status ensure_device_now(twell_train_plan* p) {
  TRY(probe_plan_device(p->device, p->opt.kernels, &p->dev));
  int l2 = 0;
  if (cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, p->device) != cudaSuccess) (void)cudaGetLastError();
  p->l2_bytes = l2;
  for (cudaStream_t* st : {&p->capture.body, &p->capture.nested, &p->replay_side}) {
    const cudaError_t err = cudaStreamCreateWithFlags(st, cudaStreamNonBlocking);
    if (err != cudaSuccess) return fail_cuda(err, "creating the plan's capture streams");
  }
  p->device_ready = true;
  return TWELL_SUCCESS;
}

// Device set-up at the first run, which may be inside a stream capture (its
// stream creation is legal there in relaxed capture mode, for this thread).
twell_status ensure_device(twell_train_plan* p) {
  if (p->device_ready) return TWELL_SUCCESS;
  const RelaxedCapture relaxed;
  if (relaxed.status() != cudaSuccess) return fail_cuda(relaxed.status(), "entering relaxed capture mode");
  return ensure_device_now(p);
}

TrainWeights weights_of(const Mat& x, const Mat& w_gate, const Mat& w_up, const Mat& w_down) {
  return TrainWeights{.x = x.ref<const bf16>(),
                      .w_gate = w_gate.ref<const bf16>(),
                      .w_up = w_up.ref<const bf16>(),
                      .w_down = w_down.ref<const bf16>()};
}

}  // namespace

extern "C" {

TWELL_API twell_status twell_train_options_default(twell_train_options* o) {
  if (o == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "options is NULL");
  memset(o, 0, sizeof(*o));
  o->ell_width = TWELL_TRAIN_ELL_WIDTH_DEFAULT;
  o->slots = TWELL_SLOTS_DEFAULT;
  o->w_down_layout = TWELL_LAYOUT_HD;
  o->path = TWELL_PATH_AUTO;
  o->kernels = TWELL_KERNELS_AUTO;
  o->tail_chunk_rows = 0;
  return ok();
}

TWELL_API twell_status twell_train_supported(int64_t d_model, int64_t hidden, const twell_train_options* options) {
  TRY(check_options(d_model, hidden, options));
  return ok();
}

TWELL_API twell_status twell_train_plan_create(twell_train_plan** plan, int64_t d_model, int64_t hidden,
                                               const twell_train_options* options, int32_t device) {
  return create_plan(plan, d_model, hidden, options, device, check_options);
}

TWELL_API twell_status twell_train_plan_destroy(twell_train_plan* plan) {
  if (plan != nullptr) {
    if (plan->readback != nullptr) (void)cudaEventDestroy(plan->readback);
    if (plan->readback_host != nullptr) (void)cudaFreeHost(plan->readback_host);
    if (plan->capture.body != nullptr) (void)cudaStreamDestroy(plan->capture.body);
    if (plan->capture.nested != nullptr) (void)cudaStreamDestroy(plan->capture.nested);
    plan->replay.clear();
    if (plan->replay_side != nullptr) (void)cudaStreamDestroy(plan->replay_side);
  }
  delete plan;
  return ok();
}

TWELL_API twell_status twell_train_saved_size(const twell_train_plan* plan, int64_t rows, size_t* bytes) {
  if (plan == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "plan is NULL");
  if (bytes == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "bytes is NULL");
  if (rows < 0 || rows > INT32_MAX) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "rows is %" PRId64 ", expected 0..2^31-1", rows);
  }
  // AUTO: the size of the route the next forward prefers (ask again before
  // each forward, or choose the route with options.path for a fixed size).
  if (plan->opt.path == TWELL_PATH_AUTO) poll_readback(plan);
  const bool dense = plan->opt.path == TWELL_PATH_DENSE || auto_prefers_dense(plan, rows);
  *bytes = saved_need(plan, rows, dense ? Route::kDense : Route::kHybrid);
  return ok();
}

TWELL_API twell_status twell_train_workspace_size(const twell_train_plan* plan, int64_t rows, size_t* bytes) {
  if (plan == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "plan is NULL");
  if (bytes == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "bytes is NULL");
  if (rows < 0 || rows > INT32_MAX) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "rows is %" PRId64 ", expected 0..2^31-1", rows);
  }
  // No poll here: the answer follows the route twell_train_saved_size last
  // answered for, so the two sizes asked one after the other belong together.
  *bytes = workspace_ask(plan, problem_of(plan, rows));
  return ok();
}

TWELL_API twell_status twell_train_forward(twell_train_plan* plan, const DLTensor* x, const DLTensor* w_gate,
                                           const DLTensor* w_up, const DLTensor* w_down, DLTensor* y, DLTensor* l1,
                                           DLTensor* active, void* saved, size_t saved_bytes, DLTensor* stats,
                                           void* workspace, size_t workspace_bytes, void* stream) {
  if (plan == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "plan is NULL");
  const int64_t D = plan->D;
  Mat mx, mg, mu, md, my, ml, ma, ms;
  TRY(check_tensor(x, MatSpec{.name = "x", .dtype = DType::kBF16, .cols = D}, &mx));
  const int64_t M = mx.rows;
  if (M > INT32_MAX) return fail(TWELL_ERROR_UNSUPPORTED, "x has %" PRId64 " rows; at most 2^31-1 per call", M);
  TRY(check_weights(plan, w_gate, w_up, w_down, &mg, &mu, &md));
  TRY(check_tensor(y, MatSpec{.name = "y", .dtype = DType::kBF16, .rows = M, .cols = D}, &my));
  TRY(check_tensor(l1, MatSpec{.name = "l1", .dtype = DType::kF32, .ndim = 1, .cols = 1, .vector_aligned = false}, &ml,
                   true));
  const MatSpec as{
      .name = "active", .dtype = DType::kI32, .ndim = 1, .cols = M, .compact = true, .vector_aligned = false};
  TRY(check_tensor(active, as, &ma, true));
  TRY(check_stats(stats, &ms));
  const NamedMat ins[] = {{&mx, "x"}, {&mg, "w_gate"}, {&mu, "w_up"}, {&md, "w_down"}};
  const NamedMat outs[] = {{&my, "y"}, {&ml, "l1"}, {&ma, "active"}, {&ms, "stats"}};
  TRY(check_call_tensors(plan->device, ins, 4, outs, 4));
  const TrainProblem prob = problem_of(plan, M);
  if (plan->opt.path == TWELL_PATH_AUTO) poll_readback(plan);
  const Route route = forward_route(plan, prob, saved_bytes, workspace_bytes);
  const size_t saved_min = saved_need(plan, M, route);
  TRY(check_buffer(saved, saved_bytes, saved_min, "saved", TWELL_ERROR_INVALID_ARGUMENT, "twell_train_saved_size"));
  TRY(check_buffer(workspace, workspace_bytes, workspace_need(plan, prob), "workspace", TWELL_ERROR_WORKSPACE,
                   "twell_train_workspace_size"));
  for (int i = 0; i < 4; ++i) {
    TRY(check_buffer_alias(saved, saved_min, "saved", *ins[i].mat, ins[i].name));
    TRY(check_buffer_alias(saved, saved_min, "saved", *outs[i].mat, outs[i].name));
    TRY(check_buffer_alias(workspace, workspace_bytes, "workspace", *outs[i].mat, outs[i].name));
  }
  TRY(check_buffers_disjoint(saved, saved_min, "saved", workspace, workspace_bytes, "workspace"));

  DeviceGuard guard;
  TRY(enter_plan_device(&guard, plan->device));
  bool capturing = false;
  TRY(stream_capture_state(static_cast<cudaStream_t>(stream), &capturing));
  TRY(ensure_device(plan));
  const TrainProblem run = problem_of(plan, M);
  const TrainWeights w = weights_of(mx, mg, mu, md);
  const TrainForwardOut o{.y = my.ref<bf16>(),
                          .l1 = reinterpret_cast<float*>(ml.ptr),
                          .active = reinterpret_cast<int32_t*>(ma.ptr),
                          .stats = reinterpret_cast<u64*>(ms.ptr)};
  auto* ws = static_cast<char*>(workspace);
  auto s = static_cast<cudaStream_t>(stream);
  auto* sv = static_cast<char*>(saved);
  TrainForwardInfo info;
  // `graph`: the forward is being captured (the caller's graph, or the replay
  // cache's), so it decides its tail chunks on the device.
  const auto launch = [&](cudaStream_t on, bool graph) -> twell_status {
    if (route == Route::kDense) return train_dense_forward_run(run, w, o, sv, ws, workspace_bytes, on);
    return train_forward_run(run, w, o, sv, ws, on, graph ? &plan->capture : nullptr, &info);
  };
  plan->last_route = route == Route::kDense ? TWELL_PATH_DENSE : TWELL_PATH_SPARSE;
  if (capturing) {
    // A captured forward replays the route it was captured with; AUTO learns from eager calls only.
    TRY(launch(s, true));
    return ok();
  }
  ReplayKey key;  // everything the launch sequence depends on
  key.add(route == Route::kDense ? 2 : 1);
  key.add(static_cast<uint64_t>(M));
  key.add(static_cast<uint64_t>(workspace_bytes));
  for (const void* ptr :
       {static_cast<const void*>(mx.ptr), static_cast<const void*>(mg.ptr), static_cast<const void*>(mu.ptr),
        static_cast<const void*>(md.ptr), static_cast<const void*>(my.ptr), static_cast<const void*>(ml.ptr),
        static_cast<const void*>(ma.ptr), static_cast<const void*>(ms.ptr), static_cast<const void*>(saved),
        static_cast<const void*>(workspace)}) {
    key.add_ptr(ptr);
  }
  for (int64_t ld : {mx.ld, mg.ld, mu.ld, md.ld, my.ld}) key.add(static_cast<uint64_t>(ld));
  TRY(plan->replay.run(key, s, plan->replay_side,
                       [&](cudaStream_t on) { return launch(on, on == plan->replay_side); }));
  // AUTO's next route: from the eager hybrid forward's numbers, or read back
  // asynchronously (the active count; the rows over the ELL width or in the tail).
  if (plan->opt.path == TWELL_PATH_AUTO) {
    const u64* dev_stats = o.stats != nullptr       ? o.stats
                           : route == Route::kDense ? train_dense_stats(run, ws)
                                                    : train_hybrid_stats(run, ws);
    const u64* over = route == Route::kDense ? train_dense_over_width(run, ws) : train_saved_tail_count(sv);
    update_preference(plan, route, run, info, dev_stats + TWELL_STAT_ACTIVE, over, s);
  }
  return ok();
}

TWELL_API twell_status twell_train_backward(twell_train_plan* plan, const DLTensor* dy, double l1_coeff,
                                            const DLTensor* x, const DLTensor* w_gate, const DLTensor* w_up,
                                            const DLTensor* w_down, const void* saved, size_t saved_bytes, DLTensor* dx,
                                            DLTensor* dw_gate, DLTensor* dw_up, DLTensor* dw_down, int32_t accumulate,
                                            DLTensor* stats, void* workspace, size_t workspace_bytes, void* stream) {
  return twell_train_backward_scaled(plan, dy, l1_coeff, nullptr, x, w_gate, w_up, w_down, saved, saved_bytes, dx,
                                     dw_gate, dw_up, dw_down, accumulate, stats, workspace, workspace_bytes, stream);
}

TWELL_API twell_status twell_train_backward_scaled(twell_train_plan* plan, const DLTensor* dy, double l1_coeff,
                                                   const DLTensor* l1_scale, const DLTensor* x, const DLTensor* w_gate,
                                                   const DLTensor* w_up, const DLTensor* w_down, const void* saved,
                                                   size_t saved_bytes, DLTensor* dx, DLTensor* dw_gate, DLTensor* dw_up,
                                                   DLTensor* dw_down, int32_t accumulate, DLTensor* stats,
                                                   void* workspace, size_t workspace_bytes, void* stream) {
  if (plan == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "plan is NULL");
  const int64_t D = plan->D, H = plan->H;
  const bool dh = plan->opt.w_down_layout == TWELL_LAYOUT_DH;
  Mat mdy, mx, mg, mu, md, mdx, mdg, mdu, mdd, ms;
  TRY(check_tensor(dy, MatSpec{.name = "dy", .dtype = DType::kBF16, .cols = D}, &mdy));
  const int64_t M = mdy.rows;
  if (M > INT32_MAX) return fail(TWELL_ERROR_UNSUPPORTED, "dy has %" PRId64 " rows; at most 2^31-1 per call", M);
  TRY(check_tensor(x, MatSpec{.name = "x", .dtype = DType::kBF16, .rows = M, .cols = D}, &mx));
  TRY(check_weights(plan, w_gate, w_up, w_down, &mg, &mu, &md));
  if (!(l1_coeff == l1_coeff) || l1_coeff > 3.0e38 || l1_coeff < -3.0e38) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "l1_coeff is %g, expected a finite float", l1_coeff);
  }
  if (accumulate != 0 && accumulate != 1) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "accumulate is %d, expected 0 or 1", accumulate);
  }
  Mat mscale;
  const MatSpec scs{.name = "l1_scale", .dtype = DType::kF32, .ndim = 1, .cols = 1, .vector_aligned = false};
  TRY(check_tensor(l1_scale, scs, &mscale, true));
  TRY(check_tensor(dx, MatSpec{.name = "dx", .dtype = DType::kBF16, .rows = M, .cols = D}, &mdx));
  TRY(check_weight(dw_gate, "dw_gate", H, D, &mdg));
  TRY(check_weight(dw_up, "dw_up", H, D, &mdu));
  TRY(check_w_down(dw_down, /*gradient=*/true, dh, D, H, &mdd));
  TRY(check_stats(stats, &ms));
  const NamedMat ins[] = {{&mdy, "dy"},  {&mx, "x"},      {&mg, "w_gate"},
                          {&mu, "w_up"}, {&md, "w_down"}, {&mscale, "l1_scale"}};
  const NamedMat outs[] = {{&mdx, "dx"}, {&mdg, "dw_gate"}, {&mdu, "dw_up"}, {&mdd, "dw_down"}, {&ms, "stats"}};
  TRY(check_call_tensors(plan->device, ins, 6, outs, 5));
  const TrainProblem prob = problem_of(plan, M);
  // The route is in the saved header (read below); until then the smaller
  // of the two sizes the plan allows.
  const size_t hybrid_saved = saved_need(plan, M, Route::kHybrid), dense_saved = saved_need(plan, M, Route::kDense);
  const size_t saved_min = plan->opt.path == TWELL_PATH_SPARSE  ? hybrid_saved
                           : plan->opt.path == TWELL_PATH_DENSE ? dense_saved
                                                                : std::min(hybrid_saved, dense_saved);
  TRY(check_buffer(saved, saved_bytes, saved_min, "saved", TWELL_ERROR_INVALID_ARGUMENT, "twell_train_saved_size"));
  TRY(check_buffer(workspace, workspace_bytes, workspace_need(plan, prob), "workspace", TWELL_ERROR_WORKSPACE,
                   "twell_train_workspace_size"));
  for (int o = 0; o < 5; ++o) {
    TRY(check_buffer_alias(saved, saved_min, "saved", *outs[o].mat, outs[o].name));
    TRY(check_buffer_alias(workspace, workspace_bytes, "workspace", *outs[o].mat, outs[o].name));
    TRY(check_buffer_alias(workspace, workspace_bytes, "workspace", *ins[o].mat, ins[o].name));
  }
  TRY(check_buffers_disjoint(saved, saved_min, "saved", workspace, workspace_bytes, "workspace"));

  DeviceGuard guard;
  TRY(enter_plan_device(&guard, plan->device));
  bool capturing = false;
  TRY(stream_capture_state(static_cast<cudaStream_t>(stream), &capturing));
  TRY(ensure_device(plan));
  auto s = static_cast<cudaStream_t>(stream);
  if (M == 0) {
    if (ms.ptr != nullptr) TRY(train_write_empty_stats(reinterpret_cast<u64*>(ms.ptr), 2, plan->opt.ell_width, s));
    if (!accumulate) {  // the gradient of an empty batch is zero
      Mat* ws_[] = {&mdg, &mdu, &mdd};
      for (Mat* m : ws_) {
        const cudaError_t err = cudaMemset2DAsync(m->ptr, static_cast<size_t>(m->ld) * 2, 0,
                                                  static_cast<size_t>(m->cols) * 2, static_cast<size_t>(m->rows), s);
        if (err != cudaSuccess) return fail_cuda(err, "zeroing the weight gradients");
      }
    }
    return ok();
  }
  const TrainProblem run = problem_of(plan, M);
  const TrainWeights w = weights_of(mx, mg, mu, md);
  const TrainBackwardIO io{.dy = mdy.ref<const bf16>(),
                           .l1_coeff = static_cast<float>(l1_coeff),
                           .l1_scale = reinterpret_cast<const float*>(mscale.ptr),
                           .dx = mdx.ref<bf16>(),
                           .dw_gate = mdg.ref<bf16>(),
                           .dw_up = mdu.ref<bf16>(),
                           .dw_down = mdd.ref<bf16>(),
                           .accumulate = accumulate == 1,
                           .stats = reinterpret_cast<u64*>(ms.ptr)};
  const auto* sv = static_cast<const char*>(saved);
  auto* ws = static_cast<char*>(workspace);
  // Captured (the caller's graph or the replay cache's): no host wait; the
  // graph takes the route of the saved header at every replay, among the
  // routes these buffers can hold.
  const bool hybrid_ok = plan->opt.path != TWELL_PATH_DENSE && saved_bytes >= hybrid_saved;
  const bool dense_ok =
      plan->opt.path != TWELL_PATH_SPARSE && saved_bytes >= dense_saved && train_dense_chunk(run, workspace_bytes) > 0;
  const auto captured = [&](cudaStream_t on) -> twell_status {
    if (!hybrid_ok && !dense_ok) {
      return fail(TWELL_ERROR_WORKSPACE,
                  "workspace_bytes is %zu, too small for the dense route the saved state's "
                  "size implies (twell_train_workspace_size)",
                  workspace_bytes);
    }
    const size_t need = std::max(hybrid_ok ? hybrid_saved : 0, dense_ok ? dense_saved : 0);
    for (int o = 0; o < 5; ++o) TRY(check_buffer_alias(saved, need, "saved", *outs[o].mat, outs[o].name));
    return train_backward_captured(run, w, io, sv, hybrid_ok, dense_ok, ws, workspace_bytes, on, plan->capture);
  };
  // Eager: the saved header is read back (one host wait) and checked.
  const auto eager = [&](cudaStream_t on) -> twell_status {
    SavedHeader hdr;
    TRY(train_read_saved_header(run, sv, on, &hdr));
    const Route route = hdr.route() == kRouteDense ? Route::kDense : Route::kHybrid;
    const size_t need = route == Route::kDense ? dense_saved : hybrid_saved;
    if (saved_bytes < need) {
      return fail(TWELL_ERROR_INVALID_ARGUMENT, "saved_bytes is %zu but the %s forward that wrote saved needs %zu",
                  saved_bytes, route == Route::kDense ? "dense-route" : "hybrid", need);
    }
    // Outputs must not overlap the whole saved state either.
    for (int o = 0; o < 5; ++o) TRY(check_buffer_alias(saved, need, "saved", *outs[o].mat, outs[o].name));
    if (route == Route::kDense) return train_dense_backward_run(run, w, io, sv, ws, workspace_bytes, 1, on);
    return train_backward_run(run, w, io, sv, static_cast<int64_t>(hdr.tail_rows()), ws, on);
  };
  if (capturing) {
    TRY(captured(s));
    return ok();
  }
  if (!hybrid_ok && !dense_ok) {  // nothing a graph could hold: eager only
    TRY(eager(s));
    return ok();
  }
  // From a call's second sighting on, replayed as the captured form.
  ReplayKey key;
  key.add(static_cast<uint64_t>(M));
  uint32_t coef_bits = 0;
  std::memcpy(&coef_bits, &io.l1_coeff, sizeof(coef_bits));
  key.add(coef_bits);
  key.add(static_cast<uint64_t>(accumulate));
  key.add(static_cast<uint64_t>(saved_bytes));
  key.add(static_cast<uint64_t>(workspace_bytes));
  for (const void* ptr :
       {static_cast<const void*>(mdy.ptr), static_cast<const void*>(mx.ptr), static_cast<const void*>(mg.ptr),
        static_cast<const void*>(mu.ptr), static_cast<const void*>(md.ptr), static_cast<const void*>(mscale.ptr), saved,
        static_cast<const void*>(mdx.ptr), static_cast<const void*>(mdg.ptr), static_cast<const void*>(mdu.ptr),
        static_cast<const void*>(mdd.ptr), static_cast<const void*>(ms.ptr), static_cast<const void*>(workspace)}) {
    key.add_ptr(ptr);
  }
  for (int64_t ld : {mdy.ld, mx.ld, mg.ld, mu.ld, md.ld, mdx.ld, mdg.ld, mdu.ld, mdd.ld}) {
    key.add(static_cast<uint64_t>(ld));
  }
  TRY(plan->replay.run(key, s, plan->replay_side,
                       [&](cudaStream_t on) { return on == plan->replay_side ? captured(on) : eager(on); }));
  return ok();
}

TWELL_API twell_status twell_train_plan_set_replay(twell_train_plan* plan, int32_t max_graphs) {
  if (plan == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "plan is NULL");
  TRY(plan->replay.set_capacity_checked(max_graphs));
  return ok();
}

TWELL_API twell_status twell_train_plan_replay_counts(const twell_train_plan* plan, int64_t* replays,
                                                      int64_t* captures) {
  if (plan == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "plan is NULL");
  plan->replay.counts(replays, captures);
  return ok();
}

TWELL_API twell_status twell_train_plan_last_route(const twell_train_plan* plan, int32_t* path) {
  if (plan == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "plan is NULL");
  if (path == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "path is NULL");
  *path = plan->last_route;
  return ok();
}

}  // extern "C"
