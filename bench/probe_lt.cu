// probe_lt: the cuBLASLt algorithms the dense path could use, one by one: for each GEMM of a
// dense FFN chunk (gate / up: x W^T; down: h W_d with W_d as [H, D] or [D, H]) and each
// workspace cap, the heuristic's first results with their workspace, GPU time, and what one call
// puts into a CUDA graph (kernel and memset nodes) with the host time of launching that graph.
// Question it answers: can the dense path drop the memset nodes (1.3 µs of host time each per
// graph launch, 2026-12-03e) without losing GPU time?
//
//   probe_lt [--D 2048] [--H 5632] [--M 64,2048,4096] [--algos 8]
//
// One JSON line per (GEMM, M, cap, workspace handed over, rank):
//   {"bench": "lt_algo", "gemm", "M", "N", "K", "ws_cap", "run_ws" (the workspace handed to the call),
//    "rank", "ws_bytes", "waves", "gpu_us", "kernels", "memsets", "graph_launch_us"}
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "../tests/cuda/harness.cuh"

#define LT_CHECK(x)                                                                      \
  do {                                                                                   \
    cublasStatus_t s_ = (x);                                                             \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                   \
      fprintf(stderr, "probe_lt: %s failed with status %d\n", #x, static_cast<int>(s_)); \
      exit(1);                                                                           \
    }                                                                                    \
  } while (0)

namespace {

using Clock = std::chrono::steady_clock;

__global__ void fill(__nv_bfloat16* a, int64_t n, uint64_t key) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    a[i] = __float2bfloat16_rn(static_cast<float>(harness::splitmix64(key + i) >> 40) * (1.0f / 16777216.0f) - 0.5f);
}

// Row-major C[M, N] = A[M, K] op(B), B [N, K] (trans) or [K, N]: column-major C^T = op(B)^T A^T.
struct Problem {
  const char* name;
  int64_t M, N, K;
  bool b_trans;
};

struct Lt {
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t la, lb, lc;
};

Lt make(const Problem& p) {
  Lt l;
  LT_CHECK(cublasLtMatmulDescCreate(&l.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = p.b_trans ? CUBLAS_OP_T : CUBLAS_OP_N, tb = CUBLAS_OP_N;
  LT_CHECK(cublasLtMatmulDescSetAttribute(l.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  LT_CHECK(cublasLtMatmulDescSetAttribute(l.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  // column-major A' = op(B)^T: stored [K, N] (ld K) when B is [N, K] row-major, else [N, K] (ld N).
  if (p.b_trans) {
    LT_CHECK(cublasLtMatrixLayoutCreate(&l.la, CUDA_R_16BF, p.K, p.N, p.K));
  } else {
    LT_CHECK(cublasLtMatrixLayoutCreate(&l.la, CUDA_R_16BF, p.N, p.K, p.N));
  }
  LT_CHECK(cublasLtMatrixLayoutCreate(&l.lb, CUDA_R_16BF, p.K, p.M, p.K));
  LT_CHECK(cublasLtMatrixLayoutCreate(&l.lc, CUDA_R_16BF, p.N, p.M, p.N));
  return l;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t D = 2048, H = 5632;
  std::vector<int64_t> Ms{64, 2048, 4096};
  int n_algos = 8;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : "";
    if (a == "--D") D = atoll(v), ++i;
    else if (a == "--H") H = atoll(v), ++i;
    else if (a == "--algos") n_algos = atoi(v), ++i;
    else if (a == "--M") {
      Ms.clear();
      for (const char* s = v; *s;) {
        Ms.push_back(strtoll(s, const_cast<char**>(&s), 10));
        if (*s == ',') ++s;
      }
      ++i;
    } else {
      fprintf(stderr, "usage: probe_lt [--D 2048] [--H 5632] [--M 64,2048,4096] [--algos 8]\n");
      return 2;
    }
  }
  const int64_t Mmax = *std::max_element(Ms.begin(), Ms.end());
  const size_t kWs = size_t(32) << 20;
  __nv_bfloat16 *A, *B, *C;
  void* ws;
  const int64_t big = std::max(Mmax, H) * std::max(D, H);
  CUDA_CHECK(cudaMalloc(&A, big * 2));
  CUDA_CHECK(cudaMalloc(&B, big * 2));
  CUDA_CHECK(cudaMalloc(&C, big * 2));
  CUDA_CHECK(cudaMalloc(&ws, kWs));
  fill<<<1024, 256>>>(A, big, 1);
  fill<<<1024, 256>>>(B, big, 2);
  cudaStream_t s;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cublasLtHandle_t h;
  LT_CHECK(cublasLtCreate(&h));
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));

  for (int64_t M : Ms) {
    const Problem probs[] = {{"gate", M, H, D, true}, {"down_hd", M, D, H, false}, {"down_dh", M, D, H, true}};
    for (const Problem& p : probs) {
      const Lt l = make(p);
      // (heuristic cap, workspace handed to the call): does a workspace-free choice stay
      // memset-free when the call is given workspace anyway?
      for (const std::pair<size_t, size_t> caps : {std::pair<size_t, size_t>{kWs, kWs}, {0, 0}, {0, kWs}}) {
        const size_t cap = caps.first, run_ws = caps.second;
        cublasLtMatmulPreference_t pref;
        LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
        uint64_t c64 = cap;
        LT_CHECK(
            cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &c64, sizeof(c64)));
        std::vector<cublasLtMatmulHeuristicResult_t> res(n_algos);
        int found = 0;
        LT_CHECK(cublasLtMatmulAlgoGetHeuristic(h, l.desc, l.la, l.lb, l.lc, l.lc, pref, n_algos, res.data(), &found));
        cublasLtMatmulPreferenceDestroy(pref);
        for (int r = 0; r < found; ++r) {
          const float one = 1.f, zero = 0.f;
          auto call = [&](cudaStream_t st) {
            return cublasLtMatmul(h, l.desc, &one, B, l.la, A, l.lb, &zero, C, l.lc, C, l.lc, &res[r].algo, ws, run_ws,
                                  st);
          };
          if (call(s) != CUBLAS_STATUS_SUCCESS) continue;
          const int reps = M >= 2048 ? 20 : 100;
          std::vector<double> t;
          for (int k = 0; k < 5; ++k) {
            CUDA_CHECK(cudaEventRecord(e0, s));
            for (int i = 0; i < reps; ++i) call(s);
            CUDA_CHECK(cudaEventRecord(e1, s));
            CUDA_CHECK(cudaEventSynchronize(e1));
            float ms = 0;
            CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
            t.push_back(ms * 1000.0 / reps);
          }
          // One call captured: its nodes, and the host time of launching the graph.
          cudaGraph_t g;
          CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
          call(s);
          CUDA_CHECK(cudaStreamEndCapture(s, &g));
          size_t n = 0;
          CUDA_CHECK(cudaGraphGetNodes(g, nullptr, &n));
          std::vector<cudaGraphNode_t> nodes(n);
          CUDA_CHECK(cudaGraphGetNodes(g, nodes.data(), &n));
          int kernels = 0, memsets = 0;
          for (cudaGraphNode_t node : nodes) {
            cudaGraphNodeType ty;
            CUDA_CHECK(cudaGraphNodeGetType(node, &ty));
            kernels += ty == cudaGraphNodeTypeKernel;
            memsets += ty == cudaGraphNodeTypeMemset;
          }
          cudaGraphExec_t ge;
          CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
          CUDA_CHECK(cudaGraphUpload(ge, s));
          std::vector<double> hl;
          for (int k = 0; k < 7; ++k) {
            CUDA_CHECK(cudaStreamSynchronize(s));
            const auto t0 = Clock::now();
            for (int i = 0; i < 8; ++i) CUDA_CHECK(cudaGraphLaunch(ge, s));
            hl.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / 8);
          }
          CUDA_CHECK(cudaStreamSynchronize(s));
          CUDA_CHECK(cudaGraphExecDestroy(ge));
          CUDA_CHECK(cudaGraphDestroy(g));
          printf(
              "{\"bench\": \"lt_algo\", \"gemm\": \"%s\", \"M\": %lld, \"N\": %lld, \"K\": %lld, \"ws_cap\": %zu, "
              "\"run_ws\": %zu, "
              "\"rank\": %d, \"ws_bytes\": %zu, \"waves\": %.3f, \"gpu_us\": %.2f, \"kernels\": %d, \"memsets\": %d, "
              "\"graph_launch_us\": %.2f}\n",
              p.name, (long long)p.M, (long long)p.N, (long long)p.K, cap, run_ws, r, res[r].workspaceSize,
              res[r].wavesCount, harness::quantile(t, 0.5), kernels, memsets, harness::quantile(hl, 0.5));
          fflush(stdout);
        }
      }
    }
  }
  return 0;
}
