#include <cinttypes>
#include <cstdint>

#include "common/errors.h"
#include "capi/plan_common.h"
#include "gate_gemm/gate_gemm.h"

namespace twell {

twell_status check_plan_dims(int64_t D, int64_t H) {
  constexpr int64_t kMaxD = 16384, kMaxH = int64_t(1) << 20;
  if (D <= 0) return fail(TWELL_ERROR_INVALID_ARGUMENT, "d_model is %" PRId64 ", expected a positive size", D);
  if (H <= 0) return fail(TWELL_ERROR_INVALID_ARGUMENT, "hidden is %" PRId64 ", expected a positive size", H);
  if (D % 8 != 0 || D > kMaxD) {
    return fail(TWELL_ERROR_UNSUPPORTED, "d_model is %" PRId64 ", expected a multiple of 8 in [8, %" PRId64 "]", D,
                kMaxD);
  }
  if (H % 8 != 0 || H > kMaxH) {
    return fail(TWELL_ERROR_UNSUPPORTED, "hidden is %" PRId64 ", expected a multiple of 8 in [8, %" PRId64 "]", H,
                kMaxH);
  }
  return TWELL_SUCCESS;
}

twell_status check_plan_options(int slots, int w_down_layout, int path, int kernels) {
  if (slots != 32 && slots != 64 && slots != 128) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "options.slots is %d, expected 32, 64 or 128", slots);
  }
  if (w_down_layout != TWELL_LAYOUT_HD && w_down_layout != TWELL_LAYOUT_DH) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT,
                "options.w_down_layout is %d, expected TWELL_LAYOUT_HD (0) or TWELL_LAYOUT_DH (1)", w_down_layout);
  }
  if (path < TWELL_PATH_AUTO || path > TWELL_PATH_DENSE) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "options.path is %d, expected 0 (auto), 1 (sparse) or 2 (dense)", path);
  }
  if (kernels < TWELL_KERNELS_AUTO || kernels > TWELL_KERNELS_SM90) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "options.kernels is %d, expected 0 (auto), 1 (portable) or 2 (sm90)",
                kernels);
  }
  if (kernels == TWELL_KERNELS_SM90 && !gate_pack_sm90_compiled()) {
    return fail(TWELL_ERROR_UNSUPPORTED, "options.kernels is TWELL_KERNELS_SM90 but this build has no sm_90a kernels");
  }
  return TWELL_SUCCESS;
}

twell_status enter_plan_device(DeviceGuard* guard, int device) {
  const cudaError_t err = guard->enter(device);
  return err == cudaSuccess ? TWELL_SUCCESS : fail_cuda(err, "selecting the plan's device");
}

twell_status check_weight(const DLTensor* t, const char* name, int64_t H, int64_t D, Mat* out) {
  return check_tensor(t, MatSpec{.name = name, .dtype = DType::kBF16, .rows = H, .cols = D}, out);
}

twell_status check_w_down(const DLTensor* t, bool gradient, bool dh, int64_t D, int64_t H, Mat* out) {
  static const char* const kNames[2][2] = {
      {"w_down (layout TWELL_LAYOUT_HD, [H, D])", "w_down (layout TWELL_LAYOUT_DH, [D, H])"},
      {"dw_down (layout TWELL_LAYOUT_HD, [H, D])", "dw_down (layout TWELL_LAYOUT_DH, [D, H])"}};
  const MatSpec spec{.name = kNames[gradient][dh], .dtype = DType::kBF16, .rows = dh ? D : H, .cols = dh ? H : D};
  return check_tensor(t, spec, out);
}

twell_status check_stats_tensor(const DLTensor* t, int words, bool required, Mat* out) {
  const MatSpec spec{.name = "stats", .dtype = DType::kU64, .ndim = 1, .cols = words, .vector_aligned = false};
  return check_tensor(t, spec, out, !required);
}

twell_status probe_plan_device(int device, int kernels, PlanDevice* out) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return fail_cuda(err, "cudaGetDeviceCount");
  }
  if (n == 0) return fail(TWELL_ERROR_NO_DEVICE, "no CUDA device is visible");
  if (device >= n) return fail(TWELL_ERROR_INVALID_ARGUMENT, "the plan's device is %d, expected 0..%d", device, n - 1);
  cudaDeviceProp prop;
  if ((err = cudaGetDeviceProperties(&prop, device)) != cudaSuccess) return fail_cuda(err, "cudaGetDeviceProperties");
  if (prop.major < 8) {
    return fail(TWELL_ERROR_UNSUPPORTED, "device %d has compute capability %d.%d; twell needs 8.0 or newer", device,
                prop.major, prop.minor);
  }
  const bool hopper = prop.major == 9 && prop.minor == 0 && gate_pack_sm90_compiled();
  if (kernels == TWELL_KERNELS_SM90 && !hopper) {
    return fail(TWELL_ERROR_UNSUPPORTED,
                "options.kernels is TWELL_KERNELS_SM90 but device %d (%s, cc %d.%d) cannot run them", device, prop.name,
                prop.major, prop.minor);
  }
  out->sm_count = prop.multiProcessorCount;
  out->use_sm90 = hopper && kernels != TWELL_KERNELS_PORTABLE;
  return TWELL_SUCCESS;
}

twell_status check_buffer(const void* ptr, size_t bytes, size_t need, const char* name, twell_status short_status,
                          const char* query) {
  if (ptr == nullptr || bytes < need) {
    return fail(short_status, "%s is %s (%zu bytes), need %zu bytes (%s)", name, ptr == nullptr ? "NULL" : "too small",
                bytes, need, query);
  }
  if (reinterpret_cast<uintptr_t>(ptr) % 256 != 0)
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "%s is not 256-byte aligned", name);
  return TWELL_SUCCESS;
}

twell_status check_on_plan_device(int plan_device, const Mat& m, const char* name) {
  if (m.ptr != nullptr && m.device != plan_device) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "%s is on CUDA device %d but the plan was made for device %d", name,
                m.device, plan_device);
  }
  return TWELL_SUCCESS;
}

twell_status check_call_tensors(int plan_device, const NamedMat* ins, int n_ins, const NamedMat* outs, int n_outs) {
  for (int i = 0; i < n_ins; ++i) TWELL_TRY(check_on_plan_device(plan_device, *ins[i].mat, ins[i].name));
  for (int o = 0; o < n_outs; ++o) {
    TWELL_TRY(check_on_plan_device(plan_device, *outs[o].mat, outs[o].name));
    for (int i = 0; i < n_ins; ++i) TWELL_TRY(check_no_alias(*outs[o].mat, outs[o].name, *ins[i].mat, ins[i].name));
    for (int i = 0; i < o; ++i) TWELL_TRY(check_no_alias(*outs[o].mat, outs[o].name, *outs[i].mat, outs[i].name));
  }
  return TWELL_SUCCESS;
}

twell_status check_buffers_disjoint(const void* a, size_t a_bytes, const char* a_name, const void* b, size_t b_bytes,
                                    const char* b_name) {
  if (a == nullptr || b == nullptr) return TWELL_SUCCESS;
  const char* a0 = static_cast<const char*>(a);
  const char* b0 = static_cast<const char*>(b);
  if (a0 < b0 + b_bytes && b0 < a0 + a_bytes) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "%s overlaps %s in memory", a_name, b_name);
  }
  return TWELL_SUCCESS;
}

// Whether `s` is capturing into a CUDA graph (*capturing), or why it cannot
// be used (no device; the legacy stream while another stream captures in
// global mode; a capture already invalidated by an earlier error).
twell_status stream_capture_state(cudaStream_t s, bool* capturing) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(s, &st);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    if (err == cudaErrorStreamCaptureImplicit || err == cudaErrorStreamCaptureInvalidated) {
      return fail(TWELL_ERROR_INVALID_ARGUMENT, "stream: %s (%s)", cudaGetErrorString(err), cudaGetErrorName(err));
    }
    return fail_cuda(err, "reading the stream's capture state");
  }
  if (st == cudaStreamCaptureStatusInvalidated) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "stream: its graph capture was invalidated by an earlier error");
  }
  *capturing = st == cudaStreamCaptureStatusActive;
  return TWELL_SUCCESS;
}

}  // namespace twell
