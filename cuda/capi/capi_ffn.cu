// C ABI: the inference FFN plan (argument checks, path choice, dispatch).
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <new>

#include "capi/device_guard.h"
#include "capi/errors.h"
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
  int sm_count = 1;
  bool use_sm90 = false;
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
constexpr int64_t kMaxDim = int64_t(1) << 20;

twell_status check_options(int64_t D, int64_t H, const twell_ffn_options* o) {
  if (o == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "options is NULL (use twell_ffn_options_default)");
  if (D <= 0) return fail(TWELL_ERROR_INVALID_ARGUMENT, "d_model is %" PRId64 ", expected a positive size", D);
  if (H <= 0) return fail(TWELL_ERROR_INVALID_ARGUMENT, "hidden is %" PRId64 ", expected a positive size", H);
  if (D % 8 != 0 || D > 16384) {
    return fail(TWELL_ERROR_UNSUPPORTED, "d_model is %" PRId64 ", expected a multiple of 8 in [8, 16384]", D);
  }
  if (H % 8 != 0 || H > kMaxDim) {
    return fail(TWELL_ERROR_UNSUPPORTED, "hidden is %" PRId64 ", expected a multiple of 8 in [8, %" PRId64 "]", H, kMaxDim);
  }
  if (o->gated != 0 && o->gated != 1) return fail(TWELL_ERROR_INVALID_ARGUMENT, "options.gated is %d, expected 0 or 1", o->gated);
  if (o->slots != 32 && o->slots != 64 && o->slots != 128) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "options.slots is %d, expected 32, 64 or 128", o->slots);
  }
  if (o->w_down_layout != TWELL_LAYOUT_HD && o->w_down_layout != TWELL_LAYOUT_DH) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "options.w_down_layout is %d, expected TWELL_LAYOUT_HD (0) or TWELL_LAYOUT_DH (1)",
                o->w_down_layout);
  }
  if (o->path < TWELL_PATH_AUTO || o->path > TWELL_PATH_DENSE) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "options.path is %d, expected 0 (auto), 1 (sparse) or 2 (dense)", o->path);
  }
  if (o->kernels < TWELL_KERNELS_AUTO || o->kernels > TWELL_KERNELS_SM90) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "options.kernels is %d, expected 0 (auto), 1 (portable) or 2 (sm90)", o->kernels);
  }
  if (o->kernels == TWELL_KERNELS_SM90 && !gate_pack_sm90_compiled()) {
    return fail(TWELL_ERROR_UNSUPPORTED, "options.kernels is TWELL_KERNELS_SM90 but this build has no sm_90a kernels");
  }
  if (o->chunk_rows < 0 || (o->chunk_rows > 0 && o->chunk_rows < 16)) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "options.chunk_rows is %d, expected 0 (default) or >= 16", o->chunk_rows);
  }
  if (!(o->dense_threshold >= 0.0 && o->dense_threshold <= 1.0)) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "options.dense_threshold is %g, expected a fraction in [0, 1]", o->dense_threshold);
  }
  return TWELL_SUCCESS;
}

FfnProblem problem_of(const twell_ffn_plan* plan, int64_t M) {
  FfnProblem p;
  p.M = M;
  p.D = plan->D;
  p.H = plan->H;
  p.gated = plan->opt.gated == 1;
  p.slots = plan->opt.slots;
  p.w_down_dh = plan->opt.w_down_layout == TWELL_LAYOUT_DH;
  p.use_sm90 = plan->use_sm90;
  p.sm_count = plan->sm_count;
  p.chunk_rows = plan->opt.chunk_rows > 0 ? plan->opt.chunk_rows : kDefaultChunkRows;
  return p;
}

// Eager AUTO calls: the rule of ffn/auto_route.h on the newest statistics the
// host has (never waits: a copy still in flight is left for a later call).
constexpr int64_t kStatsEvery = 4;

int choose_path(twell_ffn_plan* plan) {
  if (plan->opt.path != TWELL_PATH_AUTO) return plan->opt.path;
  if (plan->stats_pending) {
    const cudaError_t q = cudaEventQuery(plan->stats_ready);
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

twell_status check_stats(DLTensor* stats, Mat* out, bool required) {
  MatSpec ss{"stats", DType::kU64, 1};
  ss.cols = TWELL_STATS_WORDS;
  ss.vector_aligned = false;
  return check_tensor(stats, ss, out, !required);
}


// Device state is set up at the first run (after that call's argument checks),
// so plans can be made, sized and argument-checked on machines without a GPU.
twell_status ensure_device(twell_ffn_plan* p) {
  if (p->device_ready) return TWELL_SUCCESS;
  PlanDevice dev;
  TRY(probe_plan_device(p->device, p->opt.kernels, &dev));
  p->sm_count = dev.sm_count;
  p->use_sm90 = dev.use_sm90;
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
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  cudaError_t err = cudaThreadExchangeStreamCaptureMode(&mode);
  if (err != cudaSuccess) return fail_cuda(err, "entering relaxed capture mode");
  const twell_status st = ensure_device(p);
  (void)cudaThreadExchangeStreamCaptureMode(&mode);
  return st;
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
  o->dense_threshold = 0.008;
  return ok();
}

TWELL_API twell_status twell_ffn_supported(int64_t d_model, int64_t hidden, const twell_ffn_options* options) {
  TRY(check_options(d_model, hidden, options));
  return ok();
}

TWELL_API twell_status twell_ffn_plan_create(twell_ffn_plan** plan, int64_t d_model, int64_t hidden,
                                             const twell_ffn_options* options, int32_t device) {
  if (plan == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "plan is NULL");
  *plan = nullptr;
  TRY(check_options(d_model, hidden, options));
  if (device < 0) return fail(TWELL_ERROR_INVALID_ARGUMENT, "device is %d, expected a CUDA ordinal >= 0", device);
  auto* p = new (std::nothrow) twell_ffn_plan;
  if (p == nullptr) return fail(TWELL_ERROR_OUT_OF_MEMORY, "plan allocation failed");
  p->D = d_model;
  p->H = hidden;
  p->opt = *options;
  p->device = device;
  *plan = p;
  return ok();
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
  if (max_graphs < 0 || max_graphs > ReplayCache::kMaxGraphs) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "max_graphs is %d, expected 0 (off) .. %d", max_graphs,
                ReplayCache::kMaxGraphs);
  }
  plan->replay.set_capacity(max_graphs);
  return ok();
}

TWELL_API twell_status twell_ffn_plan_replay_counts(const twell_ffn_plan* plan, int64_t* replays, int64_t* captures) {
  if (plan == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "plan is NULL");
  if (replays != nullptr) *replays = plan->replay.replays();
  if (captures != nullptr) *captures = plan->replay.captures();
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
  MatSpec xs{"x", DType::kBF16};
  xs.cols = D;
  TRY(check_tensor(x, xs, &mx));
  const int64_t M = mx.rows;
  if (gated) {
    MatSpec gs{"w_gate", DType::kBF16};
    gs.rows = H;
    gs.cols = D;
    TRY(check_tensor(w_gate, gs, &mg));
  } else if (w_gate != nullptr) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "w_gate must be NULL for a non-gated plan");
  }
  MatSpec us{"w_up", DType::kBF16};
  us.rows = H;
  us.cols = D;
  TRY(check_tensor(w_up, us, &mu));
  MatSpec ds{dh ? "w_down (layout TWELL_LAYOUT_DH, [D, H])" : "w_down (layout TWELL_LAYOUT_HD, [H, D])", DType::kBF16};
  ds.rows = dh ? D : H;
  ds.cols = dh ? H : D;
  TRY(check_tensor(w_down, ds, &md));
  MatSpec ys{"y", DType::kBF16};
  ys.rows = M;
  ys.cols = D;
  TRY(check_tensor(y, ys, &my));
  TRY(check_stats(stats, &ms, false));
  const NamedMat ins[] = {{&mx, "x"}, {&mg, "w_gate"}, {&mu, "w_up"}, {&md, "w_down"}};
  const NamedMat outs[] = {{&my, "y"}, {&ms, "stats"}};
  TRY(check_call_tensors(plan->device, ins, 4, outs, 2));
  const FfnProblem prob = problem_of(plan, M);
  const FfnWorkspace wl = ffn_workspace(prob);
  TRY(check_buffer(workspace, workspace_bytes, wl.total, "workspace", TWELL_ERROR_WORKSPACE, "twell_ffn_workspace_size"));

  DeviceGuard guard;
  cudaError_t err = guard.enter(plan->device);
  if (err != cudaSuccess) return fail_cuda(err, "selecting the plan's device");
  auto s = static_cast<cudaStream_t>(stream);
  bool capturing = false;
  TRY(stream_capture_state(s, &capturing));
  TRY(capturing ? ensure_device_capture_safe(plan) : ensure_device(plan));
  const FfnProblem run_prob = problem_of(plan, M);  // now with the device's properties
  if (M == 0) {  // nothing to compute; the statistics still describe the call
    if (ms.ptr != nullptr && (err = stats_init(reinterpret_cast<u64*>(ms.ptr), 0, TWELL_PATH_SPARSE, s)) != cudaSuccess) {
      return fail_cuda(err, "stats init");
    }
    return ok();
  }
  FfnTensors t;
  t.x = reinterpret_cast<const bf16*>(mx.ptr);
  t.ldx = mx.ld;
  t.w_gate = reinterpret_cast<const bf16*>(mg.ptr);
  t.ldw_gate = mg.ld;
  t.w_up = reinterpret_cast<const bf16*>(mu.ptr);
  t.ldw_up = mu.ld;
  t.w_down = reinterpret_cast<const bf16*>(md.ptr);
  t.ldw_down = md.ld;
  t.y = reinterpret_cast<bf16*>(my.ptr);
  t.ldy = my.ld;
  t.stats = reinterpret_cast<u64*>(ms.ptr);
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
  for (const void* ptr : {static_cast<const void*>(t.x), static_cast<const void*>(t.w_gate),
                          static_cast<const void*>(t.w_up), static_cast<const void*>(t.w_down),
                          static_cast<const void*>(t.y), static_cast<const void*>(t.stats),
                          static_cast<const void*>(ws)}) {
    key.add_ptr(ptr);
  }
  for (int64_t ld : {t.ldx, t.ldw_gate, t.ldw_up, t.ldw_down, t.ldy}) key.add(static_cast<uint64_t>(ld));
  TRY(plan->replay.run(key, s, plan->side, [&](cudaStream_t on) {
    return path == TWELL_PATH_DENSE ? ffn_run_dense(run_prob, t, ws, on) : ffn_run_sparse(run_prob, t, ws, on);
  }));
  ++plan->calls;
  if (plan->opt.path == TWELL_PATH_AUTO && !plan->stats_pending && plan->calls - plan->last_copy_call >= kStatsEvery) {
    const u64* dev_stats = t.stats != nullptr ? t.stats : reinterpret_cast<const u64*>(ws + wl.stats);
    if ((err = cudaMemcpyAsync(plan->host_stats, dev_stats, TWELL_STATS_WORDS * sizeof(u64), cudaMemcpyDeviceToHost, s)) !=
            cudaSuccess ||
        (err = cudaEventRecord(plan->stats_ready, s)) != cudaSuccess) {
      return fail_cuda(err, "copying the statistics for TWELL_PATH_AUTO");
    }
    plan->stats_pending = true;
    plan->last_copy_call = plan->calls;
  }
  return ok();
}

TWELL_API twell_status twell_gate_pack(twell_ffn_plan* plan, const DLTensor* x, const DLTensor* w, DLTensor* packed,
                                       DLTensor* overflow_rows, DLTensor* stats, void* workspace, size_t workspace_bytes,
                                       void* stream) {
  if (plan == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "plan is NULL");
  const int64_t D = plan->D, H = plan->H;
  Mat mx, mw, mp, mr, ms;
  MatSpec xs{"x", DType::kBF16};
  xs.cols = D;
  TRY(check_tensor(x, xs, &mx));
  const int64_t M = mx.rows;
  MatSpec wsp{"w", DType::kBF16};
  wsp.rows = H;
  wsp.cols = D;
  TRY(check_tensor(w, wsp, &mw));
  MatSpec ps{"packed", DType::kU32};
  ps.rows = M;
  ps.cols = tiles_for(H) * plan->opt.slots;
  ps.compact = true;
  TRY(check_tensor(packed, ps, &mp));
  MatSpec rs{"overflow_rows", DType::kI32, 1};
  rs.cols = M;
  rs.vector_aligned = false;
  rs.compact = true;
  TRY(check_tensor(overflow_rows, rs, &mr));
  TRY(check_stats(stats, &ms, true));
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
  cudaError_t err = guard.enter(plan->device);
  if (err != cudaSuccess) return fail_cuda(err, "selecting the plan's device");
  bool capturing = false;
  TRY(stream_capture_state(static_cast<cudaStream_t>(stream), &capturing));
  TRY(capturing ? ensure_device_capture_safe(plan) : ensure_device(plan));
  if (M == 0) {
    err = stats_init(reinterpret_cast<u64*>(ms.ptr), 0, TWELL_PATH_SPARSE, static_cast<cudaStream_t>(stream));
    return err == cudaSuccess ? ok() : fail_cuda(err, "stats init");
  }
  TRY(gate_pack_run(problem_of(plan, M), reinterpret_cast<const bf16*>(mx.ptr), mx.ld, reinterpret_cast<const bf16*>(mw.ptr), mw.ld,
                    reinterpret_cast<uint32_t*>(mp.ptr), reinterpret_cast<int32_t*>(mr.ptr),
                    reinterpret_cast<u64*>(ms.ptr), static_cast<char*>(workspace), static_cast<cudaStream_t>(stream)));
  return ok();
}

}  // extern "C"
