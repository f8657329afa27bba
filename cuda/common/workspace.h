// Byte offsets of the regions of one buffer, handed out in order, each region
// starting at a multiple of kAlign:
//   Regions<size_t, 256> r;  r.take(bytes) -> offset;  r.end = bytes in all.
// A region of 0 bytes takes no space (its offset is the next region's).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace twell {

template <typename Offset, unsigned kAlign>
struct Regions {
  static_assert((kAlign & (kAlign - 1)) == 0, "the alignment must be a power of two");
  Offset end = 0;
  __host__ __device__ Offset take(uint64_t bytes) {
    const Offset at = end;
    end = static_cast<Offset>((end + bytes + (kAlign - 1)) & ~static_cast<uint64_t>(kAlign - 1));
    return at;
  }
};

// Device workspace: 256-byte aligned regions, as aligned as a fresh
// cudaMalloc, which is all that cuBLASLt workspaces, TMA bases and vector
// loads need.
using WorkspaceRegions = Regions<size_t, 256>;
// Dynamic shared memory: 16-byte aligned regions (uint4 and cp.async access).
using SmemRegions = Regions<uint32_t, 16>;

}  // namespace twell
