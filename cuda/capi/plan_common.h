// Checks and device set-up shared by the C ABI's plans (inference and training).
#pragma once

#include <cstddef>
#include <new>

#include "capi/device_guard.h"
#include "capi/tensor_check.h"
#include "common/errors.h"
#include "twell/twell.h"

namespace twell {

// What a plan learns about its device at its first run.
struct PlanDevice {
  int sm_count = 1;
  bool use_sm90 = false;  // the sm_90a kernels can and may run
};

// The d_model and hidden sizes both plans accept (D <= 16384, H <= 2^20,
// multiples of 8).
twell_status check_plan_dims(int64_t D, int64_t H);

// The options both plans share, checked in this order after the plan's own
// leading options: slots, w_down_layout, path, kernels (and sm_90a kernels
// present in this build when asked for).
twell_status check_plan_options(int slots, int w_down_layout, int path, int kernels);

// twell_*_plan_create: checks, then a new Plan with its sizes, options and
// device. `check` is the plan's options check (sizes included).
template <typename Plan, typename Options>
twell_status create_plan(Plan** plan, int64_t D, int64_t H, const Options* options, int32_t device,
                         twell_status (*check)(int64_t, int64_t, const Options*)) {
  if (plan == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "plan is NULL");
  *plan = nullptr;
  TWELL_TRY(check(D, H, options));
  if (device < 0) return fail(TWELL_ERROR_INVALID_ARGUMENT, "device is %d, expected a CUDA ordinal >= 0", device);
  auto* p = new (std::nothrow) Plan;
  if (p == nullptr) return fail(TWELL_ERROR_OUT_OF_MEMORY, "plan allocation failed");
  p->D = D;
  p->H = H;
  p->opt = *options;
  p->device = device;
  *plan = p;
  return ok();
}

// Makes the plan's device current for the call (restored when `guard` goes).
twell_status enter_plan_device(DeviceGuard* guard, int device);

// An [H, D] weight (or weight gradient) tensor.
twell_status check_weight(const DLTensor* t, const char* name, int64_t H, int64_t D, Mat* out);

// W_d (or its gradient, `gradient`) in the plan's layout: [H, D], or [D, H] for TWELL_LAYOUT_DH.
twell_status check_w_down(const DLTensor* t, bool gradient, bool dh, int64_t D, int64_t H, Mat* out);

// A statistics vector of `words` uint64 (NULL allowed unless `required`).
twell_status check_stats_tensor(const DLTensor* t, int words, bool required, Mat* out);

// Device checks done lazily at a plan's first run (after that call's argument
// checks, so argument checking works without a GPU): a device is visible,
// `device` exists, cc >= 8.0, and `kernels` (a twell_kernels) is satisfiable.
twell_status probe_plan_device(int device, int kernels, PlanDevice* out);

// A caller-owned device buffer: present, large enough (`short_status` names
// the query function `query` otherwise) and 256-byte aligned.
twell_status check_buffer(const void* ptr, size_t bytes, size_t need, const char* name, twell_status short_status,
                          const char* query);

// A tensor (if given) lives on the plan's device.
twell_status check_on_plan_device(int plan_device, const Mat& m, const char* name);

// The tensors of one call: every one on the plan's device, and no output
// overlapping an input or an earlier output.
struct NamedMat {
  const Mat* mat;
  const char* name;
};
twell_status check_call_tensors(int plan_device, const NamedMat* ins, int n_ins, const NamedMat* outs, int n_outs);

// Whether stream `s` is capturing into a CUDA graph (*capturing), or a status
// saying why it cannot be used (no device; the legacy stream while another
// stream captures in global mode; a capture already invalidated).
twell_status stream_capture_state(cudaStream_t s, bool* capturing);

// Two caller-owned raw buffers must not overlap.
twell_status check_buffers_disjoint(const void* a, size_t a_bytes, const char* a_name, const void* b, size_t b_bytes,
                                    const char* b_name);

}  // namespace twell
