#include "common/graph_cond.h"

namespace twell {

twell_status capture_graph(cudaStream_t stream, cudaGraph_t* graph) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  *graph = nullptr;
  TWELL_CUDA_STEP(cudaStreamGetCaptureInfo(stream, &status, nullptr, graph), "reading the stream's capture");
  if (status != cudaStreamCaptureStatusActive) *graph = nullptr;
  return TWELL_SUCCESS;
}

twell_status make_conditions(cudaGraph_t graph, int n, cudaGraphConditionalHandle* out) {
  for (int i = 0; i < n; ++i) {
    TWELL_CUDA_STEP(cudaGraphConditionalHandleCreate(&out[i], graph, 0, cudaGraphCondAssignDefault),
                    "creating a condition of the captured graph");
  }
  return TWELL_SUCCESS;
}

twell_status add_if_node(cudaStream_t stream, cudaGraphConditionalHandle cond, int nbodies, cudaGraph_t bodies[2],
                         const char* what) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaGraph_t graph = nullptr;
  const cudaGraphNode_t* deps = nullptr;
  const cudaGraphEdgeData* edges = nullptr;
  size_t ndeps = 0;
  TWELL_CUDA_STEP(cudaStreamGetCaptureInfo(stream, &status, nullptr, &graph, &deps, &edges, &ndeps),
                  "reading the capture dependencies");
  if (status != cudaStreamCaptureStatusActive)
    return fail(TWELL_ERROR_INTERNAL, "%s: the stream is not capturing", what);
  cudaGraphNodeParams params = {cudaGraphNodeTypeConditional};
  params.conditional.handle = cond;
  params.conditional.type = cudaGraphCondTypeIf;
  params.conditional.size = static_cast<unsigned>(nbodies);
  cudaGraphNode_t node;
  cudaError_t err = cudaGraphAddNode(&node, graph, deps, edges, ndeps, &params);
  if (err != cudaSuccess) return fail_cuda(err, what);
  err = cudaStreamUpdateCaptureDependencies(stream, &node, nullptr, 1, cudaStreamSetCaptureDependencies);
  if (err != cudaSuccess) return fail_cuda(err, what);
  for (int b = 0; b < nbodies; ++b) bodies[b] = params.conditional.phGraph_out[b];
  return TWELL_SUCCESS;
}

twell_status begin_body_capture(cudaStream_t side, cudaGraph_t body, const char* what) {
  const cudaError_t err = cudaStreamBeginCaptureToGraph(side, body, nullptr, nullptr, 0, cudaStreamCaptureModeRelaxed);
  return err == cudaSuccess ? TWELL_SUCCESS : fail_cuda(err, what);
}

twell_status end_body_capture(cudaStream_t side, cudaGraph_t body, twell_status body_status, const char* what) {
  const cudaError_t err = cudaStreamEndCapture(side, &body);
  if (body_status != TWELL_SUCCESS) return body_status;
  return err == cudaSuccess ? TWELL_SUCCESS : fail_cuda(err, what);
}

}  // namespace twell
