// Ceiling for the sparse consumer's access pattern: random 4·D-byte weight
// rows gathered from two [H, D] bf16 matrices that together (nearly) fit in
// L2 -- what every active (token, neuron) pair of the fused up+down projection
// reads. Prints the achieved bytes/s for several loads-in-flight settings;
// the best is the "L2 gather floor" the sparse FFN is compared with.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 bench/l2_gather.cu -o l2_gather && ./l2_gather [D] [H]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../tests/cuda/harness.cuh"

// Each warp walks `per_warp` random neuron ids; for each it reads row j of A
// and row j of B (D bf16 each) with 16-byte loads, UNROLL rows in flight.
template <int UNROLL>
__global__ void gather(const uint4* __restrict__ a, const uint4* __restrict__ b, const int* __restrict__ ids,
                       int per_warp, int vec_per_row, float* __restrict__ sink) {
  const int lane = threadIdx.x % 32;
  const long warp = (static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int* my = ids + warp * per_warp;
  float acc = 0.f;
  for (int i = 0; i < per_warp; i += UNROLL) {
    uint4 va[UNROLL], vb[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const long row = my[i + u];
      for (int v = lane; v < vec_per_row; v += 32) {  // D/8 vectors per row
        va[u] = a[row * vec_per_row + v];
        vb[u] = b[row * vec_per_row + v];
        acc += __uint_as_float(va[u].x ^ vb[u].y) * 1e-30f;
      }
    }
  }
  if (acc == 1.2345f) sink[0] = acc;  // keep the loads alive
}

int main(int argc, char** argv) {
  const int D = argc > 1 ? atoi(argv[1]) : 2048;
  const int H = argc > 2 ? atoi(argv[2]) : 5632;
  int sms = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const size_t mat = static_cast<size_t>(H) * D * 2;
  uint4 *a, *b;
  CUDA_CHECK(cudaMalloc(&a, mat));
  CUDA_CHECK(cudaMalloc(&b, mat));
  CUDA_CHECK(cudaMemset(a, 1, mat));
  CUDA_CHECK(cudaMemset(b, 2, mat));
  const int threads = 256, per_warp = 64;
  const int blocks = sms * 8;
  const long warps = static_cast<long>(blocks) * threads / 32;
  std::vector<int> ids(warps * per_warp);
  srand(1);
  for (auto& v : ids) v = rand() % H;
  int* d_ids;
  float* sink;
  CUDA_CHECK(cudaMalloc(&d_ids, ids.size() * sizeof(int)));
  CUDA_CHECK(cudaMalloc(&sink, 4));
  CUDA_CHECK(cudaMemcpy(d_ids, ids.data(), ids.size() * sizeof(int), cudaMemcpyHostToDevice));
  const double bytes = static_cast<double>(ids.size()) * 2.0 * D * 2.0;
  harness::Timer timer;
  auto run = [&](auto kernel, const char* name) {
    // No rotation: the two matrices are meant to stay in L2.
    auto call = [&](int, int) {
      kernel<<<blocks, threads>>>(a, b, d_ids, per_warp, D / 8, sink);
      CUDA_CHECK(cudaGetLastError());
    };
    const double t = timer.time(call, {.warmup = 3, .reps = 20}, 0).med * 1e-3;
    printf("{\"bench\": \"l2_gather\", \"D\": %d, \"H\": %d, \"rows_in_flight_per_warp\": \"%s\", \"TBps\": %.3f}\n", D,
           H, name, bytes / t / 1e12);
  };
  run(gather<1>, "1");
  run(gather<2>, "2");
  run(gather<4>, "4");
  CUDA_CHECK(cudaGetLastError());
  return 0;
}
