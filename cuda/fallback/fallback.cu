// Exact dense FFN for a device-side list of rows (see fallback.h).
//
// Two GEMMs per chunk of the row list, both one templated tensor-core kernel
// (mma.sync m16n8k16 bf16 -> fp32, so it runs on sm_80 and newer, H100 included):
//   GEMM 1 ("dual"): A = x rows gathered through the list, B = W_g and W_u
//     ([H, D], K-contiguous), epilogue h = bf16(relu(g) * u) -> h_workspace
//     (non-gated: B = W_u alone, h = bf16(relu(u))).
//   GEMM 2 ("down"): A = h_workspace (chunk-local rows), B = W_d ([H, D]:
//     K = H rows, N = D contiguous, so B fragments come from ldmatrix.trans),
//     epilogue y[rows[i]] = bf16(acc), scattered through the list.
//
// Tiling. A CTA computes a 128-row M tile against two 128-column "B halves":
// for the gated GEMM 1 the halves are the same 128 columns of W_g and of W_u
// (so the x tile is loaded once for both products, and the epilogue has g
// and u of an element in the same thread); otherwise they are 256 adjacent
// output columns. Either way the CTA does the MMA work of a 128x256 tile,
// the shape that gives the best smem-traffic / MMA ratio that still fits the
// register file with 8 warps: each warp owns 64 rows x (32 + 32) columns,
// i.e. 128 fp32 accumulators per thread; per k16 step a warp issues 8
// ldmatrix.x4 for 32 MMAs. A 128x128 tile would halve the MMAs per loaded
// byte; 256x128 would need 256 accumulators per thread (spills).
//
// Pipeline. BK = 64 (a 128-byte row per tile row, so the XOR swizzle of
// 16-byte chunks by (row & 7) makes both the cp.async writes and the
// ldmatrix reads bank-conflict free), STAGES-deep cp.async ring (48 KiB per
// stage): 4 stages (192 KiB) where the device allows it (H100), 3 on A100
// (164 KiB), 2 on 100 KiB parts (sm_86/sm_89). One __syncthreads per k-tile:
// after it, stage kt has landed for everyone and everyone has finished
// reading stage kt-1, which is the one the next cp.async batch overwrites.
// Fragments are double-buffered across the four k16 steps of a k-tile.
//
// Scheduling. The list length exists only on the device. Thread 0 of each
// CTA reads *count once; the CTA derives the chunk's valid rows and the number
// of valid M tiles, and the grid (at most one CTA per SM, persistent) strides
// over the valid tiles only. Tiles are rasterised with M fastest when the
// chunk's A is smaller than B (GEMM 1 at the reference shape: all x tiles
// stay in L2 while B streams) and N fastest otherwise (GEMM 2: W_d stays in
// L2 while h streams).
// Two launch paths, bitwise identical results (same tiles, same MMA order):
//  * cooperative (default where the device supports it): one launch runs
//    every non-empty chunk, GEMM 1 and GEMM 2 separated by grid-wide
//    barriers, and stops at the device-side count. An empty list costs one
//    launch, however many chunks max_rows allows. Capturable in CUDA graphs.
//  * launches: two kernels per chunk, ceil(max_rows / chunk_rows) chunks; an
//    empty chunk's CTAs exit after one load. Used where cooperative launch is
//    unavailable (and by the test to cross-check the cooperative path).
//
// Edges. D and H are multiples of 8, so every 16-byte chunk is wholly inside
// or wholly outside the matrix: out-of-range chunks are zero-filled by
// cp.async (src-size 0), which makes K tails contribute nothing; rows and
// columns past the edge are simply not stored. Row ids outside [0, M) are
// treated as absent (their A row is zero and their output is not written).
// Every product of a row index and a stride is 64-bit.
#include "common/bf16x8.cuh"
#include "common/launch_cache.h"
#include "common/ptx_sm80.cuh"
#include "fallback/fallback.h"

#include "fallback/fallback_detail.cuh"
#include "common/pdl.cuh"

#include <cooperative_groups.h>

namespace twell {
namespace fb {

constexpr int kThreads = 256;  // 8 warps: 2 (M) x 4 (N)
constexpr int kBM = 128;
constexpr int kBK = 64;
constexpr int kHalfN = 128;
constexpr int kOperandBytes = kBM * kBK * 2;  // one 128x64 bf16 operand tile: 16 KiB
constexpr int kStageBytes = 3 * kOperandBytes;  // A + two B halves

constexpr size_t smem_bytes(int stages) { return static_cast<size_t>(stages) * kStageBytes; }

enum class Epi : int {
  kGated,  // out = bf16(relu(acc_half0) * acc_half1), halves = same columns
  kRelu,   // out = bf16(relu(acc)), halves = adjacent columns
  kPlain,  // out = bf16(acc),       halves = adjacent columns
};

struct GemmParams {
  MatRef<const bf16> a;  // GATHER_A: x (row = list entry); else h_workspace (row = chunk-local i)
  const bf16* b0;  // half 0 operand
  const bf16* b1;  // half 1 operand (== b0 unless gated)
  int64_t ldb0, ldb1;
  MatRef<bf16> c;  // GATHER_A: h_workspace (chunk-local rows); else y (row = list entry)
  int64_t n, k;    // GEMM N and K
  int64_t m_total; // rows of x and y: list entries outside [0, m_total) are ignored
  const int32_t* rows;
  const u64* count;
  int64_t chunk_start, chunk_rows, max_rows;
  int m_fastest;
};

// Byte offset of 16-byte chunk `c` of row `r` in a [128][64] bf16 tile
// (A, or a K-major B half): 128-byte rows, chunk index XOR (r & 7).
__device__ __forceinline__ uint32_t swz_k(int r, int c) {
  return static_cast<uint32_t>(r * 128 + ((c ^ (r & 7)) << 4));
}
// Byte offset of 16-byte chunk `c` (0..15) of k-row `kr` in a [64][128] bf16
// N-major B half: 256-byte rows, the low three chunk bits XOR (kr & 7).
__device__ __forceinline__ uint32_t swz_n(int kr, int c) {
  return static_cast<uint32_t>(kr * 256 + ((c ^ (kr & 7)) << 4));
}

// Valid list entries of the chunk that starts at list entry `chunk_start`,
// from the device-side count (clamped to the host bound max_rows).
__device__ __forceinline__ int64_t chunk_valid_rows(int64_t n_valid, int64_t chunk_start, int64_t chunk_rows) {
  int64_t v = n_valid - chunk_start;
  return v < 0 ? 0 : (v > chunk_rows ? chunk_rows : v);
}

// Thread 0 reads *count (the only read of it in the CTA) and shares the
// clamped value through shared memory. Contains a __syncthreads.
__device__ __forceinline__ int64_t read_count_once(const u64* count, int64_t max_rows) {
  __shared__ long long s_count;
  if (threadIdx.x == 0) {
    const u64 raw = *count;
    s_count = raw > static_cast<u64>(max_rows) ? max_rows : static_cast<long long>(raw);
  }
  __syncthreads();
  return s_count;
}

// All tiles of one GEMM over the chunk's `valid` rows, strided over the grid.
// smem_raw: the STAGES-deep ring; s_rows: 128 ints of shared memory.
template <int STAGES, bool B_KMAJOR, Epi EPI, bool GATHER_A>
__device__ __forceinline__ void gemm_tiles(const GemmParams& p, int64_t valid, unsigned char* smem_raw,
                                           int32_t* s_rows) {
  static_assert(STAGES >= 2 && STAGES <= 4, "pipeline depth");
  constexpr int kTileN = EPI == Epi::kGated ? kHalfN : 2 * kHalfN;
  const int tid = threadIdx.x;

  const int64_t m_tiles = (valid + kBM - 1) / kBM;
  const int64_t n_tiles = (p.n + kTileN - 1) / kTileN;
  const int64_t tiles = m_tiles * n_tiles;
  const int k_tiles = static_cast<int>((p.k + kBK - 1) / kBK);

  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp >> 2;  // 64-row slab
  const int wn = warp & 3;   // 32-column slab of each half

  const uint32_t smem_base = sm80::smem_u32(smem_raw);

  // Per-lane ldmatrix offsets that do not depend on the stage or k16 step.
  // A (x4): matrices (rows 0-7,k 0-7), (rows 8-15,k 0-7), (rows 0-7,k 8-15),
  // (rows 8-15,k 8-15) = a0..a3 of m16n8k16.
  const int a_ld_row = wm * 64 + (lane & 15);  // + mi*16
  const int a_ld_hi = lane >> 4;               // which k8 half
  // K-major B (x4, no trans): (n 0-7,k 0-7), (n 0-7,k 8-15), (n 8-15,k 0-7),
  // (n 8-15,k 8-15) = b0,b1 of n8 tile 2np and b0,b1 of n8 tile 2np+1.
  const int bk_ld_row = wn * 32 + (lane & 7) + ((lane >> 4) << 3);  // + np*16
  const int bk_ld_hi = (lane >> 3) & 1;
  // N-major B (x4 .trans): (k 0-7,n 0-7), (k 8-15,n 0-7), (k 0-7,n 8-15),
  // (k 8-15,n 8-15): same register order as above.
  const int bn_ld_k = (lane & 7) + (((lane >> 3) & 1) << 3);  // + kk*16
  const int bn_ld_c = wn * 4 + (lane >> 4);                    // + np*2

  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    int64_t mt, nt;
    if (p.m_fastest) {
      mt = t % m_tiles;
      nt = t / m_tiles;
    } else {
      nt = t % n_tiles;
      mt = t / n_tiles;
    }
    const int64_t m0 = mt * kBM;  // chunk-local
    const int64_t n0 = nt * kTileN;

    __syncthreads();  // the previous tile is done with s_rows and the ring
    if (tid < kBM) {
      const int64_t i = m0 + tid;
      int32_t r = -1;
      if (i < valid) {
        r = p.rows[p.chunk_start + i];
        if (r < 0 || static_cast<int64_t>(r) >= p.m_total) r = -1;
      }
      s_rows[tid] = r;
    }
    __syncthreads();

    // ---- producer state: which global chunks this thread copies ----------
    // Base pointers and validity are fixed per tile; a k-tile only adds an
    // offset, so the per-stage address math is a few adds.
    // A: rows (tid>>3) + 32j, 16-byte chunk tid&7 of the 64-wide k-tile.
    const int a_c = tid & 7;
    const bf16* a_src[4];
    unsigned a_ok = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = (tid >> 3) + 32 * j;
      const int32_t row = s_rows[r];
      const int64_t src_row = GATHER_A ? static_cast<int64_t>(row) : m0 + r;
      a_ok |= (row >= 0 ? 1u : 0u) << j;
      a_src[j] = row >= 0 ? p.a.ptr + src_row * p.a.ld + a_c * 8 : p.a.ptr;
    }
    // B, K-major [128 n][64 k] halves: rows (tid>>3) + 32j, chunk tid&7.
    // B, N-major [64 k][128 n] halves: k-rows (tid>>4) + 16j, chunk tid&15.
    const int b_c = B_KMAJOR ? (tid & 7) : (tid & 15);
    const bf16* b_src[2];
    int64_t b_ld[2];
    unsigned b_ok = 0;     // K-major: bit 4h+j = row valid; N-major: bit h = column chunk valid
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const bf16* bsrc = h == 0 ? p.b0 : p.b1;
      const int64_t ldb = h == 0 ? p.ldb0 : p.ldb1;
      const int64_t nbase = n0 + (EPI == Epi::kGated ? 0 : h * kHalfN);
      if constexpr (B_KMAJOR) {
        const int64_t n = nbase + (tid >> 3);
#pragma unroll
        for (int j = 0; j < 4; ++j) b_ok |= (n + 32 * j < p.n ? 1u : 0u) << (4 * h + j);
        b_src[h] = n < p.n ? bsrc + n * ldb + b_c * 8 : bsrc;
        b_ld[h] = ldb;
      } else {
        const int64_t n = nbase + b_c * 8;
        b_ok |= (n < p.n ? 1u : 0u) << h;
        b_src[h] = n < p.n ? bsrc + static_cast<int64_t>(tid >> 4) * ldb + n : bsrc;
        b_ld[h] = ldb;
      }
    }

    auto load_stage = [&](uint32_t sbase, int kt) {
      const int64_t k0 = static_cast<int64_t>(kt) * kBK;
      {
        const bool kok = k0 + a_c * 8 < p.k;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int r = (tid >> 3) + 32 * j;
          const bool ok = kok && ((a_ok >> j) & 1u);
          sm80::cp_async_16_zfill(sbase + swz_k(r, a_c), ok ? a_src[j] + k0 : p.a.ptr, ok ? 16 : 0);
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t sb = sbase + (1 + h) * kOperandBytes;
        if constexpr (B_KMAJOR) {
          const bool kok = k0 + b_c * 8 < p.k;
          const bf16* src = b_src[h] + k0;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int r = (tid >> 3) + 32 * j;
            const bool ok = kok && ((b_ok >> (4 * h + j)) & 1u);
            sm80::cp_async_16_zfill(sb + swz_k(r, b_c), ok ? src + 32 * j * b_ld[h] : p.b0, ok ? 16 : 0);
          }
        } else {
          const bool nok = (b_ok >> h) & 1u;
          const bf16* src = b_src[h] + k0 * b_ld[h];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int kr = (tid >> 4) + 16 * j;
            const bool ok = nok && k0 + kr < p.k;
            sm80::cp_async_16_zfill(sb + swz_n(kr, b_c), ok ? src + 16 * j * b_ld[h] : p.b0, ok ? 16 : 0);
          }
        }
      }
    };

    // ---- consumer: fragments and MMAs of one k16 step ----------------------
    auto load_frags = [&](uint32_t sbase, int kk, uint32_t (&af)[4][4], uint32_t (&bfr)[2][4][2]) {
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) sm80::ldmatrix_x4(af[mi], sbase + swz_k(a_ld_row + mi * 16, kk * 2 + a_ld_hi));
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t sb = sbase + (1 + h) * kOperandBytes;
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          uint32_t r[4];
          if constexpr (B_KMAJOR) sm80::ldmatrix_x4(r, sb + swz_k(bk_ld_row + np * 16, kk * 2 + bk_ld_hi));
          else sm80::ldmatrix_x4_trans(r, sb + swz_n(kk * 16 + bn_ld_k, bn_ld_c + np * 2));
          bfr[h][2 * np][0] = r[0];
          bfr[h][2 * np][1] = r[1];
          bfr[h][2 * np + 1][0] = r[2];
          bfr[h][2 * np + 1][1] = r[3];
        }
      }
    };

    float acc[2][4][4][4];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[h][mi][ni][e] = 0.f;

    // ---- the cp.async ring -------------------------------------------------
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < k_tiles) load_stage(smem_base + s * kStageBytes, s);
      sm80::cp_async_commit();  // possibly empty: keeps the group count uniform
    }
    int read_stage = 0;
    int write_stage = STAGES - 1;
    for (int kt = 0; kt < k_tiles; ++kt) {
      sm80::cp_async_wait<STAGES - 2>();  // k-tile kt has landed (this thread's part)
      __syncthreads();              // ... everyone's; and stage kt-1 is free
      if (kt + STAGES - 1 < k_tiles) load_stage(smem_base + write_stage * kStageBytes, kt + STAGES - 1);
      sm80::cp_async_commit();
      write_stage = write_stage == STAGES - 1 ? 0 : write_stage + 1;

      const uint32_t sbase = smem_base + read_stage * kStageBytes;
      read_stage = read_stage == STAGES - 1 ? 0 : read_stage + 1;
      uint32_t af[2][4][4];
      uint32_t bfr[2][2][4][2];
      load_frags(sbase, 0, af[0], bfr[0]);
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk) {
        if (kk + 1 < kBK / 16) load_frags(sbase, kk + 1, af[(kk + 1) & 1], bfr[(kk + 1) & 1]);
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
              sm80::mma_m16n8k16_bf16(acc[h][mi][ni], af[kk & 1][mi][0], af[kk & 1][mi][1], af[kk & 1][mi][2],
                                      af[kk & 1][mi][3], bfr[kk & 1][h][ni][0], bfr[kk & 1][h][ni][1]);
      }
    }
    sm80::cp_async_wait<0>();  // only empty groups can be left; keep the count clean

    // ---- epilogue: straight from the accumulators (bf16x2 stores) ----------
    // Accumulator e of n8 tile ni: row (lane>>2) + 8*(e>>1), column 2*(lane&3) + (e&1).
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int eh = 0; eh < 2; ++eh) {
        const int r = wm * 64 + mi * 16 + (lane >> 2) + 8 * eh;
        const int32_t row = s_rows[r];
        if (row < 0) continue;
        const int64_t out_row = GATHER_A ? m0 + r : static_cast<int64_t>(row);
        bf16* out = p.c.ptr + out_row * p.c.ld;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const int col = wn * 32 + ni * 8 + 2 * (lane & 3);
          if constexpr (EPI == Epi::kGated) {
            const int64_t n = n0 + col;
            if (n < p.n) {
              const float v0 = fmaxf(acc[0][mi][ni][2 * eh], 0.f) * acc[1][mi][ni][2 * eh];
              const float v1 = fmaxf(acc[0][mi][ni][2 * eh + 1], 0.f) * acc[1][mi][ni][2 * eh + 1];
              *reinterpret_cast<uint32_t*>(out + n) = pack_bf16x2(v0, v1);
            }
          } else {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int64_t n = n0 + h * kHalfN + col;
              if (n < p.n) {
                float v0 = acc[h][mi][ni][2 * eh];
                float v1 = acc[h][mi][ni][2 * eh + 1];
                if constexpr (EPI == Epi::kRelu) {
                  v0 = fmaxf(v0, 0.f);
                  v1 = fmaxf(v1, 0.f);
                }
                *reinterpret_cast<uint32_t*>(out + n) = pack_bf16x2(v0, v1);
              }
            }
          }
        }
      }
    }
  }
}

template <int STAGES, bool B_KMAJOR, Epi EPI, bool GATHER_A>
__global__ void __launch_bounds__(kThreads, 1) fallback_gemm_kernel(const GemmParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ int32_t s_rows[kBM];  // x/y row id of each tile row, -1 = absent
  // Under PDL (no-ops otherwise): the count, the row list and h come from
  // earlier kernels; the next kernel may be placed once every CTA got here.
  pdl_wait();
  pdl_launch_dependents();
  const int64_t n_valid = read_count_once(p.count, p.max_rows);
  const int64_t valid = chunk_valid_rows(n_valid, p.chunk_start, p.chunk_rows);
  if (valid <= 0) return;  // CTA-uniform: the whole grid of an empty chunk exits here
  gemm_tiles<STAGES, B_KMAJOR, EPI, GATHER_A>(p, valid, smem_raw, s_rows);
}

// Both GEMMs of every non-empty chunk in one cooperative launch: a grid-wide
// barrier separates GEMM 1 (writes h_workspace) from GEMM 2 (reads it), and
// GEMM 2 from the next chunk's GEMM 1 (overwrites it). The chunk loop stops
// at the device-side count, so an empty list costs one launch, not two per
// chunk. The grid must be co-resident (cooperative launch guarantees it or
// fails), one CTA per SM at most.
template <int STAGES, bool GATED>
__global__ void __launch_bounds__(kThreads, 1) fallback_fused_kernel(const GemmParams dual, const GemmParams down) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ int32_t s_rows[kBM];
  const int64_t n_valid = read_count_once(dual.count, dual.max_rows);
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  for (int64_t start = 0; start < n_valid; start += dual.chunk_rows) {  // grid-uniform
    const int64_t valid = chunk_valid_rows(n_valid, start, dual.chunk_rows);
    GemmParams p1 = dual;
    p1.chunk_start = start;
    gemm_tiles<STAGES, true, GATED ? Epi::kGated : Epi::kRelu, true>(p1, valid, smem_raw, s_rows);
    grid.sync();
    GemmParams p2 = down;
    p2.chunk_start = start;
    gemm_tiles<STAGES, false, Epi::kPlain, false>(p2, valid, smem_raw, s_rows);
    if (start + dual.chunk_rows < n_valid) grid.sync();
  }
}

// ---- host side --------------------------------------------------------------

template <int STAGES, bool B_KMAJOR, Epi EPI, bool GATHER_A>
constexpr auto kernel_ptr() {
  return &fallback_gemm_kernel<STAGES, B_KMAJOR, EPI, GATHER_A>;
}

using KernelFn = void (*)(GemmParams);

// gemm: kDual / kDown.
template <int STAGES>
KernelFn select_kernel(unsigned gemm, bool gated) {
  if (gemm == fallback_detail::kDown) return kernel_ptr<STAGES, false, Epi::kPlain, false>();
  return gated ? kernel_ptr<STAGES, true, Epi::kGated, true>() : kernel_ptr<STAGES, true, Epi::kRelu, true>();
}

KernelFn select_kernel(unsigned gemm, bool gated, int stages) {
  switch (stages) {
    case 2: return select_kernel<2>(gemm, gated);
    case 3: return select_kernel<3>(gemm, gated);
    case 4: return select_kernel<4>(gemm, gated);
    default: return nullptr;
  }
}

using FusedFn = void (*)(GemmParams, GemmParams);

FusedFn select_fused(bool gated, int stages) {
  switch (stages) {
    case 2: return gated ? &fallback_fused_kernel<2, true> : &fallback_fused_kernel<2, false>;
    case 3: return gated ? &fallback_fused_kernel<3, true> : &fallback_fused_kernel<3, false>;
    case 4: return gated ? &fallback_fused_kernel<4, true> : &fallback_fused_kernel<4, false>;
    default: return nullptr;
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

cudaError_t validate(const FallbackArgs& a) {
  if (a.M < 0 || a.max_rows < 0 || a.chunk_rows <= 0) return cudaErrorInvalidValue;
  if (a.D <= 0 || a.H <= 0 || a.D % 8 != 0 || a.H % 8 != 0) return cudaErrorInvalidValue;
  if (!a.x.ptr || !a.w_up.ptr || !a.w_down.ptr || !a.y.ptr || !a.rows || !a.count || !a.h_workspace)
    return cudaErrorInvalidValue;
  // 16-byte cp.async sources: 16-byte aligned bases, leading dimensions multiples of 8.
  if (!aligned16(a.x.ptr) || !aligned16(a.w_up.ptr) || !aligned16(a.w_down.ptr) || !aligned16(a.h_workspace))
    return cudaErrorInvalidValue;
  if (a.w_gate.ptr && !aligned16(a.w_gate.ptr)) return cudaErrorInvalidValue;
  if (a.x.ld < a.D || a.x.ld % 8 != 0) return cudaErrorInvalidValue;
  if (a.w_up.ld < a.D || a.w_up.ld % 8 != 0) return cudaErrorInvalidValue;
  if (a.w_down.ld < a.D || a.w_down.ld % 8 != 0) return cudaErrorInvalidValue;
  if (a.w_gate.ptr && (a.w_gate.ld < a.D || a.w_gate.ld % 8 != 0)) return cudaErrorInvalidValue;
  // bf16x2 stores into y.
  if ((reinterpret_cast<uintptr_t>(a.y.ptr) & 3u) != 0 || a.y.ld < a.D || a.y.ld % 2 != 0) return cudaErrorInvalidValue;
  if (a.M > INT32_MAX) return cudaErrorInvalidValue;  // row ids are int32
  return cudaSuccess;
}

struct DeviceInfo {
  int sms = 0;
  int smem_optin = 0;
  int cooperative = 0;
};

cudaError_t device_info(DeviceInfo* info) {  // cached per device (common/launch_cache.h)
  int dev = 0;
  TWELL_CUDA_TRY(cudaGetDevice(&dev));
  TWELL_CUDA_TRY(device_attribute(&info->sms, cudaDevAttrMultiProcessorCount, dev));
  TWELL_CUDA_TRY(device_attribute(&info->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TWELL_CUDA_TRY(device_attribute(&info->cooperative, cudaDevAttrCooperativeLaunch, dev));
  return cudaSuccess;
}

// Static shared memory of the kernel (row ids, count) on top of the ring.
constexpr size_t kStaticSmemSlack = 1024;

int stages_for(const DeviceInfo& info) {
  for (int s = 4; s >= 2; --s)
    if (smem_bytes(s) + kStaticSmemSlack <= static_cast<size_t>(info.smem_optin)) return s;
  return 0;
}

cudaError_t launch_gemm(KernelFn k, unsigned grid, size_t smem, cudaStream_t stream, bool pdl, const GemmParams& p) {
  if (!pdl) {
    k<<<grid, kThreads, smem, stream>>>(p);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  pdl_attribute(&attr[0]);
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, k, p);
}

cudaError_t run(const FallbackArgs& a, cudaStream_t stream, int stages, unsigned mask, int path) {
  TWELL_CUDA_TRY(validate(a));
  if (a.M == 0 || a.max_rows == 0) return cudaSuccess;  // nothing can be listed

  DeviceInfo info;
  TWELL_CUDA_TRY(device_info(&info));
  if (stages == 0) stages = stages_for(info);
  if (stages == 0) return cudaErrorNotSupported;
  const size_t smem = smem_bytes(stages);
  if (smem + kStaticSmemSlack > static_cast<size_t>(info.smem_optin)) return cudaErrorInvalidValue;

  const bool gated = a.w_gate.ptr != nullptr;
  if (path == fallback_detail::kPathAuto && a.pdl) path = fallback_detail::kPathLaunches;
  if (path == fallback_detail::kPathAuto)
    path = info.cooperative && mask == fallback_detail::kBoth ? fallback_detail::kPathCooperative
                                                              : fallback_detail::kPathLaunches;
  if (path == fallback_detail::kPathCooperative && (!info.cooperative || mask != fallback_detail::kBoth))
    return cudaErrorNotSupported;

  const int64_t chunk = a.chunk_rows;
  const int64_t n_chunks = (a.max_rows + chunk - 1) / chunk;
  const int64_t rows_cap = a.max_rows < chunk ? a.max_rows : chunk;  // rows one chunk can hold
  const int64_t m_tiles_cap = (rows_cap + kBM - 1) / kBM;

  // Both GEMMs walk the same row list in chunks of `chunk` rows (chunk_start set per launch).
  // M fastest when the chunk's gathered x is no bigger than the weights it meets.
  const MatRef<const bf16> b0 = gated ? a.w_gate : a.w_up;
  GemmParams dual{.a = a.x,
                  .b0 = b0.ptr,
                  .b1 = a.w_up.ptr,
                  .ldb0 = b0.ld,
                  .ldb1 = a.w_up.ld,
                  .c = {a.h_workspace, a.H},
                  .n = a.H,
                  .k = a.D,
                  .m_total = a.M,
                  .rows = a.rows,
                  .count = a.count,
                  .chunk_start = 0,
                  .chunk_rows = chunk,
                  .max_rows = a.max_rows,
                  .m_fastest = rows_cap <= (gated ? 2 : 1) * a.H};
  const int64_t dual_tile_n = gated ? kHalfN : 2 * kHalfN;
  const int64_t dual_tiles = m_tiles_cap * ((a.H + dual_tile_n - 1) / dual_tile_n);

  GemmParams down{.a = {a.h_workspace, a.H},
                  .b0 = a.w_down.ptr,
                  .b1 = a.w_down.ptr,
                  .ldb0 = a.w_down.ld,
                  .ldb1 = a.w_down.ld,
                  .c = a.y,
                  .n = a.D,
                  .k = a.H,
                  .m_total = a.M,
                  .rows = a.rows,
                  .count = a.count,
                  .chunk_start = 0,
                  .chunk_rows = chunk,
                  .max_rows = a.max_rows,
                  .m_fastest = rows_cap <= a.D};
  const int64_t down_tiles = m_tiles_cap * ((a.D + 2 * kHalfN - 1) / (2 * kHalfN));

  if (path == fallback_detail::kPathCooperative) {
    const FusedFn k = select_fused(gated, stages);
    if (!k) return cudaErrorInvalidValue;
    TWELL_CUDA_TRY(set_max_dynamic_smem(k, smem));
    int per_sm = 0;
    TWELL_CUDA_TRY(occupancy_per_sm(&per_sm, k, kThreads, smem));
    if (per_sm < 1) return cudaErrorNotSupported;
    const int64_t most = dual_tiles > down_tiles ? dual_tiles : down_tiles;
    const int64_t resident = static_cast<int64_t>(info.sms);  // one CTA per SM is enough
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(most < resident ? most : resident));
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    dual.chunk_start = 0;
    down.chunk_start = 0;
    TWELL_CUDA_TRY(cudaLaunchKernelEx(&cfg, k, dual, down));
    return cudaSuccess;
  }

  const KernelFn k_dual = select_kernel(fallback_detail::kDual, gated, stages);
  const KernelFn k_down = select_kernel(fallback_detail::kDown, gated, stages);
  if (!k_dual || !k_down) return cudaErrorInvalidValue;
  TWELL_CUDA_TRY(set_max_dynamic_smem(k_dual, smem));
  TWELL_CUDA_TRY(set_max_dynamic_smem(k_down, smem));
  const unsigned grid_dual = static_cast<unsigned>(dual_tiles < info.sms ? dual_tiles : info.sms);
  const unsigned grid_down = static_cast<unsigned>(down_tiles < info.sms ? down_tiles : info.sms);
  for (int64_t c = 0; c < n_chunks; ++c) {
    dual.chunk_start = c * chunk;
    down.chunk_start = c * chunk;
    if (mask & fallback_detail::kDual) TWELL_CUDA_TRY(launch_gemm(k_dual, grid_dual, smem, stream, a.pdl, dual));
    if (mask & fallback_detail::kDown) TWELL_CUDA_TRY(launch_gemm(k_down, grid_down, smem, stream, a.pdl, down));
  }
  return cudaSuccess;
}

}  // namespace fb

cudaError_t fallback_rows(const FallbackArgs& args, cudaStream_t stream) {
  return fb::run(args, stream, 0, fallback_detail::kBoth, fallback_detail::kPathAuto);
}

namespace fallback_detail {

cudaError_t fallback_rows_ex(const FallbackArgs& args, cudaStream_t stream, int stages, unsigned gemm_mask, int path) {
  if (stages != 0 && (stages < 2 || stages > 4)) return cudaErrorInvalidValue;
  if (gemm_mask == 0 || gemm_mask > kBoth || path < kPathAuto || path > kPathCooperative) return cudaErrorInvalidValue;
  return fb::run(args, stream, stages, gemm_mask, path);
}

int auto_stages() {
  fb::DeviceInfo info;
  if (fb::device_info(&info) != cudaSuccess) return 0;
  return fb::stages_for(info);
}

cudaError_t kernel_attributes(unsigned gemm, bool gated, int stages, cudaFuncAttributes* out) {
  if (!out) return cudaErrorInvalidValue;
  if (gemm == kBoth) {
    const fb::FusedFn k = fb::select_fused(gated, stages);
    return k ? cudaFuncGetAttributes(out, k) : cudaErrorInvalidValue;
  }
  const fb::KernelFn k = fb::select_kernel(gemm, gated, stages);
  return k ? cudaFuncGetAttributes(out, k) : cudaErrorInvalidValue;
}

bool cooperative_available() {
  fb::DeviceInfo info;
  return fb::device_info(&info) == cudaSuccess && info.cooperative != 0;
}

}  // namespace fallback_detail
}  // namespace twell
