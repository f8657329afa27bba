// Programmatic dependent launch (PDL, sm_90+) for the decode-sized pipeline.
//
// At small M the FFN is a chain of short dependent kernels, and each launch
// costs a few microseconds of GPU idle time between the previous kernel's end
// and the next one's first instruction. A kernel launched with
// cudaLaunchAttributeProgrammaticStreamSerialization may start while the
// previous kernel of the stream still runs, once every CTA of that kernel has
// executed griddepcontrol.launch_dependents (or exited); it must execute
// griddepcontrol.wait, which returns when the previous kernel has completed
// and its memory is visible, before it touches anything that kernel (or an
// earlier one) produced.
//
// Rules every kernel of the chain follows (so that stream order stays exactly
// as without PDL):
//  * pdl_wait() in every CTA before the first read of an input and before the
//    first write of an output, and unconditionally (an early exit before the
//    wait would let the kernel complete before its predecessor did);
//  * pdl_launch_dependents() only after pdl_wait(), so "this kernel has
//    started its dependents" implies "its predecessor has completed".
// Without the launch attribute both are no-ops, so the same kernels serve
// ordinary launches. sm_80 code compiles them away (never launched with PDL).
#pragma once

#include <cuda_runtime.h>

namespace twell {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Fills `attr` with the PDL launch attribute.
inline void pdl_attribute(cudaLaunchAttribute* attr) {
  attr->id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr->val.programmaticStreamSerializationAllowed = 1;
}

}  // namespace twell
