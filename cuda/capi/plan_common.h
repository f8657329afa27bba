// Checks and device set-up shared by the C ABI's plans (inference and training).
#pragma once

#include <cstddef>

#include "capi/errors.h"
#include "capi/tensor_check.h"
#include "twell/twell.h"

namespace twell {

// What a plan learns about its device at its first run.
struct PlanDevice {
  int sm_count = 1;
  bool use_sm90 = false;  // the sm_90a kernels can and may run
};

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
