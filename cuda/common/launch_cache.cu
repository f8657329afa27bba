#include <map>
#include <mutex>
#include <tuple>

#include "common/launch_cache.h"

namespace twell {
namespace {

std::mutex g_mu;
std::map<std::pair<int, const void*>, size_t> g_smem;                      // (device, kernel) -> bytes allowed
std::map<std::tuple<int, const void*, int, size_t>, int> g_occupancy;      // -> blocks per SM
std::map<std::pair<int, int>, int> g_attr;                                 // (device, attribute) -> value
std::map<std::pair<int, const void*>, bool> g_sm90_code;                   // (device, kernel) -> sm_90 code runs

}  // namespace

cudaError_t set_max_dynamic_smem(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;  // the default limit needs no attribute
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const auto key = std::make_pair(dev, kernel);
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_smem.find(key);
    if (it != g_smem.end() && it->second >= bytes) return cudaSuccess;
  }
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(g_mu);
  size_t& have = g_smem[key];
  if (have < bytes) have = bytes;
  return cudaSuccess;
}

cudaError_t occupancy_per_sm(int* blocks, const void* kernel, int threads, size_t dynamic_smem) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const auto key = std::make_tuple(dev, kernel, threads, dynamic_smem);
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_occupancy.find(key);
    if (it != g_occupancy.end()) {
      *blocks = it->second;
      return cudaSuccess;
    }
  }
  err = set_max_dynamic_smem(kernel, dynamic_smem);
  if (err != cudaSuccess) return err;
  int n = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, dynamic_smem);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(g_mu);
  g_occupancy[key] = n;
  *blocks = n;
  return cudaSuccess;
}

cudaError_t device_attribute(int* value, cudaDeviceAttr attr, int device) {
  const auto key = std::make_pair(device, static_cast<int>(attr));
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_attr.find(key);
    if (it != g_attr.end()) {
      *value = it->second;
      return cudaSuccess;
    }
  }
  int v = 0;
  cudaError_t err = cudaDeviceGetAttribute(&v, attr, device);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(g_mu);
  g_attr[key] = v;
  *value = v;
  return cudaSuccess;
}

bool sm90_code_loaded(const void* kernel) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  const auto key = std::make_pair(dev, kernel);
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_sm90_code.find(key);
    if (it != g_sm90_code.end()) return it->second;
  }
  int major = 0;
  cudaFuncAttributes fa{};
  const bool yes = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                   major >= 9 && cudaFuncGetAttributes(&fa, kernel) == cudaSuccess && fa.binaryVersion >= 90 &&
                   fa.ptxVersion >= 90;
  (void)cudaGetLastError();
  std::lock_guard<std::mutex> lock(g_mu);
  g_sm90_code[key] = yes;
  return yes;
}

}  // namespace twell
