// Experiment (built into test_sparse_ffn only, never into libtwell): the
// block consumer, blocks of 32 tokens as two tensor-core products over the
// union of their active neurons, with the row consumer taking the blocks it
// declines. Measured slower than the row consumer alone on every pattern
// tried (H200, 2026-12-03, consumer GPU time): trained-like activity at
// M = 16384 232 us vs 170 us, zipf 179 vs 92 us; on uniform activity its
// early exit costs 8.7 us. See sparse_ffn_block.cu and docs/architecture.md.
#pragma once

#include "sparse_ffn/sparse_ffn.h"

namespace twell {
namespace sparse_ffn_experiments {

constexpr int64_t kBlockMaxH = 32768;
bool block_supported(const SparseFfnArgs& args);
// Writes done[b] (b < ceil(M / 32)) = 1 for the blocks it wrote, 0 for the others.
cudaError_t sparse_ffn_block(const SparseFfnArgs& args, uint8_t* done, cudaStream_t stream);
// The block consumer, then the row consumer (sub-variant rows_variant) on the declined blocks.
cudaError_t sparse_ffn_block_then_rows(const SparseFfnArgs& args, int rows_variant, uint8_t* done, cudaStream_t stream);

}  // namespace sparse_ffn_experiments
}  // namespace twell
