// Host time of twell's C ABI calls: how long the CPU spends inside
// twell_ffn_run (argument checks, path choice, every launch) per call, next
// to what the GPU spends on the same call and to the host cost of the CUDA
// primitives the call is made of.
//
// Host time is measured while a spinning kernel holds the stream, so every
// call only enqueues work and never waits for the GPU (no launch-queue back
// pressure): host_us = wall time of a burst of calls / calls. gpu_us is the
// CUDA-event time of back-to-back calls (throughput, host gaps included when
// the host is slower than the GPU; compare with bench_ffn for GPU time alone).
//
//   bench_host [--D 2048] [--H 5632] [--M 1,16,64,2048,16384] [--paths sparse,dense,auto]
//              [--layouts hd] [--calls 64] [--rounds 7] [--no-primitives]
//
// One JSON line per measurement on stdout:
//   {"bench": "host_time", "api": "c", "op": "ffn", "D", "H", "M", "path", "layout",
//    "host_us", "host_us_p10", "host_us_p90", "gpu_us", "ran_path", "replays", "replay_captures"}
//   {"bench": "host_time", "api": "c", "op": "ffn_graph", "D", "H", "M", "path", "layout", "host_us", "nodes",
//    "kernels", "memsets", "memcpys", "conditionals", "others", "kernel_names"}: the call captured into
//    a caller's graph, its top-level nodes, and one cudaGraphLaunch of it (--no-anatomy: skipped)
//   {"bench": "host_time", "api": "c", "op": "<primitive>", "host_us", ...} (cuda_graph_launch_<n>_kernels:
//    a straight-line graph of n empty kernels)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "twell/twell.h"

#include "../tests/cuda/harness.cuh"

#define TW(x)                                                                                              \
  do {                                                                                                     \
    twell_status s_ = (x);                                                                                 \
    if (s_ != TWELL_SUCCESS) {                                                                             \
      fprintf(stderr, "bench_host: %s failed: %s: %s\n", #x, twell_status_string(s_), twell_last_error()); \
      exit(1);                                                                                             \
    }                                                                                                      \
  } while (0)

namespace {

using Clock = std::chrono::steady_clock;

// Approximately N(0, 1) (sum of four uniforms, rescaled); never exactly zero in bulk.
__device__ float normal_of(uint64_t key) {
  float s = 0.f;
  for (int k = 0; k < 4; ++k) s += static_cast<float>(harness::splitmix64(key * 4 + k) >> 40) * (1.0f / 16777216.0f);
  return (s - 2.0f) * 1.7320508f;
}

// The synthetic inputs of docs/design.md: x N(0,1) with the last column 1; W_g N(0, 1/(D-1))
// with the last column `last` (a threshold that makes ~p of the neurons fire).
__global__ void fill_kernel(__nv_bfloat16* a, int64_t rows, int64_t cols, float scale, uint64_t key, int set_last,
                            float last) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % cols;
    const float v = (set_last && c == cols - 1) ? last : scale * normal_of(key * 0x100000001b3ull + i);
    a[i] = __float2bfloat16_rn(v);
  }
}

__global__ void empty_kernel(int* p) {
  if (p != nullptr && threadIdx.x == 1024) *p = 0;
}

struct HostTiming {
  double med = 0, p10 = 0, p90 = 0;
};

// Host microseconds per call of f(), in `rounds` bursts of `calls` calls each,
// with the stream held so that nothing waits for the GPU; `on_hold` runs
// after the hold is engaged and before the burst (untimed).
template <class F, class G = void (*)()>
HostTiming host_time(
    F&& f, int calls, int rounds, cudaStream_t s, harness::StreamHold& hold, bool held = true, G on_hold = [] {}) {
  std::vector<double> per_call;
  for (int r = 0; r < rounds; ++r) {
    if (held) hold.engage(s);
    on_hold();
    const auto t0 = Clock::now();
    for (int i = 0; i < calls; ++i) f();
    const auto t1 = Clock::now();
    if (held) hold.release();
    CUDA_CHECK(cudaStreamSynchronize(s));
    per_call.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / calls);
  }
  return {harness::quantile(per_call, 0.5), harness::quantile(per_call, 0.1), harness::quantile(per_call, 0.9)};
}

// A call captured into the caller's graph (global capture, as a PyTorch graph takes it): its
// nodes by type (and the kernel nodes' names where the runtime knows them), and the host time of
// one cudaGraphLaunch of it, so a replay's cost can be put down to its node count or not.
template <class F>
void graph_anatomy(F&& call, cudaStream_t s, harness::StreamHold& hold, int calls, int rounds, int64_t D, int64_t H,
                   int64_t M, const std::string& path, const std::string& layout) {
  cudaStream_t cs;
  CUDA_CHECK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
  cudaGraph_t g = nullptr;
  CUDA_CHECK(cudaStreamBeginCapture(cs, cudaStreamCaptureModeGlobal));
  call(cs);  // twell_ffn_run sees the capture and records into it
  CUDA_CHECK(cudaStreamEndCapture(cs, &g));
  size_t n = 0;
  CUDA_CHECK(cudaGraphGetNodes(g, nullptr, &n));
  std::vector<cudaGraphNode_t> nodes(n);
  CUDA_CHECK(cudaGraphGetNodes(g, nodes.data(), &n));
  int kernels = 0, memsets = 0, memcpys = 0, conditionals = 0, others = 0;
  std::string names;
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType t;
    CUDA_CHECK(cudaGraphNodeGetType(node, &t));
    if (t == cudaGraphNodeTypeKernel) {
      ++kernels;
      cudaKernelNodeParams kp = {};
      const char* fn = nullptr;
      if (cudaGraphKernelNodeGetParams(node, &kp) != cudaSuccess || kp.func == nullptr ||
          cudaFuncGetName(&fn, kp.func) != cudaSuccess || fn == nullptr) {
        (void)cudaGetLastError();
        fn = "?";
      }
      std::string name(fn);
      if (name.size() > 48) name.resize(48);
      names += (names.empty() ? "" : " ") + name;
    } else if (t == cudaGraphNodeTypeMemset) {
      ++memsets;
    } else if (t == cudaGraphNodeTypeMemcpy) {
      ++memcpys;
    } else if (t == cudaGraphNodeTypeConditional) {
      ++conditionals;
    } else {
      ++others;
    }
  }
  cudaGraphExec_t ge = nullptr;
  CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
  CUDA_CHECK(cudaGraphUpload(ge, s));
  const HostTiming ht = host_time([&] { CUDA_CHECK(cudaGraphLaunch(ge, s)); }, M >= 8192 ? 16 : calls, rounds, s, hold);
  printf(
      "{\"bench\": \"host_time\", \"api\": \"c\", \"op\": \"ffn_graph\", \"D\": %lld, \"H\": %lld, \"M\": %lld, "
      "\"path\": \"%s\", \"layout\": \"%s\", \"host_us\": %.3f, \"host_us_p10\": %.3f, \"host_us_p90\": %.3f, "
      "\"nodes\": %zu, \"kernels\": %d, \"memsets\": %d, \"memcpys\": %d, \"conditionals\": %d, \"others\": %d, "
      "\"kernel_names\": \"%s\"}\n",
      (long long)D, (long long)H, (long long)M, path.c_str(), layout.c_str(), ht.med, ht.p10, ht.p90, n, kernels,
      memsets, memcpys, conditionals, others, names.c_str());
  fflush(stdout);
  CUDA_CHECK(cudaGraphExecDestroy(ge));
  CUDA_CHECK(cudaGraphDestroy(g));
  CUDA_CHECK(cudaStreamDestroy(cs));
}

std::vector<int64_t> parse_list(const char* s) {
  std::vector<int64_t> v;
  for (const char* p = s; *p;) {
    v.push_back(std::strtoll(p, nullptr, 10));
    const char* c = std::strchr(p, ',');
    if (c == nullptr) break;
    p = c + 1;
  }
  return v;
}

std::vector<std::string> parse_words(const char* s) {
  std::vector<std::string> v;
  std::string cur;
  for (const char* p = s;; ++p) {
    if (*p == ',' || *p == '\0') {
      if (!cur.empty()) v.push_back(cur);
      cur.clear();
      if (*p == '\0') break;
    } else {
      cur += *p;
    }
  }
  return v;
}

struct Tensor2 {
  int64_t shape[2] = {0, 0};
  DLTensor dl{};
  void set(void* data, int64_t rows, int64_t cols, uint8_t code, uint8_t bits) {
    shape[0] = rows;
    shape[1] = cols;
    dl.data = data;
    dl.device = {kDLCUDA, 0};
    dl.ndim = 2;
    dl.dtype = {code, bits, 1};
    dl.shape = shape;
    dl.strides = nullptr;
    dl.byte_offset = 0;
  }
};

}  // namespace

int main(int argc, char** argv) {
  harness::fatal_handler = [](const char* message) {
    fprintf(stderr, "bench_host: %s\n", message);
    exit(3);
  };
  int64_t D = 2048, H = 5632;
  std::vector<int64_t> Ms = {1, 16, 64, 2048, 16384};
  std::vector<std::string> paths = {"sparse", "dense", "auto"}, layouts = {"hd"};
  int calls = 64, rounds = 7;
  bool primitives = true, anatomy = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&]() -> const char* {
      if (i + 1 >= argc) {
        fprintf(stderr, "bench_host: %s needs a value\n", a.c_str());
        exit(64);
      }
      return argv[++i];
    };
    if (a == "--D") D = std::strtoll(val(), nullptr, 10);
    else if (a == "--H") H = std::strtoll(val(), nullptr, 10);
    else if (a == "--M") Ms = parse_list(val());
    else if (a == "--paths") paths = parse_words(val());
    else if (a == "--layouts") layouts = parse_words(val());
    else if (a == "--calls") calls = static_cast<int>(std::strtol(val(), nullptr, 10));
    else if (a == "--rounds") rounds = static_cast<int>(std::strtol(val(), nullptr, 10));
    else if (a == "--no-primitives") primitives = false;
    else if (a == "--no-anatomy") anatomy = false;
    else {
      fprintf(stderr,
              "usage: bench_host [--D N] [--H N] [--M list] [--paths sparse,dense,auto] [--layouts hd,dh] "
              "[--calls N] [--rounds N] [--no-primitives] [--no-anatomy]\n");
      return a == "--help" ? 0 : 64;
    }
  }
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    fprintf(stderr, "bench_host: no CUDA device\n");
    return 2;
  }
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  fprintf(stderr, "# bench_host on %s, D=%lld H=%lld, %d calls x %d rounds\n", prop.name, (long long)D, (long long)H,
          calls, rounds);
  cudaStream_t s;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  harness::StreamHold hold;

  if (primitives) {
    int* dummy = nullptr;
    CUDA_CHECK(cudaMalloc(&dummy, 1 << 20));
    void* pinned = nullptr;
    CUDA_CHECK(cudaHostAlloc(&pinned, 4096, cudaHostAllocDefault));
    cudaEvent_t ev;
    CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    struct Prim {
      const char* name;
      bool held;
    };
    auto emit = [&](const char* name, const HostTiming& t) {
      printf(
          "{\"bench\": \"host_time\", \"api\": \"c\", \"op\": \"%s\", \"host_us\": %.3f, \"host_us_p10\": %.3f, "
          "\"host_us_p90\": %.3f}\n",
          name, t.med, t.p10, t.p90);
      fflush(stdout);
    };
    emit("cuda_launch", host_time([&] { empty_kernel<<<1, 32, 0, s>>>(dummy); }, calls, rounds, s, hold));
    emit("cuda_launch_ex_pdl", host_time(
                                   [&] {
                                     cudaLaunchConfig_t cfg = {};
                                     cfg.gridDim = dim3(1);
                                     cfg.blockDim = dim3(32);
                                     cfg.stream = s;
                                     cudaLaunchAttribute at[1];
                                     at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
                                     at[0].val.programmaticStreamSerializationAllowed = 1;
                                     cfg.attrs = at;
                                     cfg.numAttrs = 1;
                                     cudaLaunchKernelEx(&cfg, empty_kernel, dummy);
                                   },
                                   calls, rounds, s, hold));
    emit("cuda_memcpy_d2h_64B_plus_event_record", host_time(
                                                      [&] {
                                                        cudaMemcpyAsync(pinned, dummy, 64, cudaMemcpyDeviceToHost, s);
                                                        cudaEventRecord(ev, s);
                                                      },
                                                      calls, rounds, s, hold));
    emit("cuda_memset_64B", host_time([&] { cudaMemsetAsync(dummy, 0, 64, s); }, calls, rounds, s, hold));
    emit("cuda_event_query", host_time(
                                 [&] {
                                   (void)cudaEventQuery(ev);
                                   (void)cudaGetLastError();
                                 },
                                 calls, rounds, s, hold, false));
    // The same query on an event still pending behind the held stream (what an eager AUTO call
    // meets while the GPU is behind the host).
    emit("cuda_event_query_pending", host_time(
                                         [&] {
                                           (void)cudaEventQuery(ev);
                                           (void)cudaGetLastError();
                                         },
                                         calls, rounds, s, hold, true, [&] { CUDA_CHECK(cudaEventRecord(ev, s)); }));
    emit("cuda_func_set_attribute",
         host_time([&] { cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 1024); },
                   calls, rounds, s, hold, false));
    emit("cuda_occupancy_query", host_time(
                                     [&] {
                                       int b = 0;
                                       cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, empty_kernel, 256, 0);
                                     },
                                     calls, rounds, s, hold, false));
    emit("cuda_device_attribute", host_time(
                                      [&] {
                                        int v = 0;
                                        cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, 0);
                                      },
                                      calls, rounds, s, hold, false));
    emit("cuda_stream_is_capturing", host_time(
                                         [&] {
                                           cudaStreamCaptureStatus st;
                                           cudaStreamIsCapturing(s, &st);
                                         },
                                         calls, rounds, s, hold, false));
    // cudaGraphLaunch of a straight-line graph of n empty kernels: how a replay's host cost grows
    // with its node count (a call's graph is measured below, per path and M).
    for (int nodes : {1, 4, 16, 32}) {
      cudaStream_t cs;
      CUDA_CHECK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
      cudaGraph_t g = nullptr;
      CUDA_CHECK(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal));
      for (int k = 0; k < nodes; ++k) empty_kernel<<<1, 32, 0, cs>>>(dummy);
      CUDA_CHECK(cudaStreamEndCapture(cs, &g));
      cudaGraphExec_t ge = nullptr;
      CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
      CUDA_CHECK(cudaGraphUpload(ge, s));
      const std::string name = "cuda_graph_launch_" + std::to_string(nodes) + "_kernels";
      emit(name.c_str(), host_time([&] { CUDA_CHECK(cudaGraphLaunch(ge, s)); }, calls, rounds, s, hold));
      CUDA_CHECK(cudaGraphExecDestroy(ge));
      CUDA_CHECK(cudaGraphDestroy(g));
      CUDA_CHECK(cudaStreamDestroy(cs));
    }
    CUDA_CHECK(cudaFree(dummy));
  }

  const int64_t maxM = *std::max_element(Ms.begin(), Ms.end());
  __nv_bfloat16 *x, *wg, *wu, *wd, *wdt, *y;
  CUDA_CHECK(cudaMalloc(&x, maxM * D * 2));
  CUDA_CHECK(cudaMalloc(&y, maxM * D * 2));
  CUDA_CHECK(cudaMalloc(&wg, H * D * 2));
  CUDA_CHECK(cudaMalloc(&wu, H * D * 2));
  CUDA_CHECK(cudaMalloc(&wd, H * D * 2));
  CUDA_CHECK(cudaMalloc(&wdt, H * D * 2));
  uint64_t* stats;
  CUDA_CHECK(cudaMalloc(&stats, 8 * sizeof(uint64_t)));
  fill_kernel<<<1024, 256, 0, s>>>(x, maxM, D, 1.0f, 1, 1, 1.0f);
  fill_kernel<<<1024, 256, 0, s>>>(wg, H, D, 1.0f / std::sqrt(float(D - 1)), 2, 1, -2.5758f);  // p = 0.5%
  fill_kernel<<<1024, 256, 0, s>>>(wu, H, D, 1.0f / std::sqrt(float(D)), 3, 0, 0.f);
  fill_kernel<<<1024, 256, 0, s>>>(wd, H, D, 1.0f / std::sqrt(float(H)), 4, 0, 0.f);
  fill_kernel<<<1024, 256, 0, s>>>(wdt, D, H, 1.0f / std::sqrt(float(H)), 5, 0, 0.f);
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cudaStreamSynchronize(s));

  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  for (const std::string& layout : layouts) {
    for (const std::string& path : paths) {
      twell_ffn_options opt;
      TW(twell_ffn_options_default(&opt));
      opt.path = path == "sparse" ? TWELL_PATH_SPARSE : path == "dense" ? TWELL_PATH_DENSE : TWELL_PATH_AUTO;
      opt.w_down_layout = layout == "dh" ? TWELL_LAYOUT_DH : TWELL_LAYOUT_HD;
      twell_ffn_plan* plan = nullptr;
      TW(twell_ffn_plan_create(&plan, D, H, &opt, 0));
      for (int64_t M : Ms) {
        size_t ws_bytes = 0;
        TW(twell_ffn_workspace_size(plan, M, &ws_bytes));
        void* ws = nullptr;
        CUDA_CHECK(cudaMalloc(&ws, ws_bytes));
        Tensor2 tx, tg, tu, td, ty, ts;
        tx.set(x, M, D, kDLBfloat, 16);
        tg.set(wg, H, D, kDLBfloat, 16);
        tu.set(wu, H, D, kDLBfloat, 16);
        if (layout == "dh") td.set(wdt, D, H, kDLBfloat, 16);
        else td.set(wd, H, D, kDLBfloat, 16);
        ty.set(y, M, D, kDLBfloat, 16);
        ts.set(stats, 8, 1, kDLUInt, 64);
        ts.dl.ndim = 1;
        auto call_on = [&](cudaStream_t on) {
          TW(twell_ffn_run(plan, &tx.dl, &tg.dl, &tu.dl, &td.dl, &ty.dl, &ts.dl, ws, ws_bytes, on));
        };
        auto call = [&] { call_on(s); };
        for (int w = 0; w < 20; ++w) call();  // warm-up (AUTO settles, caches fill)
        CUDA_CHECK(cudaStreamSynchronize(s));
        // Host time: bursts behind the held stream (fewer calls at large M: the queue holds them all).
        const int c = M >= 8192 ? std::min(calls, 16) : calls;
        const HostTiming ht = host_time(call, c, rounds, s, hold);
        // GPU time per call: back-to-back calls between two events.
        const int reps = M >= 8192 ? 20 : 100;
        CUDA_CHECK(cudaEventRecord(e0, s));
        for (int r = 0; r < reps; ++r) call();
        CUDA_CHECK(cudaEventRecord(e1, s));
        CUDA_CHECK(cudaEventSynchronize(e1));
        float ms = 0;
        CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        uint64_t hs[8];
        CUDA_CHECK(cudaMemcpy(hs, stats, sizeof(hs), cudaMemcpyDeviceToHost));
        const char* ran = hs[TWELL_STAT_PATH] == TWELL_PATH_DENSE ? "dense" : "sparse";
        int64_t replays = 0, captures = 0;  // cumulative for the plan: whether the timed calls replayed
        TW(twell_ffn_plan_replay_counts(plan, &replays, &captures));
        printf(
            "{\"bench\": \"host_time\", \"api\": \"c\", \"op\": \"ffn\", \"D\": %lld, \"H\": %lld, \"M\": %lld, "
            "\"path\": \"%s\", \"layout\": \"%s\", \"ran_path\": \"%s\", \"host_us\": %.3f, \"host_us_p10\": %.3f, "
            "\"host_us_p90\": %.3f, \"gpu_us\": %.3f, \"replays\": %lld, \"replay_captures\": %lld}\n",
            (long long)D, (long long)H, (long long)M, path.c_str(), layout.c_str(), ran, ht.med, ht.p10, ht.p90,
            1000.0 * ms / reps, (long long)replays, (long long)captures);
        fflush(stdout);
        if (anatomy) graph_anatomy(call_on, s, hold, calls, rounds, D, H, M, path, layout);
        CUDA_CHECK(cudaFree(ws));
      }
      TW(twell_ffn_plan_destroy(plan));
    }
  }
  return 0;
}
