// A row-major matrix operand: the address of element [0, 0] and the distance,
// in elements, from one row to the next (CUTLASS's TensorRef, cut down to what
// twell's launchers pass around). Two words passed by value, laid out like the
// pointer + leading-dimension pair it replaces, so a kernel argument struct
// may hold it as is. An aggregate: fill it as {ptr, ld} or {.ptr = p, .ld = n}.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace twell {

template <typename T>
struct MatRef {
  T* ptr = nullptr;
  int64_t ld = 0;

  // The operand starting at row r (a row block of a larger matrix).
  __host__ __device__ MatRef rows_from(int64_t r) const { return {ptr + r * ld, ld}; }
};

}  // namespace twell
