// Self-checking test and benchmark of the sm_90a gate GEMM with the TwELL
// packing epilogue (cuda/gate_gemm/gate_gemm_sm90.cu).
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -DTWELL_HAS_SM90A=1 \
//        -Iinclude -Icuda tests/cuda/test_gate_gemm_sm90.cu cuda/gate_gemm/gate_gemm_sm90.cu \
//        -lcublas -o test_gate_gemm_sm90
//   ./test_gate_gemm_sm90 [--seed N] [--quick] [--no-timing] [--timing-only]
//                         [--variant C,E,W] [--profile C,E,W]
// Variants (cuda/gate_gemm/sm90_gate_gemm_internal.cuh): C = cluster size 1|2,
// E = epilogue 0 (TMA store) | 1 (direct stores) | 2 (main loop only, timing) |
// 3 (direct stores, values staged in shared memory); W = wgmma groups in flight 1|0;
// "default" is the public gate_pack_sm90().
//
// Reference: a plain fp32 GEMM on the GPU (k in order) gives the accumulators;
// the checker walks every (row, TwELL tile) of the kernel's output against
// them. The kernel's fp32 sums run in another order, so a value within
// eps = 1e-3 * (typical |pre-activation|) of zero may land on either side of
// zero: such a column may be present or absent (counted as "tolerated" and
// reported), anything else must match exactly: counts, columns in ascending
// order, unused words zero, row flags, statistics. Values: |bf16 - ref| <=
// 1e-2 * |ref| + 1e-4 * typical (bf16 rounding is 2^-9 relative; the floor
// covers the fp32 summation-order difference near zero).
// The packed buffer is poisoned with 0xDEADBEEF (and has guard rows past M),
// so an unwritten word or a write past row M is caught.
//
// Exit status: 0 all checks passed, 1 a check failed, 2 a CUDA error,
// 3 a kernel did not finish (hang), 77 no sm_90 device.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#if __has_include(<cublas_v2.h>)
#include <cublas_v2.h>
#define TEST_HAVE_CUBLAS 1
#else
#define TEST_HAVE_CUBLAS 0
#endif

#include "gate_gemm/gate_gemm.h"
#include "gate_gemm/sm90_gate_gemm_internal.cuh"
#include "harness.cuh"

using twell::bf16;

namespace {

using harness::grid_for;
using harness::kGuardByte;
using harness::kPoisonWord;

constexpr int kGuardRows = 3;
constexpr double kKernelLimitS = 20.0;  // a kernel under test that runs longer has hung

// sum of (acc + shift)^2 -> typical magnitude of the x.w part.
__global__ void sum_sq(const float* acc, int64_t n, float shift, double* out) {
  double s = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double v = static_cast<double>(acc[i]) + shift;
    s += v * v;
  }
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if ((threadIdx.x & 31) == 0) atomicAdd(out, s);
}

// ------------------------------------------------------------------ checker
enum Ctr {
  kErrCount = 0,   // count word wrong (beyond near-zero tolerance)
  kErrEntry,       // missing / extra / unordered entry
  kErrValue,       // value outside tolerance
  kErrUnused,      // unused word not zero
  kErrPoison,      // word still 0xDEADBEEF (never written)
  kErrFlag,        // row flag wrong
  kErrGuard,       // write past row M (packed or row_flags)
  kTolerated,      // near-zero flips accepted
  kSumK,           // sum of kernel counts
  kSumRef,         // sum of reference counts
  kOvfK,           // kernel tiles over capacity
  kOvfRef,         // reference tiles over capacity
  kMaxK,           // max kernel count
  kFlagTol,        // row flag differences explained by near-zero flips
  kRowsFlagged,    // rows with flag 1
  kNumCtr
};
const char* kCtrNames[kNumCtr] = {"count", "entry",  "value", "unused", "poison", "flag",    "guard",      "tolerated",
                                  "sumK",  "sumRef", "ovfK",  "ovfRef", "maxK",   "flagTol", "rowsFlagged"};

__device__ void note_error(int* first, int64_t row, int64_t tile, int kind) {
  if (atomicCAS(first, -1, kind) == -1) {
    first[1] = static_cast<int>(row);
    first[2] = static_cast<int>(tile);
  }
}

__global__ void check_tiles(const uint32_t* packed, const float* acc, int64_t M, int64_t H, int slots, float eps,
                            float vabs, uint8_t* status, unsigned long long* ctr, int* first) {
  const int64_t tiles = (H + 255) / 256;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= M * tiles) return;
  const int64_t row = idx / tiles, tile = idx % tiles;
  const uint32_t* K = packed + row * tiles * slots + tile * slots;
  const float* a = acc + row * H + tile * 256;
  const int valid = static_cast<int>(H - tile * 256 < 256 ? H - tile * 256 : 256);
  const uint32_t cap = slots - 1;
  unsigned long long e_count = 0, e_entry = 0, e_value = 0, e_unused = 0, e_poison = 0, tol = 0;

  for (int i = 0; i < slots; ++i) e_poison += (K[i] == kPoisonWord);

  uint32_t ref_cnt = 0, lo = 0, hi = 0;
  for (int c = 0; c < valid; ++c) {
    const float v = a[c];
    ref_cnt += v > 0.0f;
    lo += v >= eps;
    hi += v > -eps;
  }
  const uint32_t cntk = K[0];
  bool amb = false;
  if (cntk != ref_cnt) {
    if (cntk >= lo && cntk <= hi) {
      amb = true;
    } else {
      ++e_count;
    }
  }
  const uint32_t nst = min(cntk, cap);
  uint32_t e = 1;
  for (int c = 0; c < valid; ++c) {
    const float v = a[c];
    const bool stored = e <= nst && static_cast<int>(K[e] & 0xFFFFu) == c;
    if (stored) {
      const float vk = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(K[e] >> 16)));
      if (v >= eps) {
        if (!(fabsf(vk - v) <= 1e-2f * v + 1e-4f * vabs)) ++e_value;
      } else if (v > -eps) {
        if (!(vk >= 0.0f && vk <= 2.0f * eps)) ++e_value;
        if (v <= 0.0f) {
          ++tol;
          amb = true;
        }
      } else {
        ++e_entry;  // a clearly negative column stored
      }
      ++e;
    } else if (v > 0.0f) {
      if (e > nst && cntk > cap) {
        // beyond capacity: correctly dropped
      } else if (v < eps) {
        ++tol;
        amb = true;
      } else {
        ++e_entry;
      }
    }
  }
  if (e <= nst) ++e_entry;  // stored entries left over: unordered, duplicate or out of range
  for (uint32_t i = nst + 1; i < static_cast<uint32_t>(slots); ++i) e_unused += (K[i] != 0u);
  if (cntk != ref_cnt && amb) tol += (cntk > ref_cnt ? cntk - ref_cnt : ref_cnt - cntk);

  if (e_count) atomicAdd(ctr + kErrCount, e_count);
  if (e_entry) atomicAdd(ctr + kErrEntry, e_entry);
  if (e_value) atomicAdd(ctr + kErrValue, e_value);
  if (e_unused) atomicAdd(ctr + kErrUnused, e_unused);
  if (e_poison) atomicAdd(ctr + kErrPoison, e_poison);
  if (tol) atomicAdd(ctr + kTolerated, tol);
  atomicAdd(ctr + kSumK, static_cast<unsigned long long>(cntk));
  atomicAdd(ctr + kSumRef, static_cast<unsigned long long>(ref_cnt));
  if (cntk > cap) atomicAdd(ctr + kOvfK, 1ull);
  if (ref_cnt > cap) atomicAdd(ctr + kOvfRef, 1ull);
  atomicMax(ctr + kMaxK, static_cast<unsigned long long>(cntk));
  if (e_count + e_entry + e_value + e_unused + e_poison) {
    const int kind = e_poison  ? kErrPoison
                     : e_count ? kErrCount
                     : e_entry ? kErrEntry
                     : e_value ? kErrValue
                               : kErrUnused;
    note_error(first, row, tile, kind);
  }
  status[idx] = static_cast<uint8_t>((cntk > cap ? 1 : 0) | (ref_cnt > cap ? 2 : 0) | (amb ? 4 : 0));
}

__global__ void check_rows(const uint8_t* status, const uint8_t* flags, const uint32_t* packed, int64_t M,
                           int64_t tiles, int64_t row_words, unsigned long long* ctr, int* first) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row < M) {
    uint8_t any = 0;
    for (int64_t t = 0; t < tiles; ++t) any |= status[row * tiles + t];
    const bool ovk = any & 1, ovr = any & 2, amb = any & 4;
    const uint8_t f = flags[row];
    if (f == 1) atomicAdd(ctr + kRowsFlagged, 1ull);
    if (f != (ovk ? 1 : 0)) {
      atomicAdd(ctr + kErrFlag, 1ull);
      note_error(first, row, -1, kErrFlag);
    } else if (ovk != ovr) {
      if (amb) {
        atomicAdd(ctr + kFlagTol, 1ull);
      } else {
        atomicAdd(ctr + kErrFlag, 1ull);
        note_error(first, row, -1, kErrFlag);
      }
    }
  } else if (row < M + kGuardRows) {
    bool bad = flags[row] != kGuardByte;
    for (int64_t i = 0; i < row_words; ++i) bad |= packed[row * row_words + i] != kPoisonWord;
    if (bad) {
      atomicAdd(ctr + kErrGuard, 1ull);
      note_error(first, row, -1, kErrGuard);
    }
  }
}

__global__ void count_diff(const uint32_t* a, const uint32_t* b, int64_t n, unsigned long long* out) {
  unsigned long long d = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    d += a[i] != b[i];
  if (d) atomicAdd(out, d);
}

// ------------------------------------------------------------------- driver
struct Problem {
  int64_t M, D, H, ldx, ldw;
  float t;  // threshold: pre-activation = x.w - t
};

struct Buffers {
  bf16* x = nullptr;
  bf16* w = nullptr;
  float* acc = nullptr;
  double typical = 1.0;
};

struct Var {
  bool is_default;
  twell::GatePackSm90Variant v;
  std::string name;
};

std::string var_name(const twell::GatePackSm90Variant& v) {
  return "c" + std::to_string(v.cluster) + "e" + std::to_string(v.epilogue) + "w" + std::to_string(v.inflight) + "g" +
         std::to_string(v.group_n);
}

Var make_var(int cluster, int epi, int inflight = 1, int group_n = 8) {
  Var r;
  r.is_default = false;
  r.v.cluster = cluster;
  r.v.consumers = 2;
  r.v.epilogue = epi;
  r.v.inflight = inflight;
  r.v.group_n = group_n;
  r.name = var_name(r.v);
  return r;
}

Var default_var() {
  Var r;
  r.is_default = true;
  r.v = twell::gate_pack_sm90_default_variant();
  r.name = "default=" + var_name(r.v);
  return r;
}

uint64_t g_seed = 0;
int g_num_sms = 0;
cudaStream_t g_stream;
int g_failures = 0;
int g_checks = 0;

cudaError_t launch_var(const twell::GatePackArgs& a, const Var& v, int* grid = nullptr) {
  if (v.is_default) return twell::gate_pack_sm90(a, g_num_sms, g_stream);
  return twell::gate_pack_sm90_variant(a, g_num_sms, g_stream, v.v, grid);
}

void make_problem(const Problem& pb, Buffers& b, uint64_t seed) {
  CUDA_CHECK(cudaMalloc(&b.x, pb.M * pb.ldx * sizeof(bf16)));
  CUDA_CHECK(cudaMalloc(&b.w, pb.H * pb.ldw * sizeof(bf16)));
  CUDA_CHECK(cudaMalloc(&b.acc, pb.M * pb.H * sizeof(float)));
  harness::fill_normal_bf16(b.x, pb.M, pb.D, pb.ldx, seed * 2 + 1, 1.0f, 1.0f, g_stream);
  harness::fill_normal_bf16(b.w, pb.H, pb.D, pb.ldw, seed * 2 + 2,
                            1.0f / std::sqrt(static_cast<float>(std::max<int64_t>(pb.D - 1, 1))), -pb.t, g_stream);
  harness::reference_linear(b.x, pb.ldx, b.w, pb.ldw, b.acc, pb.M, pb.H, pb.D, g_stream);
  double* d_sum;
  CUDA_CHECK(cudaMalloc(&d_sum, sizeof(double)));
  CUDA_CHECK(cudaMemsetAsync(d_sum, 0, sizeof(double), g_stream));
  sum_sq<<<grid_for(pb.M * pb.H), 256, 0, g_stream>>>(b.acc, pb.M * pb.H, pb.t, d_sum);
  double h_sum = 0;
  CUDA_CHECK(cudaMemcpyAsync(&h_sum, d_sum, sizeof(double), cudaMemcpyDeviceToHost, g_stream));
  harness::wait_for(g_stream, "reference GEMM", 120.0);
  CUDA_CHECK(cudaFree(d_sum));
  b.typical = std::sqrt(h_sum / static_cast<double>(pb.M * pb.H));
  if (!(b.typical > 0)) b.typical = 1.0;
}

void free_problem(Buffers& b) {
  CUDA_CHECK(cudaFree(b.x));
  CUDA_CHECK(cudaFree(b.w));
  CUDA_CHECK(cudaFree(b.acc));
  b = Buffers();
}

// Host re-pack of one tile for diagnostics.
void print_tile_diag(const Problem& pb, const Buffers& b, const uint32_t* d_packed, int slots, int64_t row,
                     int64_t tile) {
  const int64_t tiles = (pb.H + 255) / 256;
  std::vector<uint32_t> k(slots);
  CUDA_CHECK(cudaMemcpy(k.data(), d_packed + row * tiles * slots + tile * slots, slots * 4, cudaMemcpyDeviceToHost));
  const int valid = static_cast<int>(std::min<int64_t>(256, pb.H - tile * 256));
  std::vector<float> a(valid);
  CUDA_CHECK(cudaMemcpy(a.data(), b.acc + row * pb.H + tile * 256, valid * 4, cudaMemcpyDeviceToHost));
  std::vector<uint32_t> r(slots, 0);
  uint32_t cnt = 0;
  for (int c = 0; c < valid; ++c) {
    if (a[c] > 0) {
      if (cnt < static_cast<uint32_t>(slots - 1)) {
        r[1 + cnt] = (static_cast<uint32_t>(harness::float_to_bf16_bits(a[c])) << 16) | static_cast<uint32_t>(c);
      }
      ++cnt;
    }
  }
  r[0] = cnt;
  std::printf("    row %lld tile %lld: kernel | reference words\n", (long long)row, (long long)tile);
  for (int i = 0; i < std::min(slots, 12); ++i) std::printf("      [%2d] %08x | %08x\n", i, k[i], r[i]);
}

struct RunResult {
  bool ok = true;
  unsigned long long tolerated = 0, sum_k = 0, ovf_k = 0, max_k = 0, flagged = 0;
};

RunResult run_and_check(const Problem& pb, const Buffers& b, int slots, const Var& var, bool determinism) {
  RunResult res;
  const int64_t tiles = (pb.H + 255) / 256;
  const int64_t row_words = tiles * slots;
  const int64_t rows_alloc = pb.M + kGuardRows;
  uint32_t* packed;
  uint8_t* flags;
  unsigned long long* stats;
  unsigned long long* ctr;
  int* first;
  uint8_t* status;
  CUDA_CHECK(cudaMalloc(&packed, rows_alloc * row_words * 4));
  CUDA_CHECK(cudaMalloc(&flags, rows_alloc));
  CUDA_CHECK(cudaMalloc(&stats, TWELL_STATS_WORDS * 8));
  CUDA_CHECK(cudaMalloc(&ctr, kNumCtr * 8));
  CUDA_CHECK(cudaMalloc(&first, 4 * sizeof(int)));
  CUDA_CHECK(cudaMalloc(&status, pb.M * tiles));
  auto free_buffers = [&] {
    CUDA_CHECK(cudaFree(packed));
    CUDA_CHECK(cudaFree(flags));
    CUDA_CHECK(cudaFree(stats));
    CUDA_CHECK(cudaFree(ctr));
    CUDA_CHECK(cudaFree(first));
    CUDA_CHECK(cudaFree(status));
  };
  harness::poison_words(packed, rows_alloc * row_words, g_stream);
  CUDA_CHECK(cudaMemsetAsync(flags, 0, pb.M, g_stream));
  CUDA_CHECK(cudaMemsetAsync(flags + pb.M, kGuardByte, kGuardRows, g_stream));
  CUDA_CHECK(cudaMemsetAsync(stats, 0, TWELL_STATS_WORDS * 8, g_stream));
  CUDA_CHECK(cudaMemsetAsync(ctr, 0, kNumCtr * 8, g_stream));
  CUDA_CHECK(cudaMemsetAsync(first, 0xFF, 4 * sizeof(int), g_stream));

  twell::GatePackArgs a;
  a.x = {b.x, pb.ldx};
  a.w = {b.w, pb.ldw};
  a.M = pb.M;
  a.D = pb.D;
  a.H = pb.H;
  a.slots = slots;
  a.packed = packed;
  a.row_flags = flags;
  a.stats = stats;
  char what[160];
  std::snprintf(what, sizeof what, "gate_pack_sm90 %s M=%lld D=%lld H=%lld slots=%d", var.name.c_str(), (long long)pb.M,
                (long long)pb.D, (long long)pb.H, slots);
  if (!twell::gate_pack_sm90_can_run(a)) {
    std::printf("FAIL %s: can_run returned false\n", what);
    ++g_checks;
    ++g_failures;
    res.ok = false;
    free_buffers();
    return res;
  }
  cudaError_t rc = launch_var(a, var);
  if (rc != cudaSuccess) {
    std::printf("FAIL %s: launch returned %s\n", what, cudaGetErrorName(rc));
    ++g_checks;
    ++g_failures;
    res.ok = false;
    free_buffers();
    return res;
  }
  harness::wait_for(g_stream, what, kKernelLimitS);

  const float eps = static_cast<float>(1e-3 * b.typical);
  check_tiles<<<grid_for(pb.M * tiles, 128), 128, 0, g_stream>>>(packed, b.acc, pb.M, pb.H, slots, eps,
                                                                 static_cast<float>(b.typical), status, ctr, first);
  check_rows<<<grid_for(rows_alloc, 128), 128, 0, g_stream>>>(status, flags, packed, pb.M, tiles, row_words, ctr,
                                                              first);
  CUDA_CHECK(cudaGetLastError());
  unsigned long long h_ctr[kNumCtr], h_stats[TWELL_STATS_WORDS];
  int h_first[4];
  CUDA_CHECK(cudaMemcpyAsync(h_ctr, ctr, sizeof h_ctr, cudaMemcpyDeviceToHost, g_stream));
  CUDA_CHECK(cudaMemcpyAsync(h_stats, stats, sizeof h_stats, cudaMemcpyDeviceToHost, g_stream));
  CUDA_CHECK(cudaMemcpyAsync(h_first, first, sizeof h_first, cudaMemcpyDeviceToHost, g_stream));
  harness::wait_for(g_stream, "checker", 120.0);

  bool ok = true;
  for (int i = kErrCount; i <= kErrGuard; ++i) ok &= h_ctr[i] == 0;
  // Statistics: exactly those of the kernel's own counts; the reference's
  // differ only by tolerated flips.
  const bool stats_self = h_stats[TWELL_STAT_ACTIVE] == h_ctr[kSumK] &&
                          h_stats[TWELL_STAT_OVERFLOW_TILES] == h_ctr[kOvfK] &&
                          h_stats[TWELL_STAT_MAX_TILE_COUNT] == h_ctr[kMaxK];
  const unsigned long long dsum =
      h_ctr[kSumK] > h_ctr[kSumRef] ? h_ctr[kSumK] - h_ctr[kSumRef] : h_ctr[kSumRef] - h_ctr[kSumK];
  const bool stats_ref = dsum <= h_ctr[kTolerated];
  bool other_untouched = true;
  for (int i = 0; i < TWELL_STATS_WORDS; ++i) {
    if (i == TWELL_STAT_ACTIVE || i == TWELL_STAT_OVERFLOW_TILES || i == TWELL_STAT_MAX_TILE_COUNT) continue;
    other_untouched &= h_stats[i] == 0;
  }
  ok &= stats_self && stats_ref && other_untouched;

  if (determinism && ok) {
    uint32_t* packed2;
    unsigned long long* d_diff;
    CUDA_CHECK(cudaMalloc(&packed2, pb.M * row_words * 4));
    CUDA_CHECK(cudaMalloc(&d_diff, 8));
    CUDA_CHECK(cudaMemsetAsync(d_diff, 0, 8, g_stream));
    a.packed = packed2;
    CUDA_CHECK(launch_var(a, var));
    count_diff<<<grid_for(pb.M * row_words), 256, 0, g_stream>>>(packed, packed2, pb.M * row_words, d_diff);
    unsigned long long h_diff = 0;
    CUDA_CHECK(cudaMemcpyAsync(&h_diff, d_diff, 8, cudaMemcpyDeviceToHost, g_stream));
    harness::wait_for(g_stream, "determinism rerun", kKernelLimitS);
    if (h_diff != 0) {
      std::printf("FAIL %s: second run differs in %llu words\n", what, h_diff);
      ok = false;
    }
    CUDA_CHECK(cudaFree(packed2));
    CUDA_CHECK(cudaFree(d_diff));
  }

  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL %s t=%.3f:", what, pb.t);
    for (int i = 0; i < kNumCtr; ++i) std::printf(" %s=%llu", kCtrNames[i], h_ctr[i]);
    std::printf("\n     stats: active=%llu ovf_tiles=%llu max=%llu (self %s, ref %s, others %s)\n",
                h_stats[TWELL_STAT_ACTIVE], h_stats[TWELL_STAT_OVERFLOW_TILES], h_stats[TWELL_STAT_MAX_TILE_COUNT],
                stats_self ? "ok" : "BAD", stats_ref ? "ok" : "BAD", other_untouched ? "ok" : "BAD");
    if (h_first[0] >= 0) {
      std::printf("     first error: kind=%s row=%d tile=%d\n", kCtrNames[h_first[0]], h_first[1], h_first[2]);
      if (h_first[2] >= 0 && h_first[1] < pb.M) print_tile_diag(pb, b, packed, slots, h_first[1], h_first[2]);
    }
  }
  res.ok = ok;
  res.tolerated = h_ctr[kTolerated] + h_ctr[kFlagTol];
  res.sum_k = h_ctr[kSumK];
  res.ovf_k = h_ctr[kOvfK];
  res.max_k = h_ctr[kMaxK];
  res.flagged = h_ctr[kRowsFlagged];
  free_buffers();
  return res;
}

// ----------------------------------------------------------------- timing
const harness::TimeOptions kTiming{.warmup = 3, .reps = 20};

struct TimingRow {
  std::string name;
  double ms, tflops;
};

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, timing = true, checks = true;
  int only_c = 0, only_e = -1, only_w = 1, prof_c = 0, prof_e = -1, prof_w = 1;
  g_seed = std::random_device{}() ^
           (static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) << 7);
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--seed") && i + 1 < argc) g_seed = std::strtoull(argv[++i], nullptr, 0);
    else if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--no-timing")) timing = false;
    else if (!std::strcmp(argv[i], "--timing-only")) checks = false;
    else if (!std::strcmp(argv[i], "--variant") && i + 1 < argc)
      std::sscanf(argv[++i], "%d,%d,%d", &only_c, &only_e, &only_w);
    else if (!std::strcmp(argv[i], "--profile") && i + 1 < argc)
      std::sscanf(argv[++i], "%d,%d,%d", &prof_c, &prof_e, &prof_w);
  }
  std::printf("test_gate_gemm_sm90: seed %llu (rerun with --seed %llu)\n", (unsigned long long)g_seed,
              (unsigned long long)g_seed);

  cudaDeviceProp prop;
  if (!harness::first_device(&prop)) return harness::kExitSkip;
  std::printf("device: %s (cc %d.%d, %d SMs), sm90 kernel compiled: %s, default variant %s\n", prop.name, prop.major,
              prop.minor, prop.multiProcessorCount, twell::gate_pack_sm90_compiled() ? "yes" : "no",
              default_var().name.c_str());
  if (prop.major != 9 || prop.minor != 0 || !twell::gate_pack_sm90_compiled()) {
    std::printf("SKIP: needs an sm_90 device and the sm_90a build\n");
    return harness::kExitSkip;
  }
  g_num_sms = prop.multiProcessorCount;
  CUDA_CHECK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));

  // ---- argument checks (host only, no launch)
  {
    int bad = 0;
    twell::GatePackArgs a;
    bf16* x;
    uint32_t* pk;
    uint8_t* fl;
    unsigned long long* st;
    CUDA_CHECK(cudaMalloc(&x, 1 << 20));
    CUDA_CHECK(cudaMalloc(&pk, 1 << 20));
    CUDA_CHECK(cudaMalloc(&fl, 1 << 10));
    CUDA_CHECK(cudaMalloc(&st, 64));
    a.x.ptr = x;
    a.w.ptr = x;
    a.x.ld = 64;
    a.w.ld = 64;
    a.M = 16;
    a.D = 64;
    a.H = 256;
    a.slots = 32;
    a.packed = pk;
    a.row_flags = fl;
    a.stats = st;
    bad += !twell::gate_pack_sm90_can_run(a);
    twell::GatePackArgs b2 = a;
    b2.x.ptr = x + 1;
    bad += twell::gate_pack_sm90_can_run(b2);
    b2 = a;
    b2.w.ptr = x + 4;
    bad += twell::gate_pack_sm90_can_run(b2);
    b2 = a;
    b2.x.ld = 68;
    bad += twell::gate_pack_sm90_can_run(b2);
    b2 = a;
    b2.w.ld = 60;
    bad += twell::gate_pack_sm90_can_run(b2);
    b2 = a;
    b2.slots = 48;
    bad += twell::gate_pack_sm90_can_run(b2);
    b2 = a;
    b2.D = 60;
    b2.x.ld = 64;
    b2.w.ld = 64;
    bad += twell::gate_pack_sm90_can_run(b2);
    b2 = a;
    b2.x.ptr = x + 1;
    bad += twell::gate_pack_sm90(b2, g_num_sms, g_stream) != cudaErrorInvalidValue;
    CUDA_CHECK(cudaFree(x));
    CUDA_CHECK(cudaFree(pk));
    CUDA_CHECK(cudaFree(fl));
    CUDA_CHECK(cudaFree(st));
    ++g_checks;
    if (bad) {
      ++g_failures;
      std::printf("FAIL argument checks (%d wrong answers)\n", bad);
    } else {
      std::printf("argument checks: ok\n");
    }
  }

  struct Shape {
    int64_t D, H, pad_x, pad_w;
  };
  std::vector<Shape> shapes = {{2048, 5632, 0, 0}, {4096, 14336, 0, 0}, {896, 4864, 24, 8}, {1024, 2816, 0, 0},
                               {64, 264, 0, 0},    {200, 520, 24, 8},   {24, 8, 8, 0}};
  std::vector<int64_t> Ms = {1, 7, 129, 300, 4096};
  const float t_uniform = 2.5758f;  // Phi^-1(0.995): ~0.5% active
  std::vector<float> ts = {t_uniform, 0.0f, 1000.0f};
  std::vector<Var> vars = {default_var(),     make_var(1, 0, 1), make_var(2, 0, 1),
                           make_var(1, 1, 1), make_var(2, 1, 1), make_var(1, 3, 1),
                           make_var(2, 3, 1), make_var(1, 3, 0), make_var(2, 3, 0)};
  std::vector<Var> tvars = {make_var(1, 0, 1),    make_var(2, 0, 1),    make_var(1, 1, 1),     make_var(2, 1, 1),
                            make_var(1, 3, 1),    make_var(2, 3, 1),    make_var(1, 3, 0),     make_var(2, 3, 0),
                            make_var(1, 2, 1),    make_var(2, 2, 1),    make_var(1, 2, 0),     make_var(2, 2, 0),
                            make_var(1, 3, 1, 4), make_var(2, 3, 1, 4), make_var(2, 3, 1, 16), make_var(2, 3, 0, 4)};
  if (only_c) {
    vars = {make_var(only_c, only_e, only_w)};
    tvars = vars;
  }

  if (prof_c) {
    // Two launches of one variant at M=65536, D=2048, H=5632, slots 32 (for a profiler).
    Problem pb{65536, 2048, 5632, 2048, 2048, 2.5758f};
    Buffers b;
    make_problem(pb, b, g_seed);
    uint32_t* packed;
    uint8_t* flags;
    unsigned long long* stats;
    CUDA_CHECK(cudaMalloc(&packed, pb.M * 22 * 32 * 4));
    CUDA_CHECK(cudaMalloc(&flags, pb.M));
    CUDA_CHECK(cudaMalloc(&stats, 64));
    twell::GatePackArgs a;
    a.x = {b.x, pb.D};
    a.w = {b.w, pb.D};
    a.M = pb.M;
    a.D = pb.D;
    a.H = pb.H;
    a.slots = 32;
    a.packed = packed;
    a.row_flags = flags;
    a.stats = stats;
    if (prof_c == 9) {
#if TEST_HAVE_CUBLAS
      // --profile 9,0: the cuBLAS GEMM of the same shape, for comparison.
      cublasHandle_t h;
      CUBLAS_CHECK(cublasCreate(&h));
      cublasSetStream(h, g_stream);
      bf16* c;
      CUDA_CHECK(cudaMalloc(&c, pb.M * pb.H * sizeof(bf16)));
      const float alpha = 1.0f, beta = 0.0f;
      for (int i = 0; i < 2; ++i)
        cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(pb.H), static_cast<int>(pb.M),
                     static_cast<int>(pb.D), &alpha, b.w, CUDA_R_16BF, static_cast<int>(pb.D), b.x, CUDA_R_16BF,
                     static_cast<int>(pb.D), &beta, c, CUDA_R_16BF, static_cast<int>(pb.H), CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT);
      harness::wait_for(g_stream, "profile runs", 120.0);
      std::printf("profile runs of cuBLAS done\n");
#endif
      return 0;
    }
    const Var v = make_var(prof_c, prof_e, prof_w);
    for (int i = 0; i < 2; ++i) CUDA_CHECK(launch_var(a, v));
    harness::wait_for(g_stream, "profile runs", 120.0);
    std::printf("profile runs of %s done\n", v.name.c_str());
    return 0;
  }
  if (quick) {
    shapes = {{64, 264, 0, 0}, {200, 520, 24, 8}, {896, 4864, 24, 8}};
    Ms = {7, 300};
  }

  struct Summary {
    std::string name;
    int runs = 0, fails = 0;
    unsigned long long tol = 0;
  };
  std::vector<Summary> summary;
  const auto t_start = std::chrono::steady_clock::now();

  for (const Var& var : vars) {
    if (!checks) break;
    for (const Shape& sh : shapes) {
      Summary sm;
      char nm[96];
      std::snprintf(nm, sizeof nm, "%s D=%lld H=%lld%s", var.name.c_str(), (long long)sh.D, (long long)sh.H,
                    sh.pad_x ? " (strided)" : "");
      sm.name = nm;
      std::vector<int64_t> mlist = Ms;
      if (!quick && sh.D == 2048 && sh.H == 5632) mlist.push_back(65536);
      for (int64_t M : mlist) {
        for (float t : ts) {
          Problem pb{M, sh.D, sh.H, sh.D + sh.pad_x, sh.D + sh.pad_w, t};
          Buffers b;
          make_problem(pb, b,
                       g_seed + static_cast<uint64_t>(M * 131 + sh.D * 7 + sh.H) + static_cast<uint64_t>(t * 1000));
          std::string line;
          bool all_ok = true;
          for (int slots : {32, 64, 128}) {
            const bool det = (M == 65536 && slots == 32) || (M == 300 && slots == 64);
            RunResult r = run_and_check(pb, b, slots, var, det);
            ++sm.runs;
            sm.fails += !r.ok;
            sm.tol += r.tolerated;
            all_ok &= r.ok;
            char buf[128];
            std::snprintf(buf, sizeof buf, " s%d:%s act=%.2f/row ovf=%llu rows=%llu max=%llu tol=%llu", slots,
                          r.ok ? "ok" : "FAIL", static_cast<double>(r.sum_k) / static_cast<double>(M), r.ovf_k,
                          r.flagged, r.max_k, r.tolerated);
            line += buf;
          }
          std::printf("%s %-34s M=%-6lld t=%-6.3f%s\n", all_ok ? "ok  " : "FAIL", nm, (long long)M, t, line.c_str());
          std::fflush(stdout);
          free_problem(b);
        }
      }
      summary.push_back(sm);
    }
  }
  const double check_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();

  // ---- timing: M=65536, D=2048, H=5632
  std::vector<TimingRow> trows;
  if (timing && !quick) {
    harness::Timer timer;
    const int64_t M = 65536, D = 2048, H = 5632;
    const double flop = 2.0 * M * D * H;
    for (float t : {t_uniform, 0.0f}) {
      Problem pb{M, D, H, D, D, t};
      Buffers b;
      make_problem(pb, b, g_seed + 99);
      CUDA_CHECK(cudaFree(b.acc));  // not needed
      b.acc = nullptr;
      for (int slots : {32, 64, 128}) {
        if (t == 0.0f && slots != 32) continue;
        const int64_t row_words = ((H + 255) / 256) * slots;
        uint32_t* packed;
        uint8_t* flags;
        unsigned long long* stats;
        CUDA_CHECK(cudaMalloc(&packed, M * row_words * 4));
        CUDA_CHECK(cudaMalloc(&flags, M));
        CUDA_CHECK(cudaMalloc(&stats, 64));
        CUDA_CHECK(cudaMemsetAsync(flags, 0, M, g_stream));
        CUDA_CHECK(cudaMemsetAsync(stats, 0, 64, g_stream));
        twell::GatePackArgs a;
        a.x = {b.x, D};
        a.w = {b.w, D};
        a.M = M;
        a.D = D;
        a.H = H;
        a.slots = slots;
        a.packed = packed;
        a.row_flags = flags;
        a.stats = stats;
        for (const Var& var : tvars) {
          if (var.v.epilogue == 2 && slots != 32) continue;
          int grid = 0;
          CUDA_CHECK(launch_var(a, var, &grid));
          const double ms = timer.time([&](int, int) { CUDA_CHECK(launch_var(a, var)); }, kTiming, g_stream).med;
          char nm[96];
          std::snprintf(nm, sizeof nm, "twell %s slots=%d %s grid=%d", var.name.c_str(), slots,
                        t == 0.0f ? "~50%" : "~0.5%", grid);
          trows.push_back({nm, ms, flop / (ms * 1e-3) / 1e12});
        }
        CUDA_CHECK(cudaFree(packed));
        CUDA_CHECK(cudaFree(flags));
        CUDA_CHECK(cudaFree(stats));
      }
#if TEST_HAVE_CUBLAS
      if (t == t_uniform) {
        cublasHandle_t h;
        if (cublasCreate(&h) == CUBLAS_STATUS_SUCCESS) {
          cublasSetStream(h, g_stream);
          bf16* c;
          CUDA_CHECK(cudaMalloc(&c, M * H * sizeof(bf16)));
          const float alpha = 1.0f, beta = 0.0f;
          cublasStatus_t cst = CUBLAS_STATUS_SUCCESS;
          // Column-major view: C^T [H, M] = W [H, D] (as D x H, transposed) * x^T [D, M].
          auto gemm = [&](int, int) {
            cst =
                cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(H), static_cast<int>(M), static_cast<int>(D),
                             &alpha, b.w, CUDA_R_16BF, static_cast<int>(D), b.x, CUDA_R_16BF, static_cast<int>(D),
                             &beta, c, CUDA_R_16BF, static_cast<int>(H), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
          };
          const double ms = timer.time(gemm, kTiming, g_stream).med;
          if (cst == CUBLAS_STATUS_SUCCESS) {
            trows.push_back({"cuBLAS bf16 GEMM (fp32 acc, bf16 out)", ms, flop / (ms * 1e-3) / 1e12});
          } else {
            std::printf("cuBLAS GEMM failed: status %d\n", static_cast<int>(cst));
          }
          CUDA_CHECK(cudaFree(c));
          cublasDestroy(h);
        }
      }
#endif
      free_problem(b);
    }
  }

  // ---- summary
  std::printf("\n==== summary (seed %llu, %d checks in %.1f s) ====\n", (unsigned long long)g_seed, g_checks, check_s);
  std::printf("%-44s %6s %6s %10s\n", "cases", "runs", "fails", "tolerated");
  for (const Summary& s : summary) std::printf("%-44s %6d %6d %10llu\n", s.name.c_str(), s.runs, s.fails, s.tol);
  if (!trows.empty()) {
    double cublas_tf = 0;
    for (const TimingRow& r : trows)
      if (r.name.rfind("cuBLAS", 0) == 0) cublas_tf = r.tflops;
    std::printf("\ntiming M=65536 D=2048 H=5632 (median of 20 after warm-up)\n");
    for (const TimingRow& r : trows) {
      if (cublas_tf > 0)
        std::printf("  %-48s %8.3f ms %7.1f TFLOP/s  %5.1f%% of cuBLAS\n", r.name.c_str(), r.ms, r.tflops,
                    100.0 * r.tflops / cublas_tf);
      else std::printf("  %-48s %8.3f ms %7.1f TFLOP/s\n", r.name.c_str(), r.ms, r.tflops);
    }
  }
  std::printf("RESULT: %s (%d of %d checks failed)\n", g_failures ? "FAIL" : "PASS", g_failures, g_checks);
  CUDA_CHECK(cudaStreamDestroy(g_stream));
  return g_failures ? harness::kExitFail : harness::kExitPass;
}
