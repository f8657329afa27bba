// Private to cuda/sparse_ffn and its test/benchmark: run one named variant
// of the sparse consumer instead of the one sparse_ffn() picks from M and the
// SM count. Used to test every variant on any shape and to time them against
// each other (the launcher's choice is tuned from those timings).
#pragma once

#include "sparse_ffn/sparse_ffn.h"

namespace twell {
namespace sparse_ffn_detail {

// Tokens per CTA the current D bucket supports, largest first (at most 3),
// written to `out`; returns how many. D <= 1024 and <= 2048: {8, 4, 1};
// <= 4096: {4, 2, 1}; <= 8192: {2, 1}; <= 16384: {1}. 0 if D is unsupported.
int tokens_per_cta_options(int64_t D, int* out);

// The row consumer (sparse_ffn_rows.cu): one warp per token, no shared
// memory, for D <= kRowsMaxD. Selected by tokens_per_cta == kRowsKernel, with
// `up_mma` naming its sub-variant (0 .. kRowsVariants-1), with the warps per
// SM its registers are sized for: 0 = one pair at a time, W_u's and W_d's
// rows loaded together, 12 warps; 1 = one pair at a time, W_d's row after the
// dot product, 16 warps; 2 = two pairs at a time, W_d's rows after the dot
// products, 8 warps; 3 = as 1 with 12 warps.
constexpr int kRowsKernel = -1;
constexpr int kRowsVariants = 4;
constexpr int64_t kRowsMaxD = 2048;
bool rows_supported(int64_t D);
// skip_blocks: see row_pairs.cuh (nullptr: every row; the library always
// passes nullptr, the block-consumer experiment its per-block choices).
cudaError_t sparse_ffn_rows(const SparseFfnArgs& args, int variant, const uint8_t* skip_blocks, cudaStream_t stream);

// The launcher's choice for these arguments (what sparse_ffn() runs).
void default_config(const SparseFfnArgs& args, int sm_count, int* tokens_per_cta, int* cluster, int* up_mma);

// Runs the variant with `tokens_per_cta` tokens per CTA (one of the options
// above, or kRowsKernel) and, when tokens_per_cta == 1, `cluster` CTAs per token (1, 2, 4 or
// 8; a thread-block cluster on sm_90, silently 1 where clusters cannot run).
// up_mma (gated only): 1 = the up-projection dot products on tensor cores
// (mma.sync, bf16 products accumulated in fp32), 0 = on FFMA.
cudaError_t sparse_ffn_config(const SparseFfnArgs& args, int tokens_per_cta, int cluster, int up_mma,
                              cudaStream_t stream);

// The cluster size actually usable for a TB=1 launch on the current device
// (1 where the device or the loaded binary has no cluster support).
int usable_cluster(const SparseFfnArgs& args, int requested);

}  // namespace sparse_ffn_detail
}  // namespace twell
