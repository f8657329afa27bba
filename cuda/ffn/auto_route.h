// TWELL_PATH_AUTO: one rule, applied on the host (eager calls) and on the
// device (calls captured in a CUDA graph).
//
// The rule: sparse unless the statistics of a recent call say the dense path
// pays (active gate entries above `threshold` of M*H, or rows over TwELL
// capacity above 4*threshold of M); a plan on the dense path re-probes the
// sparse one every 16th call (the dense path's statistics lack the
// overflow-row count). No statistics yet: sparse.
//
// Eager calls read the statistics back asynchronously (pinned memory and an
// event, never a wait). A captured call cannot take a host decision: the
// decision would be frozen into the graph. There the plan keeps its history
// in device memory (AutoState), a one-thread kernel applies the rule at the
// start of every replay and sets the condition of an IF/ELSE graph node whose
// two bodies are the dense and the sparse path, and a second one-thread
// kernel after the node records the replay's statistics for the next one.
// Decode-sized captured calls use none of it (cuda/ffn/pipeline.cu,
// ffn_run_auto_captured_decode): the decode consumer decides from the replay
// itself and sets the condition of an IF node on the dense path.
#pragma once

#include "common/twell_internal.h"

namespace twell {

constexpr int64_t kAutoReprobeEvery = 16;

// TWELL_PATH_SPARSE or TWELL_PATH_DENSE for the next call; `stats` are the
// words of a recent call (nullptr: none yet), `calls` the calls made so far.
__host__ __device__ inline int auto_path(const u64* stats, int64_t calls, double threshold, int64_t H) {
  if (stats == nullptr) return TWELL_PATH_SPARSE;
  const double rows = stats[TWELL_STAT_ROWS] > 0 ? static_cast<double>(stats[TWELL_STAT_ROWS]) : 1.0;
  const double density = static_cast<double>(stats[TWELL_STAT_ACTIVE]) / (rows * static_cast<double>(H));
  // The dense path's statistics count tiles over capacity, not rows.
  const double over =
      static_cast<double>(stats[TWELL_STAT_PATH] == TWELL_PATH_DENSE ? stats[TWELL_STAT_OVERFLOW_TILES]
                                                                     : stats[TWELL_STAT_OVERFLOW_ROWS]) /
      rows;
  const bool dense = density > threshold || over > 4 * threshold;
  if (dense && calls % kAutoReprobeEvery == kAutoReprobeEvery - 1) return TWELL_PATH_SPARSE;
  return dense ? TWELL_PATH_DENSE : TWELL_PATH_SPARSE;
}

// Device-side history of a plan's captured AUTO calls.
struct AutoState {
  u64 last[TWELL_STATS_WORDS];  // statistics of the latest replay
  u64 calls;                    // replays so far
  u64 have;                     // 1 once `last` holds a replay's statistics
};

// Sets `condition` to 1 (dense) or 0 (sparse) from `state` and counts the call.
cudaError_t auto_decide(cudaGraphConditionalHandle condition, AutoState* state, double threshold, int64_t H,
                        cudaStream_t stream);
// state->last = stats; state->have = 1.
cudaError_t auto_record(const u64* stats, AutoState* state, cudaStream_t stream);

}  // namespace twell
