// The token-row view of a TwELL matrix shared by the row consumer
// (sparse_ffn_rows.cu) and the block consumer (sparse_ffn_block.cu): the
// consumers' parameters and the warp-wide walk over one row's stored pairs.
#pragma once

#include "common/matref.h"
#include "common/pack_entry.cuh"
#include "common/twell_internal.h"
#include "sparse_ffn/sparse_ffn.h"

namespace twell {
namespace rows_detail {

constexpr unsigned kFull = 0xFFFFFFFFu;

struct RowParams {
  const uint32_t* packed;
  int64_t row_words;
  int slots;
  int tiles;
  int64_t M, H;
  int nch;  // 16-byte chunks in a row of D
  MatRef<const bf16> x;
  MatRef<const bf16> wu;
  MatRef<const bf16> wd;
  MatRef<bf16> y;
  const uint8_t* flags;
  u64* stats;
  // Blocks of kBlockTokens tokens the block consumer has written (nonzero): skipped.
  const uint8_t* skip_blocks;
};

// The consumers' parameters for a call (the caller has checked the arguments).
inline RowParams row_params(const SparseFfnArgs& a, const uint8_t* skip_blocks) {
  const int64_t tiles = tiles_for(a.H);
  return RowParams{.packed = a.packed,
                   .row_words = tiles * a.slots,
                   .slots = a.slots,
                   .tiles = static_cast<int>(tiles),
                   .M = a.M,
                   .H = a.H,
                   .nch = static_cast<int>(a.D >> 3),
                   .x = a.x,
                   .wu = a.w_up,
                   .wd = a.w_down,
                   .y = a.y,
                   .flags = a.row_flags,
                   .stats = a.stats,
                   .skip_blocks = skip_blocks};
}

// Tokens per block of the block consumer (and per entry of skip_blocks).
constexpr int kBlockTokens = 32;

// The warp-wide pair list of one batch: lane l holds pair q0 + l (its neuron
// and gate value) and `valid` has a bit for every usable pair.
struct PairBatch {
  uint32_t j;
  float g;
  unsigned valid;
};

// Steps 1-2 for pairs q0 .. q0+31 of the tile group starting at w0; incl is
// lane t's inclusive scan of the clamped counts of tile w0 + t.
__device__ __forceinline__ PairBatch read_pairs(const RowParams& p, const uint32_t* prow, int w0, int incl, int total,
                                                int q0, int lane) {
  const int q = q0 + lane;
  // pos = the number of tiles whose pairs all lie before q (incl is nondecreasing).
  int pos = 0;
#pragma unroll
  for (int step = 16; step > 0; step >>= 1) {
    const int v = __shfl_sync(kFull, incl, pos + step - 1);
    if (v <= q) pos += step;
  }
  const int first = __shfl_sync(kFull, incl, pos > 0 ? pos - 1 : 0);
  const int excl = pos > 0 ? first : 0;
  PairBatch b{0u, 0.f, 0u};
  bool ok = false;
  if (q < total) {
    const int tile = w0 + pos;
    const uint32_t word = __ldcs(prow + static_cast<int64_t>(tile) * p.slots + 1 + (q - excl));
    const uint32_t col = static_cast<uint32_t>(entry_col(word));
    b.j = static_cast<uint32_t>(tile) * kTileCols + col;
    b.g = entry_value(word);
    ok = col < static_cast<uint32_t>(kTileCols) && b.j < static_cast<uint32_t>(p.H);
  }
  b.valid = __ballot_sync(kFull, ok);
  return b;
}

}  // namespace rows_detail
}  // namespace twell
