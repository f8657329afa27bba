// The scaffolding every standalone CUDA test and benchmark program shares, so that each program
// holds only its kernel's own logic: exit statuses, CUDA/cuBLAS checks, a hang watchdog,
// counter-based random numbers, bf16 bit helpers, output poisoning, a plain fp32 reference GEMM,
// and one timing method (CUDA events around every call, warm-up, inputs rotated over sets that
// together exceed the L2, short calls queued behind a blocking kernel, median and quantiles).
//
// Header-only and self-contained (CUDA runtime and the C++ standard library only), so the
// benchmarks that link just the public library can use it too. Include it in one translation
// unit of a program: the kernels below are ordinary (non-inline) definitions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace harness {

// ---------------------------------------------------------------- exit statuses
constexpr int kExitPass = 0;
constexpr int kExitFail = 1;       // a check failed
constexpr int kExitCudaError = 2;  // a CUDA or cuBLAS call failed outside the code under test
constexpr int kExitHang = 3;       // a kernel did not finish (see wait_for)
constexpr int kExitSkip = 77;      // nothing here can run it: ctest's SKIP_RETURN_CODE (CMakeLists.txt)

// ---------------------------------------------------------------- checks
// What a failed check does with its message ("file:line: expression -> what went wrong"): by
// default print it and exit with kExitCudaError. A program that wants more context or another
// exit status installs its own handler (bench_ffn names what it was doing and exits 3); a
// handler must not return.
using FatalHandler = void (*)(const char* message);
inline FatalHandler fatal_handler = nullptr;

[[noreturn]] inline void fail_check(const char* file, int line, const char* expr, const char* what) {
  char msg[1024];
  std::snprintf(msg, sizeof msg, "%s:%d: %s -> %s", file, line, expr, what);
  if (fatal_handler != nullptr) fatal_handler(msg);
  std::fflush(stdout);
  std::fprintf(stderr, "FATAL: %s\n", msg);
  std::exit(kExitCudaError);
}

inline void check_cuda(cudaError_t e, const char* file, int line, const char* expr) {
  if (e == cudaSuccess) return;
  char what[512];
  std::snprintf(what, sizeof what, "%s (%s)", cudaGetErrorName(e), cudaGetErrorString(e));
  fail_check(file, line, expr, what);
}

// cuBLAS and cuBLASLt statuses are plain enums whose success value is 0; taking an int keeps
// this header free of the cuBLAS headers.
inline void check_cublas(int status, const char* file, int line, const char* expr) {
  if (status == 0) return;
  char what[64];
  std::snprintf(what, sizeof what, "cuBLAS status %d", status);
  fail_check(file, line, expr, what);
}

#define CUDA_CHECK(expr) ::harness::check_cuda((expr), __FILE__, __LINE__, #expr)
#define CUBLAS_CHECK(expr) ::harness::check_cublas(static_cast<int>(expr), __FILE__, __LINE__, #expr)

// Waits for the stream, but gives up if it has not drained after limit_s: a kernel that hangs
// must fail the program rather than the CI job's time limit. std::_Exit, because a normal exit
// would wait for the hung kernel while tearing down the CUDA context.
inline void wait_for(cudaStream_t s, const char* what, double limit_s = 120.0) {
  const auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    const cudaError_t e = cudaStreamQuery(s);
    if (e == cudaSuccess) return;
    if (e != cudaErrorNotReady) check_cuda(e, __FILE__, __LINE__, what);
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > limit_s) {
      std::fflush(stdout);
      std::fprintf(stderr, "HANG: %s did not finish in %.0f s\n", what, limit_s);
      std::fflush(stderr);
      std::_Exit(kExitHang);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

// The first CUDA device's properties, or false (and a SKIP line) when there is none.
inline bool first_device(cudaDeviceProp* prop) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("SKIP: no CUDA device\n");
    return false;
  }
  CUDA_CHECK(cudaGetDeviceProperties(prop, 0));
  return true;
}

// ---------------------------------------------------------------- device buffers
// Blocks for a grid-stride loop over n elements (the grid-stride loop covers the rest).
inline int grid_for(int64_t n, int block = 256) {
  return static_cast<int>(std::min<int64_t>((n + block - 1) / block, 65536));
}

// A device copy of a host vector (at least one element, so an empty vector gives a valid pointer).
template <typename T>
T* upload(const std::vector<T>& h) {
  T* d = nullptr;
  CUDA_CHECK(cudaMalloc(&d, std::max<size_t>(h.size(), 1) * sizeof(T)));
  if (!h.empty()) CUDA_CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// ---------------------------------------------------------------- random numbers
// Counter-based: value i of a tensor depends only on (seed, i), for any launch shape.
__host__ __device__ inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// N(0, 1) by Box-Muller on two 24-bit uniforms of one hash.
__device__ inline float normal_at(uint64_t seed, uint64_t i) {
  const uint64_t h = splitmix64(seed ^ splitmix64(i));
  const float u1 = (static_cast<float>(h >> 40) + 0.5f) * (1.0f / 16777216.0f);
  const float u2 = static_cast<float>((h >> 16) & 0xFFFFFF) * (1.0f / 16777216.0f);
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

// The host stream of the same generator (splitmix64 of a counter stepped by its increment).
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    const uint64_t z = splitmix64(s);
    s += 0x9E3779B97F4A7C15ull;
    return z;
  }
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
  double normal() {
    double u1 = uniform();
    const double u2 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  uint64_t below(uint64_t n) { return next() % n; }
};

// ---------------------------------------------------------------- bf16 bits
// Host code holds bf16 as its 16 bits. Round to nearest even, NaN to the canonical 0x7FFF:
// the same bits as __float2bfloat16_rn, without its host-side overhead in bulk fills.
__host__ __device__ inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFFu;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

__host__ __device__ inline float bf16_bits_to_float(uint32_t bits) {
  const uint32_t u = (bits & 0xFFFFu) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline double round_to_bf16(double v) { return bf16_bits_to_float(float_to_bf16_bits(static_cast<float>(v))); }

inline bool bf16_is_nan(uint16_t b) { return (b & 0x7F80u) == 0x7F80u && (b & 0x7Fu) != 0; }

// ---------------------------------------------------------------- poisoning
// Outputs are filled with a value no correct kernel writes before every call, so that a word
// it failed to write (or wrote out of bounds) shows; never zeros, which a kernel may leave.
constexpr uint32_t kPoisonWord = 0xDEADBEEFu;  // 32-bit outputs (TwELL words)
constexpr uint16_t kPoisonBf16 = 0xFFFFu;      // bf16 outputs: a NaN, so it also shows in a norm
constexpr uint8_t kGuardByte = 0xA5;           // guard bytes past the end of a byte array

__global__ void fill_words_kernel(uint32_t* p, int64_t n, uint32_t v) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = v;
}

inline void poison_words(uint32_t* p, int64_t n, cudaStream_t s) {
  fill_words_kernel<<<grid_for(n), 256, 0, s>>>(p, n, kPoisonWord);
  CUDA_CHECK(cudaGetLastError());
}

inline void poison_bf16(void* p, size_t count, cudaStream_t s) {
  CUDA_CHECK(cudaMemsetAsync(p, 0xFF, count * 2, s));  // every element kPoisonBf16
}

// ---------------------------------------------------------------- inputs and references
// rows x cols of N(0, scale^2) bf16, row stride ld; the last column is `last` (a bias or a
// threshold against an input whose last column is 1); the padding (cols..ld) is NaN, so a
// kernel that reads it shows it.
__global__ void fill_normal_bf16_kernel(__nv_bfloat16* p, int64_t rows, int64_t cols, int64_t ld, uint64_t seed,
                                        float scale, float last) {
  const int64_t n = rows * ld;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % ld;
    float v;
    if (c >= cols) v = __int_as_float(0x7fc00000);
    else if (c == cols - 1) v = last;
    else v = scale * normal_at(seed, static_cast<uint64_t>(i));
    p[i] = __float2bfloat16_rn(v);
  }
}

inline void fill_normal_bf16(__nv_bfloat16* p, int64_t rows, int64_t cols, int64_t ld, uint64_t seed, float scale,
                             float last, cudaStream_t s) {
  fill_normal_bf16_kernel<<<grid_for(rows * ld), 256, 0, s>>>(p, rows, cols, ld, seed, scale, last);
  CUDA_CHECK(cudaGetLastError());
}

// A bf16 matrix operand by element strides: element (i, j) is p[i * si + j * sj].
struct StridedBf16 {
  const __nv_bfloat16* p;
  int64_t si, sj;
};

// C[m, n] = sum_k A(m, k) B(k, n) in fp32: one fmaf chain per element with k ascending, so the
// result does not depend on the tiling (64 x 64 per block of 256 threads, 4 x 4 per thread).
__global__ void __launch_bounds__(256) reference_gemm_kernel(StridedBf16 A, StridedBf16 B, float* C, int64_t ldc,
                                                             int64_t M, int64_t N, int64_t K) {
  __shared__ float as[16][64 + 1];
  __shared__ float bs[16][64 + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * 64, n0 = static_cast<int64_t>(blockIdx.x) * 64;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    // Walk memory along the operand's unit stride, so the loads coalesce.
    for (int idx = threadIdx.x; idx < 16 * 64; idx += 256) {
      const bool a_k_inner = A.sj == 1;
      const int ak = a_k_inner ? idx % 16 : idx / 64, am = a_k_inner ? idx / 16 : idx % 64;
      const int64_t m = m0 + am, k = k0 + ak;
      as[ak][am] = (m < M && k < K) ? __bfloat162float(A.p[m * A.si + k * A.sj]) : 0.0f;
      const bool b_k_inner = B.si == 1;
      const int bk = b_k_inner ? idx % 16 : idx / 64, bn = b_k_inner ? idx / 16 : idx % 64;
      const int64_t n = n0 + bn, kb = k0 + bk;
      bs[bk][bn] = (n < N && kb < K) ? __bfloat162float(B.p[kb * B.si + n * B.sj]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < 16; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = as[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + ty * 4 + i, n = n0 + tx * 4 + j;
      if (m < M && n < N) C[m * ldc + n] = acc[i][j];
    }
}

inline void reference_gemm(StridedBf16 A, StridedBf16 B, float* C, int64_t ldc, int64_t M, int64_t N, int64_t K,
                           cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((N + 63) / 64), static_cast<unsigned>((M + 63) / 64));
  reference_gemm_kernel<<<grid, 256, 0, s>>>(A, B, C, ldc, M, N, K);
  CUDA_CHECK(cudaGetLastError());
}

// acc[m, n] = x[m, :] . w[n, :] (row-major x [M, K] and w [N, K], nn.Linear's layout).
inline void reference_linear(const __nv_bfloat16* x, int64_t ldx, const __nv_bfloat16* w, int64_t ldw, float* acc,
                             int64_t M, int64_t N, int64_t K, cudaStream_t s) {
  reference_gemm({x, ldx, 1}, {w, 1, ldw}, acc, N, M, N, K, s);
}

// ---------------------------------------------------------------- timing
// Linear-interpolated quantile q in [0, 1] of the values (NaN for none).
template <typename T>
double quantile(std::vector<T> v, double q) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  const double pos = q * (v.size() - 1);
  const size_t lo = static_cast<size_t>(pos);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - lo) * (v[hi] - v[lo]);
}

// Spins until the host sets *release (or timeout_ns of GPU time pass, then sets *timed_out),
// so the work queued behind it starts only once the host has queued all of it (the "blocking
// kernel" of NVIDIA's nvbench).
__global__ void hold_stream_kernel(const volatile int* release, volatile int* timed_out,
                                   unsigned long long timeout_ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  while (*release == 0) {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    if (t - t0 > timeout_ns) {
      *timed_out = 1;
      return;
    }
    __nanosleep(1000);
  }
}

// A stream held by hold_stream_kernel through two flags in mapped host memory.
class StreamHold {
 public:
  StreamHold() {
    CUDA_CHECK(cudaHostAlloc(&release_host_, sizeof(int), cudaHostAllocMapped));
    CUDA_CHECK(cudaHostGetDevicePointer(&release_dev_, release_host_, 0));
    CUDA_CHECK(cudaHostAlloc(&timeout_host_, sizeof(int), cudaHostAllocMapped));
    CUDA_CHECK(cudaHostGetDevicePointer(&timeout_dev_, timeout_host_, 0));
  }
  ~StreamHold() {
    cudaFreeHost(release_host_);
    cudaFreeHost(timeout_host_);
  }
  StreamHold(const StreamHold&) = delete;
  StreamHold& operator=(const StreamHold&) = delete;

  void engage(cudaStream_t s, unsigned long long timeout_ns = 2000000000ull) {
    *static_cast<volatile int*>(release_host_) = 0;
    *static_cast<volatile int*>(timeout_host_) = 0;
    hold_stream_kernel<<<1, 1, 0, s>>>(release_dev_, timeout_dev_, timeout_ns);
    CUDA_CHECK(cudaGetLastError());
  }
  void release() {
    __sync_synchronize();
    *static_cast<volatile int*>(release_host_) = 1;
  }
  // Whether the last hold gave up before release() (valid once the stream has drained).
  bool timed_out() const { return *static_cast<volatile int*>(timeout_host_) != 0; }

 private:
  int* release_host_ = nullptr;
  int* release_dev_ = nullptr;
  int* timeout_host_ = nullptr;
  int* timeout_dev_ = nullptr;
};

// How the timed calls reach the GPU.
enum class Queue {
  kHeld,        // calls whose warm-up took under 1 ms queued in batches behind the blocking kernel:
                // the events see GPU time only (a stream of layers); longer calls as they come
  kBackToBack,  // as they come, in batches: host launch gaps are in the times when the host is slower
  kIdle,        // one at a time on an idle GPU: the time of a lone call, launch latency included
};

struct TimeOptions {
  int warmup = 5;  // untimed calls first (at least 1: the last one decides how kHeld queues)
  int reps = 50;   // timed calls
  int sets = 1;    // call k gets input set k % sets: enough sets that one pass exceeds the L2
  Queue queue = Queue::kHeld;
};

struct Timing {
  double med = NAN, p10 = NAN, p90 = NAN, mean = NAN;  // milliseconds per call
  int n = 0;
  bool blocked = false;  // the timed calls were queued behind the blocking kernel
  int blocking_timeouts = 0;
};

// The one timing method of the test and benchmark programs: CUDA events around every call.
// Its events and flags are made on the current device at the first time() call, so a Timer
// can be declared before the program has found (or chosen) its device.
class Timer {
 public:
  static constexpr int kBatch = 16;             // timed calls queued behind one blocking kernel
  static constexpr float kBlockBelowMs = 1.0f;  // longer calls: the host is ahead of the GPU anyway

  Timer() = default;
  ~Timer() {
    if (!hold_) return;
    for (int i = 0; i < kBatch; ++i) {
      cudaEventDestroy(start_[i]);
      cudaEventDestroy(stop_[i]);
    }
  }
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;

  // call(run, set) enqueues one call on s; it returns void, or a std::string that is empty on
  // success and otherwise stops the timing and comes back in *error. Runs 0..warmup-1 are
  // untimed, then `reps` timed runs; run r uses set r % sets. Long calls are never held, which
  // also keeps calls of many launches from filling the launch queue while the stream is held.
  template <class Call>
  Timing time(Call&& call, const TimeOptions& o, cudaStream_t s, std::string* error = nullptr) {
    init();
    Timing t;
    int run = 0;
    const int warm = std::max(o.warmup, 1);
    for (; run < warm; ++run) {
      if (run == warm - 1) CUDA_CHECK(cudaEventRecord(start_[0], s));
      std::string e = invoke(call, run, run % o.sets);
      if (run == warm - 1) CUDA_CHECK(cudaEventRecord(stop_[0], s));
      if (!e.empty()) return fail(t, e, error);
    }
    wait_for(s, "warm-up calls");
    float last_warm_ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&last_warm_ms, start_[0], stop_[0]));
    bool block = o.queue == Queue::kHeld && last_warm_ms < kBlockBelowMs;
    t.blocked = block;
    const int batch = o.queue == Queue::kIdle ? 1 : kBatch;
    std::vector<float> ms;
    for (int r0 = 0; r0 < o.reps; r0 += batch) {
      const int n = std::min(batch, o.reps - r0);
      if (block) hold_->engage(s);
      std::string e;
      for (int k = 0; k < n && e.empty(); ++k, ++run) {
        CUDA_CHECK(cudaEventRecord(start_[k], s));
        e = invoke(call, run, run % o.sets);
        CUDA_CHECK(cudaEventRecord(stop_[k], s));
      }
      if (block) hold_->release();
      wait_for(s, "timed calls");
      if (!e.empty()) return fail(t, e, error);
      if (block && hold_->timed_out()) {
        ++t.blocking_timeouts;
        block = false;  // the host could not queue a batch in time: stop holding the stream
      }
      for (int k = 0; k < n; ++k) {
        float v = 0;
        CUDA_CHECK(cudaEventElapsedTime(&v, start_[k], stop_[k]));
        ms.push_back(v);
      }
    }
    t.n = static_cast<int>(ms.size());
    t.med = quantile(ms, 0.5);
    t.p10 = quantile(ms, 0.1);
    t.p90 = quantile(ms, 0.9);
    double sum = 0;
    for (float v : ms) sum += v;
    t.mean = ms.empty() ? NAN : sum / ms.size();
    return t;
  }

 private:
  void init() {
    if (hold_) return;
    for (int i = 0; i < kBatch; ++i) {
      CUDA_CHECK(cudaEventCreate(&start_[i]));
      CUDA_CHECK(cudaEventCreate(&stop_[i]));
    }
    hold_.emplace();
  }
  template <class Call>
  static std::string invoke(Call& call, int run, int set) {
    if constexpr (std::is_void_v<decltype(call(run, set))>) {
      call(run, set);
      return std::string();
    } else {
      return call(run, set);
    }
  }
  static Timing fail(const Timing& t, const std::string& e, std::string* error) {
    if (error != nullptr) *error = e;
    return t;
  }

  cudaEvent_t start_[kBatch] = {}, stop_[kBatch] = {};
  std::optional<StreamHold> hold_;  // engaged once init() has run
};

}  // namespace harness
