// bench_ffn: twell's sparse FFN against a dense cuBLASLt FFN, in one process.
//
// This program is also an example of the public C API: of twell it includes
// only <twell/twell.h> (plus CUDA, cuBLASLt and the test programs' harness,
// tests/cuda/harness.cuh, for checks and timing), builds DLTensor descriptors
// by hand over cudaMalloc'd buffers, makes plans, sizes and owns the
// workspace, and reads the device-side statistics after the timed runs.
//
//   bench_ffn --suite quick
//   bench_ffn --D 2048 --H 5632 --M 1,64,65536 --pattern uniform --p 0.005
//             --slots 32 --kernels auto,portable --benches ffn_sparse,ffn_auto --reps 50
//   bench_ffn --help
//
// Output: one JSON object per line on stdout (machine-readable), a table on
// stderr. Exit status: 0 all good; 1 some twell call failed or a relative
// error was over --tol (the other configurations still ran); 2 no GPU;
// 3 a fatal CUDA/cuBLAS error (the CUDA context is unusable).
// Methodology and field meanings: bench/README.md.

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#include <twell/twell.h>

#include "../tests/cuda/harness.cuh"

typedef __nv_bfloat16 bf16;

// ---------------------------------------------------------------------------
// Error handling. CUDA and cuBLAS errors outside twell are fatal (exit 3):
// after one the numbers mean nothing (the harness's CUDA_CHECK / CUBLAS_CHECK
// end here through harness::fatal_handler). A failing twell call is reported
// as a record with an "error" field and the next configuration runs, unless
// the failure left the CUDA context broken.
// ---------------------------------------------------------------------------
static std::string g_doing = "start-up";  // named in fatal messages

static void fatal(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "bench_ffn: FATAL while %s: ", g_doing.c_str());
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  fflush(stdout);
  exit(3);
}

// A twell status as a message ("" on success).
static std::string twell_msg(const char* call, twell_status s) {
  if (s == TWELL_SUCCESS) return "";
  return std::string(call) + ": " + twell_status_string(s) + ": " + twell_last_error();
}

// ---------------------------------------------------------------------------
// Counter-based RNG: value i of tensor `key` depends only on (seed, key, i),
// so inputs are reproducible for any launch shape and need no cuRAND.
// ---------------------------------------------------------------------------
using harness::grid_for;
using harness::splitmix64;

// Standard normal by Box-Muller on two 24-bit uniforms.
__device__ inline float normal01(uint64_t key, uint64_t i) {
  const uint64_t a = splitmix64(key ^ splitmix64(2 * i));
  const uint64_t b = splitmix64(key ^ splitmix64(2 * i + 1));
  const float u1 = static_cast<float>((a >> 40) + 1) * (1.0f / 16777216.0f);  // (0, 1]
  const float u2 = static_cast<float>(b >> 40) * (1.0f / 16777216.0f);        // [0, 1)
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

static uint64_t tensor_key(uint64_t seed, int set, int tensor) {
  return splitmix64(seed * 0x100000001B3ull + static_cast<uint64_t>(set) * 64 + tensor);
}

// x [M, D]: N(0,1), last column 1. skew: every token's row (but its last
// column) scaled by exp(0.35 z), z ~ N(0,1) per token.
__global__ void fill_x_kernel(bf16* x, int64_t M, int64_t D, uint64_t key, uint64_t row_key, int skew) {
  const int64_t n = M * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / D, col = i - row * D;
    float v = 1.0f;
    if (col != D - 1) {
      v = normal01(key, static_cast<uint64_t>(i));
      if (skew) v *= expf(0.35f * normal01(row_key, static_cast<uint64_t>(row)));
    }
    x[i] = __float2bfloat16_rn(v);
  }
}

// W [rows, cols]: N(0, std^2). If set_last: the last column is a per-row
// threshold: row_thr[row] when given, else thr, or thr_hot for the n_hot rows
// k * hot_stride (k < n_hot).
__global__ void fill_w_kernel(bf16* w, int64_t rows, int64_t cols, float stddev, uint64_t key, int set_last, float thr,
                              int64_t hot_stride, int64_t n_hot, float thr_hot, const float* row_thr) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / cols, col = i - row * cols;
    float v;
    if (set_last && col == cols - 1) {
      const bool hot = n_hot > 0 && row % hot_stride == 0 && row / hot_stride < n_hot;
      v = row_thr != nullptr ? row_thr[row] : (hot ? thr_hot : thr);
    } else {
      v = stddev * normal01(key, static_cast<uint64_t>(i));
    }
    w[i] = __float2bfloat16_rn(v);
  }
}

// h = bf16(relu(g) * u), 8 bf16 per thread (H is a multiple of 8).
__global__ void relu_mul_kernel(const bf16* g, const bf16* u, bf16* h, int64_t n8) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n8; i += int64_t(gridDim.x) * blockDim.x) {
    const uint4 gv = reinterpret_cast<const uint4*>(g)[i];
    const uint4 uv = reinterpret_cast<const uint4*>(u)[i];
    uint4 hv;
    const __nv_bfloat162* gp = reinterpret_cast<const __nv_bfloat162*>(&gv);
    const __nv_bfloat162* up = reinterpret_cast<const __nv_bfloat162*>(&uv);
    __nv_bfloat162* hp = reinterpret_cast<__nv_bfloat162*>(&hv);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 gf = __bfloat1622float2(gp[k]);
      const float2 uf = __bfloat1622float2(up[k]);
      hp[k] = __floats2bfloat162_rn(fmaxf(gf.x, 0.0f) * uf.x, fmaxf(gf.y, 0.0f) * uf.y);
    }
    reinterpret_cast<uint4*>(h)[i] = hv;
  }
}

// Partial sums (fp64) of (a - f(b))^2 and f(b)^2, one pair per block; f = relu
// if relu_b. The host adds the partials in a fixed order (deterministic).
__global__ void relerr_kernel(const bf16* a, const bf16* b, int64_t n, int relu_b, double* partials) {
  double d2 = 0.0, r2 = 0.0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const double av = __bfloat162float(a[i]);
    double bv = __bfloat162float(b[i]);
    if (relu_b && !(bv > 0.0)) bv = 0.0;
    d2 += (av - bv) * (av - bv);
    r2 += bv * bv;
  }
  __shared__ double s[2][256];
  s[0][threadIdx.x] = d2;
  s[1][threadIdx.x] = r2;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      s[0][threadIdx.x] += s[0][threadIdx.x + w];
      s[1][threadIdx.x] += s[1][threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = s[0][0];
    partials[2 * blockIdx.x + 1] = s[1][0];
  }
}

// Which neurons fire for at least one token (g > 0), and how many entries are > 0.
__global__ void active_kernel(const bf16* g, int64_t M, int64_t H, uint8_t* col_active,
                              unsigned long long* partial_count) {
  unsigned long long c = 0;
  const int64_t n = M * H;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (__bfloat162float(g[i]) > 0.0f) {
      ++c;
      col_active[i % H] = 1;  // same value from every writer: no race on the result
    }
  }
  __shared__ unsigned long long s[256];
  s[threadIdx.x] = c;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial_count[blockIdx.x] = s[0];
}

// ---------------------------------------------------------------------------
// Host helpers
// ---------------------------------------------------------------------------
static double norm_ppf(double p) {  // inverse standard normal CDF (Acklam + one Halley step)
  static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02,  -2.759285104469687e+02,
                             1.383577518672690e+02,  -3.066479806614716e+01, 2.506628277459239e+00};
  static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                             6.680131188771972e+01, -1.328068155288572e+01};
  static const double c[] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                             -2.549732539343734e+00, 4.374664141464968e+00,  2.938163982698783e+00};
  static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                             3.754408661907416e+00};
  double x;
  if (p < 0.02425) {
    const double q = sqrt(-2 * log(p));
    x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  } else if (p > 1 - 0.02425) {
    const double q = sqrt(-2 * log(1 - p));
    x = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  } else {
    const double q = p - 0.5, r = q * q;
    x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
  }
  const double e = 0.5 * erfc(-x / sqrt(2.0)) - p;
  const double u = e * sqrt(2 * M_PI) * exp(x * x / 2);
  return x - u / (1 + x * u / 2);
}

// The "trained" pattern (python/twell/patterns.py, the same definition): 10% of
// the H neurons live at shuffled positions, live neuron k firing with
// p_k = min(0.65, c k^-1.2), c set for 12 active per token on average (or as
// many as 0.65 per live neuron allows); the others never fire (threshold -30).
static std::vector<float> trained_thresholds(int64_t H, uint64_t seed) {
  const int64_t n = std::max<int64_t>(1, static_cast<int64_t>(std::llround(0.1 * static_cast<double>(H))));
  const double target = std::min(12.0, 0.65 * static_cast<double>(n));
  auto total = [&](double c) {
    double t = 0;
    for (int64_t k = 1; k <= n; ++k) t += std::min(0.65, c * std::pow(static_cast<double>(k), -1.2));
    return t;
  };
  double lo = 0, hi = 1;
  while (total(hi) < target && hi < 1e12) hi *= 2;
  for (int i = 0; i < 200; ++i) {
    const double mid = 0.5 * (lo + hi);
    (total(mid) < target ? lo : hi) = mid;
  }
  std::vector<int64_t> pos(static_cast<size_t>(H));
  for (int64_t j = 0; j < H; ++j) pos[static_cast<size_t>(j)] = j;
  uint64_t state = seed ^ 0x7472616e6564ull;  // Fisher-Yates with splitmix64
  for (int64_t j = H - 1; j > 0; --j) {
    state = splitmix64(state);
    std::swap(pos[static_cast<size_t>(j)], pos[static_cast<size_t>(state % static_cast<uint64_t>(j + 1))]);
  }
  std::vector<float> thr(static_cast<size_t>(H), -30.0f);
  for (int64_t k = 1; k <= n; ++k) {
    const double p = std::min(0.65, hi * std::pow(static_cast<double>(k), -1.2));
    thr[static_cast<size_t>(pos[static_cast<size_t>(k - 1)])] = static_cast<float>(norm_ppf(p));
  }
  return thr;
}

template <class T>
static T* dalloc(size_t count) {
  void* p = nullptr;
  CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(count * sizeof(T), 256)));
  return static_cast<T*>(p);
}

static void dfree(void* p) {
  if (p != nullptr) CUDA_CHECK(cudaFree(p));
}

// A DLTensor over a device buffer; owns its shape array (so it must not be copied).
struct Tensor {
  int64_t shape[2] = {0, 0};
  DLTensor dl;
  Tensor() { memset(&dl, 0, sizeof(dl)); }
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  void set(void* data, DLDataTypeCode code, int bits, int64_t rows, int64_t cols, int device, int ndim = 2) {
    shape[0] = ndim == 2 ? rows : cols;
    shape[1] = cols;
    dl.data = data;
    dl.device.device_type = kDLCUDA;
    dl.device.device_id = device;
    dl.ndim = ndim;
    dl.dtype.code = static_cast<uint8_t>(code);
    dl.dtype.bits = static_cast<uint8_t>(bits);
    dl.dtype.lanes = 1;
    dl.shape = shape;
    dl.strides = nullptr;  // compact row-major
    dl.byte_offset = 0;
  }
};

// One cuBLASLt bf16 GEMM (fp32 compute, bf16 out) with a fixed algorithm.
// Row-major C[rows_c, cols_c] = A · B expressed in cuBLASLt's column-major terms.
struct LtGemm {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo;
  // column-major: C[m, n] = op(A) · op(B), A stored [lda, *], k inner.
  void init(cublasLtHandle_t lt, cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n, int64_t k,
            int64_t lda, int64_t ldb, int64_t ldc, size_t ws_bytes) {
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    CUBLAS_CHECK(
        cublasLtMatrixLayoutCreate(&a, CUDA_R_16BF, ta == CUBLAS_OP_N ? m : k, ta == CUBLAS_OP_N ? k : m, lda));
    CUBLAS_CHECK(
        cublasLtMatrixLayoutCreate(&b, CUDA_R_16BF, tb == CUBLAS_OP_N ? k : n, tb == CUBLAS_OP_N ? n : k, ldb));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&c, CUDA_R_16BF, m, n, ldc));
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                      sizeof(ws_bytes)));
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(lt, desc, a, b, c, c, pref, 1, &res, &found));
    if (found < 1)
      fatal("cuBLASLt has no algorithm for a %lld x %lld x %lld bf16 GEMM", (long long)m, (long long)n, (long long)k);
    algo = res.algo;
    CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
  }
  void run(cublasLtHandle_t lt, const void* A, const void* B, void* C, void* ws, size_t ws_bytes,
           cudaStream_t s) const {
    const float one = 1.0f, zero = 0.0f;
    CUBLAS_CHECK(cublasLtMatmul(lt, desc, &one, A, a, B, b, &zero, C, c, C, c, &algo, ws, ws_bytes, s));
  }
  void destroy() {
    if (desc) cublasLtMatmulDescDestroy(desc);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
    desc = nullptr;
    a = b = c = nullptr;
  }
};

// y_rowmajor[M, N] = x_rowmajor[M, K] · W_rowmajor[N, K]^T  (nn.Linear)
static void init_linear(LtGemm& g, cublasLtHandle_t lt, int64_t M, int64_t N, int64_t K, size_t ws) {
  g.init(lt, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, K, K, N, ws);  // A = W (K x N col-major), B = x (K x M)
}
// y_rowmajor[M, N] = h_rowmajor[M, K] · W_rowmajor[K, N]  (W_d as [H, D])
static void init_matmul(LtGemm& g, cublasLtHandle_t lt, int64_t M, int64_t N, int64_t K, size_t ws) {
  g.init(lt, CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, N, K, N, ws);  // A = W (N x K col-major), B = h (K x M)
}

// ---------------------------------------------------------------------------
// Small JSON writer (one object per line).
// ---------------------------------------------------------------------------
struct Json {
  std::string s = "{";
  void key(const char* k) {
    if (s.size() > 1) s += ", ";
    s += "\"";
    s += k;
    s += "\": ";
  }
  void str(const char* k, const std::string& v) {
    key(k);
    s += "\"";
    for (char ch : v) {
      if (ch == '"' || ch == '\\') {
        s += '\\';
        s += ch;
      } else if (static_cast<unsigned char>(ch) < 0x20) {
        char buf[8];
        snprintf(buf, sizeof(buf), "\\u%04x", ch);
        s += buf;
      } else {
        s += ch;
      }
    }
    s += "\"";
  }
  void num(const char* k, double v) {
    key(k);
    if (!std::isfinite(v)) {
      s += "null";
      return;
    }
    char buf[64];
    snprintf(buf, sizeof(buf), "%.6g", v);
    s += buf;
  }
  void integer(const char* k, long long v) {
    key(k);
    s += std::to_string(v);
  }
  void boolean(const char* k, bool v) {
    key(k);
    s += v ? "true" : "false";
  }
  void raw(const char* k, const std::string& v) {
    key(k);
    s += v;
  }
  std::string done() const { return s + "}"; }
};

// ---------------------------------------------------------------------------
// Options and configurations
// ---------------------------------------------------------------------------
struct Options {
  int reps = 50;
  int warmup = 5;
  uint64_t seed = 20261113;
  int device = 0;
  bool blocking = true;
  double tol = 2e-2;
  int max_sets = 32;
  bool dry_run = false;
  bool table = true;
};

struct Config {
  int64_t D = 2048, H = 5632, M = 16384;
  std::string pattern = "uniform";
  double p = 0.005;
  std::vector<int> slots{32};
  std::vector<std::string> kernels{"auto"};
  std::vector<std::string> benches{"ffn_sparse", "ffn_auto"};
};

static const char* kAllBenches[] = {"ffn_sparse", "ffn_auto", "ffn_dense", "gate_pack"};

static bool has(const std::vector<std::string>& v, const char* s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

static std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at <= s.size()) {
    const size_t c = s.find(',', at);
    const std::string part = s.substr(at, c == std::string::npos ? std::string::npos : c - at);
    if (!part.empty()) out.push_back(part);
    if (c == std::string::npos) break;
    at = c + 1;
  }
  return out;
}

static int64_t parse_int(const std::string& s, const char* what) {
  char* end = nullptr;
  errno = 0;
  const long long v = strtoll(s.c_str(), &end, 10);
  if (errno != 0 || end == s.c_str() || *end != '\0') {
    fprintf(stderr, "bench_ffn: %s: '%s' is not an integer\n", what, s.c_str());
    exit(64);
  }
  return v;
}

static double parse_double(const std::string& s, const char* what) {
  char* end = nullptr;
  const double v = strtod(s.c_str(), &end);
  if (end == s.c_str() || *end != '\0') {
    fprintf(stderr, "bench_ffn: %s: '%s' is not a number\n", what, s.c_str());
    exit(64);
  }
  return v;
}

// The presets. quick: ~1-2 min on an H100. full: a sweep over M, density,
// patterns, slots and both kernel families.
static std::vector<Config> suite(const std::string& name, const std::vector<std::string>& kernels_override) {
  std::vector<Config> out;
  auto add = [&](int64_t D, int64_t H, int64_t M, const char* pat, double p, std::vector<std::string> benches,
                 std::vector<int> slots = {32}, std::vector<std::string> kernels = {"auto"}) {
    Config c;
    c.D = D;
    c.H = H;
    c.M = M;
    c.pattern = pat;
    c.p = p;
    c.benches = std::move(benches);
    c.slots = std::move(slots);
    c.kernels = kernels_override.empty() ? std::move(kernels) : kernels_override;
    out.push_back(c);
  };
  const std::vector<std::string> ffn{"ffn_sparse", "ffn_auto"};
  if (name == "quick") {
    for (int64_t M : {1, 16, 64, 2048, 16384, 65536}) add(2048, 5632, M, "uniform", 0.005, ffn);
    add(2048, 5632, 65536, "uniform", 0.02, ffn);
    add(2048, 5632, 65536, "skewed", 0.005, ffn);
    add(2048, 5632, 65536, "hot", 0.005, ffn);
    add(2048, 5632, 16384, "trained", 0.005, ffn);
    add(2048, 5632, 65536, "trained", 0.005, ffn);
    add(2048, 5632, 16384, "dense", 0.5, ffn);
    add(2048, 5632, 65536, "uniform", 0.005, {"gate_pack"});
    add(4096, 14336, 16384, "uniform", 0.005, ffn);
    add(896, 4864, 16384, "uniform", 0.005, ffn);
    add(1024, 2816, 16384, "uniform", 0.005, ffn);
  } else if (name == "full") {
    const std::vector<std::string> both{"auto", "portable"};
    const std::vector<std::string> all{"ffn_sparse", "ffn_auto", "ffn_dense"};
    for (int64_t M : {1, 4, 16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072})
      add(2048, 5632, M, "uniform", 0.005, all, {32}, both);
    for (double p : {0.001, 0.002, 0.01, 0.02, 0.05, 0.1}) add(2048, 5632, 65536, "uniform", p, ffn, {32}, both);
    add(2048, 5632, 65536, "skewed", 0.005, ffn, {32, 64, 128}, both);
    add(2048, 5632, 65536, "hot", 0.005, ffn, {32, 64}, both);
    for (int64_t M : {2048, 16384, 65536}) add(2048, 5632, M, "trained", 0.005, ffn, {32}, both);
    add(2048, 5632, 65536, "dense", 0.5, all, {32}, both);
    add(2048, 5632, 65536, "uniform", 0.005, {"gate_pack"}, {32, 64, 128}, both);
    add(2048, 5632, 16384, "uniform", 0.005, {"gate_pack"}, {32}, both);
    const int64_t shapes[3][2] = {{4096, 14336}, {896, 4864}, {1024, 2816}};
    for (auto& dh : shapes) {
      for (int64_t M : {1, 64, 16384, 65536}) add(dh[0], dh[1], M, "uniform", 0.005, ffn, {32}, both);
      add(dh[0], dh[1], 65536, "uniform", 0.005, {"gate_pack"}, {32}, both);
    }
  } else {
    fprintf(stderr, "bench_ffn: unknown suite '%s' (quick, full)\n", name.c_str());
    exit(64);
  }
  return out;
}

static void usage(FILE* f) {
  fprintf(f,
          "usage: bench_ffn [--suite quick|full] [--D N --H N --M N[,N...]] [options]\n"
          "\n"
          "twell's sparse FFN vs a dense cuBLASLt FFN on synthetic inputs (docs/design.md).\n"
          "One JSON object per line on stdout, a table on stderr.\n"
          "\n"
          "configuration (ignored with --suite, except --kernels):\n"
          "  --D N                 d_model (multiple of 8; default 2048)\n"
          "  --H N                 hidden size (multiple of 8; default 5632)\n"
          "  --M N[,N...]          tokens per call (default 16384)\n"
          "  --pattern P[,P...]    uniform | skewed | hot | dense | trained (default uniform)\n"
          "  --p F                 target active fraction per token (default 0.005; dense: 0.5)\n"
          "  --slots S[,S...]      TwELL words per tile: 32, 64, 128 (default 32)\n"
          "  --kernels K[,K...]    auto | portable | sm90 (default auto)\n"
          "  --benches B[,B...]    ffn_sparse, ffn_auto, ffn_dense, gate_pack (default ffn_sparse,ffn_auto)\n"
          "timing:\n"
          "  --reps N              timed runs per measurement (default 50)\n"
          "  --warmup N            untimed runs first (default 5, at least 1)\n"
          "  --no-blocking         do not hold the stream while queueing (times include host launch gaps)\n"
          "  --max-sets N          most rotated input sets (default 32)\n"
          "other:\n"
          "  --seed N              RNG seed (default 20261113)\n"
          "  --device N            CUDA device (default 0)\n"
          "  --tol F               relerr above this fails the record (default 0.02)\n"
          "  --no-table            no table on stderr\n"
          "  --dry-run             print the configurations as JSON and exit (no GPU needed)\n"
          "  --help\n"
          "exit: 0 ok, 1 a twell call failed or relerr > tol, 2 no GPU, 3 fatal CUDA/cuBLAS error, 64 usage\n");
}

// Timing: the harness's method (bench/README.md, "Methodology").
using harness::Timing;

static harness::TimeOptions timing_options(const Options& o, int sets) {
  return {.warmup = o.warmup,
          .reps = o.reps,
          .sets = sets,
          .queue = o.blocking ? harness::Queue::kHeld : harness::Queue::kBackToBack};
}

// ---------------------------------------------------------------------------
// Per-process context
// ---------------------------------------------------------------------------
struct Ctx {
  Options opt;
  int device = 0;
  std::string device_name;
  int cc_major = 0, cc_minor = 0;
  int64_t l2_bytes = 50 << 20;
  bool sm90a = false;
  cudaStream_t stream = nullptr;
  cublasLtHandle_t lt = nullptr;
  void* lt_ws = nullptr;
  size_t lt_ws_bytes = 64 << 20;
  double copy_gbps = NAN;    // device copy bandwidth, bytes read + written, GB/s
  double gemm_tflops = NAN;  // cuBLASLt bf16 8192^3
  harness::Timer timer;
  int failures = 0;
  bool table_header = false;
  double* partials = nullptr;  // relerr partials, 2 * 1024 doubles
};

static double relerr(Ctx& c, const bf16* a, const bf16* ref, int64_t n, bool relu_ref) {
  const int blocks = std::min(grid_for(n), 1024);
  relerr_kernel<<<blocks, 256, 0, c.stream>>>(a, ref, n, relu_ref ? 1 : 0, c.partials);
  CUDA_CHECK(cudaGetLastError());
  std::vector<double> h(2 * blocks);
  CUDA_CHECK(cudaMemcpyAsync(h.data(), c.partials, h.size() * sizeof(double), cudaMemcpyDeviceToHost, c.stream));
  CUDA_CHECK(cudaStreamSynchronize(c.stream));
  double d2 = 0, r2 = 0;
  for (int i = 0; i < blocks; ++i) {
    d2 += h[2 * i];
    r2 += h[2 * i + 1];
  }
  return r2 > 0 ? sqrt(d2 / r2) : (d2 == 0 ? 0.0 : INFINITY);
}

static void measure_ceilings(Ctx& c) {
  // Copy bandwidth: a 512 MiB device-to-device copy, bytes read + written.
  g_doing = "measuring the device copy bandwidth";
  const size_t bytes = size_t(512) << 20;
  char* a = dalloc<char>(bytes);
  char* b = dalloc<char>(bytes);
  CUDA_CHECK(cudaMemsetAsync(a, 0x3c, bytes, c.stream));
  harness::TimeOptions o = timing_options(c.opt, 1);
  o.reps = 20;
  o.warmup = 3;
  Timing t = c.timer.time(
      [&](int, int) { CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, c.stream)); }, o, c.stream);
  c.copy_gbps = 2.0 * bytes / (t.med * 1e-3) / 1e9;
  dfree(a);
  dfree(b);

  // GEMM rate: cuBLASLt bf16 8192 x 8192 x 8192 on random data.
  g_doing = "measuring the cuBLASLt bf16 GEMM rate";
  const int64_t n = 8192;
  bf16* A = dalloc<bf16>(n * n);
  bf16* B = dalloc<bf16>(n * n);
  bf16* C = dalloc<bf16>(n * n);
  fill_w_kernel<<<grid_for(n * n), 256, 0, c.stream>>>(A, n, n, 1.0f, tensor_key(c.opt.seed, 999, 1), 0, 0, 1, 0, 0,
                                                       nullptr);
  fill_w_kernel<<<grid_for(n * n), 256, 0, c.stream>>>(B, n, n, 1.0f, tensor_key(c.opt.seed, 999, 2), 0, 0, 1, 0, 0,
                                                       nullptr);
  CUDA_CHECK(cudaGetLastError());
  LtGemm g;
  init_linear(g, c.lt, n, n, n, c.lt_ws_bytes);
  o.reps = 10;
  t = c.timer.time([&](int, int) { g.run(c.lt, A, B, C, c.lt_ws, c.lt_ws_bytes, c.stream); }, o, c.stream);
  c.gemm_tflops = 2.0 * n * n * n / (t.med * 1e-3) / 1e12;
  g.destroy();
  dfree(A);
  dfree(B);
  dfree(C);
  fprintf(stderr, "# ceilings: device copy %.0f GB/s (read+write, 512 MiB D2D), cuBLASLt bf16 8192^3 %.0f TFLOP/s\n",
          c.copy_gbps, c.gemm_tflops);
}

// One input set: x, y and the three weights (weights are rotated too, so a
// decode-sized call cannot keep W_g resident in L2 from the previous call).
struct Set {
  bf16 *x = nullptr, *y = nullptr, *wg = nullptr, *wu = nullptr, *wd = nullptr;
  Tensor tx, ty, twg, twu, twd;
};

static const char* path_name(uint64_t p) {
  return p == TWELL_PATH_SPARSE ? "sparse" : p == TWELL_PATH_DENSE ? "dense" : p == TWELL_PATH_AUTO ? "auto" : "?";
}

static void table_row(Ctx& c, const char* bench, const Config& cfg, const char* kern, int slots, double act,
                      long long ovf, const char* path, const Timing& t, double dense_ms, double tflops,
                      double floor_frac, double mem, double rel, const std::string& err) {
  if (!c.opt.table) return;
  if (!c.table_header) {
    fprintf(stderr, "%-17s %5s %6s %7s %-8s %-8s %4s %8s %7s %-6s %9s %9s %7s %7s %6s %6s %9s\n", "bench", "D", "H",
            "M", "pattern", "kernels", "S", "act/tok", "ovf", "path", "ms", "dense_ms", "speedup", "TFLOP/s", "floor%",
            "mem", "relerr");
    c.table_header = true;
  }
  if (!err.empty()) {
    fprintf(stderr, "%-17s %5lld %6lld %7lld %-8s %-8s %4d  FAILED: %s\n", bench, (long long)cfg.D, (long long)cfg.H,
            (long long)cfg.M, cfg.pattern.c_str(), kern, slots, err.c_str());
    return;
  }
  fprintf(stderr, "%-17s %5lld %6lld %7lld %-8s %-8s %4d %8.2f %7lld %-6s %9.4f %9.4f %7.2f %7.1f %6.1f %6.3f %9.2e\n",
          bench, (long long)cfg.D, (long long)cfg.H, (long long)cfg.M, cfg.pattern.c_str(), kern, slots, act, ovf, path,
          t.med, dense_ms, dense_ms / t.med, tflops, 100.0 * floor_frac, mem, rel);
}

static void common_fields(Ctx& c, Json& j, const char* bench, const Config& cfg, const char* kern, int slots,
                          int nsets) {
  j.str("bench", bench);
  j.integer("D", cfg.D);
  j.integer("H", cfg.H);
  j.integer("M", cfg.M);
  j.str("pattern", cfg.pattern);
  j.num("p", cfg.p);
  j.str("kernels", kern);
  j.integer("slots", slots);
  j.str("device", c.device_name);
  j.str("cc", std::to_string(c.cc_major) + "." + std::to_string(c.cc_minor));
  j.integer("reps", c.opt.reps);
  j.integer("warmup", std::max(c.opt.warmup, 1));
  j.integer("rotation_sets", nsets);
  j.integer("seed", static_cast<long long>(c.opt.seed));
  j.num("copy_gbps", c.copy_gbps);
  j.num("gemm_peak_tflops", c.gemm_tflops);
}

static void timing_fields(Json& j, const Timing& t) {
  j.num("ms", t.med);
  j.num("p10_ms", t.p10);
  j.num("p90_ms", t.p90);
  j.num("mean_ms", t.mean);
  j.boolean("blocking", t.blocked);
  if (t.blocking_timeouts) j.integer("blocking_timeouts", t.blocking_timeouts);
}

static void emit(const Json& j) {
  printf("%s\n", j.done().c_str());
  fflush(stdout);
}

// ---------------------------------------------------------------------------
// One configuration: generate the inputs, time the dense baselines, then
// every (kernels, slots, bench) variant of twell. The steps share a Workload.
// ---------------------------------------------------------------------------
struct Workload {
  explicit Workload(const Config& config) : cfg(config) {}
  const Config& cfg;
  std::string label;  // names the configuration in messages
  bool any_ffn = false, any_pack = false;
  int nsets = 1;
  std::vector<Set> sets;
  bf16 *g = nullptr, *u = nullptr, *h = nullptr;  // the dense FFN's intermediates [M, H]
  bf16* y_ref = nullptr;                          // its y on set 0 [M, D]
  Timing t_dense, t_gemm;
  int64_t union_active = 0;  // neurons that fire for at least one token of set 0
  double density_ref = NAN;  // fraction of the gate pre-activations of set 0 that are > 0
  // Work and least bytes of each kind of call, for the floors (bench/README.md).
  double gate_flops = 0, w_bytes = 0, xy_bytes = 0, sparse_bytes = 0;
  size_t dense_inter = 0;  // bytes of the dense g, u, h
  // One statistics slot per twell run (warm-up, timed and correctness runs), read back at the end.
  int total_runs = 0;
  uint64_t* stats_all = nullptr;
  std::vector<uint64_t> hstats;
  int32_t* overflow_list = nullptr;  // gate_pack's overflow-row list [M]
};

// Floor of a call (bench/README.md): compute floor = FLOPs / cuBLAS GEMM rate; bytes floor =
// least bytes / copy bandwidth; the floor is the larger.
static double floor_ms(const Ctx& c, double flops, double bytes, double* fc, double* fb) {
  *fc = flops / (c.gemm_tflops * 1e12) * 1e3;
  *fb = bytes / (c.copy_gbps * 1e9) * 1e3;
  return std::max(*fc, *fb);
}

// Rotation: enough input sets that one pass over them exceeds twice the L2. Returns false (and
// writes a record saying why) when the sets, the dense intermediates and twell's workspace would
// not fit in GPU memory.
static bool plan_memory(Ctx& c, Workload& w) {
  const Config& cfg = w.cfg;
  const int64_t D = cfg.D, H = cfg.H, M = cfg.M;
  const size_t set_bytes = size_t(2 * M * D + 3 * H * D) * sizeof(bf16);
  w.nsets = static_cast<int>(
      std::min<int64_t>(c.opt.max_sets, std::max<int64_t>(1, (2 * c.l2_bytes + set_bytes - 1) / set_bytes)));
  w.dense_inter = size_t(3) * M * H * sizeof(bf16);
  size_t free_b = 0, total_b = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  const size_t packed_est = size_t(M) * ((H + 255) / 256) * 128 * 4;
  const size_t need = w.nsets * set_bytes + w.dense_inter + size_t(M) * D * 2 + 2 * packed_est + (size_t(256) << 20);
  if (need <= free_b) return true;
  Json j;
  common_fields(c, j, "config", cfg, "-", 0, w.nsets);
  j.str("error", "skipped: needs about " + std::to_string(need >> 20) + " MiB of GPU memory, " +
                     std::to_string(free_b >> 20) + " MiB free");
  emit(j);
  fprintf(stderr, "SKIPPED %s: not enough GPU memory\n", w.label.c_str());
  ++c.failures;
  return false;
}

// The rotated input sets and the dense intermediates.
static void make_inputs(Ctx& c, Workload& w) {
  const Config& cfg = w.cfg;
  const int64_t D = cfg.D, H = cfg.H, M = cfg.M;
  const int dev = c.device;
  // Thresholds: gate pre-activations are N(thr, 1), so P(active) = p.
  const double p = cfg.pattern == "dense" ? 0.5 : cfg.p;
  const float thr = static_cast<float>(-norm_ppf(1.0 - p));
  const bool hot = cfg.pattern == "hot";
  const int64_t n_hot = hot ? std::min<int64_t>(16, H) : 0;
  const float thr_hot = static_cast<float>(-norm_ppf(1.0 - 0.6));  // ~60% of tokens
  const int64_t hot_stride = n_hot > 0 ? H / n_hot : 1;
  float* row_thr = nullptr;  // the trained pattern's per-neuron thresholds
  if (cfg.pattern == "trained") {
    const std::vector<float> t = trained_thresholds(H, c.opt.seed);
    row_thr = dalloc<float>(t.size());
    CUDA_CHECK(cudaMemcpy(row_thr, t.data(), t.size() * sizeof(float), cudaMemcpyHostToDevice));
  }

  w.sets = std::vector<Set>(w.nsets);
  for (int s = 0; s < w.nsets; ++s) {
    Set& S = w.sets[s];
    S.x = dalloc<bf16>(M * D);
    S.y = dalloc<bf16>(M * D);
    S.wg = dalloc<bf16>(H * D);
    S.wu = dalloc<bf16>(H * D);
    S.wd = dalloc<bf16>(H * D);
    fill_x_kernel<<<grid_for(M * D), 256, 0, c.stream>>>(S.x, M, D, tensor_key(c.opt.seed, s, 0),
                                                         tensor_key(c.opt.seed, s, 5), cfg.pattern == "skewed");
    fill_w_kernel<<<grid_for(H * D), 256, 0, c.stream>>>(S.wg, H, D, 1.0f / sqrtf(float(D - 1)),
                                                         tensor_key(c.opt.seed, s, 1), 1, thr, hot_stride, n_hot,
                                                         thr_hot, row_thr);
    fill_w_kernel<<<grid_for(H * D), 256, 0, c.stream>>>(S.wu, H, D, 1.0f / sqrtf(float(D)),
                                                         tensor_key(c.opt.seed, s, 2), 0, 0, 1, 0, 0, nullptr);
    fill_w_kernel<<<grid_for(H * D), 256, 0, c.stream>>>(S.wd, H, D, 1.0f / sqrtf(float(H)),
                                                         tensor_key(c.opt.seed, s, 3), 0, 0, 1, 0, 0, nullptr);
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaMemsetAsync(S.y, 0, size_t(M) * D * 2, c.stream));  // defined, never read before written
    S.tx.set(S.x, kDLBfloat, 16, M, D, dev);
    S.ty.set(S.y, kDLBfloat, 16, M, D, dev);
    S.twg.set(S.wg, kDLBfloat, 16, H, D, dev);
    S.twu.set(S.wu, kDLBfloat, 16, H, D, dev);
    S.twd.set(S.wd, kDLBfloat, 16, H, D, dev);  // TWELL_LAYOUT_HD
  }
  CUDA_CHECK(cudaStreamSynchronize(c.stream));
  dfree(row_thr);
  w.g = dalloc<bf16>(M * H);
  w.u = dalloc<bf16>(M * H);
  w.h = dalloc<bf16>(M * H);
  w.y_ref = dalloc<bf16>(M * D);
}

// Times the cuBLASLt dense FFN and gate GEMM, then computes the reference y (and g, u, h) of set 0.
static void run_dense_baselines(Ctx& c, Workload& w) {
  const int64_t D = w.cfg.D, H = w.cfg.H, M = w.cfg.M;
  g_doing = std::string("timing the cuBLASLt baselines, ") + w.label;
  LtGemm gemm_gate, gemm_down;
  init_linear(gemm_gate, c.lt, M, H, D, c.lt_ws_bytes);
  init_matmul(gemm_down, c.lt, M, D, H, c.lt_ws_bytes);
  auto dense_ffn = [&](const Set& S, bf16* y) {
    gemm_gate.run(c.lt, S.wg, S.x, w.g, c.lt_ws, c.lt_ws_bytes, c.stream);
    gemm_gate.run(c.lt, S.wu, S.x, w.u, c.lt_ws, c.lt_ws_bytes, c.stream);
    relu_mul_kernel<<<grid_for(M * H / 8), 256, 0, c.stream>>>(w.g, w.u, w.h, M * H / 8);
    CUDA_CHECK(cudaGetLastError());
    gemm_down.run(c.lt, S.wd, w.h, y, c.lt_ws, c.lt_ws_bytes, c.stream);
  };
  const harness::TimeOptions o = timing_options(c.opt, w.nsets);
  if (w.any_ffn) w.t_dense = c.timer.time([&](int, int s) { dense_ffn(w.sets[s], w.sets[s].y); }, o, c.stream);
  w.t_gemm = c.timer.time(
      [&](int, int s) { gemm_gate.run(c.lt, w.sets[s].wg, w.sets[s].x, w.g, c.lt_ws, c.lt_ws_bytes, c.stream); }, o,
      c.stream);

  g_doing = std::string("computing the reference, ") + w.label;
  dense_ffn(w.sets[0], w.y_ref);
  gemm_gate.destroy();
  gemm_down.destroy();
}

// From g of set 0: the neurons that fire for some token, and the fraction of entries > 0.
static void count_reference_activity(Ctx& c, Workload& w) {
  const int64_t H = w.cfg.H, M = w.cfg.M;
  uint8_t* col_active = dalloc<uint8_t>(H);
  unsigned long long* cnt = dalloc<unsigned long long>(1024);
  CUDA_CHECK(cudaMemsetAsync(col_active, 0, H, c.stream));
  const int ablocks = std::min(grid_for(M * H), 1024);
  active_kernel<<<ablocks, 256, 0, c.stream>>>(w.g, M, H, col_active, cnt);
  CUDA_CHECK(cudaGetLastError());
  std::vector<uint8_t> hcol(H);
  std::vector<unsigned long long> hcnt(ablocks);
  CUDA_CHECK(cudaMemcpyAsync(hcol.data(), col_active, H, cudaMemcpyDeviceToHost, c.stream));
  CUDA_CHECK(cudaMemcpyAsync(hcnt.data(), cnt, ablocks * sizeof(unsigned long long), cudaMemcpyDeviceToHost, c.stream));
  CUDA_CHECK(cudaStreamSynchronize(c.stream));
  w.union_active = 0;
  for (uint8_t v : hcol) w.union_active += v;
  unsigned long long pos = 0;
  for (auto v : hcnt) pos += v;
  w.density_ref = double(pos) / (double(M) * H);
  dfree(col_active);
  dfree(cnt);

  const int64_t D = w.cfg.D;
  w.gate_flops = 2.0 * M * D * H;
  w.w_bytes = double(H) * D * 2;
  w.xy_bytes = 2.0 * M * D * 2;
  w.sparse_bytes = w.w_bytes + 2.0 * w.union_active * D * 2 + w.xy_bytes;  // W_g + active rows of W_u, W_d
}

// The records (and table rows) of the two cuBLASLt baselines.
static void write_baseline_records(Ctx& c, const Workload& w) {
  const Config& cfg = w.cfg;
  const int64_t D = cfg.D, H = cfg.H, M = cfg.M;
  const Timing& t_dense = w.t_dense;
  const Timing& t_gemm = w.t_gemm;
  const double gate_flops = w.gate_flops;
  if (w.any_ffn) {
    Json j;
    common_fields(c, j, "dense_cublas", cfg, "cublasLt", 0, w.nsets);
    j.num("density", w.density_ref);
    j.num("active_per_token", w.density_ref * H);
    j.integer("union_active_neurons", w.union_active);
    timing_fields(j, t_dense);
    j.num("dense_ms", t_dense.med);
    j.str("baseline", "cublasLt dense gated FFN (g, u GEMMs + relu*mul kernel + down GEMM)");
    j.num("speedup_vs_dense", 1.0);
    j.num("gate_gemm_ms", t_gemm.med);
    j.num("tflops", gate_flops / (t_dense.med * 1e9));
    j.num("effective_tflops", 3 * gate_flops / (t_dense.med * 1e9));
    double fc, fb;
    const double fl = floor_ms(c, 3 * gate_flops, 3 * w.w_bytes + w.xy_bytes, &fc, &fb);
    j.num("floor_ms", fl);
    j.num("floor_compute_ms", fc);
    j.num("floor_bytes_ms", fb);
    j.num("floor_fraction", fl / t_dense.med);
    j.num("gbps", (3 * w.w_bytes + w.xy_bytes) / (t_dense.med * 1e6));
    j.integer("intermediate_bytes", static_cast<long long>(w.dense_inter));
    emit(j);
    table_row(c, "dense_cublas", cfg, "cublasLt", 0, w.density_ref * H, 0, "dense", t_dense, t_dense.med,
              3 * gate_flops / (t_dense.med * 1e9), fl / t_dense.med, 1.0, NAN, "");
  }
  Json j;
  common_fields(c, j, "gate_gemm_cublas", cfg, "cublasLt", 0, w.nsets);
  timing_fields(j, t_gemm);
  j.num("dense_ms", t_gemm.med);
  j.str("baseline", "cublasLt x W_g^T");
  j.num("speedup_vs_dense", 1.0);
  j.num("tflops", gate_flops / (t_gemm.med * 1e9));
  double fc, fb;
  const double fl = floor_ms(c, gate_flops, w.w_bytes + M * D * 2.0 + M * H * 2.0, &fc, &fb);
  j.num("floor_ms", fl);
  j.num("floor_compute_ms", fc);
  j.num("floor_bytes_ms", fb);
  j.num("floor_fraction", fl / t_gemm.med);
  emit(j);
  table_row(c, "gate_gemm_cublas", cfg, "cublasLt", 0, w.density_ref * H, 0, "dense", t_gemm, t_gemm.med,
            gate_flops / (t_gemm.med * 1e9), fl / t_gemm.med, NAN, NAN, "");
}

// One twell variant: the bench it runs, its plan and the buffers it owns.
struct TwellRun {
  const char* bench = nullptr;
  std::string kern;
  int slots = 32;
  bool is_pack = false;  // twell_gate_pack; else twell_ffn_run
  twell_ffn_plan* plan = nullptr;
  size_t ws_bytes = 0;
  void* ws = nullptr;
  uint32_t* packed = nullptr;  // gate_pack's output [M, row_words]
  int64_t row_words = 0;
  Tensor tpacked, tlist;
};

// The options, the plan and the workspace of a variant ("" or the failing call's message).
static std::string set_up_twell(Ctx& c, const Workload& w, TwellRun& run) {
  const int64_t D = w.cfg.D, H = w.cfg.H, M = w.cfg.M;
  twell_ffn_options o;
  twell_ffn_options_default(&o);
  o.slots = run.slots;
  o.w_down_layout = TWELL_LAYOUT_HD;
  o.path = strcmp(run.bench, "ffn_sparse") == 0 || run.is_pack ? TWELL_PATH_SPARSE
           : strcmp(run.bench, "ffn_dense") == 0               ? TWELL_PATH_DENSE
                                                               : TWELL_PATH_AUTO;
  o.kernels = run.kern == "portable" ? TWELL_KERNELS_PORTABLE
              : run.kern == "sm90"   ? TWELL_KERNELS_SM90
                                     : TWELL_KERNELS_AUTO;
  std::string err = twell_msg("twell_ffn_supported", twell_ffn_supported(D, H, &o));
  if (err.empty()) err = twell_msg("twell_ffn_plan_create", twell_ffn_plan_create(&run.plan, D, H, &o, c.device));
  if (err.empty()) err = twell_msg("twell_ffn_workspace_size", twell_ffn_workspace_size(run.plan, M, &run.ws_bytes));
  if (err.empty()) run.ws = dalloc<char>(run.ws_bytes);  // cudaMalloc: 256-byte aligned
  if (err.empty() && run.is_pack) {
    err = twell_msg("twell_packed_row_words", twell_packed_row_words(H, run.slots, &run.row_words));
    if (err.empty()) {
      run.packed = dalloc<uint32_t>(size_t(M) * run.row_words);
      run.tpacked.set(run.packed, kDLUInt, 32, M, run.row_words, c.device);
      run.tlist.set(w.overflow_list, kDLInt, 32, 1, M, c.device, 1);
    }
  }
  CUDA_CHECK(cudaMemsetAsync(w.stats_all, 0, size_t(w.total_runs) * TWELL_STATS_WORDS * 8, c.stream));
  return err;
}

// One call of twell on set s; run r writes its own statistics slot, so nothing is read back
// (and nothing synchronises) while timing.
static std::string call_twell(Ctx& c, Workload& w, TwellRun& run, int r, int s) {
  Tensor tstats;
  tstats.set(w.stats_all + size_t(r) * TWELL_STATS_WORDS, kDLUInt, 64, 1, TWELL_STATS_WORDS, c.device, 1);
  Set& S = w.sets[s];
  twell_status st;
  if (run.is_pack) {
    st = twell_gate_pack(run.plan, &S.tx.dl, &S.twg.dl, &run.tpacked.dl, &run.tlist.dl, &tstats.dl, run.ws,
                         run.ws_bytes, c.stream);
    return twell_msg("twell_gate_pack", st);
  }
  st = twell_ffn_run(run.plan, &S.tx.dl, &S.twg.dl, &S.twu.dl, &S.twd.dl, &S.ty.dl, &tstats.dl, run.ws, run.ws_bytes,
                     c.stream);
  return twell_msg("twell_ffn_run", st);
}

// Correctness on set 0, output poisoned first (NaN bf16 everywhere): the relative error
// against cuBLAS in *rel ("" or the failing call's message).
static std::string check_twell(Ctx& c, Workload& w, TwellRun& run, double* rel) {
  const int64_t D = w.cfg.D, H = w.cfg.H, M = w.cfg.M;
  const int corr = w.total_runs - 1;
  std::string err;
  if (run.is_pack) {
    CUDA_CHECK(cudaMemsetAsync(run.packed, 0xFF, size_t(M) * run.row_words * 4, c.stream));
    err = call_twell(c, w, run, corr, 0);
    if (err.empty()) {
      Tensor tdense;
      tdense.set(w.h, kDLBfloat, 16, M, H, c.device);  // h is free now: unpack into it
      harness::poison_bf16(w.h, size_t(M) * H, c.stream);
      err = twell_msg("twell_unpack", twell_unpack(&run.tpacked.dl, run.slots, &tdense.dl, c.stream));
    }
    if (err.empty()) *rel = relerr(c, w.h, w.g, M * H, true);  // vs relu(g) of cuBLAS
  } else {
    harness::poison_bf16(w.sets[0].y, size_t(M) * D, c.stream);
    err = call_twell(c, w, run, corr, 0);
    if (err.empty()) *rel = relerr(c, w.sets[0].y, w.y_ref, M * D, false);
  }
  return err;
}

// After a failed twell call: if it broke the CUDA context, nothing else can run.
static void stop_if_context_broken(Ctx& c, Json& j, const std::string& err, const char* bench) {
  cudaError_t e = cudaStreamSynchronize(c.stream);
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  if (e != cudaSuccess) {
    j.str("error", err + " (then CUDA: " + cudaGetErrorString(e) + ")");
    emit(j);
    fatal("the CUDA context is broken after %s: %s", bench, cudaGetErrorString(e));
  }
  cudaGetLastError();
}

// The record (and table row) of a variant that ran: the statistics of its timed runs,
// averaged, its time against the baseline and the floor, and its error.
static void write_twell_record(Ctx& c, Workload& w, const TwellRun& run, Json& j, const Timing& t, double rel) {
  const Config& cfg = w.cfg;
  const int64_t D = cfg.D, H = cfg.H, M = cfg.M;
  CUDA_CHECK(cudaMemcpyAsync(w.hstats.data(), w.stats_all, w.hstats.size() * 8, cudaMemcpyDeviceToHost, c.stream));
  CUDA_CHECK(cudaStreamSynchronize(c.stream));
  const int first = std::max(c.opt.warmup, 1);
  double active = 0, rows = 0, ovf_rows = 0, ovf_tiles = 0;
  uint64_t max_row = 0, max_tile = 0;
  int n_sparse = 0, n_dense = 0;
  uint64_t last_path = 0;
  for (int r = first; r < first + c.opt.reps; ++r) {
    const uint64_t* s = &w.hstats[size_t(r) * TWELL_STATS_WORDS];
    rows += double(s[TWELL_STAT_ROWS]);
    active += double(s[TWELL_STAT_ACTIVE]);
    ovf_rows += double(s[TWELL_STAT_OVERFLOW_ROWS]);
    ovf_tiles += double(s[TWELL_STAT_OVERFLOW_TILES]);
    max_row = std::max<uint64_t>(max_row, s[TWELL_STAT_MAX_ROW_COUNT]);
    max_tile = std::max<uint64_t>(max_tile, s[TWELL_STAT_MAX_TILE_COUNT]);
    last_path = s[TWELL_STAT_PATH];
    (last_path == TWELL_PATH_DENSE ? n_dense : n_sparse) += 1;
  }
  const double nr = std::max(1, c.opt.reps);
  const double density = rows > 0 ? active / (rows * H) : NAN;
  const uint64_t* sc = &w.hstats[size_t(w.total_runs - 1) * TWELL_STATS_WORDS];
  const double baseline_ms = run.is_pack ? w.t_gemm.med : w.t_dense.med;
  const bool rel_ok = std::isfinite(rel) && rel <= c.opt.tol;
  const double gate_flops = w.gate_flops;

  j.num("density", density);
  j.num("density_ref", w.density_ref);
  j.num("active_per_token", density * H);
  j.integer("max_row_active", static_cast<long long>(max_row));
  j.integer("max_tile_count", static_cast<long long>(max_tile));
  j.num("overflow_rows", ovf_rows / nr);
  j.num("overflow_tiles", ovf_tiles / nr);
  j.num("overflow_row_fraction", ovf_rows / std::max(rows, 1.0));
  j.str("path", path_name(last_path));
  j.raw("path_counts", "{\"sparse\": " + std::to_string(n_sparse) + ", \"dense\": " + std::to_string(n_dense) + "}");
  j.integer("stats_format", static_cast<long long>(sc[TWELL_STAT_FORMAT]));
  j.integer("union_active_neurons", w.union_active);
  timing_fields(j, t);
  j.num("dense_ms", baseline_ms);
  j.str("baseline", run.is_pack ? "cublasLt x W_g^T" : "cublasLt dense gated FFN");
  j.num("dense_ffn_ms", w.t_dense.med);
  j.num("gate_gemm_ms", w.t_gemm.med);
  j.num("speedup_vs_dense", baseline_ms / t.med);
  j.num("relerr", rel);
  j.boolean("relerr_ok", rel_ok);
  j.str("relerr_vs", run.is_pack ? "relu(cuBLAS x W_g^T), set 0, after twell_unpack" : "cuBLAS dense y, set 0");
  j.num("tflops", gate_flops / (t.med * 1e9));
  double fc, fb, fl, mem;
  if (run.is_pack) {
    const double out_bytes = double(M) * run.row_words * 4;
    fl = floor_ms(c, gate_flops, w.w_bytes + M * D * 2.0 + out_bytes, &fc, &fb);
    j.num("gbps", (w.w_bytes + M * D * 2.0 + out_bytes) / (t.med * 1e6));
    mem = (double(run.ws_bytes) + out_bytes + 4.0 * M) / (double(M) * H * 2);  // vs a dense [M, H] gate output
    j.integer("packed_bytes", static_cast<long long>(out_bytes));
  } else {
    const bool dense_path = last_path == TWELL_PATH_DENSE;
    fl = dense_path ? floor_ms(c, 3 * gate_flops, 3 * w.w_bytes + w.xy_bytes, &fc, &fb)
                    : floor_ms(c, gate_flops, w.sparse_bytes, &fc, &fb);
    j.num("effective_tflops", 3 * gate_flops / (t.med * 1e9));
    j.num("gbps", (dense_path ? 3 * w.w_bytes + w.xy_bytes : w.sparse_bytes) / (t.med * 1e6));
    mem = double(run.ws_bytes) / double(w.dense_inter);
    j.integer("dense_intermediate_bytes", static_cast<long long>(w.dense_inter));
  }
  j.num("floor_ms", fl);
  j.num("floor_compute_ms", fc);
  j.num("floor_bytes_ms", fb);
  j.num("floor_fraction", fl / t.med);
  j.integer("workspace_bytes", static_cast<long long>(run.ws_bytes));
  j.num("peak_mem_ratio", mem);
  if (!rel_ok) {
    j.str("error", "relerr " + std::to_string(rel) + " is not <= tol " + std::to_string(c.opt.tol));
    ++c.failures;
  }
  emit(j);
  table_row(c, run.bench, cfg, run.kern.c_str(), run.slots, density * H, static_cast<long long>(ovf_rows / nr + 0.5),
            path_name(last_path), t, baseline_ms, gate_flops / (t.med * 1e9), fl / t.med, mem, rel,
            rel_ok ? "" : "relerr over tolerance");
}

// One (kernels, slots, bench) variant: set up, time, check, write its record.
static void run_twell_variant(Ctx& c, Workload& w, const std::string& kern, int slots, const char* bench) {
  TwellRun run;
  run.bench = bench;
  run.kern = kern;
  run.slots = slots;
  run.is_pack = strcmp(bench, "gate_pack") == 0;
  g_doing = std::string(bench) + " (kernels=" + kern + ", slots=" + std::to_string(slots) + "), " + w.label;
  Json j;
  common_fields(c, j, bench, w.cfg, kern.c_str(), slots, w.nsets);
  std::string err = set_up_twell(c, w, run);
  Timing t;
  if (err.empty()) {
    t = c.timer.time([&](int r, int s) { return call_twell(c, w, run, r, s); }, timing_options(c.opt, w.nsets),
                     c.stream, &err);
  }
  double rel = NAN;
  if (err.empty()) err = check_twell(c, w, run, &rel);
  if (!err.empty()) stop_if_context_broken(c, j, err, bench);

  if (err.empty()) {
    write_twell_record(c, w, run, j, t, rel);
  } else {
    j.str("error", err);
    emit(j);
    table_row(c, bench, w.cfg, kern.c_str(), slots, NAN, 0, "-", t, NAN, NAN, NAN, NAN, NAN, err);
    ++c.failures;
  }
  if (run.plan) twell_ffn_plan_destroy(run.plan);
  dfree(run.ws);
  dfree(run.packed);
}

static void free_workload(Workload& w) {
  dfree(w.stats_all);
  dfree(w.overflow_list);
  dfree(w.g);
  dfree(w.u);
  dfree(w.h);
  dfree(w.y_ref);
  for (Set& S : w.sets) {
    dfree(S.x);
    dfree(S.y);
    dfree(S.wg);
    dfree(S.wu);
    dfree(S.wd);
  }
}

static void run_config(Ctx& c, const Config& cfg) {
  Workload w(cfg);
  char label[256];
  snprintf(label, sizeof(label), "D=%lld H=%lld M=%lld %s p=%g", (long long)cfg.D, (long long)cfg.H, (long long)cfg.M,
           cfg.pattern.c_str(), cfg.p);
  w.label = label;
  g_doing = std::string("setting up ") + w.label;
  w.any_ffn = has(cfg.benches, "ffn_sparse") || has(cfg.benches, "ffn_auto") || has(cfg.benches, "ffn_dense");
  w.any_pack = has(cfg.benches, "gate_pack");
  if (!plan_memory(c, w)) return;

  make_inputs(c, w);
  run_dense_baselines(c, w);
  count_reference_activity(c, w);
  write_baseline_records(c, w);

  w.total_runs = std::max(c.opt.warmup, 1) + c.opt.reps + 1;  // + the correctness run
  w.stats_all = dalloc<uint64_t>(size_t(w.total_runs) * TWELL_STATS_WORDS);
  w.hstats.resize(size_t(w.total_runs) * TWELL_STATS_WORDS);
  w.overflow_list = w.any_pack ? dalloc<int32_t>(cfg.M) : nullptr;
  for (const std::string& kern : cfg.kernels)
    for (int slots : cfg.slots)
      for (const char* bench : kAllBenches)
        if (has(cfg.benches, bench)) run_twell_variant(c, w, kern, slots, bench);
  free_workload(w);
}

// ---------------------------------------------------------------------------
int main(int argc, char** argv) {
  harness::fatal_handler = [](const char* message) { fatal("%s", message); };
  Options opt;
  std::string suite_name;
  Config custom;
  std::vector<int64_t> Ms{custom.M};
  std::vector<std::string> patterns{"uniform"};
  std::vector<std::string> kernels_arg;
  bool p_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) {
        fprintf(stderr, "bench_ffn: %s needs a value\n", a.c_str());
        exit(64);
      }
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      usage(stdout);
      return 0;
    } else if (a == "--suite") {
      suite_name = val();
    } else if (a == "--D") {
      custom.D = parse_int(val(), "--D");
    } else if (a == "--H") {
      custom.H = parse_int(val(), "--H");
    } else if (a == "--M") {
      Ms.clear();
      for (auto& s : split(val())) Ms.push_back(parse_int(s, "--M"));
    } else if (a == "--pattern") {
      patterns = split(val());
    } else if (a == "--p") {
      custom.p = parse_double(val(), "--p");
      p_given = true;
    } else if (a == "--slots") {
      custom.slots.clear();
      for (auto& s : split(val())) custom.slots.push_back(static_cast<int>(parse_int(s, "--slots")));
    } else if (a == "--kernels") {
      kernels_arg = split(val());
    } else if (a == "--benches") {
      custom.benches = split(val());
    } else if (a == "--reps") {
      opt.reps = static_cast<int>(parse_int(val(), "--reps"));
    } else if (a == "--warmup") {
      opt.warmup = static_cast<int>(parse_int(val(), "--warmup"));
    } else if (a == "--seed") {
      opt.seed = static_cast<uint64_t>(parse_int(val(), "--seed"));
    } else if (a == "--device") {
      opt.device = static_cast<int>(parse_int(val(), "--device"));
    } else if (a == "--tol") {
      opt.tol = parse_double(val(), "--tol");
    } else if (a == "--max-sets") {
      opt.max_sets = static_cast<int>(parse_int(val(), "--max-sets"));
    } else if (a == "--no-blocking") {
      opt.blocking = false;
    } else if (a == "--no-table") {
      opt.table = false;
    } else if (a == "--dry-run") {
      opt.dry_run = true;
    } else {
      fprintf(stderr, "bench_ffn: unknown argument '%s' (--help)\n", a.c_str());
      return 64;
    }
  }
  for (auto& k : kernels_arg) {
    if (k != "auto" && k != "portable" && k != "sm90") {
      fprintf(stderr, "bench_ffn: --kernels: '%s' is not auto, portable or sm90\n", k.c_str());
      return 64;
    }
  }
  for (auto& b : custom.benches) {
    bool ok = false;
    for (const char* k : kAllBenches) ok = ok || b == k;
    if (!ok) {
      fprintf(stderr, "bench_ffn: --benches: '%s' is not one of ffn_sparse, ffn_auto, ffn_dense, gate_pack\n",
              b.c_str());
      return 64;
    }
  }
  if (opt.reps < 1 || opt.warmup < 0 || opt.max_sets < 1) {
    fprintf(stderr, "bench_ffn: --reps must be >= 1, --warmup >= 0, --max-sets >= 1\n");
    return 64;
  }

  std::vector<Config> configs;
  if (!suite_name.empty()) {
    configs = suite(suite_name, kernels_arg);
  } else {
    if (!kernels_arg.empty()) custom.kernels = kernels_arg;
    for (auto& pat : patterns) {
      if (pat != "uniform" && pat != "skewed" && pat != "hot" && pat != "dense" && pat != "trained") {
        fprintf(stderr, "bench_ffn: --pattern: '%s' is not uniform, skewed, hot, dense or trained\n", pat.c_str());
        return 64;
      }
      for (int64_t M : Ms) {
        Config c = custom;
        c.M = M;
        c.pattern = pat;
        if (pat == "dense") c.p = 0.5;
        else if (!p_given) c.p = 0.005;
        configs.push_back(c);
      }
    }
  }
  for (const Config& c : configs) {
    if (c.D < 16 || c.H < 8 || c.M < 1 || c.D % 8 || c.H % 8 || !(c.p > 0 && c.p < 1)) {
      fprintf(stderr,
              "bench_ffn: bad configuration D=%lld H=%lld M=%lld p=%g (D >= 16, H >= 8 multiples of 8, M >= 1, 0 < p < "
              "1)\n",
              (long long)c.D, (long long)c.H, (long long)c.M, c.p);
      return 64;
    }
  }

  if (opt.dry_run) {
    for (const Config& c : configs) {
      Json j;
      j.str("config", "dry-run");
      j.integer("D", c.D);
      j.integer("H", c.H);
      j.integer("M", c.M);
      j.str("pattern", c.pattern);
      j.num("p", c.p);
      std::string s = "[", k = "[", b = "[";
      for (size_t i = 0; i < c.slots.size(); ++i) s += (i ? ", " : "") + std::to_string(c.slots[i]);
      for (size_t i = 0; i < c.kernels.size(); ++i) k += (i ? ", \"" : "\"") + c.kernels[i] + "\"";
      for (size_t i = 0; i < c.benches.size(); ++i) b += (i ? ", \"" : "\"") + c.benches[i] + "\"";
      j.raw("slots", s + "]");
      j.raw("kernels", k + "]");
      j.raw("benches", b + "]");
      emit(j);
    }
    return 0;
  }

  // ---- device ----
  Ctx c;
  c.opt = opt;
  c.device = opt.device;
  if (twell_version() != TWELL_VERSION) {
    fprintf(stderr, "bench_ffn: warning: libtwell is version %d, the header is %d\n", twell_version(), TWELL_VERSION);
  }
  int32_t ndev = 0;
  twell_status st = twell_device_count(&ndev);
  if (st != TWELL_SUCCESS || ndev == 0) {
    fprintf(stderr, "bench_ffn: no GPU: %s\n", st != TWELL_SUCCESS ? twell_last_error() : "no CUDA device is visible");
    return 2;
  }
  if (opt.device >= ndev) {
    fprintf(stderr, "bench_ffn: --device %d, but there are %d devices\n", opt.device, ndev);
    return 64;
  }
  twell_device_info info;
  st = twell_get_device_info(opt.device, &info);
  if (st != TWELL_SUCCESS) {
    fprintf(stderr, "bench_ffn: twell_get_device_info: %s\n", twell_last_error());
    return 3;
  }
  c.device_name = info.name;
  c.cc_major = info.cc_major;
  c.cc_minor = info.cc_minor;
  c.l2_bytes = info.l2_bytes > 0 ? info.l2_bytes : (50 << 20);
  c.sm90a = info.has_sm90a_kernels != 0;
  CUDA_CHECK(cudaSetDevice(opt.device));
  CUDA_CHECK(cudaStreamCreateWithFlags(&c.stream, cudaStreamNonBlocking));
  CUBLAS_CHECK(cublasLtCreate(&c.lt));
  CUDA_CHECK(cudaMalloc(&c.lt_ws, c.lt_ws_bytes));
  c.partials = dalloc<double>(2 * 1024);
  {
    time_t now = time(nullptr);
    char date[64];
    strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    fprintf(stderr, "# bench_ffn on %s (cc %d.%d, %d SMs, L2 %lld MiB, sm90a kernels %s), %s\n# twell %s\n", info.name,
            info.cc_major, info.cc_minor, info.sm_count, (long long)(c.l2_bytes >> 20), c.sm90a ? "yes" : "no", date,
            twell_build_info());
    fprintf(stderr, "# %zu configurations, reps %d, warm-up %d, %s\n", configs.size(), opt.reps,
            std::max(opt.warmup, 1),
            opt.blocking ? "calls under 1 ms queued behind a blocking kernel (GPU time)" : "no blocking kernel");
    Json j;
    j.str("bench", "environment");
    j.str("device", info.name);
    j.str("cc", std::to_string(info.cc_major) + "." + std::to_string(info.cc_minor));
    j.integer("sm_count", info.sm_count);
    j.integer("l2_bytes", c.l2_bytes);
    j.boolean("sm90a_kernels", c.sm90a);
    j.str("twell_build", twell_build_info());
    j.integer("twell_version", twell_version());
    int cuda_rt = 0, cublas_v = static_cast<int>(cublasLtGetVersion());
    cudaRuntimeGetVersion(&cuda_rt);
    j.integer("cuda_runtime", cuda_rt);
    j.integer("cublaslt_version", cublas_v);
    j.str("date", date);
    measure_ceilings(c);
    j.num("copy_gbps", c.copy_gbps);
    j.num("gemm_peak_tflops", c.gemm_tflops);
    emit(j);
  }

  for (const Config& cfg : configs) run_config(c, cfg);

  g_doing = "shutting down";
  CUDA_CHECK(cudaDeviceSynchronize());
  cublasLtDestroy(c.lt);
  fprintf(stderr, "# done: %zu configurations, %d failure(s)\n", configs.size(), c.failures);
  return c.failures ? 1 : 0;
}
