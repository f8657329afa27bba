// One place that chooses the gate GEMM + TwELL kernel for a call: the decode
// kernel (small M, sm_90), the persistent sm_90a kernel, or the portable
// cuBLASLt + packer path where neither can run. Inference and training both
// call it, so a new gate kernel is routed in one place.
#pragma once

#include "gate_gemm/gate_gemm.h"

namespace twell {

struct GateRoute {
  bool use_sm90 = false;      // the plan may use the Hopper kernels
  bool allow_decode = true;   // may use the small-M decode kernel
  bool pdl = false;           // launch the decode kernel as a programmatic dependent (cuda/common/pdl.cuh)
  int sm_count = 1;
  void* portable_chunk = nullptr;  // gate_portable_workspace_bytes(M, H) bytes
  void* lt_workspace = nullptr;    // cuBLASLt workspace
  size_t lt_bytes = 0;
};

twell_status gate_pack_dispatch(const GatePackArgs& args, const GateRoute& route, cudaStream_t stream);

}  // namespace twell
