#include <cinttypes>
#include <cstdio>

#include "common/errors.h"
#include "capi/tensor_check.h"

namespace twell {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kBF16: return "bfloat16";
    case DType::kF32: return "float32";
    case DType::kU32: return "uint32";
    case DType::kI32: return "int32";
    case DType::kU64: return "uint64";
  }
  return "?";
}

static int dtype_bytes(DType t) {
  switch (t) {
    case DType::kBF16: return 2;
    case DType::kU64: return 8;
    default: return 4;
  }
}

static bool dtype_matches(const DLDataType& d, DType t) {
  if (d.lanes != 1) return false;
  switch (t) {
    case DType::kBF16: return d.code == kDLBfloat && d.bits == 16;
    case DType::kF32: return d.code == kDLFloat && d.bits == 32;
    case DType::kU32: return d.code == kDLUInt && d.bits == 32;
    case DType::kI32: return d.code == kDLInt && d.bits == 32;
    case DType::kU64: return (d.code == kDLUInt || d.code == kDLInt) && d.bits == 64;
  }
  return false;
}

static const char* device_type_name(int t) {
  switch (t) {
    case kDLCPU: return "host (CPU)";
    case kDLCUDA: return "CUDA device";
    case kDLCUDAHost: return "CUDA pinned host";
    case kDLCUDAManaged: return "CUDA managed";
    default: return "non-CUDA";
  }
}

static void describe_dtype(const DLDataType& d, char* buf, size_t n) {
  const char* code = d.code == kDLInt      ? "int"
                     : d.code == kDLUInt   ? "uint"
                     : d.code == kDLFloat  ? "float"
                     : d.code == kDLBfloat ? "bfloat"
                                           : "code";
  if (d.lanes == 1) snprintf(buf, n, "%s%d", code, d.bits);
  else snprintf(buf, n, "%s%dx%d", code, d.bits, d.lanes);
}

int64_t Mat::bytes_span() const {
  if (rows == 0 || cols == 0) return 0;
  return ((rows - 1) * ld + cols) * static_cast<int64_t>(dtype_bytes(dtype));
}

twell_status check_tensor(const DLTensor* t, const MatSpec& s, Mat* out, bool allow_null) {
  if (t == nullptr) {
    if (allow_null) {
      *out = Mat{};
      return TWELL_SUCCESS;
    }
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "%s is NULL", s.name);
  }
  if (t->device.device_type != kDLCUDA && t->device.device_type != kDLCUDAManaged) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT,
                "%s is in %s memory (DLPack device type %d); twell needs CUDA device memory", s.name,
                device_type_name(t->device.device_type), static_cast<int>(t->device.device_type));
  }
  if (t->ndim != s.ndim) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "%s has %d dimensions, expected %d", s.name, t->ndim, s.ndim);
  }
  if (t->shape == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "%s has a NULL shape array", s.name);
  DType dt = s.dtype;
  if (!dtype_matches(t->dtype, s.dtype)) {
    if (s.alternate_dtype_f32 && dtype_matches(t->dtype, DType::kF32)) {
      dt = DType::kF32;
    } else {
      char got[32];
      describe_dtype(t->dtype, got, sizeof(got));
      if (s.alternate_dtype_f32)
        return fail(TWELL_ERROR_INVALID_ARGUMENT, "%s has dtype %s, expected %s or float32", s.name, got,
                    dtype_name(s.dtype));
      return fail(TWELL_ERROR_INVALID_ARGUMENT, "%s has dtype %s, expected %s", s.name, got, dtype_name(s.dtype));
    }
  }
  const int64_t rows = s.ndim == 2 ? t->shape[0] : 1;
  const int64_t cols = s.ndim == 2 ? t->shape[1] : t->shape[0];
  char shape_str[64];
  if (s.ndim == 2) snprintf(shape_str, sizeof(shape_str), "[%" PRId64 ", %" PRId64 "]", rows, cols);
  else snprintf(shape_str, sizeof(shape_str), "[%" PRId64 "]", cols);
  if (rows < 0 || cols < 0) return fail(TWELL_ERROR_INVALID_ARGUMENT, "%s has a negative extent %s", s.name, shape_str);
  const bool bad_rows = s.rows >= 0 && rows != s.rows;
  const bool bad_cols = s.cols >= 0 && cols != s.cols;
  if (bad_rows || bad_cols) {
    char want[64];
    char r[24], c[24];
    if (s.rows >= 0) snprintf(r, sizeof(r), "%" PRId64, s.rows);
    else snprintf(r, sizeof(r), "M");
    if (s.cols >= 0) snprintf(c, sizeof(c), "%" PRId64, s.cols);
    else snprintf(c, sizeof(c), "N");
    if (s.ndim == 2) snprintf(want, sizeof(want), "[%s, %s]", r, c);
    else snprintf(want, sizeof(want), "[%s]", c);
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "%s has shape %s, expected %s", s.name, shape_str, want);
  }
  if (cols % s.cols_multiple != 0) {
    return fail(TWELL_ERROR_UNSUPPORTED, "%s has %" PRId64 " columns; twell needs a multiple of %" PRId64, s.name, cols,
                s.cols_multiple);
  }
  int64_t ld = cols;
  if (t->strides != nullptr) {
    const int64_t inner = t->strides[s.ndim - 1];
    if (cols > 1 && inner != 1) {
      return fail(TWELL_ERROR_INVALID_ARGUMENT, "%s has inner stride %" PRId64 ", expected 1 (rows must be contiguous)",
                  s.name, inner);
    }
    if (s.ndim == 2) {
      ld = t->strides[0];
      if (rows > 1 && ld < cols) {
        return fail(TWELL_ERROR_INVALID_ARGUMENT,
                    "%s has row stride %" PRId64 " < %" PRId64 " columns (overlapping rows)", s.name, ld, cols);
      }
      if (rows <= 1) ld = cols;
    }
  }
  if (s.compact && ld != cols) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT,
                "%s has row stride %" PRId64 ", expected a compact tensor (stride %" PRId64 ")", s.name, ld, cols);
  }
  if (t->data == nullptr && rows * cols > 0) return fail(TWELL_ERROR_INVALID_ARGUMENT, "%s has NULL data", s.name);
  char* ptr = static_cast<char*>(t->data) + t->byte_offset;
  const int esize = dtype_bytes(dt);
  if (s.vector_aligned) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) {
      return fail(TWELL_ERROR_INVALID_ARGUMENT, "%s data pointer is not 16-byte aligned", s.name);
    }
    if (rows > 1 && (ld * esize) % 16 != 0) {
      return fail(TWELL_ERROR_INVALID_ARGUMENT, "%s row stride (%" PRId64 " elements) is not a multiple of 16 bytes",
                  s.name, ld);
    }
  } else if (reinterpret_cast<uintptr_t>(ptr) % esize != 0) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "%s data pointer is not aligned to its %d-byte element", s.name, esize);
  }
  out->ptr = ptr;
  out->rows = rows;
  out->cols = cols;
  out->ld = ld;
  out->dtype = dt;
  out->device = t->device.device_id;
  return TWELL_SUCCESS;
}

twell_status check_same_device(const Mat* const* mats, const char* const* names, int n) {
  int first = -1;
  for (int i = 0; i < n; ++i) {
    if (mats[i] == nullptr || mats[i]->ptr == nullptr) continue;
    if (first < 0) {
      first = i;
    } else if (mats[i]->device != mats[first]->device) {
      return fail(TWELL_ERROR_INVALID_ARGUMENT, "%s is on CUDA device %d but %s is on device %d", names[i],
                  mats[i]->device, names[first], mats[first]->device);
    }
  }
  return TWELL_SUCCESS;
}

twell_status check_no_alias(const Mat& out, const char* out_name, const Mat& in, const char* in_name) {
  if (out.ptr == nullptr || in.ptr == nullptr) return TWELL_SUCCESS;
  const char* a0 = out.ptr;
  const char* a1 = out.ptr + out.bytes_span();
  const char* b0 = in.ptr;
  const char* b1 = in.ptr + in.bytes_span();
  if (a0 < b1 && b0 < a1) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "%s overlaps %s in memory (outputs must not alias inputs)", out_name,
                in_name);
  }
  return TWELL_SUCCESS;
}

}  // namespace twell
