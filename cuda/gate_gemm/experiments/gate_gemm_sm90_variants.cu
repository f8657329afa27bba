// The sm_90a gate GEMM's experiment variants (GatePackSm90Variant): cluster
// pairs with TMA multicast, the other epilogues, no wgmma group in flight,
// other schedule bands. Built into test_gate_gemm_sm90 only (CMakeLists.txt),
// never into libtwell, which builds the dispatcher's variant alone
// (gate_gemm_sm90.cu).

#include "gate_gemm/sm90_gate_gemm_internal.cuh"
#include "gate_gemm/sm90_gate_kernel.cuh"

namespace twell {
namespace {

using namespace sm90_gate;

template <int kConsumers, int kEpi, int kInflight>
cudaError_t dispatch_cluster(const GatePackArgs& a, int cluster, int num_sms, int device, cudaStream_t stream,
                             int* grid_ctas, int group_n) {
  switch (cluster) {
    case 1: return dispatch_slots<1, kConsumers, kEpi, kInflight>(a, num_sms, device, stream, grid_ctas, group_n);
    case 2: return dispatch_slots<2, kConsumers, kEpi, kInflight>(a, num_sms, device, stream, grid_ctas, group_n);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

GatePackSm90Variant gate_pack_sm90_default_variant() {
  GatePackSm90Variant v;
  v.cluster = kDefaultCluster;
  v.consumers = kDefaultConsumers;
  v.epilogue = kDefaultEpilogue;
  v.inflight = kDefaultInflight;
  v.group_n = kDefaultGroupN;
  return v;
}

cudaError_t gate_pack_sm90_variant(const GatePackArgs& args, int num_sms, cudaStream_t stream,
                                   const GatePackSm90Variant& v, int* grid_ctas) {
  int device = 0;
  TWELL_CUDA_TRY(prepare_launch(args, &num_sms, &device));
  if (args.M == 0) {
    if (grid_ctas) *grid_ctas = 0;
    return cudaSuccess;
  }
  if (v.consumers != 2 || v.group_n < 1) return cudaErrorInvalidValue;
  const int g = v.group_n;
  if (v.epilogue == kEpiTmaStore && v.inflight == 1)
    return dispatch_cluster<2, kEpiTmaStore, 1>(args, v.cluster, num_sms, device, stream, grid_ctas, g);
  if (v.epilogue == kEpiDirect && v.inflight == 1)
    return dispatch_cluster<2, kEpiDirect, 1>(args, v.cluster, num_sms, device, stream, grid_ctas, g);
  if (v.epilogue == kEpiDirect && v.inflight == 0)
    return dispatch_cluster<2, kEpiDirect, 0>(args, v.cluster, num_sms, device, stream, grid_ctas, g);
  if (v.epilogue == kEpiStaged && v.inflight == 1)
    return dispatch_cluster<2, kEpiStaged, 1>(args, v.cluster, num_sms, device, stream, grid_ctas, g);
  if (v.epilogue == kEpiStaged && v.inflight == 0)
    return dispatch_cluster<2, kEpiStaged, 0>(args, v.cluster, num_sms, device, stream, grid_ctas, g);
  if (v.epilogue == kEpiNone && v.inflight == 1)
    return dispatch_cluster<2, kEpiNone, 1>(args, v.cluster, num_sms, device, stream, grid_ctas, g);
  if (v.epilogue == kEpiNone && v.inflight == 0)
    return dispatch_cluster<2, kEpiNone, 0>(args, v.cluster, num_sms, device, stream, grid_ctas, g);
  return cudaErrorInvalidValue;
}

}  // namespace twell
