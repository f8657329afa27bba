// DeviceGuard makes `device` current for the duration of a call and restores
// the caller's current device afterwards. RelaxedCapture puts this thread in
// relaxed stream-capture mode for a scope: while any stream is being captured
// in global mode (PyTorch's default), calls such as cudaEventQuery, stream
// creation or allocation from any thread invalidate that capture unless the
// calling thread is in relaxed mode.
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

class RelaxedCapture {
 public:
  RelaxedCapture() { status_ = cudaThreadExchangeStreamCaptureMode(&mode_); }
  ~RelaxedCapture() {
    if (status_ == cudaSuccess) (void)cudaThreadExchangeStreamCaptureMode(&mode_);
  }
  RelaxedCapture(const RelaxedCapture&) = delete;
  RelaxedCapture& operator=(const RelaxedCapture&) = delete;
  cudaError_t status() const { return status_; }

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
  cudaError_t status_ = cudaSuccess;
};

}  // namespace twell
