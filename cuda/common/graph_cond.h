// Conditional nodes (IF, IF/ELSE) in a CUDA graph being captured: how a
// captured call takes a decision that an eager call takes on the host. A
// one-thread kernel sets each node's condition from device state at every
// replay (cudaGraphSetConditional); the nodes' bodies are captured through a
// second stream, which nothing else uses, into the graph's body graphs.
#pragma once

#include <cuda_runtime.h>

#include "common/errors.h"

namespace twell {

// Whether `stream` is capturing, and its graph if so.
twell_status capture_graph(cudaStream_t stream, cudaGraph_t* graph);

// n condition handles of `graph`, each reset to 0 at the start of every launch.
twell_status make_conditions(cudaGraph_t graph, int n, cudaGraphConditionalHandle* out);

// Appends an IF node on `cond` (nbodies = 1) or an IF/ELSE node (nbodies = 2:
// body 0 runs when the condition is non-zero, body 1 otherwise) after the
// capture's current dependencies, continues the capture after it, and gives
// its body graphs.
twell_status add_if_node(cudaStream_t stream, cudaGraphConditionalHandle cond, int nbodies, cudaGraph_t bodies[2],
                         const char* what);

twell_status begin_body_capture(cudaStream_t side, cudaGraph_t body, const char* what);
// Ends the body's capture whatever `body_status` is; returns the first failure.
twell_status end_body_capture(cudaStream_t side, cudaGraph_t body, twell_status body_status, const char* what);

// add_if_node, then body(b, side) captured into body b for each body.
template <class Body>
twell_status capture_if(cudaStream_t stream, cudaStream_t side, cudaGraphConditionalHandle cond, int nbodies,
                        const char* what, Body&& body) {
  cudaGraph_t bodies[2] = {};
  TWELL_TRY(add_if_node(stream, cond, nbodies, bodies, what));
  for (int b = 0; b < nbodies; ++b) {
    TWELL_TRY(begin_body_capture(side, bodies[b], what));
    TWELL_TRY(end_body_capture(side, bodies[b], body(b, side), what));
  }
  return TWELL_SUCCESS;
}

}  // namespace twell
