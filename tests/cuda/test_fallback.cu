// Self-checking test and benchmark of the dense fallback (cuda/fallback/).
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
//        -Iinclude -Icuda tests/cuda/test_fallback.cu cuda/fallback/fallback.cu -o /tmp/tf
//   /tmp/tf [--small] [--seed N] [--no-bench]
//
// Inputs are fresh random bf16 each run (seed printed; --seed repeats a run):
// x ~ N(0,1), W_g, W_u ~ N(0, 1/D), W_d ~ N(0, 1/H), so g, u ~ N(0,1) and y = O(1).
// y and the workspace are poisoned with 0xFFFF (a bf16 NaN) before every call.
//
// Oracle: a float64 CPU reference (h rounded to bf16 like the kernel, then y in
// float64) on sampled rows, and, for every row, a simple fp32 GPU reference
// that is itself checked against the CPU one. Metric: relative Frobenius error
// ||y - ref|| / ||ref|| over the listed rows of a call, and per listed row.
// Tolerance 2e-2: the output is rounded to bf16 (relative error up to 2^-9,
// rms ~2.3e-3 of each element) and h is rounded to bf16 before GEMM 2 (another
// ~2e-3 of each contribution, where the kernel and the reference may round
// the fp32/fp64 pre-activation differently by one ulp); fp32 accumulation
// order adds ~1e-6. The expected error is ~3.5e-3, so 2e-2 has a 5x margin,
// while any real bug (a missing 8-column K chunk at D = 2048 alone gives
// ~6e-2, a wrong or missing row gives ~1.4) fails it.
// Also checked: unlisted rows and the row padding of y keep the poison bit
// for bit; listed rows hold no NaN; the result is bitwise the same on a
// second call and with every pipeline depth (2, 3, 4 stages: same MMA order).
// Benchmark (not with --small / --no-bench): harness::Timer, median of 20 calls
// after 3 warm-up calls.
//
// Exit: 0 pass, 1 a check failed, 2 a CUDA error or bad arguments, 77 no device.
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

#include "fallback/fallback.h"
#include "fallback/fallback_detail.cuh"
#include "harness.cuh"

using twell::bf16;
using twell::u64;

using harness::bf16_bits_to_float;
using harness::float_to_bf16_bits;
using harness::kPoisonBf16;
using harness::Rng;

// ---------------------------------------------------------------- random data
static std::vector<uint16_t> random_bf16(Rng& rng, size_t n, double sd) {
  std::vector<uint16_t> v(n);
  for (auto& e : v) e = float_to_bf16_bits(static_cast<float>(rng.normal() * sd));
  return v;
}

// ------------------------------------------------------ fp32 GPU reference
__global__ void ref_act(const float* g, const float* u, bf16* h, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const float v = g ? fmaxf(g[i], 0.f) * u[i] : fmaxf(u[i], 0.f);
  h[i] = __float2bfloat16_rn(v);
}

// y_ref [M, D] (float, dense) for all M rows of x (row stride ldx).
static void gpu_reference(const bf16* x, int64_t ldx, const bf16* wg, const bf16* wu, const bf16* wd, int M, int D,
                          int H, std::vector<float>& y_out, cudaStream_t st) {
  float *g = nullptr, *u = nullptr, *y = nullptr;
  bf16* h = nullptr;
  const size_t mh = static_cast<size_t>(M) * H;
  CUDA_CHECK(cudaMalloc(&u, mh * 4));
  if (wg) CUDA_CHECK(cudaMalloc(&g, mh * 4));
  CUDA_CHECK(cudaMalloc(&h, mh * 2));
  CUDA_CHECK(cudaMalloc(&y, static_cast<size_t>(M) * D * 4));
  if (wg) harness::reference_linear(x, ldx, wg, D, g, M, H, D, st);
  harness::reference_linear(x, ldx, wu, D, u, M, H, D, st);
  ref_act<<<static_cast<unsigned>((mh + 255) / 256), 256, 0, st>>>(g, u, h, static_cast<int64_t>(mh));
  CUDA_CHECK(cudaGetLastError());
  harness::reference_gemm({h, H, 1}, {wd, D, 1}, y, D, M, D, H, st);  // W_d is [H, D]: B(k, n) = wd[k * D + n]
  y_out.resize(static_cast<size_t>(M) * D);
  CUDA_CHECK(cudaMemcpyAsync(y_out.data(), y, y_out.size() * 4, cudaMemcpyDeviceToHost, st));
  CUDA_CHECK(cudaStreamSynchronize(st));
  cudaFree(g);
  cudaFree(u);
  cudaFree(h);
  cudaFree(y);
}

// float64 CPU reference for one row (h rounded to bf16 like the kernel).
static void cpu_reference_row(const std::vector<uint16_t>& x, int row, const std::vector<uint16_t>* wg,
                              const std::vector<uint16_t>& wu, const std::vector<uint16_t>& wd, int D, int H,
                              std::vector<double>& y) {
  std::vector<double> xr(D), h(H);
  for (int k = 0; k < D; ++k) xr[k] = bf16_bits_to_float(x[static_cast<size_t>(row) * D + k]);
  for (int j = 0; j < H; ++j) {
    double gs = 0, us = 0;
    const uint16_t* wuj = &wu[static_cast<size_t>(j) * D];
    for (int k = 0; k < D; ++k) us += xr[k] * bf16_bits_to_float(wuj[k]);
    if (wg) {
      const uint16_t* wgj = &(*wg)[static_cast<size_t>(j) * D];
      for (int k = 0; k < D; ++k) gs += xr[k] * bf16_bits_to_float(wgj[k]);
      h[j] = harness::round_to_bf16(std::max(gs, 0.0) * us);
    } else {
      h[j] = harness::round_to_bf16(std::max(us, 0.0));
    }
  }
  y.assign(D, 0.0);
  for (int j = 0; j < H; ++j) {
    if (h[j] == 0.0) continue;
    const uint16_t* wdj = &wd[static_cast<size_t>(j) * D];
    for (int n = 0; n < D; ++n) y[n] += h[j] * bf16_bits_to_float(wdj[n]);
  }
}

// ------------------------------------------------------------- bookkeeping
struct Group {
  int D = 0, H = 0;
  bool gated = false;
  int runs = 0, fails = 0;
  double max_set_err = 0, max_row_err = 0, max_cpu_err = 0, ref_vs_cpu = 0;
  int cpu_rows = 0;
  std::string first_failure;
};

static bool g_all_ok = true;
static void fail(Group& g, const std::string& why) {
  if (g.first_failure.empty()) g.first_failure = why;
  g_all_ok = false;
}

// ---------------------------------------------------------------- one call
struct DeviceBuffers {
  bf16 *x = nullptr, *y = nullptr, *hws = nullptr;
  int32_t* rows = nullptr;
  u64* count = nullptr;
  // x [M, ldx], y [M, ldy], a workspace of `chunk` rows of H, the row list [M] and its count.
  void alloc(int64_t M, int64_t ldx, int64_t ldy, int64_t H, int64_t chunk) {
    CUDA_CHECK(cudaMalloc(&x, static_cast<size_t>(M) * ldx * 2));
    CUDA_CHECK(cudaMalloc(&y, static_cast<size_t>(M) * ldy * 2));
    CUDA_CHECK(cudaMalloc(&hws, static_cast<size_t>(chunk) * H * 2));
    CUDA_CHECK(cudaMalloc(&rows, static_cast<size_t>(M) * 4));
    CUDA_CHECK(cudaMalloc(&count, sizeof(u64)));
  }
  void free() {
    cudaFree(x);
    cudaFree(y);
    cudaFree(hws);
    cudaFree(rows);
    cudaFree(count);
  }
};

static twell::FallbackArgs make_args(const DeviceBuffers& b, const bf16* wg, const bf16* wu, const bf16* wd,
                                     int64_t ldx, int64_t ldy, int64_t M, int64_t D, int64_t H, int64_t max_rows,
                                     int64_t chunk) {
  twell::FallbackArgs a;
  a.x = {b.x, ldx};
  a.w_gate = {wg, D};
  a.w_up = {wu, D};
  a.w_down = {wd, D};
  a.y = {b.y, ldy};
  a.M = M;
  a.D = D;
  a.H = H;
  a.rows = b.rows;
  a.count = b.count;
  a.max_rows = max_rows;
  a.chunk_rows = chunk;
  a.h_workspace = b.hws;
  return a;
}

// Runs the fallback on the first M rows and checks it. y_ref: [>=M, D] float.
static void run_case(Group& grp, cudaStream_t st, const bf16* d_x_full, int64_t ldx, const bf16* wg, const bf16* wu,
                     const bf16* wd, int D, int H, int M, int64_t ldy, const std::vector<int32_t>& list, int64_t chunk,
                     const std::vector<float>& y_ref, const std::vector<int>& cpu_rows,
                     const std::vector<std::vector<double>>& cpu_ref, bool extra_checks, const char* kind) {
  char tag[256];
  std::snprintf(tag, sizeof tag, "D=%d H=%d %s M=%d list=%s(%zu) chunk=%lld", D, H, grp.gated ? "gated" : "relu", M,
                kind, list.size(), static_cast<long long>(chunk));
  ++grp.runs;
  bool ok = true;
  DeviceBuffers b;
  // Exact-size buffers, so the sanitizer sees any access past them.
  b.alloc(M, ldx, ldy, H, chunk);
  CUDA_CHECK(cudaMemcpyAsync(b.x, d_x_full, static_cast<size_t>(M) * ldx * 2, cudaMemcpyDeviceToDevice, st));
  // The list, then in-range garbage past its end (never to be read).
  std::vector<int32_t> rows_h(M);
  for (int i = 0; i < M; ++i)
    rows_h[i] = i < static_cast<int>(list.size()) ? list[i] : static_cast<int32_t>((i * 7919ll) % M);
  const u64 cnt = list.size();
  CUDA_CHECK(cudaMemcpyAsync(b.rows, rows_h.data(), rows_h.size() * 4, cudaMemcpyHostToDevice, st));
  CUDA_CHECK(cudaMemcpyAsync(b.count, &cnt, sizeof cnt, cudaMemcpyHostToDevice, st));

  const size_t ny = static_cast<size_t>(M) * ldy;
  auto poison = [&] {
    harness::poison_bf16(b.y, ny, st);
    harness::poison_bf16(b.hws, static_cast<size_t>(chunk) * H, st);
  };
  twell::FallbackArgs args = make_args(b, wg, wu, wd, ldx, ldy, M, D, H, M, chunk);
  poison();
  cudaError_t e = twell::fallback_rows(args, st);
  if (e != cudaSuccess) {
    fail(grp, std::string(tag) + ": fallback_rows returned " + cudaGetErrorName(e));
    ok = false;
  }
  std::vector<uint16_t> y(ny);
  CUDA_CHECK(cudaMemcpyAsync(y.data(), b.y, ny * 2, cudaMemcpyDeviceToHost, st));
  CUDA_CHECK(cudaStreamSynchronize(st));
  CUDA_CHECK(cudaGetLastError());

  std::vector<char> listed(M, 0);
  for (int32_t r : list) listed[r] = 1;
  // Poison kept outside the listed rows and the [D, ldy) padding.
  size_t bad_poison = 0, nan_listed = 0;
  for (int r = 0; r < M; ++r)
    for (int64_t c = 0; c < ldy; ++c) {
      const uint16_t v = y[static_cast<size_t>(r) * ldy + c];
      if (!listed[r] || c >= D) {
        bad_poison += v != kPoisonBf16;
      } else {
        nan_listed += std::isnan(bf16_bits_to_float(v)) ? 1 : 0;
      }
    }
  if (bad_poison) {
    fail(grp, std::string(tag) + ": " + std::to_string(bad_poison) + " unlisted/padding elements overwritten");
    ok = false;
  }
  if (nan_listed) {
    fail(grp, std::string(tag) + ": " + std::to_string(nan_listed) + " NaN in listed rows");
    ok = false;
  }
  // Error against the GPU reference: over the set and per row.
  double num = 0, den = 0;
  for (int32_t r : list) {
    double rn = 0, rd = 0;
    for (int c = 0; c < D; ++c) {
      const double ref = y_ref[static_cast<size_t>(r) * D + c];
      const double d = bf16_bits_to_float(y[static_cast<size_t>(r) * ldy + c]) - ref;
      rn += d * d;
      rd += ref * ref;
    }
    num += rn;
    den += rd;
    const double re = std::sqrt(rn / std::max(rd, 1e-300));
    grp.max_row_err = std::max(grp.max_row_err, re);
    if (!(re < 2e-2)) {
      fail(grp, std::string(tag) + ": row " + std::to_string(r) + " rel err " + std::to_string(re));
      ok = false;
    }
  }
  if (!list.empty()) {
    const double se = std::sqrt(num / std::max(den, 1e-300));
    grp.max_set_err = std::max(grp.max_set_err, se);
    if (!(se < 2e-2)) {
      fail(grp, std::string(tag) + ": set rel err " + std::to_string(se));
      ok = false;
    }
  }
  // Directly against the float64 CPU reference on the sampled rows that are listed.
  {
    double cn = 0, cd = 0;
    for (size_t s = 0; s < cpu_rows.size(); ++s) {
      const int r = cpu_rows[s];
      if (r >= M || !listed[r]) continue;
      for (int c = 0; c < D; ++c) {
        const double d = bf16_bits_to_float(y[static_cast<size_t>(r) * ldy + c]) - cpu_ref[s][c];
        cn += d * d;
        cd += cpu_ref[s][c] * cpu_ref[s][c];
      }
    }
    if (cd > 0) {
      const double ce = std::sqrt(cn / cd);
      grp.max_cpu_err = std::max(grp.max_cpu_err, ce);
      if (!(ce < 2e-2)) {
        fail(grp, std::string(tag) + ": rel err vs CPU float64 " + std::to_string(ce));
        ok = false;
      }
    }
  }
  // Bitwise: a second call, every pipeline depth, both launch paths (the
  // MMA order is the same in all of them, so the results must be identical).
  if (extra_checks) {
    std::vector<uint16_t> y2(ny);
    const int depths[] = {0, 2, 3, 4};
    const int paths[] = {twell::fallback_detail::kPathLaunches, twell::fallback_detail::kPathCooperative};
    for (int s : depths)
      for (int path : paths) {
        if (s == 4 && twell::fallback_detail::auto_stages() < 4) continue;
        if (path == twell::fallback_detail::kPathCooperative && !twell::fallback_detail::cooperative_available())
          continue;
        poison();
        e = twell::fallback_detail::fallback_rows_ex(args, st, s, twell::fallback_detail::kBoth, path);
        CUDA_CHECK(cudaMemcpyAsync(y2.data(), b.y, ny * 2, cudaMemcpyDeviceToHost, st));
        CUDA_CHECK(cudaStreamSynchronize(st));
        CUDA_CHECK(cudaGetLastError());
        if (e != cudaSuccess || std::memcmp(y.data(), y2.data(), ny * 2) != 0) {
          fail(grp, std::string(tag) + ": not bitwise reproducible (stages " + std::to_string(s) + ", path " +
                        std::to_string(path) + (e != cudaSuccess ? std::string(", ") + cudaGetErrorName(e) : "") + ")");
          ok = false;
        }
      }
  }
  if (!ok) ++grp.fails;
  b.free();
}

// --------------------------------------------------------------- one shape
static void test_shape(std::vector<Group>& groups, Rng& rng, cudaStream_t st, int D, int H, const std::vector<int>& Ms,
                       const std::vector<int64_t>& chunks) {
  const int Mmax = *std::max_element(Ms.begin(), Ms.end());
  auto t0 = std::chrono::steady_clock::now();
  std::vector<uint16_t> wg = random_bf16(rng, static_cast<size_t>(H) * D, 1.0 / std::sqrt(D));
  std::vector<uint16_t> wu = random_bf16(rng, static_cast<size_t>(H) * D, 1.0 / std::sqrt(D));
  std::vector<uint16_t> wd = random_bf16(rng, static_cast<size_t>(H) * D, 1.0 / std::sqrt(H));
  std::vector<uint16_t> x = random_bf16(rng, static_cast<size_t>(Mmax) * D, 1.0);
  bf16 *d_wg, *d_wu, *d_wd;
  CUDA_CHECK(cudaMalloc(&d_wg, wg.size() * 2));
  CUDA_CHECK(cudaMalloc(&d_wu, wu.size() * 2));
  CUDA_CHECK(cudaMalloc(&d_wd, wd.size() * 2));
  CUDA_CHECK(cudaMemcpy(d_wg, wg.data(), wg.size() * 2, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(d_wu, wu.data(), wu.size() * 2, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(d_wd, wd.data(), wd.size() * 2, cudaMemcpyHostToDevice));

  for (int gated = 1; gated >= 0; --gated) {
    Group grp;
    grp.D = D;
    grp.H = H;
    grp.gated = gated;
    // Gated: compact x and y. Non-gated: padded rows (ldx > D, odd-ish ldy).
    const int64_t ldx = gated ? D : D + 8;
    const int64_t ldy = gated ? D : D + 6;
    bf16* d_x;
    CUDA_CHECK(cudaMalloc(&d_x, static_cast<size_t>(Mmax) * ldx * 2));
    CUDA_CHECK(cudaMemset(d_x, 0xFF, static_cast<size_t>(Mmax) * ldx * 2));  // NaN in the padding
    CUDA_CHECK(cudaMemcpy2D(d_x, ldx * 2, x.data(), D * 2, D * 2, Mmax, cudaMemcpyHostToDevice));
    const bf16* wgp = gated ? d_wg : nullptr;

    std::vector<float> y_ref;
    gpu_reference(d_x, ldx, wgp, d_wu, d_wd, Mmax, D, H, y_ref, st);
    // CPU float64 on sampled rows (all rows for tiny shapes).
    std::vector<int> cpu_rows;
    if (static_cast<int64_t>(D) * H <= 32768) {
      for (int r = 0; r < Mmax; ++r) cpu_rows.push_back(r);
    } else {
      for (int r : {0, 1, 6, 127, 128, 129, 299, Mmax - 1})
        if (r < Mmax) cpu_rows.push_back(r);
      for (int i = 0; i < 4; ++i) cpu_rows.push_back(static_cast<int>(rng.next() % Mmax));
    }
    std::vector<std::vector<double>> cpu_ref(cpu_rows.size());
    double rn = 0, rd = 0;
    for (size_t s = 0; s < cpu_rows.size(); ++s) {
      cpu_reference_row(x, cpu_rows[s], gated ? &wg : nullptr, wu, wd, D, H, cpu_ref[s]);
      for (int c = 0; c < D; ++c) {
        const double d = y_ref[static_cast<size_t>(cpu_rows[s]) * D + c] - cpu_ref[s][c];
        rn += d * d;
        rd += cpu_ref[s][c] * cpu_ref[s][c];
      }
    }
    grp.cpu_rows = static_cast<int>(cpu_rows.size());
    grp.ref_vs_cpu = std::sqrt(rn / std::max(rd, 1e-300));
    // Both round h to bf16; fp32 vs fp64 pre-activations flip a rare ulp.
    if (!(grp.ref_vs_cpu < 1e-3))
      fail(grp, "GPU fp32 reference disagrees with CPU float64: " + std::to_string(grp.ref_vs_cpu));

    for (int M : Ms) {
      for (int kind = 0; kind < 4; ++kind) {
        std::vector<int32_t> list;
        const char* kname = "";
        if (kind == 0) {
          kname = "empty";
        } else if (kind == 1) {
          kname = "one";
          list.push_back(static_cast<int32_t>(rng.next() % M));
        } else if (kind == 2) {
          kname = "every3rd";
          for (int r = static_cast<int>(rng.next() % 3); r < M; r += 3) list.push_back(r);
        } else {
          kname = "all";
          for (int r = 0; r < M; ++r) list.push_back(r);
        }
        for (int64_t chunk : chunks) {
          const bool extra =
              (kind == 3 && (M > 300 || chunk == chunks.front())) || (kind == 2 && chunk == chunks.front());
          run_case(grp, st, d_x, ldx, wgp, d_wu, d_wd, D, H, M, ldy, list, chunk, y_ref, cpu_rows, cpu_ref, extra,
                   kname);
        }
      }
    }
    cudaFree(d_x);
    groups.push_back(grp);
  }
  cudaFree(d_wg);
  cudaFree(d_wu);
  cudaFree(d_wd);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("  D=%d H=%d: %d + %d runs, %.1f s\n", D, H, groups[groups.size() - 2].runs, groups.back().runs, secs);
  std::fflush(stdout);
}

// ------------------------------------------------------- argument checks
static bool test_arguments(cudaStream_t st) {
  bool ok = true;
  const int64_t M = 16, D = 64, H = 64;
  DeviceBuffers b;
  bf16* w;
  b.alloc(M, D, D, H, 128);
  CUDA_CHECK(cudaMalloc(&w, H * D * 2));
  harness::poison_bf16(b.y, M * D, st);
  auto good = [&] { return make_args(b, w, w, w, D, D, M, D, H, M, 128); };
  struct Bad {
    const char* what;
    twell::FallbackArgs a;
  };
  std::vector<Bad> bad;
  {
    auto a = good();
    a.D = 60;
    a.x.ld = a.w_gate.ld = a.w_up.ld = a.w_down.ld = a.y.ld = 64;
    bad.push_back({"D % 8 != 0", a});
  }
  {
    auto a = good();
    a.H = 12;
    bad.push_back({"H % 8 != 0", a});
  }
  {
    auto a = good();
    a.x.ptr = nullptr;
    bad.push_back({"x null", a});
  }
  {
    auto a = good();
    a.rows = nullptr;
    bad.push_back({"rows null", a});
  }
  {
    auto a = good();
    a.count = nullptr;
    bad.push_back({"count null", a});
  }
  {
    auto a = good();
    a.h_workspace = nullptr;
    bad.push_back({"workspace null", a});
  }
  {
    auto a = good();
    a.x.ptr = b.x + 1;
    bad.push_back({"x misaligned", a});
  }
  {
    auto a = good();
    a.x.ld = 65;
    bad.push_back({"ldx odd", a});
  }
  {
    auto a = good();
    a.w_down.ld = 32;
    bad.push_back({"ldw_down < D", a});
  }
  {
    auto a = good();
    a.y.ld = 63;
    bad.push_back({"ldy < D", a});
  }
  {
    auto a = good();
    a.chunk_rows = 0;
    bad.push_back({"chunk_rows 0", a});
  }
  {
    auto a = good();
    a.max_rows = -1;
    bad.push_back({"max_rows < 0", a});
  }
  for (auto& c : bad) {
    const cudaError_t e = twell::fallback_rows(c.a, st);
    if (e != cudaErrorInvalidValue) {
      std::printf("  argument check '%s': got %s, expected cudaErrorInvalidValue\n", c.what, cudaGetErrorName(e));
      ok = false;
    }
  }
  // max_rows = 0 and M = 0 are valid no-ops.
  {
    auto a = good();
    a.max_rows = 0;
    if (twell::fallback_rows(a, st) != cudaSuccess) ok = false;
    a = good();
    a.M = 0;
    if (twell::fallback_rows(a, st) != cudaSuccess) ok = false;
  }
  std::vector<uint16_t> y(M * D);
  CUDA_CHECK(cudaMemcpyAsync(y.data(), b.y, M * D * 2, cudaMemcpyDeviceToHost, st));
  CUDA_CHECK(cudaStreamSynchronize(st));
  for (auto v : y)
    if (v != kPoisonBf16) {
      ok = false;
      std::printf("  a rejected call touched y\n");
      break;
    }
  b.free();
  cudaFree(w);
  return ok;
}

// ----------------------------------------------------------- graph capture
// Captures fallback_rows() once, then replays the graph with different lists
// and counts written to the same device buffers: each replay must equal a
// direct call with that list (the count is only ever read on the device).
static bool test_graph(Rng& rng, cudaStream_t st, std::string& msg) {
  const int64_t M = 300, D = 1024, H = 2816, chunk = 128;
  std::vector<uint16_t> hx = random_bf16(rng, M * D, 1.0);
  std::vector<uint16_t> hw = random_bf16(rng, 3 * H * D, 1.0 / std::sqrt(D));
  DeviceBuffers b;
  bf16* w;
  b.alloc(M, D, D, H, chunk);
  CUDA_CHECK(cudaMalloc(&w, 3 * H * D * 2));
  CUDA_CHECK(cudaMemcpy(b.x, hx.data(), M * D * 2, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(w, hw.data(), 3 * H * D * 2, cudaMemcpyHostToDevice));
  const twell::FallbackArgs args = make_args(b, w, w + H * D, w + 2 * H * D, D, D, M, D, H, M, chunk);
  auto set_list = [&](int step, int n) {
    std::vector<int32_t> rows(M, 0);
    for (int i = 0; i < n; ++i) rows[i] = static_cast<int32_t>(i * step);
    const u64 cnt = n;
    CUDA_CHECK(cudaMemcpyAsync(b.rows, rows.data(), M * 4, cudaMemcpyHostToDevice, st));
    CUDA_CHECK(cudaMemcpyAsync(b.count, &cnt, 8, cudaMemcpyHostToDevice, st));
    harness::poison_bf16(b.y, M * D, st);
  };
  auto fetch = [&] {
    std::vector<uint16_t> y(M * D);
    CUDA_CHECK(cudaMemcpyAsync(y.data(), b.y, M * D * 2, cudaMemcpyDeviceToHost, st));
    CUDA_CHECK(cudaStreamSynchronize(st));
    return y;
  };
  bool ok = true;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  set_list(1, 0);
  CUDA_CHECK(cudaStreamSynchronize(st));
  CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
  const cudaError_t ce = twell::fallback_rows(args, st);
  const cudaError_t ee = cudaStreamEndCapture(st, &graph);
  if (ce != cudaSuccess || ee != cudaSuccess) {
    msg = std::string("capture failed: ") + cudaGetErrorName(ce) + " / " + cudaGetErrorName(ee);
    cudaGetLastError();
    ok = false;
  } else if (cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) {
    msg = "cudaGraphInstantiate failed";
    cudaGetLastError();
    ok = false;
  } else {
    const int cases[][2] = {{1, 300}, {2, 150}, {7, 3}, {1, 0}, {1, 129}};
    for (auto& c : cases) {
      set_list(c[0], c[1]);
      CUDA_CHECK(cudaStreamSynchronize(st));
      CUDA_CHECK(twell::fallback_rows(args, st));
      const std::vector<uint16_t> direct = fetch();
      set_list(c[0], c[1]);
      CUDA_CHECK(cudaGraphLaunch(exec, st));
      const std::vector<uint16_t> replay = fetch();
      size_t written = 0;
      for (auto v : direct) written += v != kPoisonBf16;
      if (direct != replay || (c[1] > 0) != (written > 0)) {
        msg = "replay with " + std::to_string(c[1]) + " rows differs from a direct call";
        ok = false;
      }
    }
    if (ok) msg = "captured once, 5 replays with different device-side lists match direct calls";
  }
  if (exec) cudaGraphExecDestroy(exec);
  if (graph) cudaGraphDestroy(graph);
  b.free();
  cudaFree(w);
  return ok;
}

// ------------------------------------------------------------- benchmark
struct BenchLine {
  std::string what;
  double value;
  const char* unit;
};

struct BenchCtx {
  twell::FallbackArgs args;
  cudaStream_t st;
  int stages;
  unsigned mask;
  int path = twell::fallback_detail::kPathLaunches;
};

// Median milliseconds of one fallback call with c's settings.
static double time_ms(harness::Timer& timer, const BenchCtx& c) {
  auto call = [&](int, int) {
    CUDA_CHECK(twell::fallback_detail::fallback_rows_ex(c.args, c.st, c.stages, c.mask, c.path));
  };
  return timer.time(call, {.warmup = 3, .reps = 20}, c.st).med;
}

static const char* path_name(int path) {
  return path == twell::fallback_detail::kPathCooperative ? "coop" : "launches";
}

static void benchmark(Rng& rng, cudaStream_t st, std::vector<BenchLine>& lines) {
  harness::Timer timer;
  // Dense chunk: 4096 listed rows, D = 2048, H = 5632, one chunk.
  {
    const int64_t M = 4096, D = 2048, H = 5632;
    std::vector<uint16_t> hx = random_bf16(rng, M * D, 1.0);
    std::vector<uint16_t> hw = random_bf16(rng, 3 * H * D, 1.0 / std::sqrt(D));
    DeviceBuffers b;
    bf16* w;
    b.alloc(M, D, D, H, M);
    CUDA_CHECK(cudaMalloc(&w, 3 * H * D * 2));
    CUDA_CHECK(cudaMemcpy(b.x, hx.data(), M * D * 2, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(w, hw.data(), 3 * H * D * 2, cudaMemcpyHostToDevice));
    std::vector<int32_t> rows(M);
    for (int i = 0; i < M; ++i) rows[i] = i;
    const u64 cnt = M;
    CUDA_CHECK(cudaMemcpy(b.rows, rows.data(), M * 4, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(b.count, &cnt, 8, cudaMemcpyHostToDevice));
    const double f_dual = 4.0 * M * D * H, f_down = 2.0 * M * D * H;
    const int auto_s = twell::fallback_detail::auto_stages();
    for (int gated = 1; gated >= 0; --gated) {
      BenchCtx c{make_args(b, gated ? w : nullptr, w + H * D, w + 2 * H * D, D, D, M, D, H, M, M), st, 0, 0};
      const double fd = gated ? f_dual : f_dual / 2;
      std::vector<int> depths = {auto_s};
      if (auto_s == 4) depths.push_back(3);  // what an A100 would run
      for (int s : depths) {
        c.stages = s;
        char name[160];
        c.mask = twell::fallback_detail::kDual;
        const double td = time_ms(timer, c);
        c.mask = twell::fallback_detail::kDown;
        const double tn = time_ms(timer, c);
        std::snprintf(name, sizeof name, "%s %d stages: GEMM1 (dual) rows=4096 D=2048 H=5632",
                      gated ? "gated" : "relu ", s);
        lines.push_back({name, fd / (td * 1e9), "TFLOP/s"});
        std::snprintf(name, sizeof name, "%s %d stages: GEMM2 (down) rows=4096 D=2048 H=5632",
                      gated ? "gated" : "relu ", s);
        lines.push_back({name, f_down / (tn * 1e9), "TFLOP/s"});
        c.mask = twell::fallback_detail::kBoth;
        for (int path : {int(twell::fallback_detail::kPathLaunches), int(twell::fallback_detail::kPathCooperative)}) {
          if (path == twell::fallback_detail::kPathCooperative && !twell::fallback_detail::cooperative_available())
            continue;
          c.path = path;
          const double tb = time_ms(timer, c);
          std::snprintf(name, sizeof name, "%s %d stages: whole fallback, %s (%.3f ms)", gated ? "gated" : "relu ", s,
                        path_name(path), tb);
          lines.push_back({name, (fd + f_down) / (tb * 1e9), "TFLOP/s"});
        }
        c.path = twell::fallback_detail::kPathLaunches;
      }
    }
    b.free();
    cudaFree(w);
  }
  // Empty list (and a few rows) at M = 65536, chunk 4096: 16 chunks of launches.
  {
    const int64_t M = 65536, D = 2048, H = 5632, chunk = 4096;
    DeviceBuffers b;
    bf16* w;
    b.alloc(M, D, D, H, chunk);
    CUDA_CHECK(cudaMalloc(&w, 3 * H * D * 2));
    std::vector<uint16_t> hw = random_bf16(rng, 3 * H * D, 1.0 / std::sqrt(D));
    CUDA_CHECK(cudaMemcpy(w, hw.data(), 3 * H * D * 2, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemset(b.x, 0x3F, M * D * 2));  // ~0.75, never read in the empty case
    std::vector<int32_t> rows(M);
    for (int i = 0; i < M; ++i) rows[i] = i * 1771 % M;
    for (int i = 0; i < 37; ++i) rows[i] = i * 1771;
    CUDA_CHECK(cudaMemcpy(b.rows, rows.data(), M * 4, cudaMemcpyHostToDevice));
    BenchCtx c{make_args(b, w, w + H * D, w + 2 * H * D, D, D, M, D, H, M, chunk), st, 0,
               twell::fallback_detail::kBoth};
    for (int path : {int(twell::fallback_detail::kPathLaunches), int(twell::fallback_detail::kPathCooperative)})
      for (u64 cnt : {u64(0), u64(37), u64(4096)}) {
        if (path == twell::fallback_detail::kPathCooperative && !twell::fallback_detail::cooperative_available())
          continue;
        c.path = path;
        CUDA_CHECK(cudaMemcpy(b.count, &cnt, 8, cudaMemcpyHostToDevice));
        const double t = time_ms(timer, c);
        char name[160];
        std::snprintf(name, sizeof name, "count=%llu of M=65536, chunk 4096 (16 chunks), %s",
                      static_cast<unsigned long long>(cnt),
                      path == twell::fallback_detail::kPathCooperative ? "coop (1 launch)" : "launches (32)");
        lines.push_back({name, t * 1e3, "us"});
      }
    b.free();
    cudaFree(w);
  }
}

int main(int argc, char** argv) {
  bool small = false, tiny = false, bench = true;
  uint64_t seed = static_cast<uint64_t>(std::chrono::high_resolution_clock::now().time_since_epoch().count());
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--small")) small = true;
    else if (!std::strcmp(argv[i], "--tiny")) small = tiny = true;
    else if (!std::strcmp(argv[i], "--no-bench")) bench = false;
    else if (!std::strcmp(argv[i], "--seed") && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
    else {
      std::fprintf(stderr, "usage: %s [--small | --tiny] [--no-bench] [--seed N]\n", argv[0]);
      return 2;
    }
  }
  cudaDeviceProp prop;
  if (!harness::first_device(&prop)) return harness::kExitSkip;
  std::printf("test_fallback: %s (sm_%d%d, %d SMs), seed %llu%s\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount, static_cast<unsigned long long>(seed),
              tiny    ? ", --tiny"
              : small ? ", --small"
                      : "");
  std::printf("pipeline depth chosen for this device: %d stages\n", twell::fallback_detail::auto_stages());
  Rng rng(seed);
  cudaStream_t st;
  CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));

  // Kernel resources: registers, local memory (must be 0: no spills).
  bool res_ok = true;
  std::vector<std::string> res_lines;
  for (int s = 2; s <= 4; ++s)
    for (int k = 0; k < 5; ++k) {
      cudaFuncAttributes fa;
      const unsigned gemm = k == 2   ? twell::fallback_detail::kDown
                            : k >= 3 ? twell::fallback_detail::kBoth
                                     : twell::fallback_detail::kDual;
      CUDA_CHECK(twell::fallback_detail::kernel_attributes(gemm, k == 0 || k == 3, s, &fa));
      static const char* names[] = {"dual gated", "dual relu", "down", "coop gated", "coop relu"};
      char line[200];
      std::snprintf(line, sizeof line, "%-10s stages=%d: %3d regs, %zu B local, %zu B static smem + %d KiB ring",
                    names[k], s, fa.numRegs, fa.localSizeBytes, fa.sharedSizeBytes, 48 * s);
      res_lines.push_back(line);
      if (fa.localSizeBytes != 0) res_ok = false;
    }
  if (!res_ok) g_all_ok = false;

  const bool args_ok = test_arguments(st);
  if (!args_ok) g_all_ok = false;
  std::string graph_msg = "skipped (--tiny)";
  const bool graph_ok = tiny || test_graph(rng, st, graph_msg);
  if (!graph_ok) g_all_ok = false;

  std::vector<Group> groups;
  std::printf("correctness sweep:\n");
  if (tiny) {  // for the slow sanitizer tools (racecheck, synccheck)
    for (auto dh : std::vector<std::pair<int, int>>{{72, 200}, {136, 520}})
      test_shape(groups, rng, st, dh.first, dh.second, {129}, {128});
  } else if (small) {  // for memcheck
    const std::vector<int> Ms = {1, 7, 129, 300};
    const std::vector<int64_t> chunks = {128, 200, 4096};
    for (auto dh : std::vector<std::pair<int, int>>{{64, 264}, {72, 200}, {136, 520}})
      test_shape(groups, rng, st, dh.first, dh.second, Ms, chunks);
  } else {
    const std::vector<int> Ms = {1, 7, 129, 300, 4096};
    const std::vector<int64_t> chunks = {128, 200, 256, 4096};
    for (auto dh : std::vector<std::pair<int, int>>{{2048, 5632}, {896, 4864}, {1024, 2816}, {64, 264}, {72, 200}})
      test_shape(groups, rng, st, dh.first, dh.second, Ms, chunks);
  }

  std::vector<BenchLine> bl;
  if (bench && !small) benchmark(rng, st, bl);

  // ---- summary (last) ----
  std::printf("\n==== test_fallback summary (seed %llu) ====\n", static_cast<unsigned long long>(seed));
  for (auto& l : res_lines) std::printf("  %s\n", l.c_str());
  std::printf("  argument checks: %s\n", args_ok ? "pass" : "FAIL");
  std::printf("  CUDA graph capture (default path: %s): %s: %s\n",
              twell::fallback_detail::cooperative_available() ? "cooperative" : "launches", graph_ok ? "pass" : "FAIL",
              graph_msg.c_str());
  std::printf("  %-6s %-6s %-6s %5s %5s %10s %10s %10s %12s\n", "D", "H", "ffn", "runs", "fail", "set err", "row err",
              "vs cpu", "ref vs cpu");
  for (auto& g : groups) {
    std::printf("  %-6d %-6d %-6s %5d %5d %10.2e %10.2e %10.2e %8.2e(%d)\n", g.D, g.H, g.gated ? "gated" : "relu",
                g.runs, g.fails, g.max_set_err, g.max_row_err, g.max_cpu_err, g.ref_vs_cpu, g.cpu_rows);
    if (!g.first_failure.empty()) std::printf("      first failure: %s\n", g.first_failure.c_str());
  }
  for (auto& l : bl) std::printf("  %-72s %9.1f %s\n", l.what.c_str(), l.value, l.unit);
  std::printf("%s\n", g_all_ok ? "ALL CHECKS PASSED" : "SOME CHECKS FAILED");
  cudaStreamDestroy(st);
  return g_all_ok ? harness::kExitPass : harness::kExitFail;
}
