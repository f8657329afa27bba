// Decode-sized sparse consumer (1 <= M <= kSparseDecodeMaxRows tokens), the
// last sparse step of the small-M inference pipeline (cuda/ffn/pipeline.cu).
//
// Same output contract as sparse_ffn.h for y: for every row m whose tiles all
// fit (true count <= slots-1), y[m] = bf16(sum over the stored entries, in
// ascending column order, of h_j * W_d[j]) with h_j = g_j * (x[m] . W_u[j])
// (gated) or h_j = g_j (non-gated), fp32 throughout; rows with an overflowed
// tile are not written (the exact fallback writes them). On top of that it
// replaces stats_init and the overflow compaction of the large-M pipeline:
// every TWELL_STATS_WORDS word of `stats` is written with plain stores (rows,
// active, overflow rows and tiles, max tile and row counts, path = SPARSE,
// format), and overflow_rows[0, k) = the ascending overflowed rows, k =
// stats[TWELL_STAT_OVERFLOW_ROWS]; all derived from the packed count words,
// so the gate kernel needs no zeroed statistics or row flags.
//
// Work split (why it is fast at small M): a token's work goes to a thread-
// block cluster of C CTAs (C up to 8, as many as the SMs allow for M tokens),
// where the existing consumer would give one CTA (or a cluster that splits
// only the pairs). Each CTA stages the token's whole packed row and x in
// shared memory (one round trip), decodes the entries, and computes
// u = x . W_u[j] for a 1/C share of the pairs, one warp per pair (every
// 16-byte load of the row in flight at once); each h is stored straight into
// every CTA's shared memory (distributed shared memory), so one cluster
// barrier publishes them all; then each CTA owns a 1/C slice of y's columns
// and sums h_j * W_d[j, slice] over all pairs (the first W_d loads of the
// slice are issued before the up phase, the rest were prefetched into L2
// during it). Deterministic: every sum has a fixed order (split partial sums
// added in a fixed tree, warp butterflies, pair order, a fixed-order
// reduction over thread groups). Measured on an H100 (ncu, caches flushed,
// D=2048, H=5632, M=1): 9.7 us, against 14.3 us for sparse_ffn() at M=1.
//
// Captured AUTO calls (dense_pairs > 0): every CTA first sums the stored
// pairs of the whole call from the count words (M * tiles words, the same sum
// in every CTA) and, above dense_pairs, the call goes dense: nothing is
// computed here, and CTA 0 sets the condition of the IF node that follows
// (body: the dense path), so this replay's own gate output decides.
//
// Requirements (sparse_ffn_decode_can_run): 1 <= M <= kSparseDecodeMaxRows;
// D, H multiples of 8, D <= 16384; slots in {32, 64, 128} with
// tiles_for(H) * slots <= kSparseDecodeMaxRowWords; row strides multiples of 8
// elements and 16-byte aligned bases; a device of compute capability >= 9.0
// running sm_90 code.
#pragma once

#include "common/matref.h"
#include "common/twell_internal.h"

namespace twell {

constexpr int64_t kSparseDecodeMaxRows = 64;
constexpr int64_t kSparseDecodeMaxRowWords = 4096;  // packed words per row held in shared memory

struct SparseFfnDecodeArgs {
  const uint32_t* packed = nullptr;  // [M, tiles_for(H) * slots]
  int slots = 32;
  int64_t M = 0, D = 0, H = 0;
  MatRef<const bf16> x;       // [M, D] (gated only; x.ptr = nullptr for non-gated)
  MatRef<const bf16> w_up;    // [H, D] (gated only)
  MatRef<const bf16> w_down;  // [H, D]
  MatRef<bf16> y;             // [M, D]
  u64* stats = nullptr;            // [TWELL_STATS_WORDS], every word written
  int32_t* overflow_rows = nullptr;  // [M]
  bool pdl = false;  // launched as a programmatic dependent of the previous kernel (cuda/common/pdl.cuh)
  // 0, or the device-side decision of a captured AUTO call: when the call's stored pairs (all rows,
  // clamped tile counts) exceed dense_pairs, no row is computed or listed here and
  // dense_condition (a condition of the graph being replayed, reset to 0 at every launch) is set
  // to 1 for the IF node whose body is the dense path; else it is set to 0.
  int64_t dense_pairs = 0;
  cudaGraphConditionalHandle dense_condition = 0;
};

// Cheap host check (one cached attribute query per device).
bool sparse_ffn_decode_can_run(const SparseFfnDecodeArgs& args);
// Launches on `stream`; sm_count sizes the clusters (M * C <= sm_count).
cudaError_t sparse_ffn_decode(const SparseFfnDecodeArgs& args, int sm_count, cudaStream_t stream);
// Testing only: the same with a given cluster size (1, 2, 4 or 8).
cudaError_t sparse_ffn_decode_cluster(const SparseFfnDecodeArgs& args, int cluster, cudaStream_t stream);

}  // namespace twell
