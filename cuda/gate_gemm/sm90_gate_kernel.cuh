// Gate GEMM with the TwELL packing epilogue, Hopper (sm_90a) path.
//
//   packed = TwELL(relu(x . W^T)),  x [M, D] bf16,  W [H, D] bf16,  fp32 accumulation.
//
// Structure (one CTA = 3 warpgroups, 384 threads, persistent):
//  * warpgroup 0 is the producer: after setmaxnreg.dec, one thread walks the
//    tile schedule and issues TMA loads (128-byte swizzle) of a 128x64 x tile
//    and a 256x64 W tile per K step into a ring of 4 (3) shared-memory stages
//    of 48 KiB; each stage completes on a "full" mbarrier (expect-tx bytes).
//    Out-of-bounds rows/columns (M, H, the K tail) are zero-filled by TMA.
//  * warpgroups 1 and 2 are consumers (setmaxnreg.inc): each owns 64 rows of
//    the 128-row CTA tile and the full 256 columns (= one TwELL tile),
//    issuing 4 wgmma m64n256k16 per stage. One wgmma group stays in flight: a
//    stage is released (one arrive per warp on its "empty" mbarrier) only
//    after the group that read it has retired (wgmma.wait_group 1); variant
//    inflight=0 waits for each group at once and releases one step earlier.
//  * variant cluster=2: CTA pairs along M each load half of the W tile and
//    multicast it to both, halving W traffic from L2; the empty barriers then
//    collect arrivals from the consumers of both CTAs, since a stage of one
//    CTA is written by the producers of both; a cluster barrier keeps a CTA
//    alive until its peer can no longer touch its shared memory.
//  * the epilogue packs straight from the accumulators: in the wgmma layout
//    the 256 columns of a row sit in the 4 lanes of a quad, so a row's 256-bit
//    positivity mask (fp32 > 0, column order) is merged with two quad
//    shuffles per 32-bit word and every positive value gets its rank
//    (ascending column order, deterministic) by a popcount. Three ways to
//    write the slots (GatePackSm90Variant::epilogue):
//      0: into a per-warpgroup shared staging buffer, then one TMA store
//         (clipped at row M); before the buffer is rewritten for the next
//         tile the issuing thread waits until the previous store has read it
//         (cp.async.bulk.wait_group.read) and the warpgroup meets on a named
//         barrier; the last store is waited for before exit;
//      1: each quad zero-fills its two rows' slots in global memory with
//         16-byte stores, then writes entries and counts (__syncwarp orders
//         the two among the lanes); code unrolled per value;
//      3 (default): as 1, but each lane stages its row values as bf16 in 128
//         bytes of shared scratch and loops over its own positive values only,
//         reading them back by run-time index. With 0.5% activity most warps
//         hold a positive somewhere in most 8-value groups, so per-group
//         skipping (0, 1) saves little; 3 halves the epilogue's instructions.
//    The producer keeps prefetching the next tile during the epilogue.
//  * schedule: static stride over output tiles (tile += number of clusters),
//    ordered in bands of group_n column tiles with the column fastest, so the
//    CTAs running at the same time share x rows and a W band in L2.
//
// Measured on an H100 SXM (M=65536, D=2048, H=5632, ~0.5% active, median of
// 20; cuBLAS bf16 GEMM 762 TFLOP/s): default (cluster 1, epilogue 3) 699
// TFLOP/s for slots=32 (91.7%), 682 for 64 (89.5%), 636 for 128 (83.5%);
// main loop alone 768. Run-to-run spread of a few percent.
//
// Shared memory (1 KiB alignment slack included): epilogue 3: 4 x 48 KiB +
// 32 KiB scratch = 225 KiB; epilogue 0: 4 stages + 2 x 64 x slots x 4 B
// (208 / 225 KiB), 3 stages for slots 128 (209 KiB); epilogue 1: 193 KiB.
// Registers: 168 per thread at launch (384 threads, 1 CTA/SM), 40 producer /
// 232 consumer after setmaxnreg; no local memory.
//
// This header holds the kernel and its launch templates. Everything in it has
// internal linkage, so each translation unit that includes it builds its own
// instantiations: the library's gate_gemm_sm90.cu builds the one variant the
// dispatcher uses (kDefault* below, for slots 32, 64 and 128), the test
// program's experiments/gate_gemm_sm90_variants.cu builds all of them.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstring>
#include <mutex>

#include "common/launch_cache.h"
#include "common/pack_entry.cuh"
#include "common/sm90_ptx.cuh"
#include "gate_gemm/gate_gemm.h"
#include "gate_gemm/sm90_wgmma.cuh"

#ifndef TWELL_HAS_SM90A
#define TWELL_HAS_SM90A 0
#endif

namespace twell {
namespace sm90_gate {

// Host helpers defined once, in gate_gemm_sm90.cu.
// cuTensorMapEncodeTiled from the driver (nullptr when the driver lacks it).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder();
// A 2-D tensor map, reused from a per-thread cache of recent encodings.
cudaError_t encode_2d(PFN_cuTensorMapEncodeTiled_v12000 encode, CUtensorMap* map, CUtensorMapDataType dtype,
                      const void* ptr, uint64_t inner, uint64_t outer, uint64_t stride_bytes, uint32_t box_inner,
                      uint32_t box_outer, CUtensorMapSwizzle swizzle, CUtensorMapL2promotion promo);
// The checks every launch makes first: an sm_90 device, arguments the kernel
// can run. Sets *device and, when M > 0 and *num_sms <= 0, *num_sms to the
// device's SM count.
cudaError_t prepare_launch(const GatePackArgs& args, int* num_sms, int* device);

namespace {

constexpr int kBN = 256;  // CTA columns = one TwELL tile
constexpr int kBK = 64;   // K per stage: 64 bf16 = 128 B = one swizzle row
constexpr uint32_t kBBytes = kBN * kBK * 2;
constexpr uint32_t kSmemLimit = 232448;  // sm_90 opt-in maximum per block
// The variant gate_pack_sm90() runs (see GatePackSm90Variant).
constexpr int kDefaultCluster = 1;
constexpr int kDefaultConsumers = 2;
constexpr int kDefaultEpilogue = 3;
constexpr int kDefaultInflight = 1;
constexpr int kDefaultGroupN = 8;

// Epilogue kinds: how the packed tile slots reach global memory.
constexpr int kEpiTmaStore = 0;  // staged in shared memory, one TMA store per warpgroup
constexpr int kEpiDirect = 1;    // each quad writes its two rows with 16-byte stores
constexpr int kEpiNone = 2;      // no packing (benchmark of the main loop only)
constexpr int kEpiStaged = 3;    // like kEpiDirect, values staged as bf16 in per-lane shared scratch

template <int kSlots, int kCluster, int kConsumers, int kEpi, int kInflight>
struct Cfg {
  static constexpr int kBM = 64 * kConsumers;  // CTA rows
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr uint32_t kABytes = kBM * kBK * 2;
  static constexpr uint32_t kStageBytes = kABytes + kBBytes;
  static constexpr uint32_t kOutWG = kEpi == kEpiTmaStore ? 64u * kSlots * 4u : 0u;
  // kEpiStaged: 128 bytes per consumer thread (its 64 values of one row as bf16).
  static constexpr uint32_t kScratch = kEpi == kEpiStaged ? kConsumers * 128u * 128u : 0u;
  static constexpr uint32_t kAvail = kSmemLimit - 1024 - kConsumers * kOutWG - kScratch - 64;
  static constexpr int kStages =
      static_cast<int>(kAvail / kStageBytes) > 4 ? 4 : static_cast<int>(kAvail / kStageBytes);
  static constexpr uint32_t kOffB = kStages * kABytes;
  static constexpr uint32_t kOffOut = kOffB + kStages * kBBytes;
  static constexpr uint32_t kOffScratch = kOffOut + kConsumers * kOutWG;
  static constexpr uint32_t kOffBar = kOffScratch + kScratch;
  static constexpr uint32_t kSmem = 1024 + kOffBar + 2 * kStages * 8;  // +1 KiB to align
  // Register split after setmaxnreg (multiples of 8, total <= 65536).
  // ptxas allocates the whole kernel under the launch-bounds cap (65536 / 384
  // = 168 per thread), which the 128 accumulators plus the epilogue fit; a
  // third consumer warpgroup (512 threads, cap 128) does not.
  static constexpr int kProducerRegs = 40;
  static constexpr int kConsumerRegs = 232;
  static_assert(kConsumers == 2, "only 2 consumer warpgroups fit the register file");
  static_assert(kStages >= 2, "too little shared memory for a pipeline");
  static_assert(kSmem <= kSmemLimit, "shared memory over the sm_90 limit");
  static_assert(128 * kProducerRegs + 128 * kConsumers * kConsumerRegs <= 65536, "registers");
};

struct Params {
  int M;
  int group_n;  // column tiles per schedule band
  int nk;  // K steps = ceil(D / 64)
  int mt;  // row tiles of kBM * cluster rows
  int nt;  // column tiles
  long long total;
  int64_t row_words;  // packed words per row
  uint32_t* packed;
  uint8_t* row_flags;
  u64* stats;
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Tile t of the schedule -> (row tile of the cluster, column tile).
__device__ __forceinline__ void decode_tile(long long t, int mt, int nt, int group_n, int& mc, int& n) {
  if (t <= 0x7fffffffLL && static_cast<long long>(group_n) * mt <= 0x7fffffffLL) {
    // 32-bit path (every realistic shape): no 64-bit division subroutine.
    const uint32_t band_tiles = static_cast<uint32_t>(group_n) * static_cast<uint32_t>(mt);
    const uint32_t tt = static_cast<uint32_t>(t);
    const uint32_t band = tt / band_tiles;
    const uint32_t r = tt - band * band_tiles;
    const int n_first = static_cast<int>(band) * group_n;
    const uint32_t gn = static_cast<uint32_t>(min(group_n, nt - n_first));
    const uint32_t m = r / gn;
    mc = static_cast<int>(m);
    n = n_first + static_cast<int>(r - m * gn);
    return;
  }
  const long long band_tiles = static_cast<long long>(group_n) * mt;
  const int band = static_cast<int>(t / band_tiles);
  const int r = static_cast<int>(t - band * band_tiles);
  const int n_first = band * group_n;
  const int gn = min(group_n, nt - n_first);
  mc = r / gn;
  n = n_first + (r - mc * gn);
}

template <int kCluster>
__device__ __forceinline__ void release_stage(uint32_t bar_empty, int lane) {
  if (lane == 0) {
    if constexpr (kCluster == 1) {
      sm90::mbar_arrive(bar_empty);
    } else {
#pragma unroll
      for (int cta = 0; cta < kCluster; ++cta) sm90::mbar_arrive_cluster(bar_empty, cta);
    }
  }
}

// Packs one row half (h = 0: row lane/4, h = 1: row lane/4 + 8 of the warp's
// 16) of the accumulator: writes the entries (ascending column order, at most
// slots-1) to row_words[1..] when `store`, returns the row's true count.
// The quad's lanes must all call it (shuffles); row_words[0] and the unused
// words are the caller's.
template <int kSlots, int h>
__device__ __forceinline__ uint32_t pack_row(const float (&acc)[128], uint32_t* row_words, int q, bool store) {
  constexpr int kCap = kSlots - 1;
  // w[grp]: columns 32*grp .. 32*grp+31 of the row, bit = column - 32*grp.
  // This lane holds columns 8*j + 2*q + b (j = 0..31, b = 0..1): its bits of
  // group grp are 8*jj + 2*q + b (jj = j - 4*grp).
  uint32_t w[8];
#pragma unroll
  for (int grp = 0; grp < 8; ++grp) {
    // A max over the group's 8 values first: with sparse activations most
    // groups have no positive value and cost one FMNMX per value.
    float mx = acc[4 * (4 * grp) + 2 * h];
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
      for (int b = 0; b < 2; ++b) mx = fmaxf(mx, acc[4 * (4 * grp + jj) + 2 * h + b]);
    }
    uint32_t bits = 0;
    if (mx > 0.0f) {
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          if (acc[4 * (4 * grp + jj) + 2 * h + b] > 0.0f) bits |= 1u << (8 * jj + b);
        }
      }
    }
    w[grp] = bits << (2 * q);
  }
#pragma unroll
  for (int grp = 0; grp < 8; ++grp) {
    w[grp] |= __shfl_xor_sync(0xffffffffu, w[grp], 1);
    w[grp] |= __shfl_xor_sync(0xffffffffu, w[grp], 2);
  }
  uint32_t prefix = 0;  // positives in columns below 32*grp
#pragma unroll
  for (int grp = 0; grp < 8; ++grp) {
    const uint32_t own = (w[grp] >> (2 * q)) & 0x03030303u;
    if (store && own != 0 && prefix < static_cast<uint32_t>(kCap)) {
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          if (own & (1u << (8 * jj + b))) {
            const int bit = 8 * jj + 2 * q + b;  // column within the group, <= 31
            const uint32_t rank = prefix + __popc(w[grp] & ((1u << bit) - 1u));
            if (rank < static_cast<uint32_t>(kCap)) {
              row_words[1 + rank] = pack_entry(32 * grp + bit, acc[4 * (4 * grp + jj) + 2 * h + b]);
            }
          }
        }
      }
    }
    prefix += __popc(w[grp]);
  }
  return prefix;
}

// One of 8 registers by a run-time index, without local memory (7 selects).
__device__ __forceinline__ uint32_t select8(const uint32_t (&a)[8], uint32_t i) {
  const uint32_t r01 = (i & 1u) ? a[1] : a[0];
  const uint32_t r23 = (i & 1u) ? a[3] : a[2];
  const uint32_t r45 = (i & 1u) ? a[5] : a[4];
  const uint32_t r67 = (i & 1u) ? a[7] : a[6];
  const uint32_t r03 = (i & 2u) ? r23 : r01;
  const uint32_t r47 = (i & 2u) ? r67 : r45;
  return (i & 4u) ? r47 : r03;
}

// pack_row with fewer instructions per warp: with sparse activations most
// warps hold a positive value somewhere in most 8-value groups, so code that
// is unrolled per value and skipped per group runs almost always. Here every
// lane (1) stages its 64 values of the row as bf16 in its own 128 bytes of
// shared memory (16-byte chunks XOR-swizzled by lane so a warp's stores are
// conflict-free), (2) builds its positivity mask branch-free, (3) merges the
// quad's masks into the row's 256-bit mask in column order, (4) loops over
// its own set bits only, in ascending column order, reading each value back
// by a run-time index. Same words as pack_row.
template <int kSlots, int h>
__device__ __forceinline__ uint32_t pack_row_staged(const float (&acc)[128], uint32_t* row_words, int q, bool store,
                                                    uint8_t* scratch, int swz) {
  constexpr uint32_t kCap = kSlots - 1;
  // (1) word j = bf16x2(col 8j+2q, col 8j+2q+1); chunk c = words 4c..4c+3.
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    uint32_t w4[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int j = 4 * c + i;
      const __nv_bfloat162 v = __floats2bfloat162_rn(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
      w4[i] = *reinterpret_cast<const uint32_t*>(&v);
    }
    *reinterpret_cast<uint4*>(scratch + ((c ^ swz) << 4)) = make_uint4(w4[0], w4[1], w4[2], w4[3]);
  }
  // (2) bit 2j+b of m[j/16] <=> acc of column 8j+2q+b > 0 (fp32 decides).
  uint32_t m[2] = {0u, 0u};
#pragma unroll
  for (int j = 0; j < 32; ++j) {
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      if (acc[4 * j + 2 * h + b] > 0.0f) m[j >> 4] |= 1u << (2 * (j & 15) + b);
    }
  }
  // (3) w[grp]: columns 32*grp .. 32*grp+31 of the row, bit = column - 32*grp.
  // This lane's byte for grp (bits 2*jj+b) spreads to bits 8*jj+b, then 2q up.
  uint32_t w[8];
#pragma unroll
  for (int grp = 0; grp < 8; ++grp) {
    const uint32_t byte = (m[grp >> 2] >> (8 * (grp & 3))) & 0xFFu;
    w[grp] = ((byte | (byte << 6) | (byte << 12) | (byte << 18)) & 0x03030303u) << (2 * q);
  }
#pragma unroll
  for (int grp = 0; grp < 8; ++grp) {
    w[grp] |= __shfl_xor_sync(0xffffffffu, w[grp], 1);
    w[grp] |= __shfl_xor_sync(0xffffffffu, w[grp], 2);
  }
  uint32_t pre[8];  // positives in columns below 32*grp
  uint32_t total = 0;
#pragma unroll
  for (int grp = 0; grp < 8; ++grp) {
    pre[grp] = total;
    total += __popc(w[grp]);
  }
  // (4) own positives in ascending column order; ranks ascend, so stop at
  // the first one past capacity.
  if (store) {
    uint32_t rem_lo = m[0], rem_hi = m[1];
    while ((rem_lo | rem_hi) != 0u) {
      uint32_t e;
      if (rem_lo != 0u) {
        e = __ffs(rem_lo) - 1;
        rem_lo &= rem_lo - 1u;
      } else {
        e = 32 + __ffs(rem_hi) - 1;
        rem_hi &= rem_hi - 1u;
      }
      const uint32_t j = e >> 1, b = e & 1u;
      const uint32_t grp = j >> 2;
      const uint32_t pos = 8u * (j & 3u) + 2u * q + b;  // column within the group
      const uint32_t rank = select8(pre, grp) + __popc(select8(w, grp) & ((1u << pos) - 1u));
      if (rank >= kCap) break;
      const uint32_t bits = *reinterpret_cast<const unsigned short*>(
          scratch + (((j >> 2) ^ static_cast<uint32_t>(swz)) << 4) + ((j & 3u) << 2) + (b << 1));
      row_words[1 + rank] = (bits << 16) | (32u * grp + pos);
    }
  }
  return total;
}

// ------------------------------------------------------------ kernel phases
// The kernel below is a sequence of these; each is inlined into it. The
// ring position (stage s, barrier parity `phase`) is kept in plain locals of
// each loop: folding it into a helper struct or moving the producer's loads
// into a helper changed the SASS (ptxas assigned registers differently).

// Shared-memory addresses every role uses. The stages start 1024-byte
// aligned: the 128-byte swizzled TMA tiles and the wgmma descriptors need it.
struct Smem {
  uint32_t base;       // shared-window address of the x stages (W stages at + kOffB)
  uint8_t* gbase;      // the same address as a generic pointer
  uint32_t bar_full;   // + 8 * stage: the stage's tiles have landed (TMA transaction bytes)
  uint32_t bar_empty;  // + 8 * stage: every consumer warp has read the stage
};

template <class C>
__device__ __forceinline__ Smem carve_smem(uint8_t* smem_raw) {
  const uint32_t raw = sm90::smem_u32(smem_raw);
  Smem sm;
  sm.base = (raw + 1023u) & ~1023u;
  sm.gbase = smem_raw + (sm.base - raw);
  sm.bar_full = sm.base + C::kOffBar;
  sm.bar_empty = sm.bar_full + 8u * C::kStages;
  return sm;
}

// Thread 0 initialises the stage barriers and prefetches the tensor-map
// descriptors. The barriers must be initialised before anyone uses them,
// cluster-wide when the peer CTA multicasts into them.
template <class C, int kCluster, int kConsumers, int kEpi>
__device__ __forceinline__ void init_pipeline(const Smem& sm, int tid, const CUtensorMap* tm_x, const CUtensorMap* tm_w,
                                              const CUtensorMap* tm_out) {
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < C::kStages; ++s) {
      sm90::mbar_init(sm.bar_full + 8u * s, 1);
      // One arrival per consumer warp of every CTA whose producer writes here.
      sm90::mbar_init(sm.bar_empty + 8u * s, 4 * kConsumers * kCluster);
    }
    sm90::fence_barrier_init();
    sm90::prefetch_tensormap(tm_x);
    sm90::prefetch_tensormap(tm_w);
    if constexpr (kEpi == kEpiTmaStore) sm90::prefetch_tensormap(tm_out);
  }
  if constexpr (kCluster > 1) {
    sm90::cluster_sync();
  } else {
    __syncthreads();
  }
}

// Warpgroup 0: hands most of its registers to the consumers; one thread
// walks the tile schedule and fills the stages, running ahead of the
// consumers by up to kStages K steps (also across tiles, during their
// epilogue).
template <class C, int kCluster>
__device__ __forceinline__ void producer_warpgroup(const CUtensorMap* tm_x, const CUtensorMap* tm_w, const Smem& sm,
                                                   const Params& p, int tid, uint32_t rank, long long first,
                                                   long long stride) {
  sm90::setmaxnreg_dec<C::kProducerRegs>();
  if (tid == 0) {
    uint32_t phase = 0;
    int s = 0;
    for (long long t = first; t < p.total; t += stride) {
      int mc, n;
      decode_tile(t, p.mt, p.nt, p.group_n, mc, n);
      const int m0 = (mc * kCluster + static_cast<int>(rank)) * C::kBM;
      const int n0 = n * kBN;
      for (int kb = 0; kb < p.nk; ++kb) {
        // Fresh barriers: waiting for parity 1 returns at once (first lap).
        sm90::mbar_wait(sm.bar_empty + 8u * s, phase ^ 1u);
        const uint32_t full = sm.bar_full + 8u * s;
        sm90::mbar_arrive_expect_tx(full, C::kStageBytes);
        sm90::tma_load_2d(tm_x, sm.base + s * C::kABytes, full, kb * kBK, m0);
        if constexpr (kCluster == 1) {
          sm90::tma_load_2d(tm_w, sm.base + C::kOffB + s * kBBytes, full, kb * kBK, n0);
        } else {
          constexpr uint32_t kPart = kBBytes / kCluster;
          constexpr int kRowsPart = kBN / kCluster;
          sm90::tma_load_2d_multicast(tm_w, sm.base + C::kOffB + s * kBBytes + rank * kPart, full, kb * kBK,
                                      n0 + static_cast<int>(rank) * kRowsPart,
                                      static_cast<uint16_t>((1u << kCluster) - 1u));
        }
        if (++s == C::kStages) {
          s = 0;
          phase ^= 1u;
        }
      }
    }
  }
  __syncwarp();
}

// Where a consumer thread sits in the CTA tile and in the wgmma layout.
struct ConsumerThread {
  int c;            // consumer index: rows 64*c .. 64*c+63 of the CTA tile
  int wtid;         // thread within the warpgroup
  int lane;
  int q;            // lane within its quad: columns 8j + 2q and 8j + 2q + 1
  int r0;           // this thread's rows within the warpgroup's 64: r0 and r0 + 8
  uint32_t bar_id;  // named barrier of this warpgroup (0 = __syncthreads)
};

// Main loop of one tile: 4 x m64n256k16 per stage, one wgmma group in
// flight. A stage is released only after the group that read it has retired
// (wgmma.wait_group 1); inflight=0 waits for each group at once instead.
// Returns with every MMA of the tile retired and every stage released.
template <class C, int kCluster, int kInflight>
__device__ __forceinline__ void mma_tile(float (&acc)[128], const Smem& sm, int& ring_s, uint32_t& ring_phase, int c,
                                         int lane, int nk) {
  // Local copies, written back at the end: looping on the references
  // directly made the compiler lay the loop out differently (other SASS).
  int s = ring_s;
  uint32_t phase = ring_phase;
  int prev = 0;
  for (int kb = 0; kb < nk; ++kb) {
    sm90::mbar_wait(sm.bar_full + 8u * s, phase);
    const uint64_t da = sm90::desc_k_major_sw128(sm.base + s * C::kABytes + c * (64 * kBK * 2));
    const uint64_t db = sm90::desc_k_major_sw128(sm.base + C::kOffB + s * kBBytes);
#pragma unroll
    for (int i = 0; i < 128; ++i) sm90::fence_operand(acc[i]);
    sm90::wgmma_fence();
#pragma unroll
    for (int k = 0; k < kBK / 16; ++k) {
      // scale-d = 0 on the first K step of a tile clears the accumulator.
      sm90::wgmma_m64n256k16_bf16(acc, da + 2 * k, db + 2 * k, (kb > 0 || k > 0) ? 1u : 0u);
    }
    sm90::wgmma_commit_group();
#pragma unroll
    for (int i = 0; i < 128; ++i) sm90::fence_operand(acc[i]);
    if constexpr (kInflight == 1) {
      if (kb > 0) {
        sm90::wgmma_wait_group<1>();  // the group that read stage `prev` has retired
        release_stage<kCluster>(sm.bar_empty + 8u * prev, lane);
      }
    } else {
      // Release this stage as soon as its MMAs retire; the other consumer
      // warpgroup's group keeps the tensor cores busy meanwhile.
      sm90::wgmma_wait_group<0>();
      release_stage<kCluster>(sm.bar_empty + 8u * s, lane);
    }
    prev = s;
    if (++s == C::kStages) {
      s = 0;
      phase ^= 1u;
    }
  }
  sm90::wgmma_wait_group<0>();
#pragma unroll
  for (int i = 0; i < 128; ++i) sm90::fence_operand(acc[i]);
  if constexpr (kInflight == 1) release_stage<kCluster>(sm.bar_empty + 8u * prev, lane);
  (void)prev;
  ring_s = s;
  ring_phase = phase;
}

// kEpiNone: consume every accumulator (a pairwise sum and a store that never
// happens) so that ptxas keeps the MMAs; this variant times the main loop.
__device__ __forceinline__ void keep_accumulators(const float (&acc)[128], u64* stats) {
  float v0 = 0.0f, v1 = 0.0f, v2 = 0.0f, v3 = 0.0f;
#pragma unroll
  for (int i = 0; i < 128; i += 4) {
    v0 += acc[i];
    v1 += acc[i + 1];
    v2 += acc[i + 2];
    v3 += acc[i + 3];
  }
  if ((v0 + v1) + (v2 + v3) == -1.2345e-30f) stats[TWELL_STAT_PATH] = 0xFFFFu;
}

// kEpiTmaStore: pack this warpgroup's 64 rows x 256 columns into its shared
// staging buffer, then one thread stores the buffer with TMA (clipped at row
// M). Before the buffer is rewritten, the previous tile's store must have
// finished reading it. cnt[h] receives the true count of row r0 + 8h.
template <int kSlots, class C>
__device__ __forceinline__ void pack_tile_tma_store(const float (&acc)[128], const Smem& sm, const ConsumerThread& me,
                                                    const CUtensorMap* tm_out, int n, int m_wg, int M,
                                                    uint32_t (&cnt)[2]) {
  uint32_t* const out_words = reinterpret_cast<uint32_t*>(sm.gbase + C::kOffOut + me.c * C::kOutWG);
  if (me.wtid == 0) sm90::bulk_wait_group_read0();
  sm90::named_bar_sync(me.bar_id, 128);
  // Zero this quad's two rows (each lane a quarter), then fill entries.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint4* dst = reinterpret_cast<uint4*>(out_words + (me.r0 + 8 * h) * kSlots);
#pragma unroll
    for (int i = 0; i < kSlots / 16; ++i) dst[4 * i + me.q] = make_uint4(0u, 0u, 0u, 0u);
  }
  __syncwarp();
  cnt[0] = pack_row<kSlots, 0>(acc, out_words + me.r0 * kSlots, me.q, true);
  cnt[1] = pack_row<kSlots, 1>(acc, out_words + (me.r0 + 8) * kSlots, me.q, true);
  if (me.q == 0) {
    out_words[me.r0 * kSlots] = cnt[0];
    out_words[(me.r0 + 8) * kSlots] = cnt[1];
  }
  sm90::fence_proxy_async_shared();
  sm90::named_bar_sync(me.bar_id, 128);
  if (me.wtid == 0 && m_wg < M) {
    sm90::tma_store_2d(tm_out, sm.base + C::kOffOut + me.c * C::kOutWG, n * kSlots, m_wg);
    sm90::bulk_commit_group();
  }
}

// kEpiDirect, kEpiStaged: pack straight to global memory. Each quad owns its
// two rows' slots, so no shared staging and no cross-warp synchronisation.
// Zero fill first (16-byte stores, lanes of a quad on consecutive chunks),
// then the entries and the count; __syncwarp orders the two among the lanes.
// cnt[h] receives the true count of row r0 + 8h.
template <int kSlots, int kEpi, class C>
__device__ __forceinline__ void pack_tile_global(const float (&acc)[128], const Smem& sm, const ConsumerThread& me,
                                                 const Params& p, int n, int m_wg, uint32_t (&cnt)[2]) {
  const int row0 = m_wg + me.r0;
  const bool ok0 = row0 < p.M, ok1 = row0 + 8 < p.M;
  uint32_t* const g0 = p.packed + static_cast<int64_t>(row0) * p.row_words + n * kSlots;
  uint32_t* const g1 = g0 + 8 * p.row_words;
#pragma unroll
  for (int i = 0; i < kSlots / 16; ++i) {
    if (ok0) reinterpret_cast<uint4*>(g0)[4 * i + me.q] = make_uint4(0u, 0u, 0u, 0u);
    if (ok1) reinterpret_cast<uint4*>(g1)[4 * i + me.q] = make_uint4(0u, 0u, 0u, 0u);
  }
  __syncwarp();
  if constexpr (kEpi == kEpiStaged) {
    uint8_t* const scratch = sm.gbase + (C::kOffScratch + (me.wtid + 128 * me.c) * 128);
    cnt[0] = pack_row_staged<kSlots, 0>(acc, g0, me.q, ok0, scratch, me.lane & 7);
    cnt[1] = pack_row_staged<kSlots, 1>(acc, g1, me.q, ok1, scratch, me.lane & 7);
  } else {
    cnt[0] = pack_row<kSlots, 0>(acc, g0, me.q, ok0);
    cnt[1] = pack_row<kSlots, 1>(acc, g1, me.q, ok1);
  }
  if (me.q == 0) {
    if (ok0) g0[0] = cnt[0];
    if (ok1) g1[0] = cnt[1];
  }
}

// Per-thread statistics over the tiles it packed (lane 0 of each quad counts
// its two rows), flagged rows written as they overflow.
struct PackStats {
  u64 active = 0;
  u64 overflow = 0;
  uint32_t max = 0;
};

template <int kSlots>
__device__ __forceinline__ void count_rows(PackStats& st, const uint32_t (&cnt)[2], int row0, const Params& p) {
  constexpr uint32_t kCap = kSlots - 1;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    st.active += cnt[h];
    st.max = max(st.max, cnt[h]);
    if (cnt[h] > kCap) {
      ++st.overflow;
      const int row = row0 + 8 * h;
      if (row < p.M) p.row_flags[row] = 1;
    }
  }
}

// Reduce the statistics over the warp: one atomic of each kind per warp.
__device__ __forceinline__ void flush_stats(PackStats st, int lane, u64* stats) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    st.active += __shfl_xor_sync(0xffffffffu, st.active, off);
    st.overflow += __shfl_xor_sync(0xffffffffu, st.overflow, off);
    st.max = max(st.max, __shfl_xor_sync(0xffffffffu, st.max, off));
  }
  if (lane == 0) {
    if (st.active) atomicAdd(stats + TWELL_STAT_ACTIVE, st.active);
    if (st.overflow) atomicAdd(stats + TWELL_STAT_OVERFLOW_TILES, st.overflow);
    if (st.max) atomicMax(stats + TWELL_STAT_MAX_TILE_COUNT, static_cast<u64>(st.max));
  }
}

// Warpgroups 1 and 2: each takes the registers the producer gave up and, per
// tile of the schedule, accumulates its 64 rows x 256 columns (mma_tile) and
// packs them (one of the epilogues) while the producer already loads the
// next tile's stages.
template <int kSlots, class C, int kCluster, int kEpi, int kInflight>
__device__ __forceinline__ void consumer_warpgroup(const CUtensorMap* tm_out, const Smem& sm, const Params& p, int tid,
                                                   int wg, int lane, uint32_t rank, long long first, long long stride) {
  sm90::setmaxnreg_inc<C::kConsumerRegs>();
  ConsumerThread me;
  me.c = wg - 1;
  me.wtid = tid - 128 * wg;
  me.lane = lane;
  me.q = lane & 3;
  me.r0 = (me.wtid >> 5) * 16 + (lane >> 2);
  me.bar_id = 1 + me.c;

  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.0f;

  uint32_t phase = 0;
  int s = 0;
  PackStats stats;
  for (long long t = first; t < p.total; t += stride) {
    int mc, n;
    decode_tile(t, p.mt, p.nt, p.group_n, mc, n);
    const int m_wg = (mc * kCluster + static_cast<int>(rank)) * C::kBM + 64 * me.c;
    mma_tile<C, kCluster, kInflight>(acc, sm, s, phase, me.c, lane, p.nk);
    if constexpr (kEpi == kEpiNone) {
      keep_accumulators(acc, p.stats);
      continue;
    }
    uint32_t cnt[2];
    if constexpr (kEpi == kEpiTmaStore) {
      pack_tile_tma_store<kSlots, C>(acc, sm, me, tm_out, n, m_wg, p.M, cnt);
    } else {
      pack_tile_global<kSlots, kEpi, C>(acc, sm, me, p, n, m_wg, cnt);
    }
    if (me.q == 0) count_rows<kSlots>(stats, cnt, m_wg + me.r0, p);
  }
  // The last TMA store must finish reading shared memory before the CTA exits.
  if constexpr (kEpi == kEpiTmaStore) {
    if (me.wtid == 0) sm90::bulk_wait_group0();
  }
  flush_stats(stats, lane, p.stats);
}

#endif  // sm_90a

template <int kSlots, int kCluster, int kConsumers, int kEpi, int kInflight>
// clang-format off: it would split the launch bounds' arguments across lines.
__global__ void __launch_bounds__(Cfg<kSlots, kCluster, kConsumers, kEpi, kInflight>::kThreads, 1)
    gate_pack_sm90_kernel(const __grid_constant__ CUtensorMap tm_x, const __grid_constant__ CUtensorMap tm_w,
                          const __grid_constant__ CUtensorMap tm_out, const Params p) {
// clang-format on
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Cfg<kSlots, kCluster, kConsumers, kEpi, kInflight>;
  extern __shared__ uint8_t smem_raw[];
  const Smem sm = carve_smem<C>(smem_raw);

  const int tid = threadIdx.x;
  const int wg = tid >> 7;
  const int lane = tid & 31;
  uint32_t rank = 0;
  if constexpr (kCluster > 1) rank = sm90::cluster_ctarank();

  init_pipeline<C, kCluster, kConsumers, kEpi>(sm, tid, &tm_x, &tm_w, &tm_out);

  // Static schedule: cluster i runs tiles i, i + clusters, i + 2 clusters, ...
  const long long first = blockIdx.x / kCluster;
  const long long stride = gridDim.x / kCluster;
  if (wg == 0) {
    producer_warpgroup<C, kCluster>(&tm_x, &tm_w, sm, p, tid, rank, first, stride);
  } else {
    consumer_warpgroup<kSlots, C, kCluster, kEpi, kInflight>(&tm_out, sm, p, tid, wg, lane, rank, first, stride);
  }
  // No CTA may exit while its peer can still arrive on its barriers or
  // multicast into its shared memory.
  if constexpr (kCluster > 1) sm90::cluster_sync();
#endif  // sm_90a
}

// ------------------------------------------------------------------ host side

// Max co-resident clusters of a kernel configuration, cached per device
// (a function of the kernel and the device only). 0 = cannot launch.
template <int kSlots, int kCluster, int kConsumers, int kEpi, int kInflight>
cudaError_t max_active_clusters(int device, int* out) {
  using C = Cfg<kSlots, kCluster, kConsumers, kEpi, kInflight>;
  static std::mutex mu;
  static int cached[64];
  static bool known[64] = {};
  if (device >= 0 && device < 64) {
    std::lock_guard<std::mutex> lock(mu);
    if (known[device]) {
      *out = cached[device];
      return cudaSuccess;
    }
  }
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = kCluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.gridDim = dim3(kCluster, 1, 1);
  cfg.blockDim = dim3(C::kThreads, 1, 1);
  cfg.dynamicSmemBytes = C::kSmem;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int n = 0;
  TWELL_CUDA_TRY(
      cudaOccupancyMaxActiveClusters(&n, gate_pack_sm90_kernel<kSlots, kCluster, kConsumers, kEpi, kInflight>, &cfg));
  if (device >= 0 && device < 64) {
    std::lock_guard<std::mutex> lock(mu);
    cached[device] = n;
    known[device] = true;
  }
  *out = n;
  return cudaSuccess;
}

template <int kSlots, int kCluster, int kConsumers, int kEpi, int kInflight>
cudaError_t launch(const GatePackArgs& a, int num_sms, int device, cudaStream_t stream, int* grid_ctas, int group_n) {
  using C = Cfg<kSlots, kCluster, kConsumers, kEpi, kInflight>;
  auto kernel = gate_pack_sm90_kernel<kSlots, kCluster, kConsumers, kEpi, kInflight>;
  TWELL_CUDA_TRY(set_max_dynamic_smem(kernel, C::kSmem));  // once per device (common/launch_cache.h)

  int grid_clusters = num_sms / kCluster;
  if constexpr (kCluster > 1) {
    int max_clusters = 0;
    TWELL_CUDA_TRY((max_active_clusters<kSlots, kCluster, kConsumers, kEpi, kInflight>(device, &max_clusters)));
    if (max_clusters <= 0) {
      return launch<kSlots, 1, kConsumers, kEpi, kInflight>(a, num_sms, device, stream, grid_ctas, group_n);
    }
    grid_clusters = std::min(grid_clusters, max_clusters);
  }

  PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorSymbolNotFound;

  const int64_t tiles = tiles_for(a.H);
  CUtensorMap tm_x, tm_w, tm_out;
  TWELL_CUDA_TRY(encode_2d(encode, &tm_x, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, a.x.ptr, a.D, a.M, a.x.ld * 2, kBK, C::kBM,
                           CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B));
  TWELL_CUDA_TRY(encode_2d(encode, &tm_w, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, a.w.ptr, a.D, a.H, a.w.ld * 2, kBK,
                           kBN / kCluster, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B));
  if constexpr (kEpi == kEpiTmaStore) {
    TWELL_CUDA_TRY(encode_2d(encode, &tm_out, CU_TENSOR_MAP_DATA_TYPE_UINT32, a.packed,
                             static_cast<uint64_t>(tiles * kSlots), a.M, static_cast<uint64_t>(tiles * kSlots * 4),
                             kSlots, 64, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_NONE));
  } else {
    std::memset(&tm_out, 0, sizeof tm_out);  // unused
  }

  Params p;
  p.M = static_cast<int>(a.M);
  p.group_n = std::max(1, std::min(group_n, static_cast<int>(tiles)));
  p.nk = static_cast<int>((a.D + kBK - 1) / kBK);
  p.mt = static_cast<int>((a.M + C::kBM * kCluster - 1) / (C::kBM * kCluster));
  p.nt = static_cast<int>(tiles);
  p.total = static_cast<long long>(p.mt) * p.nt;
  p.row_words = tiles * kSlots;
  p.packed = a.packed;
  p.row_flags = a.row_flags;
  p.stats = a.stats;

  const long long clusters = std::min<long long>(std::max(grid_clusters, 1), p.total);
  if (grid_ctas) *grid_ctas = static_cast<int>(clusters * kCluster);

  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  cfg.gridDim = dim3(static_cast<unsigned>(clusters * kCluster), 1, 1);
  cfg.blockDim = dim3(C::kThreads, 1, 1);
  cfg.dynamicSmemBytes = C::kSmem;
  cfg.stream = stream;
  if constexpr (kCluster > 1) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = kCluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&cfg, kernel, tm_x, tm_w, tm_out, p);
}

template <int kCluster, int kConsumers, int kEpi, int kInflight>
cudaError_t dispatch_slots(const GatePackArgs& a, int num_sms, int device, cudaStream_t stream, int* grid_ctas,
                           int group_n) {
  switch (a.slots) {
    case 32: return launch<32, kCluster, kConsumers, kEpi, kInflight>(a, num_sms, device, stream, grid_ctas, group_n);
    case 64:
      if constexpr (kEpi == kEpiNone) {
        return cudaErrorInvalidValue;
      } else {
        return launch<64, kCluster, kConsumers, kEpi, kInflight>(a, num_sms, device, stream, grid_ctas, group_n);
      }
    case 128:
      if constexpr (kEpi == kEpiNone) {
        return cudaErrorInvalidValue;
      } else {
        return launch<128, kCluster, kConsumers, kEpi, kInflight>(a, num_sms, device, stream, grid_ctas, group_n);
      }
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace sm90_gate
}  // namespace twell
