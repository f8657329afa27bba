#include "common/errors.h"
#include "gate_gemm/gate_decode.h"
#include "gate_gemm/gate_dispatch.h"
#include "gate_gemm/gate_portable.h"

namespace twell {

twell_status gate_pack_dispatch(const GatePackArgs& a, const GateRoute& r, cudaStream_t stream) {
  // Decode-sized calls: split-K over thread-block clusters streams W_g with
  // every SM (the persistent wgmma kernel has only one CTA per column tile).
  if (r.use_sm90 && r.allow_decode && a.M <= kGateDecodeMaxRows && gate_pack_decode_preferred(a, r.sm_count)) {
    TWELL_CUDA_STEP(r.pdl ? gate_pack_decode_pdl(a, r.sm_count, stream) : gate_pack_decode(a, r.sm_count, stream),
                    "gate GEMM (decode)");
    return TWELL_SUCCESS;
  }
  if (r.use_sm90 && gate_pack_sm90_can_run(a)) {
    TWELL_CUDA_STEP(gate_pack_sm90(a, r.sm_count, stream), "gate GEMM (sm_90a)");
    return TWELL_SUCCESS;
  }
  return gate_pack_portable(a, r.portable_chunk, r.lt_workspace, r.lt_bytes, stream);
}

}  // namespace twell
