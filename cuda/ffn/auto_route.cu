#include "ffn/auto_route.h"

namespace twell {
namespace {

__global__ void auto_decide_kernel(cudaGraphConditionalHandle condition, AutoState* state, double threshold,
                                   int64_t H) {
  const int path = auto_path(state->have ? state->last : nullptr, static_cast<int64_t>(state->calls), threshold, H);
  state->calls += 1;
  cudaGraphSetConditional(condition, path == TWELL_PATH_DENSE ? 1u : 0u);
}

__global__ void auto_record_kernel(const u64* stats, AutoState* state) {
  for (int i = 0; i < TWELL_STATS_WORDS; ++i) state->last[i] = stats[i];
  state->have = 1;
}

}  // namespace

cudaError_t auto_decide(cudaGraphConditionalHandle condition, AutoState* state, double threshold, int64_t H,
                        cudaStream_t stream) {
  auto_decide_kernel<<<1, 1, 0, stream>>>(condition, state, threshold, H);
  return cudaGetLastError();
}

cudaError_t auto_record(const u64* stats, AutoState* state, cudaStream_t stream) {
  auto_record_kernel<<<1, 1, 0, stream>>>(stats, state);
  return cudaGetLastError();
}

}  // namespace twell
