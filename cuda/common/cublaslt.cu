#include <dlfcn.h>

#include <cstdio>

#include <cstdlib>
#include <map>
#include <string>
#include <mutex>
#include <tuple>

#include <cublasLt.h>

#include "common/errors.h"
#include "common/cublaslt.h"

namespace twell {
namespace {

// Column-major D = op(A) op(B) + beta D, the form cuBLASLt takes.
struct LtMatmul {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  void* c = nullptr;
  int64_t ldc = 0;
  bool c_is_f32 = false;
  float beta = 0.0f;
  bool avoid_workspace = false;
};

struct LtApi {
  decltype(&cublasLtCreate) create = nullptr;
  decltype(&cublasLtMatmulDescCreate) desc_create = nullptr;
  decltype(&cublasLtMatmulDescSetAttribute) desc_set = nullptr;
  decltype(&cublasLtMatrixLayoutCreate) layout_create = nullptr;
  decltype(&cublasLtMatmulPreferenceCreate) pref_create = nullptr;
  decltype(&cublasLtMatmulPreferenceSetAttribute) pref_set = nullptr;
  decltype(&cublasLtMatmulPreferenceDestroy) pref_destroy = nullptr;
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic = nullptr;
  decltype(&cublasLtMatmul) matmul = nullptr;
  char error[512] = "";
  bool ok = false;
};

template <typename F>
bool load_symbol(void* lib, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  return *out != nullptr;
}

const LtApi& api() {
  static LtApi a;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* env = std::getenv("TWELL_CUBLASLT_PATH");
    // Beside a wheel install: <site-packages>/twell/libtwell.so and the nvidia-cublas wheel's
    // <site-packages>/nvidia/cu13/lib/libcublasLt.so.13 (so C/C++ programs linked against the
    // wheel find it without a preload or LD_LIBRARY_PATH).
    std::string beside;
    Dl_info self{};
    if (dladdr(reinterpret_cast<void*>(&lt_gemm), &self) != 0 && self.dli_fname != nullptr) {
      std::string dir(self.dli_fname);
      const size_t slash = dir.rfind('/');
      if (slash != std::string::npos) beside = dir.substr(0, slash) + "/../nvidia/cu13/lib/libcublasLt.so.13";
    }
    const char* candidates[] = {env, "libcublasLt.so.13", beside.empty() ? nullptr : beside.c_str(), "libcublasLt.so"};
    void* lib = nullptr;
    for (const char* c : candidates) {
      if (c != nullptr && (lib = dlopen(c, RTLD_NOW | RTLD_GLOBAL)) != nullptr) break;
    }
    if (lib == nullptr) {
      snprintf(a.error, sizeof(a.error),
               "cuBLASLt (libcublasLt.so.13) could not be loaded: install it with `pip install nvidia-cublas==13.0.*` "
               "(the Python package preloads it) or set TWELL_CUBLASLT_PATH");
      return;
    }
    bool ok = load_symbol(lib, "cublasLtCreate", &a.create) &&
              load_symbol(lib, "cublasLtMatmulDescCreate", &a.desc_create) &&
              load_symbol(lib, "cublasLtMatmulDescSetAttribute", &a.desc_set) &&
              load_symbol(lib, "cublasLtMatrixLayoutCreate", &a.layout_create) &&
              load_symbol(lib, "cublasLtMatmulPreferenceCreate", &a.pref_create) &&
              load_symbol(lib, "cublasLtMatmulPreferenceSetAttribute", &a.pref_set) &&
              load_symbol(lib, "cublasLtMatmulPreferenceDestroy", &a.pref_destroy) &&
              load_symbol(lib, "cublasLtMatmulAlgoGetHeuristic", &a.heuristic) &&
              load_symbol(lib, "cublasLtMatmul", &a.matmul);
    if (!ok) {
      snprintf(a.error, sizeof(a.error), "libcublasLt was loaded but lacks a symbol twell needs (need cuBLAS 13)");
      return;
    }
    a.ok = true;
  });
  return a;
}

// Descriptors + chosen algorithm for one problem, made once (cuBLASLt
// descriptors are immutable once configured, so sharing them is safe).
struct Prepared {
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t la, lb, lc;
  cublasLtMatmulAlgo_t algo;
  size_t workspace_bytes;  // what the call hands cuBLASLt: 0 for a workspace-free choice
};

using Key = std::tuple<int, bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, size_t, bool>;

std::mutex g_mutex;
std::map<int, cublasLtHandle_t> g_handles;
std::map<Key, Prepared> g_prepared;

twell_status lt_fail(cublasStatus_t s, const char* what) {
  return fail(TWELL_ERROR_CUBLAS, "%s failed with cuBLAS status %d", what, static_cast<int>(s));
}

twell_status lt_matmul(const LtMatmul& g, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const LtApi& a = api();
  if (!a.ok) return fail(TWELL_ERROR_UNSUPPORTED, "%s", a.error);
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return fail_cuda(err, "cudaGetDevice");
  const Key key{device,     g.trans_a,       g.trans_b,        g.m, g.n, g.k, g.lda, g.ldb, g.ldc,
                g.c_is_f32, workspace_bytes, g.avoid_workspace};
  Prepared p;
  cublasLtHandle_t handle;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto h = g_handles.find(device);
    if (h == g_handles.end()) {
      cublasStatus_t s = a.create(&handle);
      if (s != CUBLAS_STATUS_SUCCESS) return lt_fail(s, "cublasLtCreate");
      g_handles[device] = handle;
    } else {
      handle = h->second;
    }
    auto it = g_prepared.find(key);
    if (it != g_prepared.end()) {
      p = it->second;
    } else {
      cublasStatus_t s = a.desc_create(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
      if (s != CUBLAS_STATUS_SUCCESS) return lt_fail(s, "cublasLtMatmulDescCreate");
      const cublasOperation_t ta = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
      const cublasOperation_t tb = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
      a.desc_set(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta));
      a.desc_set(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb));
      const cudaDataType ct = g.c_is_f32 ? CUDA_R_32F : CUDA_R_16BF;
      // Stored (column-major) shapes of A and B before op().
      const uint64_t a_rows = g.trans_a ? g.k : g.m, a_cols = g.trans_a ? g.m : g.k;
      const uint64_t b_rows = g.trans_b ? g.n : g.k, b_cols = g.trans_b ? g.k : g.n;
      if ((s = a.layout_create(&p.la, CUDA_R_16BF, a_rows, a_cols, g.lda)) != CUBLAS_STATUS_SUCCESS ||
          (s = a.layout_create(&p.lb, CUDA_R_16BF, b_rows, b_cols, g.ldb)) != CUBLAS_STATUS_SUCCESS ||
          (s = a.layout_create(&p.lc, ct, g.m, g.n, g.ldc)) != CUBLAS_STATUS_SUCCESS) {
        return lt_fail(s, "cublasLtMatrixLayoutCreate");
      }
      cublasLtMatmulPreference_t pref;
      if ((s = a.pref_create(&pref)) != CUBLAS_STATUS_SUCCESS) return lt_fail(s, "cublasLtMatmulPreferenceCreate");
      uint64_t cap = workspace_bytes;
      a.pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &cap, sizeof(cap));
      cublasLtMatmulHeuristicResult_t result;
      int found = 0;
      s = a.heuristic(handle, p.desc, p.la, p.lb, p.lc, p.lc, pref, 1, &result, &found);
      if (s != CUBLAS_STATUS_SUCCESS || found == 0) {
        a.pref_destroy(pref);
        return lt_fail(s, "cublasLtMatmulAlgoGetHeuristic");
      }
      if (g.avoid_workspace && result.workspaceSize > 0) {
        // The heuristic's first choice among the algorithms that need no workspace, if it has one.
        cap = 0;
        a.pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &cap, sizeof(cap));
        cublasLtMatmulHeuristicResult_t free_choice;
        if (a.heuristic(handle, p.desc, p.la, p.lb, p.lc, p.lc, pref, 1, &free_choice, &found) ==
                CUBLAS_STATUS_SUCCESS &&
            found > 0) {
          result = free_choice;
        }
      }
      a.pref_destroy(pref);
      p.algo = result.algo;
      // Given workspace, cuBLASLt may use (and zero) it even for an algorithm that needs none.
      p.workspace_bytes = g.avoid_workspace && result.workspaceSize == 0 ? 0 : workspace_bytes;
      g_prepared[key] = p;
    }
  }
  const float alpha = 1.0f, beta = g.beta;
  cublasStatus_t s = a.matmul(handle, p.desc, &alpha, g.a, p.la, g.b, p.lb, &beta, g.c, p.lc, g.c, p.lc, &p.algo,
                              workspace, p.workspace_bytes, stream);
  if (s != CUBLAS_STATUS_SUCCESS) return lt_fail(s, "cublasLtMatmul");
  return TWELL_SUCCESS;
}

}  // namespace

twell_status lt_gemm(const LtGemm& g, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  // A row-major matrix is the column-major view of its transpose, so
  // C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: B goes first.
  const LtMatmul cm{.trans_a = g.trans_b,
                    .trans_b = g.trans_a,
                    .m = g.n,
                    .n = g.m,
                    .k = g.k,
                    .a = g.b.ptr,
                    .lda = g.b.ld,
                    .b = g.a.ptr,
                    .ldb = g.a.ld,
                    .c = g.c.ptr,
                    .ldc = g.c.ld,
                    .c_is_f32 = g.c_is_f32,
                    .beta = g.beta,
                    .avoid_workspace = g.avoid_workspace};
  return lt_matmul(cm, workspace, workspace_bytes, stream);
}

twell_status lt_linear(const void* a, int64_t lda, const void* b, int64_t ldb, void* c, int64_t ldc, bool c_is_f32,
                       int64_t M, int64_t N, int64_t K, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const LtGemm g{.m = M,
                 .n = N,
                 .k = K,
                 .a = {static_cast<const bf16*>(a), lda},
                 .b = {static_cast<const bf16*>(b), ldb},
                 .trans_b = true,
                 .c = {c, ldc},
                 .c_is_f32 = c_is_f32};
  return lt_gemm(g, workspace, workspace_bytes, stream);
}

}  // namespace twell
