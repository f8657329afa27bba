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
// Timing (not with --small / --no-timing): harness::Timer, median of 50 calls
// after 10 warm-up calls, W_g rotated over >= 4 copies (> L2), against a
// device-to-device copy.
//
// Exit: 0 pass, 1 a check failed, 2 a CUDA error, 77 no device that runs it.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/cublaslt.h"
#include "format/pack.h"
#include "gate_gemm/gate_decode.h"
#include "gate_gemm/gate_gemm.h"
#include "gate_gemm/gate_portable.h"
#include "harness.cuh"

using twell::bf16;
using twell::u64;

namespace {

using harness::kGuardByte;
using harness::kPoisonWord;

constexpr int kGuardRows = 2;

struct Problem {
  int64_t M, D, H, ldx, ldw;
};

struct Failures {
  int64_t count = 0, entry = 0, value = 0, unused = 0, poison = 0, flag = 0, guard = 0, stats = 0, determinism = 0,
          tolerated = 0;
  int64_t total() const { return count + entry + value + unused + poison + flag + guard + stats + determinism; }
};

// Checks one slots setting of one data set. Returns the failure counters.
Failures check(const Problem& pr, int slots, const std::vector<float>& acc, double typ,
               const std::vector<uint32_t>& got, const std::vector<uint8_t>& flags, const std::vector<u64>& stats,
               const std::vector<uint32_t>& ref, const std::vector<uint8_t>& ref_flags,
               const std::vector<u64>& ref_stats) {
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
        if (o[w] == kPoisonWord) ++f.poison;
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
        const double v = harness::bf16_bits_to_float(word >> 16);
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
          if (o[w] != r[w] &&
              (w == 0 || ((o[w] ^ r[w]) & 0xFFFFu) != 0)) {  // same words (values may differ by rounding)
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
      if (got[(pr.M + g) * rw + w] != kPoisonWord) ++f.guard;
    if (flags[pr.M + g] != kGuardByte) ++f.guard;
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
  harness::poison_words(d_packed, words, s);
  CUDA_CHECK(cudaMemsetAsync(d_flags, 0, pr.M, s));
  CUDA_CHECK(cudaMemsetAsync(d_flags + pr.M, kGuardByte, kGuardRows, s));
  CUDA_CHECK(cudaMemsetAsync(d_stats, 0, TWELL_STATS_WORDS * sizeof(u64), s));
  twell::GatePackArgs a;
  a.x = {x, pr.ldx};
  a.w = {w, pr.ldw};
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
  CUDA_CHECK(twell::gate_pack_decode_variant(a, g_sm_count, s, variant));
  CUDA_CHECK(cudaStreamSynchronize(s));
  r.packed.resize(words);
  r.flags.resize(pr.M + kGuardRows);
  r.stats.resize(TWELL_STATS_WORDS);
  CUDA_CHECK(cudaMemcpy(r.packed.data(), d_packed, words * 4, cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaMemcpy(r.flags.data(), d_flags, pr.M + kGuardRows, cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaMemcpy(r.stats.data(), d_stats, TWELL_STATS_WORDS * 8, cudaMemcpyDeviceToHost));
  return r;
}

// Device-to-device copy bandwidth, bytes read + written (the bound of a weight-streaming kernel).
double copy_gbps(cudaStream_t s, harness::Timer& timer) {
  const size_t bytes = size_t(512) << 20;
  void *src, *dst;
  CUDA_CHECK(cudaMalloc(&src, bytes));
  CUDA_CHECK(cudaMalloc(&dst, bytes));
  CUDA_CHECK(cudaMemsetAsync(src, 1, bytes, s));
  const harness::Timing t =
      timer.time([&](int, int) { CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s)); },
                 {.warmup = 2, .reps = 10}, s);
  CUDA_CHECK(cudaFree(src));
  CUDA_CHECK(cudaFree(dst));
  return 2.0 * bytes / (t.med * 1e-3) / 1e9;
}

// Microseconds per call of the decode kernel (default and each main-loop variant), the sm_90a
// kernel and the portable route (cuBLASLt fp32 GEMM + the reference packer: at small M it can
// beat both fused kernels), with W_g rotated over copies that together exceed the L2.
void time_kernels(cudaStream_t s) {
  harness::Timer timer;
  std::printf("device copy: %.0f GB/s (read + write)\n", copy_gbps(s, timer));
  std::printf("%6s %6s %4s %10s %8s %8s %8s %8s %10s %8s %12s\n", "D", "H", "M", "decode_us", "GB/s", "v0_us", "v1_us",
              "v2_us", "sm90_us", "GB/s", "portable_us");
  void* lt_ws = nullptr;
  CUDA_CHECK(cudaMalloc(&lt_ws, twell::kLtWorkspaceBytes));
  for (auto [D, H] : std::vector<std::pair<int64_t, int64_t>>{{2048, 5632}, {4096, 14336}, {896, 4864}}) {
    const size_t wbytes = static_cast<size_t>(H * D) * 2;
    const int copies = std::max<int>(4, static_cast<int>((size_t(200) << 20) / wbytes) + 1);
    std::vector<bf16*> ws(copies);
    for (int c = 0; c < copies; ++c) {
      CUDA_CHECK(cudaMalloc(&ws[c], wbytes));
      harness::fill_normal_bf16(ws[c], H, D, D, 99 + c, 1.0f / std::sqrt(float(D - 1)), -2.5758f, s);
    }
    bf16* x;
    uint32_t* packed;
    uint8_t* flags;
    u64* stats;
    CUDA_CHECK(cudaMalloc(&x, 64 * D * 2));
    harness::fill_normal_bf16(x, 64, D, D, 7, 1.0f, 1.0f, s);
    CUDA_CHECK(cudaMalloc(&packed, 64 * twell::tiles_for(H) * 32 * 4));
    CUDA_CHECK(cudaMalloc(&flags, 64 + 16));
    CUDA_CHECK(cudaMalloc(&stats, TWELL_STATS_WORDS * 8));
    CUDA_CHECK(cudaMemsetAsync(flags, 0, 64, s));
    CUDA_CHECK(cudaMemsetAsync(stats, 0, TWELL_STATS_WORDS * 8, s));
    void* chunk = nullptr;
    CUDA_CHECK(cudaMalloc(&chunk, twell::gate_portable_workspace_bytes(64, H)));
    for (int64_t M : {1, 4, 16, 32, 64}) {
      twell::GatePackArgs a;
      a.x = {x, D};
      a.w.ld = D;
      a.M = M;
      a.D = D;
      a.H = H;
      a.slots = 32;
      a.packed = packed;
      a.row_flags = flags;
      a.stats = stats;
      float t[6] = {-1, -1, -1, -1, -1, -1};  // default, v0, v1, v2, sm90, portable
      for (int variant = 0; variant < 6; ++variant) {
        a.w.ptr = ws[0];
        if (variant < 4 && !twell::gate_pack_decode_can_run(a)) continue;
        if (variant == 4 && !(twell::gate_pack_sm90_compiled() && twell::gate_pack_sm90_can_run(a))) continue;
        if (variant == 5 && twell::gate_pack_portable(a, chunk, lt_ws, twell::kLtWorkspaceBytes, s) != TWELL_SUCCESS) {
          CUDA_CHECK(cudaGetLastError());
          continue;
        }
        auto call = [&](int, int set) {
          a.w.ptr = ws[set];
          if (variant < 4) CUDA_CHECK(twell::gate_pack_decode_variant(a, g_sm_count, s, variant - 1));
          else if (variant == 4) CUDA_CHECK(twell::gate_pack_sm90(a, g_sm_count, s));
          else if (twell::gate_pack_portable(a, chunk, lt_ws, twell::kLtWorkspaceBytes, s) != TWELL_SUCCESS)
            CUDA_CHECK(cudaErrorUnknown);
        };
        t[variant] = static_cast<float>(timer.time(call, {.warmup = 10, .reps = 50, .sets = copies}, s).med * 1e3);
      }
      std::printf("%6lld %6lld %4lld %10.2f %8.0f %8.2f %8.2f %8.2f %10.2f %8.0f %12.2f\n", (long long)D, (long long)H,
                  (long long)M, t[0], t[0] > 0 ? wbytes / (t[0] * 1e-6) / 1e9 : 0.0, t[1], t[2], t[3], t[4],
                  t[4] > 0 ? wbytes / (t[4] * 1e-6) / 1e9 : 0.0, t[5]);
    }
    for (auto p : ws) CUDA_CHECK(cudaFree(p));
    CUDA_CHECK(cudaFree(chunk));
    CUDA_CHECK(cudaFree(x));
    CUDA_CHECK(cudaFree(packed));
    CUDA_CHECK(cudaFree(flags));
    CUDA_CHECK(cudaFree(stats));
  }
  CUDA_CHECK(cudaFree(lt_ws));
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
  cudaDeviceProp prop{};
  if (!harness::first_device(&prop)) return harness::kExitSkip;
  g_sm_count = prop.multiProcessorCount;
  std::printf("device %s, cc %d.%d, %d SMs, seed %llu\n", prop.name, prop.major, prop.minor, g_sm_count,
              static_cast<unsigned long long>(seed));
  cudaStream_t s;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

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
    CUDA_CHECK(cudaMalloc(&d_x, Mmax * ldx_max * 2));
    CUDA_CHECK(cudaMalloc(&d_w, H * ldw * 2));
    CUDA_CHECK(cudaMalloc(&d_acc, Mmax * H * 4));
    CUDA_CHECK(cudaMalloc(&d_packed, (Mmax + kGuardRows) * rw_max * 4));
    CUDA_CHECK(cudaMalloc(&d_ref, Mmax * rw_max * 4));
    CUDA_CHECK(cudaMalloc(&d_flags, Mmax + 16));
    CUDA_CHECK(cudaMalloc(&d_rflags, Mmax + 16));
    CUDA_CHECK(cudaMalloc(&d_stats, TWELL_STATS_WORDS * 8));
    CUDA_CHECK(cudaMalloc(&d_rstats, TWELL_STATS_WORDS * 8));
    for (const Pat& pat : pats) {
      const float scale = 1.0f / std::sqrt(static_cast<float>(D - 1));
      ++seed;
      harness::fill_normal_bf16(d_w, H, D, ldw, seed * 7919, scale, pat.bias, s);
      for (int64_t M : Ms) {
        Problem pr{M, D, H, D + (M == 7 ? 8 : 0), ldw};
        ++seed;
        harness::fill_normal_bf16(d_x, M, D, pr.ldx, seed * 104729, 1.0f, 1.0f, s);
        harness::reference_linear(d_x, pr.ldx, d_w, ldw, d_acc, M, H, D, s);
        std::vector<float> acc(M * H);
        CUDA_CHECK(cudaStreamSynchronize(s));
        CUDA_CHECK(cudaMemcpy(acc.data(), d_acc, M * H * 4, cudaMemcpyDeviceToHost));
        double ss = 0;
        for (float v : acc) ss += (static_cast<double>(v) - pat.bias) * (static_cast<double>(v) - pat.bias);
        const double typ = std::sqrt(ss / static_cast<double>(acc.size()));
        for (int slots : slot_opts) {
          const int64_t rw = twell::tiles_for(H) * slots;
          CUDA_CHECK(cudaMemsetAsync(d_rflags, 0, M, s));
          CUDA_CHECK(cudaMemsetAsync(d_rstats, 0, TWELL_STATS_WORDS * 8, s));
          CUDA_CHECK(twell::pack_rows(d_acc, true, H, M, H, slots, d_ref, d_rflags, d_rstats, s));
          CUDA_CHECK(cudaStreamSynchronize(s));
          std::vector<uint32_t> ref(M * rw);
          std::vector<uint8_t> rflags(M);
          std::vector<u64> rstats(TWELL_STATS_WORDS);
          CUDA_CHECK(cudaMemcpy(ref.data(), d_ref, M * rw * 4, cudaMemcpyDeviceToHost));
          CUDA_CHECK(cudaMemcpy(rflags.data(), d_rflags, M, cudaMemcpyDeviceToHost));
          CUDA_CHECK(cudaMemcpy(rstats.data(), d_rstats, TWELL_STATS_WORDS * 8, cudaMemcpyDeviceToHost));
          bool launched = false;
          RunOut r1 = run_decode(pr, slots, d_x, d_w, d_packed, d_flags, d_stats, s, &launched);
          if (!launched) {
            skipped = true;
            continue;
          }
          // second run with another main-loop variant: must be bitwise equal too
          RunOut r2 =
              run_decode(pr, slots, d_x, d_w, d_packed, d_flags, d_stats, s, &launched, static_cast<int>(cases % 3));
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
            std::printf("ok   D=%lld H=%lld M=%lld %s: active %llu, overflow tiles %llu, max tile %llu\n", (long long)D,
                        (long long)H, (long long)M, pat.name, (unsigned long long)r1.stats[TWELL_STAT_ACTIVE],
                        (unsigned long long)r1.stats[TWELL_STAT_OVERFLOW_TILES],
                        (unsigned long long)r1.stats[TWELL_STAT_MAX_TILE_COUNT]);
          }
        }
      }
    }
    CUDA_CHECK(cudaFree(d_x));
    CUDA_CHECK(cudaFree(d_w));
    CUDA_CHECK(cudaFree(d_acc));
    CUDA_CHECK(cudaFree(d_packed));
    CUDA_CHECK(cudaFree(d_ref));
    CUDA_CHECK(cudaFree(d_flags));
    CUDA_CHECK(cudaFree(d_rflags));
    CUDA_CHECK(cudaFree(d_stats));
    CUDA_CHECK(cudaFree(d_rstats));
  }
  if (skipped && cases == 0) {
    std::printf("SKIP: gate_pack_decode cannot run on this device/build\n");
    return harness::kExitSkip;
  }
  std::printf("correctness: %lld cases, %lld failed, %lld tolerated near-zero tiles\n", (long long)cases,
              (long long)failed_cases, (long long)tolerated);

  if (timing) time_kernels(s);
  CUDA_CHECK(cudaStreamDestroy(s));
  if (failed_cases) {
    std::printf("FAILED\n");
    return harness::kExitFail;
  }
  std::printf("PASSED\n");
  return harness::kExitPass;
}
