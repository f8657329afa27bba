// Self-checking test and benchmark of the decode gate GEMM + TwELL pack
// (cuda/gate_gemm/gate_decode.cu).
//
//   ./test_gate_decode [--small] [--no-timing] [--seed N]
//
// Reference: a plain fp32 GEMM on the GPU (k in order) gives the accumulators,
// the reference packer twell::pack_rows packs them. The kernel sums in another
// order (mma.sync partials per K-slice, slices added in rank order), so a
// column whose |acc| <= eps = 1e-3 * typical |pre-activation| may land on
// either side of zero ("tolerated"); everything else must match exactly:
// counts, columns in ascending order, unused words zero, row flags, statistics.
// Values: |bf16 - ref| <= 1e-2 * |ref| + 1e-4 * typical. The packed buffer is
// poisoned (0xDEADBEEF) with guard rows past M; row_flags has guard bytes.
// Determinism: a second run must give bitwise the same words, flags, stats.
// Timing (not with --small / --no-timing): CUDA events, median of 50, W_g
// rotated over >= 4 copies (> L2), against a device-to-device copy.
//
// Exit: 0 pass, 1 a check failed, 2 a CUDA error, 77 no device that runs it.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/cublaslt.h"
#include "format/pack.h"
#include "gate_gemm/gate_decode.h"
#include "gate_gemm/gate_gemm.h"
#include "gate_gemm/gate_portable.h"

using twell::bf16;
using twell::u64;

#define CK(expr)                                                                                          \
  do {                                                                                                    \
    cudaError_t e_ = (expr);                                                                              \
    if (e_ != cudaSuccess) {                                                                              \
      std::printf("CUDA error %s (%s) at %s:%d: %s\n", cudaGetErrorName(e_), cudaGetErrorString(e_), __FILE__, \
                  __LINE__, #expr);                                                                       \
      std::fflush(stdout);                                                                                \
      std::exit(2);                                                                                       \
    }                                                                                                     \
  } while (0)

namespace {

constexpr uint32_t kPoison = 0xDEADBEEFu;
constexpr uint8_t kFlagGuard = 0xA5;
constexpr int kGuardRows = 2;

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

__device__ __forceinline__ float normal_at(uint64_t seed, uint64_t i) {
  const uint64_t h = splitmix64(seed ^ splitmix64(i));
  const float u1 = (static_cast<float>(h >> 40) + 0.5f) * (1.0f / 16777216.0f);
  const float u2 = static_cast<float>((h >> 16) & 0xFFFFFF) * (1.0f / 16777216.0f);
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

// rows x cols of N(0, scale^2), last column = last, padding (cols..ld) = NaN.
__global__ void init_matrix(bf16* p, int64_t rows, int64_t cols, int64_t ld, uint64_t seed, float scale, float last) {
  const int64_t n = rows * ld;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % ld;
    float v;
    if (c >= cols)
      v = __int_as_float(0x7fc00000);
    else if (c == cols - 1)
      v = last;
    else
      v = scale * normal_at(seed, static_cast<uint64_t>(i));
    p[i] = __float2bfloat16_rn(v);
  }
}

__global__ void fill_u32(uint32_t* p, int64_t n, uint32_t v) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = v;
}

// acc[m, n] = sum_k x[m, k] * w[n, k] in fp32, k ascending. One thread per (m, n).
__global__ void ref_gemm(const bf16* x, int64_t ldx, const bf16* w, int64_t ldw, float* acc, int64_t M, int64_t D,
                         int64_t H) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t m = blockIdx.y;
  if (n >= H || m >= M) return;
  float s = 0.0f;
  for (int64_t k = 0; k < D; ++k) s = fmaf(__bfloat162float(x[m * ldx + k]), __bfloat162float(w[n * ldw + k]), s);
  acc[m * H + n] = s;
}

__global__ void sleep_kernel(unsigned ns) {
  const long long t0 = clock64();
  while (clock64() - t0 < static_cast<long long>(ns) * 2) {
  }
}

float bf16_bits_to_float(uint32_t hi16) {
  const uint32_t u = hi16 << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Problem {
  int64_t M, D, H, ldx, ldw;
};

struct Failures {
  int64_t count = 0, entry = 0, value = 0, unused = 0, poison = 0, flag = 0, guard = 0, stats = 0, determinism = 0,
          tolerated = 0;
  int64_t total() const { return count + entry + value + unused + poison + flag + guard + stats + determinism; }
};

// Checks one slots setting of one data set. Returns the failure counters.
Failures check(const Problem& pr, int slots, const std::vector<float>& acc, double typ, const std::vector<uint32_t>& got,
               const std::vector<uint8_t>& flags, const std::vector<u64>& stats, const std::vector<uint32_t>& ref,
               const std::vector<uint8_t>& ref_flags, const std::vector<u64>& ref_stats) {
  Failures f;
  const int64_t tiles = twell::tiles_for(pr.H);
  const int64_t rw = tiles * slots;
  const int cap = slots - 1;
  const double eps = 1e-3 * typ;
  u64 active = 0, over = 0, maxc = 0;
  bool any_tol = false;
  for (int64_t m = 0; m < pr.M; ++m) {
    bool row_over = false, row_tol = false;
    for (int64_t t = 0; t < tiles; ++t) {
      const uint32_t* o = &got[m * rw + t * slots];
      const uint32_t* r = &ref[m * rw + t * slots];
      const int64_t c0 = t * 256;
      const int width = static_cast<int>(std::min<int64_t>(256, pr.H - c0));
      for (int w = 0; w < slots; ++w)
        if (o[w] == kPoison) ++f.poison;
      const uint32_t count = o[0];
      active += count;
      maxc = std::max<u64>(maxc, count);
      if (static_cast<int>(count) > cap) {
        ++over;
        row_over = true;
      }
      int amb = 0, rpos_strict = 0;
      for (int c = 0; c < width; ++c) {
        const double a = acc[m * pr.H + c0 + c];
        if (std::fabs(a) <= eps) ++amb;
        else if (a > 0) ++rpos_strict;
      }
      if (amb == 0) {
        if (count != r[0]) ++f.count;
      } else {
        if (static_cast<int>(count) < rpos_strict || static_cast<int>(count) > rpos_strict + amb) ++f.count;
        if (count != r[0]) {
          ++f.tolerated;
          row_tol = true;
          any_tol = true;
        }
      }
      const int stored = std::min<int>(static_cast<int>(count), cap);
      // entries: ascending, each positive or ambiguous, no strict positive skipped below the cutoff
      int prev = -1;
      for (int e = 0; e < stored; ++e) {
        const uint32_t word = o[1 + e];
        const int col = static_cast<int>(word & 0xFFFFu);
        if (col <= prev || col >= width) {
          ++f.entry;
          break;
        }
        for (int c = prev + 1; c < col; ++c) {  // skipped columns must not be strictly positive
          const double a = acc[m * pr.H + c0 + c];
          if (a > eps) {
            ++f.entry;
            break;
          }
        }
        const double a = acc[m * pr.H + c0 + col];
        if (!(a > eps || std::fabs(a) <= eps)) ++f.entry;
        const double v = bf16_bits_to_float(word >> 16);
        if (!(v > 0) || std::fabs(v - a) > 1e-2 * std::fabs(a) + 1e-4 * typ) ++f.value;
        prev = col;
      }
      if (static_cast<int>(count) <= cap) {  // all positives must be listed
        for (int c = prev + 1; c < width; ++c)
          if (acc[m * pr.H + c0 + c] > eps) {
            ++f.entry;
            break;
          }
      }
      for (int w = 1 + stored; w < slots; ++w)
        if (o[w] != 0u) ++f.unused;
      if (amb == 0) {
        for (int w = 0; w < slots; ++w)
          if (o[w] != r[w] && (w == 0 || ((o[w] ^ r[w]) & 0xFFFFu) != 0)) {  // same words (values may differ by rounding)
            ++f.entry;
            break;
          }
      }
    }
    if ((flags[m] != 0) != row_over) ++f.flag;
    if (!row_tol && flags[m] != ref_flags[m]) ++f.flag;
  }
  for (int g = 0; g < kGuardRows; ++g) {
    for (int64_t w = 0; w < rw; ++w)
      if (got[(pr.M + g) * rw + w] != kPoison) ++f.guard;
    if (flags[pr.M + g] != kFlagGuard) ++f.guard;
  }
  if (stats[TWELL_STAT_ACTIVE] != active || stats[TWELL_STAT_OVERFLOW_TILES] != over ||
      stats[TWELL_STAT_MAX_TILE_COUNT] != maxc)
    ++f.stats;
  for (int i = 0; i < TWELL_STATS_WORDS; ++i) {
    if (i == TWELL_STAT_ACTIVE || i == TWELL_STAT_OVERFLOW_TILES || i == TWELL_STAT_MAX_TILE_COUNT) continue;
    if (stats[i] != 0) ++f.stats;
  }
  if (!any_tol && (stats[TWELL_STAT_ACTIVE] != ref_stats[TWELL_STAT_ACTIVE] ||
                   stats[TWELL_STAT_OVERFLOW_TILES] != ref_stats[TWELL_STAT_OVERFLOW_TILES] ||
                   stats[TWELL_STAT_MAX_TILE_COUNT] != ref_stats[TWELL_STAT_MAX_TILE_COUNT]))
    ++f.stats;
  return f;
}

int g_sm_count = 0;

struct RunOut {
  std::vector<uint32_t> packed;
  std::vector<uint8_t> flags;
  std::vector<u64> stats;
};

RunOut run_decode(const Problem& pr, int slots, const bf16* x, const bf16* w, uint32_t* d_packed, uint8_t* d_flags,
                  u64* d_stats, cudaStream_t s, bool* launched, int variant = -1) {
  const int64_t rw = twell::tiles_for(pr.H) * slots;
  const int64_t words = (pr.M + kGuardRows) * rw;
  fill_u32<<<256, 256, 0, s>>>(d_packed, words, kPoison);
  CK(cudaGetLastError());
  CK(cudaMemsetAsync(d_flags, 0, pr.M, s));
  CK(cudaMemsetAsync(d_flags + pr.M, kFlagGuard, kGuardRows, s));
  CK(cudaMemsetAsync(d_stats, 0, TWELL_STATS_WORDS * sizeof(u64), s));
  twell::GatePackArgs a;
  a.x = x;
  a.ldx = pr.ldx;
  a.w = w;
  a.ldw = pr.ldw;
  a.M = pr.M;
  a.D = pr.D;
  a.H = pr.H;
  a.slots = slots;
  a.packed = d_packed;
  a.row_flags = d_flags;
  a.stats = d_stats;
  *launched = twell::gate_pack_decode_can_run(a);
  RunOut r;
  if (!*launched) return r;
  CK(twell::gate_pack_decode_variant(a, g_sm_count, s, variant));
  CK(cudaStreamSynchronize(s));
  r.packed.resize(words);
  r.flags.resize(pr.M + kGuardRows);
  r.stats.resize(TWELL_STATS_WORDS);
  CK(cudaMemcpy(r.packed.data(), d_packed, words * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(r.flags.data(), d_flags, pr.M + kGuardRows, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(r.stats.data(), d_stats, TWELL_STATS_WORDS * 8, cudaMemcpyDeviceToHost));
  return r;
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  bool small = false, timing = true;
  uint64_t seed = 12345;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--small") small = true, timing = false;
    else if (a == "--no-timing") timing = false;
    else if (a == "--seed" && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
  }
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  g_sm_count = prop.multiProcessorCount;
  std::printf("device %s, cc %d.%d, %d SMs, seed %llu\n", prop.name, prop.major, prop.minor, g_sm_count,
              static_cast<unsigned long long>(seed));
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

  std::vector<std::pair<int64_t, int64_t>> shapes = {{2048, 5632}, {4096, 14336}, {896, 4864},
                                                     {1024, 2816}, {64, 264},     {200, 520}};
  std::vector<int64_t> Ms = {1, 2, 7, 16, 33, 64};
  if (small) {
    shapes = {{64, 264}, {200, 520}, {896, 4864}};
    Ms = {1, 7, 33};
  }
  const int slot_opts[3] = {32, 64, 128};
  struct Pat {
    const char* name;
    float bias;
  } pats[3] = {{"sparse", -2.5758f}, {"heavy", 0.0f}, {"allneg", -40.0f}};

  int64_t cases = 0, failed_cases = 0, tolerated = 0;
  bool skipped = false;
  for (auto [D, H] : shapes) {
    const int64_t Mmax = 64;
    const int64_t ldw = D + (D == 200 ? 16 : 0);
    const int64_t ldx_max = D + 8;
    bf16 *d_x, *d_w;
    float* d_acc;
    uint32_t *d_packed, *d_ref;
    uint8_t *d_flags, *d_rflags;
    u64 *d_stats, *d_rstats;
    const int64_t rw_max = twell::tiles_for(H) * 128;
    CK(cudaMalloc(&d_x, Mmax * ldx_max * 2));
    CK(cudaMalloc(&d_w, H * ldw * 2));
    CK(cudaMalloc(&d_acc, Mmax * H * 4));
    CK(cudaMalloc(&d_packed, (Mmax + kGuardRows) * rw_max * 4));
    CK(cudaMalloc(&d_ref, Mmax * rw_max * 4));
    CK(cudaMalloc(&d_flags, Mmax + 16));
    CK(cudaMalloc(&d_rflags, Mmax + 16));
    CK(cudaMalloc(&d_stats, TWELL_STATS_WORDS * 8));
    CK(cudaMalloc(&d_rstats, TWELL_STATS_WORDS * 8));
    for (const Pat& pat : pats) {
      const float scale = 1.0f / std::sqrt(static_cast<float>(D - 1));
      ++seed;
      init_matrix<<<1024, 256, 0, s>>>(d_w, H, D, ldw, seed * 7919, scale, pat.bias);
      CK(cudaGetLastError());
      for (int64_t M : Ms) {
        Problem pr{M, D, H, D + (M == 7 ? 8 : 0), ldw};
        ++seed;
        init_matrix<<<256, 256, 0, s>>>(d_x, M, D, pr.ldx, seed * 104729, 1.0f, 1.0f);
        CK(cudaGetLastError());
        ref_gemm<<<dim3(static_cast<unsigned>((H + 127) / 128), static_cast<unsigned>(M)), 128, 0, s>>>(
            d_x, pr.ldx, d_w, ldw, d_acc, M, D, H);
        CK(cudaGetLastError());
        std::vector<float> acc(M * H);
        CK(cudaStreamSynchronize(s));
        CK(cudaMemcpy(acc.data(), d_acc, M * H * 4, cudaMemcpyDeviceToHost));
        double ss = 0;
        for (float v : acc) ss += (static_cast<double>(v) - pat.bias) * (static_cast<double>(v) - pat.bias);
        const double typ = std::sqrt(ss / static_cast<double>(acc.size()));
        for (int slots : slot_opts) {
          const int64_t rw = twell::tiles_for(H) * slots;
          CK(cudaMemsetAsync(d_rflags, 0, M, s));
          CK(cudaMemsetAsync(d_rstats, 0, TWELL_STATS_WORDS * 8, s));
          CK(twell::pack_rows(d_acc, true, H, M, H, slots, d_ref, d_rflags, d_rstats, s));
          CK(cudaStreamSynchronize(s));
          std::vector<uint32_t> ref(M * rw);
          std::vector<uint8_t> rflags(M);
          std::vector<u64> rstats(TWELL_STATS_WORDS);
          CK(cudaMemcpy(ref.data(), d_ref, M * rw * 4, cudaMemcpyDeviceToHost));
          CK(cudaMemcpy(rflags.data(), d_rflags, M, cudaMemcpyDeviceToHost));
          CK(cudaMemcpy(rstats.data(), d_rstats, TWELL_STATS_WORDS * 8, cudaMemcpyDeviceToHost));
          bool launched = false;
          RunOut r1 = run_decode(pr, slots, d_x, d_w, d_packed, d_flags, d_stats, s, &launched);
          if (!launched) {
            skipped = true;
            continue;
          }
          // second run with another main-loop variant: must be bitwise equal too
          RunOut r2 = run_decode(pr, slots, d_x, d_w, d_packed, d_flags, d_stats, s, &launched,
                                 static_cast<int>(cases % 3));
          Failures f = check(pr, slots, acc, typ, r1.packed, r1.flags, r1.stats, ref, rflags, rstats);
          if (r1.packed != r2.packed || r1.flags != r2.flags || r1.stats != r2.stats) ++f.determinism;
          ++cases;
          tolerated += f.tolerated;
          if (f.total() != 0) {
            ++failed_cases;
            std::printf(
                "FAIL D=%lld H=%lld M=%lld slots=%d %s: count %lld entry %lld value %lld unused %lld poison %lld "
                "flag %lld guard %lld stats %lld determinism %lld (active %llu/%llu)\n",
                (long long)D, (long long)H, (long long)M, slots, pat.name, (long long)f.count, (long long)f.entry,
                (long long)f.value, (long long)f.unused, (long long)f.poison, (long long)f.flag, (long long)f.guard,
                (long long)f.stats, (long long)f.determinism, (unsigned long long)r1.stats[TWELL_STAT_ACTIVE],
                (unsigned long long)rstats[TWELL_STAT_ACTIVE]);
          } else if (M == 64 && slots == 32) {
            std::printf("ok   D=%lld H=%lld M=%lld %s: active %llu, overflow tiles %llu, max tile %llu\n",
                        (long long)D, (long long)H, (long long)M, pat.name,
                        (unsigned long long)r1.stats[TWELL_STAT_ACTIVE],
                        (unsigned long long)r1.stats[TWELL_STAT_OVERFLOW_TILES],
                        (unsigned long long)r1.stats[TWELL_STAT_MAX_TILE_COUNT]);
          }
        }
      }
    }
    CK(cudaFree(d_x));
    CK(cudaFree(d_w));
    CK(cudaFree(d_acc));
    CK(cudaFree(d_packed));
    CK(cudaFree(d_ref));
    CK(cudaFree(d_flags));
    CK(cudaFree(d_rflags));
    CK(cudaFree(d_stats));
    CK(cudaFree(d_rstats));
  }
  if (skipped && cases == 0) {
    std::printf("gate_pack_decode cannot run on this device/build: skipped\n");
    return 77;
  }
  std::printf("correctness: %lld cases, %lld failed, %lld tolerated near-zero tiles\n", (long long)cases,
              (long long)failed_cases, (long long)tolerated);

  if (timing) {
    // Copy bandwidth (read + write).
    const size_t cb = size_t(512) << 20;
    void *ca, *cbuf;
    CK(cudaMalloc(&ca, cb));
    CK(cudaMalloc(&cbuf, cb));
    CK(cudaMemsetAsync(ca, 1, cb, s));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    std::vector<float> ts;
    for (int i = 0; i < 12; ++i) {
      CK(cudaEventRecord(e0, s));
      CK(cudaMemcpyAsync(cbuf, ca, cb, cudaMemcpyDeviceToDevice, s));
      CK(cudaEventRecord(e1, s));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (i >= 2) ts.push_back(ms);
    }
    const double copy_bw = 2.0 * cb / (median(ts) * 1e-3) / 1e9;
    std::printf("device copy: %.0f GB/s (read + write)\n", copy_bw);
    CK(cudaFree(ca));
    CK(cudaFree(cbuf));

    std::printf("%6s %6s %4s %10s %8s %8s %8s %8s %10s %8s %12s\n", "D", "H", "M", "decode_us", "GB/s", "v0_us", "v1_us",
                "v2_us", "sm90_us", "GB/s", "portable_us");
    // The portable route (cuBLASLt fp32 GEMM + the reference packer) as a
    // third baseline: at small M it can beat both fused kernels.
    void* lt_ws = nullptr;
    CK(cudaMalloc(&lt_ws, twell::kLtWorkspaceBytes));
    for (auto [D, H] : std::vector<std::pair<int64_t, int64_t>>{{2048, 5632}, {4096, 14336}, {896, 4864}}) {
      const size_t wbytes = static_cast<size_t>(H * D) * 2;
      const int copies = std::max<int>(4, static_cast<int>((size_t(200) << 20) / wbytes) + 1);
      std::vector<bf16*> ws(copies);
      for (int c = 0; c < copies; ++c) {
        CK(cudaMalloc(&ws[c], wbytes));
        init_matrix<<<1024, 256, 0, s>>>(ws[c], H, D, D, 99 + c, 1.0f / std::sqrt(float(D - 1)), -2.5758f);
        CK(cudaGetLastError());
      }
      bf16* x;
      uint32_t* packed;
      uint8_t* flags;
      u64* stats;
      CK(cudaMalloc(&x, 64 * D * 2));
      init_matrix<<<256, 256, 0, s>>>(x, 64, D, D, 7, 1.0f, 1.0f);
      CK(cudaMalloc(&packed, 64 * twell::tiles_for(H) * 32 * 4));
      CK(cudaMalloc(&flags, 64 + 16));
      CK(cudaMalloc(&stats, TWELL_STATS_WORDS * 8));
      CK(cudaMemsetAsync(flags, 0, 64, s));
      CK(cudaMemsetAsync(stats, 0, TWELL_STATS_WORDS * 8, s));
      void* chunk = nullptr;
      CK(cudaMalloc(&chunk, twell::gate_portable_workspace_bytes(64, H)));
      for (int64_t M : {1, 4, 16, 32, 64}) {
        twell::GatePackArgs a;
        a.x = x;
        a.ldx = D;
        a.ldw = D;
        a.M = M;
        a.D = D;
        a.H = H;
        a.slots = 32;
        a.packed = packed;
        a.row_flags = flags;
        a.stats = stats;
        float t[6] = {-1, -1, -1, -1, -1, -1};  // default, v0, v1, v2, sm90, portable
        for (int variant = 0; variant < 6; ++variant) {
          a.w = ws[0];
          if (variant < 4 && !twell::gate_pack_decode_can_run(a)) continue;
          if (variant == 4 && !(twell::gate_pack_sm90_compiled() && twell::gate_pack_sm90_can_run(a))) continue;
          if (variant == 5 && twell::gate_pack_portable(a, chunk, lt_ws, twell::kLtWorkspaceBytes, s) != TWELL_SUCCESS) {
            CK(cudaGetLastError());
            continue;
          }
          ts.clear();
          // A sleeping kernel ahead of each timed launch keeps the GPU busy while
          // the host enqueues, so the events see the kernel, not the launch gap.
          constexpr int kIters = 60;
          std::vector<cudaEvent_t> ev(2 * kIters);
          for (auto& e : ev) CK(cudaEventCreate(&e));
          for (int i = 0; i < kIters; ++i) {
            a.w = ws[i % copies];
            sleep_kernel<<<1, 1, 0, s>>>(30000);
            CK(cudaEventRecord(ev[2 * i], s));
            if (variant < 4) CK(twell::gate_pack_decode_variant(a, g_sm_count, s, variant - 1));
            else if (variant == 4) CK(twell::gate_pack_sm90(a, g_sm_count, s));
            else if (twell::gate_pack_portable(a, chunk, lt_ws, twell::kLtWorkspaceBytes, s) != TWELL_SUCCESS) CK(cudaErrorUnknown);
            CK(cudaEventRecord(ev[2 * i + 1], s));
          }
          CK(cudaStreamSynchronize(s));
          for (int i = 10; i < kIters; ++i) {
            float ms;
            CK(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]));
            ts.push_back(ms);
          }
          for (auto& e : ev) CK(cudaEventDestroy(e));
          t[variant] = median(ts) * 1e3f;
        }
        std::printf("%6lld %6lld %4lld %10.2f %8.0f %8.2f %8.2f %8.2f %10.2f %8.0f %12.2f\n", (long long)D, (long long)H,
                    (long long)M, t[0], t[0] > 0 ? wbytes / (t[0] * 1e-6) / 1e9 : 0.0, t[1], t[2], t[3], t[4],
                    t[4] > 0 ? wbytes / (t[4] * 1e-6) / 1e9 : 0.0, t[5]);
      }
      for (auto p : ws) CK(cudaFree(p));
      CK(cudaFree(chunk));
      CK(cudaFree(x));
      CK(cudaFree(packed));
      CK(cudaFree(flags));
      CK(cudaFree(stats));
    }
    CK(cudaFree(lt_ws));
  }
  CK(cudaStreamDestroy(s));
  if (failed_cases) {
    std::printf("FAILED\n");
    return 1;
  }
  std::printf("PASSED\n");
  return 0;
}
