// Decode-sized gate GEMM + TwELL pack (M <= kGateDecodeMaxRows tokens).
//
// Same contract as gate_gemm.h (true counts in word 0, ascending entries,
// value = __float2bfloat16_rn(acc) for fp32 acc > 0, at most slots-1 entries,
// zeros after, row_flags[m] = 1 on overflow, stats atomics aggregated per CTA).
//
// At small M the gate GEMM is a stream over W_g. The 256-column tiles are far
// fewer than the SMs (22 at H = 5632), so each tile is handled by a thread-
// block cluster (sm_90) of k CTAs that split D: every CTA streams its K-slice
// of the tile's 256 W_g rows with 16-byte loads and computes the partial dot
// products for all tokens with mma.sync (bf16 in, fp32 accumulate); the
// partials meet through distributed shared memory and are summed in a fixed
// rank order (deterministic), each CTA reducing and packing a subset of the
// tokens. k (<= 8, the portable cluster size) minimises waves x K-blocks per
// CTA, where a wave is as many clusters as cudaOccupancyMaxActiveClusters says
// fit at once (GPCs do not divide evenly by every k).
//
// Tried and measured (H100, 2026-11-23, same-run A/B of the whole FFN):
//  * the K-slice streamed into shared memory through a cp.async ring (about
//    200 KB in flight per SM): 16.5 vs 17.1 us alone at M = 1, but 1-2.5 us
//    slower end to end at M = 4..16, because 200 KB of shared memory per CTA
//    keeps the CTAs that PDL places early (consumer, fallback, the next
//    call's gate) off 110 SMs;
//  * an L2 bulk prefetch of the slice before the PDL wait: 4 us slower (the
//    bulk prefetches of a CTA queue behind each other);
//  * prefetching the active neurons' W_u/W_d rows into L2 while packing, with
//    the consumer's statistics moved to an extra cluster: within noise (+-1 us).
//
// Requirements (gate_pack_decode_can_run): 1 <= M <= kGateDecodeMaxRows, D and H
// multiples of 8 (> 0), x.ld and w.ld multiples of 8, x and w 16-byte aligned,
// slots in {32, 64, 128}, a device of compute capability >= 9.0 and a build
// that carries sm_90 (or newer) code for the kernel. Elsewhere can_run is
// false and callers use the other gate paths.
#pragma once

#include "gate_gemm/gate_gemm.h"

namespace twell {

constexpr int64_t kGateDecodeMaxRows = 64;

// Cheap host-side check (one cached cudaFuncGetAttributes per device).
bool gate_pack_decode_can_run(const GatePackArgs& args);
// Whether the decode kernel is the faster gate path for these arguments on a
// device with sm_count SMs (measured on an H100 against the sm_90a persistent
// wgmma kernel): M <= 16 always; 16 < M <= 32 when the column tiles are at most
// a quarter of the SMs (H <= ~8K on an H100); 32 < M <= 64 when also D >= 2048
// (D=2048, H=5632, M=64: 24.6 us vs 26.1 us; D=896, H=4864: 18.5 vs 16.6;
// D=4096, H=14336 has too many tiles: 63 vs 52 us).
bool gate_pack_decode_preferred(const GatePackArgs& args, int sm_count);
// Launches on `stream` (any 1 <= M <= kGateDecodeMaxRows that can_run accepts;
// sm_count is unused: the split of D comes from an occupancy query).
// M == 0 is a no-op.
cudaError_t gate_pack_decode(const GatePackArgs& args, int sm_count, cudaStream_t stream);
// The same, launched as a programmatic dependent of the previous kernel in the
// stream (cuda/common/pdl.cuh): the launch overlaps that kernel's tail, and the
// next kernel, if launched the same way, is placed while this one runs.
cudaError_t gate_pack_decode_pdl(const GatePackArgs& args, int sm_count, cudaStream_t stream);
// Testing/tuning only: the same with a given main-loop variant (-1 = default;
// 0 = plain groups of 4 K-blocks, 1 = double-buffered groups of 2,
// 2 = double-buffered groups of 4 for M <= 16). Results are identical.
cudaError_t gate_pack_decode_variant(const GatePackArgs& args, int sm_count, cudaStream_t stream, int variant);

}  // namespace twell
