// Makes `device` current for the duration of a call and restores the
// caller's current device afterwards.
#pragma once

#include <cuda_runtime.h>

namespace twell {

class DeviceGuard {
 public:
  cudaError_t enter(int device) {
    cudaError_t err = cudaGetDevice(&previous_);
    if (err != cudaSuccess) return err;
    if (previous_ != device) {
      err = cudaSetDevice(device);
      if (err == cudaSuccess) switched_ = true;
    }
    return err;
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = -1;
  bool switched_ = false;
};

}  // namespace twell
