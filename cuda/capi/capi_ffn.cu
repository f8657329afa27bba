// C ABI: the inference FFN plan (argument checks, path choice, dispatch).
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <new>

#include "capi/device_guard.h"
#include "common/errors.h"
#include "capi/plan_common.h"
#include "capi/replay_cache.h"
#include "capi/tensor_check.h"
#include "ffn/auto_route.h"
#include "ffn/pipeline.h"
#include "format/pack.h"
#include "gate_gemm/gate_gemm.h"

using namespace twell;

struct twell_ffn_plan {
  int64_t D = 0, H = 0;
  twell_ffn_options opt{};
  int device = 0;
  PlanDevice dev;  // read at the first run
  // TWELL_PATH_AUTO, eager calls (ffn/auto_route.h): a recent call's
  // statistics arrive in pinned host memory through an async copy, issued at
  // most every kStatsEvery calls and read only once its event has completed,
  // so the host never waits for the GPU.
  uint64_t* host_stats = nullptr;  // target of the copy in flight
  cudaEvent_t stats_ready = nullptr;
  bool stats_pending = false;
  bool have_stats = false;
  u64 last_stats[TWELL_STATS_WORDS] = {};  // the newest completed copy
  int64_t calls = 0;
  int64_t last_copy_call = -(int64_t(1) << 40);
  int64_t next_poll_call = 0;  // the pending copy's event is queried from this call on
  // TWELL_PATH_AUTO, captured calls: the device-side history and the stream
  // through which the IF/ELSE node's two bodies are captured.
  AutoState* dev_auto = nullptr;
  cudaStream_t side = nullptr;  // also the stream eager calls are captured on (replay_cache.h)
  ReplayCache replay;
  bool device_ready = false;
};

namespace {

#define TRY TWELL_TRY

constexpr int64_t kDefaultChunkRows = 4096;

twell_status check_options(int64_t D, int64_t H, const twell_ffn_options* o) {
  if (o == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "options is NULL (use twell_ffn_options_default)");
  TRY(check_plan_dims(D, H));
  if (o->gated != 0 && o->gated != 1)
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "options.gated is %d, expected 0 or 1", o->gated);
  TRY(check_plan_options(o->slots, o->w_down_layout, o->path, o->kernels));
  if (o->chunk_rows < 0 || (o->chunk_rows > 0 && o->chunk_rows < 16)) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "options.chunk_rows is %d, expected 0 (default) or >= 16", o->chunk_rows);
  }
  if (!(o->dense_threshold >= 0.0 && o->dense_threshold <= 1.0)) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "options.dense_threshold is %g, expected a fraction in [0, 1]",
                o->dense_threshold);
  }
  return TWELL_SUCCESS;
}

FfnProblem problem_of(const twell_ffn_plan* plan, int64_t M) {
  return FfnProblem{.M = M,
                    .D = plan->D,
                    .H = plan->H,
                    .gated = plan->opt.gated == 1,
                    .slots = plan->opt.slots,
                    .w_down_dh = plan->opt.w_down_layout == TWELL_LAYOUT_DH,
                    .use_sm90 = plan->dev.use_sm90,
                    .sm_count = plan->dev.sm_count,
                    .chunk_rows = plan->opt.chunk_rows > 0 ? plan->opt.chunk_rows : kDefaultChunkRows};
}

// Eager AUTO calls: the rule of ffn/auto_route.h on the newest statistics the
// host has (never waits: a copy still in flight is left for a later call). A
// copy is issued at most every kStatsEvery calls and its event queried at most
// every kStatsEvery calls (a query costs about as much host time as the rest
// of a replayed call).
constexpr int64_t kStatsEvery = 4;

int choose_path(twell_ffn_plan* plan) {
  if (plan->opt.path != TWELL_PATH_AUTO) return plan->opt.path;
  if (plan->stats_pending && plan->calls >= plan->next_poll_call) {
    const cudaError_t q = cudaEventQuery(plan->stats_ready);
    plan->next_poll_call = plan->calls + kStatsEvery;
    if (q == cudaSuccess) {
      plan->stats_pending = false;
      plan->have_stats = true;
      for (int i = 0; i < TWELL_STATS_WORDS; ++i) plan->last_stats[i] = plan->host_stats[i];
    } else {
      (void)cudaGetLastError();  // cudaErrorNotReady is not an error; anything else resurfaces at the next launch
    }
  }
  return auto_path(plan->have_stats ? plan->last_stats : nullptr, plan->calls, plan->opt.dense_threshold, plan->H);
}

// Device state is set up at the first run (after that call's argument checks),
// so plans can be made, sized and argument-checked on machines without a GPU.
twell_status ensure_device(twell_ffn_plan* p) {
  if (p->device_ready) return TWELL_SUCCESS;
  TRY(probe_plan_device(p->device, p->opt.kernels, &p->dev));
  cudaError_t err;
  if ((err = cudaHostAlloc(reinterpret_cast<void**>(&p->host_stats), TWELL_STATS_WORDS * sizeof(uint64_t),
                           cudaHostAllocDefault)) != cudaSuccess) {
    return fail_cuda(err, "allocating the plan's pinned statistics buffer");
  }
  if ((err = cudaEventCreateWithFlags(&p->stats_ready, cudaEventDisableTiming)) != cudaSuccess) {
    return fail_cuda(err, "creating the plan's statistics event");
  }
  if ((err = cudaStreamCreateWithFlags(&p->side, cudaStreamNonBlocking)) != cudaSuccess) {
    return fail_cuda(err, "creating the plan's capture stream");
  }
  if ((err = cudaMalloc(reinterpret_cast<void**>(&p->dev_auto), sizeof(AutoState))) != cudaSuccess) {
    return fail_cuda(err, "allocating the plan's AUTO state");
  }
  // Zeroed on the plan's own stream, which no capture can involve.
  if ((err = cudaMemsetAsync(p->dev_auto, 0, sizeof(AutoState), p->side)) != cudaSuccess ||
      (err = cudaStreamSynchronize(p->side)) != cudaSuccess) {
    return fail_cuda(err, "initialising the plan's AUTO state");
  }
  p->device_ready = true;
  return TWELL_SUCCESS;
}

// Device set-up may happen inside a stream capture (a plan's first call
// captured in a graph): its allocations and its one synchronisation are
// legal there only in relaxed capture mode, for this thread.
twell_status ensure_device_capture_safe(twell_ffn_plan* p) {
  if (p->device_ready) return TWELL_SUCCESS;
  const RelaxedCapture relaxed;
  if (relaxed.status() != cudaSuccess) return fail_cuda(relaxed.status(), "entering relaxed capture mode");
  return ensure_device(p);
}

}  // namespace

extern "C" {

TWELL_API twell_status twell_ffn_options_default(twell_ffn_options* o) {
  if (o == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "options is NULL");
  memset(o, 0, sizeof(*o));
  o->gated = 1;
  o->slots = TWELL_SLOTS_DEFAULT;
  o->w_down_layout = TWELL_LAYOUT_HD;
  o->path = TWELL_PATH_AUTO;
  o->kernels = TWELL_KERNELS_AUTO;
  o->chunk_rows = 0;
  o->dense_threshold = 0.012;
  return ok();
}

TWELL_API twell_status twell_ffn_supported(int64_t d_model, int64_t hidden, const twell_ffn_options* options) {
  TRY(check_options(d_model, hidden, options));
  return ok();
}

TWELL_API twell_status twell_ffn_plan_create(twell_ffn_plan** plan, int64_t d_model, int64_t hidden,
                                             const twell_ffn_options* options, int32_t device) {
  return create_plan(plan, d_model, hidden, options, device, check_options);
}

TWELL_API twell_status twell_ffn_plan_destroy(twell_ffn_plan* plan) {
  if (plan == nullptr) return ok();
  if (plan->stats_ready != nullptr) {
    cudaEventSynchronize(plan->stats_ready);  // the async copy into host_stats must finish first
    cudaEventDestroy(plan->stats_ready);
  }
  if (plan->host_stats != nullptr) cudaFreeHost(plan->host_stats);
  // A graph that captured this plan's AUTO calls reads dev_auto: destroying
  // the plan before such a graph is documented as not allowed.
  plan->replay.clear();
  if (plan->dev_auto != nullptr) cudaFree(plan->dev_auto);
  if (plan->side != nullptr) cudaStreamDestroy(plan->side);
  (void)cudaGetLastError();
  delete plan;
  return ok();
}

TWELL_API twell_status twell_ffn_plan_set_replay(twell_ffn_plan* plan, int32_t max_graphs) {
  if (plan == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "plan is NULL");
  TRY(plan->replay.set_capacity_checked(max_graphs));
  return ok();
}

TWELL_API twell_status twell_ffn_plan_replay_counts(const twell_ffn_plan* plan, int64_t* replays, int64_t* captures) {
  if (plan == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "plan is NULL");
  plan->replay.counts(replays, captures);
  return ok();
}

TWELL_API twell_status twell_ffn_workspace_size(const twell_ffn_plan* plan, int64_t rows, size_t* bytes) {
  if (plan == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "plan is NULL");
  if (bytes == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "bytes is NULL");
  if (rows < 0) return fail(TWELL_ERROR_INVALID_ARGUMENT, "rows is %" PRId64 ", expected >= 0", rows);
  *bytes = ffn_workspace(problem_of(plan, rows)).total;
  return ok();
}

TWELL_API twell_status twell_ffn_run(twell_ffn_plan* plan, const DLTensor* x, const DLTensor* w_gate,
                                     const DLTensor* w_up, const DLTensor* w_down, DLTensor* y, DLTensor* stats,
                                     void* workspace, size_t workspace_bytes, void* stream) {
  if (plan == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "plan is NULL");
  const int64_t D = plan->D, H = plan->H;
  const bool gated = plan->opt.gated == 1, dh = plan->opt.w_down_layout == TWELL_LAYOUT_DH;
  Mat mx, mg, mu, md, my, ms;
  TRY(check_tensor(x, MatSpec{.name = "x", .dtype = DType::kBF16, .cols = D}, &mx));
  const int64_t M = mx.rows;
  if (gated) {
    TRY(check_weight(w_gate, "w_gate", H, D, &mg));
  } else if (w_gate != nullptr) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "w_gate must be NULL for a non-gated plan");
  }
  TRY(check_weight(w_up, "w_up", H, D, &mu));
  TRY(check_w_down(w_down, /*gradient=*/false, dh, D, H, &md));
  TRY(check_tensor(y, MatSpec{.name = "y", .dtype = DType::kBF16, .rows = M, .cols = D}, &my));
  TRY(check_stats_tensor(stats, TWELL_STATS_WORDS, /*required=*/false, &ms));
  const NamedMat ins[] = {{&mx, "x"}, {&mg, "w_gate"}, {&mu, "w_up"}, {&md, "w_down"}};
  const NamedMat outs[] = {{&my, "y"}, {&ms, "stats"}};
  TRY(check_call_tensors(plan->device, ins, 4, outs, 2));
  const FfnProblem prob = problem_of(plan, M);
  const FfnWorkspace wl = ffn_workspace(prob);
  TRY(check_buffer(workspace, workspace_bytes, wl.total, "workspace", TWELL_ERROR_WORKSPACE,
                   "twell_ffn_workspace_size"));

  DeviceGuard guard;
  TRY(enter_plan_device(&guard, plan->device));
  cudaError_t err;
  auto s = static_cast<cudaStream_t>(stream);
  bool capturing = false;
  TRY(stream_capture_state(s, &capturing));
  TRY(capturing ? ensure_device_capture_safe(plan) : ensure_device(plan));
  const FfnProblem run_prob = problem_of(plan, M);  // now with the device's properties
  if (M == 0) {  // nothing to compute; the statistics still describe the call
    if (ms.ptr != nullptr &&
        (err = stats_init(reinterpret_cast<u64*>(ms.ptr), 0, TWELL_PATH_SPARSE, s)) != cudaSuccess) {
      return fail_cuda(err, "stats init");
    }
    return ok();
  }
  const FfnTensors t{.x = mx.ref<const bf16>(),
                     .w_gate = mg.ref<const bf16>(),
                     .w_up = mu.ref<const bf16>(),
                     .w_down = md.ref<const bf16>(),
                     .y = my.ref<bf16>(),
                     .stats = reinterpret_cast<u64*>(ms.ptr)};
  auto* ws = static_cast<char*>(workspace);
  if (capturing) {
    // Captured: AUTO decides on the device at every replay; the fixed paths
    // are captured as they are. The eager history is left alone.
    if (plan->opt.path == TWELL_PATH_AUTO) {
      TRY(ffn_run_auto_captured(run_prob, t, ws, s, plan->side, plan->dev_auto, plan->opt.dense_threshold));
    } else {
      TRY(plan->opt.path == TWELL_PATH_DENSE ? ffn_run_dense(run_prob, t, ws, s) : ffn_run_sparse(run_prob, t, ws, s));
    }
    return ok();
  }
  const int path = choose_path(plan);
  ReplayKey key;  // everything the launch sequence depends on (replay_cache.h)
  key.add(static_cast<uint64_t>(path));
  key.add(static_cast<uint64_t>(M));
  for (const void* ptr :
       {static_cast<const void*>(t.x.ptr), static_cast<const void*>(t.w_gate.ptr), static_cast<const void*>(t.w_up.ptr),
        static_cast<const void*>(t.w_down.ptr), static_cast<const void*>(t.y.ptr), static_cast<const void*>(t.stats),
        static_cast<const void*>(ws)}) {
    key.add_ptr(ptr);
  }
  for (int64_t ld : {t.x.ld, t.w_gate.ld, t.w_up.ld, t.w_down.ld, t.y.ld}) key.add(static_cast<uint64_t>(ld));
  TRY(plan->replay.run(key, s, plan->side, [&](cudaStream_t on) {
    return path == TWELL_PATH_DENSE ? ffn_run_dense(run_prob, t, ws, on) : ffn_run_sparse(run_prob, t, ws, on);
  }));
  ++plan->calls;
  if (plan->opt.path == TWELL_PATH_AUTO && !plan->stats_pending && plan->calls - plan->last_copy_call >= kStatsEvery) {
    const u64* dev_stats = t.stats != nullptr ? t.stats : reinterpret_cast<const u64*>(ws + wl.stats);
    if ((err = cudaMemcpyAsync(plan->host_stats, dev_stats, TWELL_STATS_WORDS * sizeof(u64), cudaMemcpyDeviceToHost,
                               s)) != cudaSuccess ||
        (err = cudaEventRecord(plan->stats_ready, s)) != cudaSuccess) {
      return fail_cuda(err, "copying the statistics for TWELL_PATH_AUTO");
    }
    plan->stats_pending = true;
    plan->last_copy_call = plan->calls;
    plan->next_poll_call = plan->calls;  // first query at the next call
  }
  return ok();
}

TWELL_API twell_status twell_gate_pack(twell_ffn_plan* plan, const DLTensor* x, const DLTensor* w, DLTensor* packed,
                                       DLTensor* overflow_rows, DLTensor* stats, void* workspace,
                                       size_t workspace_bytes, void* stream) {
  if (plan == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "plan is NULL");
  const int64_t D = plan->D, H = plan->H;
  Mat mx, mw, mp, mr, ms;
  TRY(check_tensor(x, MatSpec{.name = "x", .dtype = DType::kBF16, .cols = D}, &mx));
  const int64_t M = mx.rows;
  TRY(check_weight(w, "w", H, D, &mw));
  const MatSpec ps{
      .name = "packed", .dtype = DType::kU32, .rows = M, .cols = tiles_for(H) * plan->opt.slots, .compact = true};
  TRY(check_tensor(packed, ps, &mp));
  const MatSpec rs{
      .name = "overflow_rows", .dtype = DType::kI32, .ndim = 1, .cols = M, .compact = true, .vector_aligned = false};
  TRY(check_tensor(overflow_rows, rs, &mr));
  TRY(check_stats_tensor(stats, TWELL_STATS_WORDS, /*required=*/true, &ms));
  const Mat* all[] = {&mx, &mw, &mp, &mr, &ms};
  const char* names[] = {"x", "w", "packed", "overflow_rows", "stats"};
  for (int i = 0; i < 5; ++i) TRY(check_on_plan_device(plan->device, *all[i], names[i]));
  for (int o = 2; o < 5; ++o) {
    for (int i = 0; i < o; ++i) TRY(check_no_alias(*all[o], names[o], *all[i], names[i]));
  }
  const FfnProblem prob = problem_of(plan, M);
  TRY(check_buffer(workspace, workspace_bytes, ffn_workspace(prob).total, "workspace", TWELL_ERROR_WORKSPACE,
                   "twell_ffn_workspace_size"));
  DeviceGuard guard;
  TRY(enter_plan_device(&guard, plan->device));
  bool capturing = false;
  TRY(stream_capture_state(static_cast<cudaStream_t>(stream), &capturing));
  TRY(capturing ? ensure_device_capture_safe(plan) : ensure_device(plan));
  if (M == 0) {
    const cudaError_t err =
        stats_init(reinterpret_cast<u64*>(ms.ptr), 0, TWELL_PATH_SPARSE, static_cast<cudaStream_t>(stream));
    return err == cudaSuccess ? ok() : fail_cuda(err, "stats init");
  }
  TRY(gate_pack_run(problem_of(plan, M), mx.ref<const bf16>(), mw.ref<const bf16>(),
                    reinterpret_cast<uint32_t*>(mp.ptr), reinterpret_cast<int32_t*>(mr.ptr),
                    reinterpret_cast<u64*>(ms.ptr), static_cast<char*>(workspace), static_cast<cudaStream_t>(stream)));
  return ok();
}

}  // extern "C"
