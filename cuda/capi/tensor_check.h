// Validation of DLTensor arguments before any CUDA call. Each check names the
// argument in its message and returns a status; nothing is launched or
// written when a check fails.
#pragma once

#include <cstdint>

#include "common/matref.h"
#include "twell/twell.h"

namespace twell {

enum class DType { kBF16, kF32, kU32, kI32, kU64 };

const char* dtype_name(DType t);

// A validated 2-D (or 1-D, rows = 1) tensor in device memory.
struct Mat {
  char* ptr = nullptr;  // data + byte_offset
  int64_t rows = 0, cols = 0;
  int64_t ld = 0;       // row stride in elements
  DType dtype = DType::kBF16;
  int device = -1;
  int64_t bytes_span() const;  // bytes from ptr to one past the last element
  // The operand the launchers take (T is the element type the spec checked).
  template <typename T>
  MatRef<T> ref() const {
    return {reinterpret_cast<T*>(ptr), ld};
  }
};

struct MatSpec {
  const char* name;
  DType dtype;
  int ndim = 2;            // 1 or 2
  int64_t rows = -1;       // expected, or -1 = any (>= 1)
  int64_t cols = -1;       // expected, or -1 = any
  bool compact = false;    // row stride must equal cols
  bool vector_aligned = true;  // 16-byte aligned base and ld a multiple of 16 bytes
  bool alternate_dtype_f32 = false;  // also accept float32 (then dtype is reported in Mat)
  int64_t cols_multiple = 1;   // columns must be a multiple of this (TWELL_ERROR_UNSUPPORTED otherwise)
};

// Checks one tensor; on success fills *out. `allow_null` makes a NULL tensor OK (out->ptr = nullptr).
twell_status check_tensor(const DLTensor* t, const MatSpec& spec, Mat* out, bool allow_null = false);

// All given tensors live on one device (nullptr entries skipped).
twell_status check_same_device(const Mat* const* mats, const char* const* names, int n);

// An output must not overlap an input.
twell_status check_no_alias(const Mat& out, const char* out_name, const Mat& in, const char* in_name);

}  // namespace twell
