// The library's sm_90a gate GEMM (TMA + wgmma, persistent; the kernel and its
// variants are described in sm90_gate_kernel.cuh): the variant the dispatcher
// uses only. The other variants are experiments, built into the test program
// by experiments/gate_gemm_sm90_variants.cu and never shipped.

#include "gate_gemm/gate_gemm.h"
#include "gate_gemm/sm90_gate_kernel.cuh"

namespace twell {
namespace sm90_gate {
namespace {

// The tensor maps of the last few launches of this thread, so a steady state
// of calls on the same tensors (weights always; x and the packed output when
// the caller's allocator hands out the same buffers) skips the encoding.
struct MapKey {
  const void* ptr;
  uint64_t inner, outer, stride;
  uint32_t box_inner, box_outer;
  int dtype, swizzle, promo;
  bool operator==(const MapKey& o) const {
    return ptr == o.ptr && inner == o.inner && outer == o.outer && stride == o.stride && box_inner == o.box_inner &&
           box_outer == o.box_outer && dtype == o.dtype && swizzle == o.swizzle && promo == o.promo;
  }
};
constexpr int kMapCache = 16;
struct MapCache {
  MapKey key[kMapCache] = {};
  CUtensorMap map[kMapCache];
  bool valid[kMapCache] = {};
  int next = 0;
};

cudaError_t encode_2d_uncached(PFN_cuTensorMapEncodeTiled_v12000 encode, CUtensorMap* map, CUtensorMapDataType dtype,
                               const void* ptr, uint64_t inner, uint64_t outer, uint64_t stride_bytes,
                               uint32_t box_inner, uint32_t box_outer, CUtensorMapSwizzle swizzle,
                               CUtensorMapL2promotion promo) {
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {stride_bytes};
  const cuuint32_t box[2] = {box_inner, box_outer};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(map, dtype, 2, const_cast<void*>(ptr), dims, strides, box, elem_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, promo, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static std::once_flag once;
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  std::call_once(once, [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess) {
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
    }
  });
  return fn;
}

cudaError_t encode_2d(PFN_cuTensorMapEncodeTiled_v12000 encode, CUtensorMap* map, CUtensorMapDataType dtype,
                      const void* ptr, uint64_t inner, uint64_t outer, uint64_t stride_bytes, uint32_t box_inner,
                      uint32_t box_outer, CUtensorMapSwizzle swizzle, CUtensorMapL2promotion promo) {
  thread_local MapCache cache;
  const MapKey k{ptr,
                 inner,
                 outer,
                 stride_bytes,
                 box_inner,
                 box_outer,
                 static_cast<int>(dtype),
                 static_cast<int>(swizzle),
                 static_cast<int>(promo)};
  for (int i = 0; i < kMapCache; ++i) {
    if (cache.valid[i] && cache.key[i] == k) {
      *map = cache.map[i];
      return cudaSuccess;
    }
  }
  TWELL_CUDA_TRY(
      encode_2d_uncached(encode, map, dtype, ptr, inner, outer, stride_bytes, box_inner, box_outer, swizzle, promo));
  const int slot = cache.next;
  cache.next = (cache.next + 1) % kMapCache;
  cache.key[slot] = k;
  cache.map[slot] = *map;
  cache.valid[slot] = true;
  return cudaSuccess;
}

cudaError_t prepare_launch(const GatePackArgs& args, int* num_sms, int* device) {
  if (!gate_pack_sm90_compiled()) return cudaErrorNoKernelImageForDevice;
  TWELL_CUDA_TRY(cudaGetDevice(device));
  int major = 0, minor = 0;
  TWELL_CUDA_TRY(device_attribute(&major, cudaDevAttrComputeCapabilityMajor, *device));
  TWELL_CUDA_TRY(device_attribute(&minor, cudaDevAttrComputeCapabilityMinor, *device));
  if (major != 9 || minor != 0) return cudaErrorNoKernelImageForDevice;
  if (!gate_pack_sm90_can_run(args)) return cudaErrorInvalidValue;
  if (args.M > 0 && *num_sms <= 0) {
    TWELL_CUDA_TRY(device_attribute(num_sms, cudaDevAttrMultiProcessorCount, *device));
  }
  return cudaSuccess;
}

}  // namespace sm90_gate

namespace {
bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
}  // namespace

bool gate_pack_sm90_compiled() { return TWELL_HAS_SM90A == 1; }

bool gate_pack_sm90_can_run(const GatePackArgs& a) {
  if (!gate_pack_sm90_compiled()) return false;
  if (a.slots != 32 && a.slots != 64 && a.slots != 128) return false;
  if (a.x.ptr == nullptr || a.w.ptr == nullptr || a.packed == nullptr || a.row_flags == nullptr || a.stats == nullptr)
    return false;
  // TMA: 16-byte aligned bases and row strides, strides below 2^40 bytes,
  // int32 coordinates (rows and columns, plus one cluster tile of slack).
  if (!aligned16(a.x.ptr) || !aligned16(a.w.ptr) || !aligned16(a.packed)) return false;
  if (a.M < 0 || a.M > (int64_t{1} << 31) - 1024) return false;
  if (a.D < 8 || a.D % 8 != 0 || a.D > (int64_t{1} << 30)) return false;
  if (a.H < 8 || a.H % 8 != 0 || a.H > (int64_t{1} << 30)) return false;
  if (a.x.ld < a.D || a.x.ld % 8 != 0 || a.x.ld > (int64_t{1} << 38)) return false;
  if (a.w.ld < a.D || a.w.ld % 8 != 0 || a.w.ld > (int64_t{1} << 38)) return false;
  const int64_t row_words = tiles_for(a.H) * a.slots;
  if (row_words * 4 >= (int64_t{1} << 40)) return false;
  return true;
}

cudaError_t gate_pack_sm90(const GatePackArgs& args, int num_sms, cudaStream_t stream) {
  int device = 0;
  TWELL_CUDA_TRY(sm90_gate::prepare_launch(args, &num_sms, &device));
  if (args.M == 0) return cudaSuccess;
  using namespace sm90_gate;
  return dispatch_slots<kDefaultCluster, kDefaultConsumers, kDefaultEpilogue, kDefaultInflight>(
      args, num_sms, device, stream, nullptr, kDefaultGroupN);
}

}  // namespace twell
