// A C++17 user of twell: RAII around the plan and the device buffers, one FFN call per M.
// Build: see examples/CMakeLists.txt. Run: ./ffn_cpp
#include <cuda_runtime_api.h>
#include <twell/twell.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

void check(twell_status s, const char* what) {
  if (s != TWELL_SUCCESS)
    throw std::runtime_error(std::string(what) + ": " + twell_status_string(s) + ": " + twell_last_error());
}

struct PlanDeleter {
  void operator()(twell_ffn_plan* p) const { twell_ffn_plan_destroy(p); }
};
using Plan = std::unique_ptr<twell_ffn_plan, PlanDeleter>;

struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) {
    if (cudaMalloc(&ptr, bytes) != cudaSuccess) throw std::runtime_error("cudaMalloc failed");
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

// A compact bf16 (or other) CUDA tensor view with its own shape array.
struct View {
  int64_t shape[2];
  DLTensor t{};
  View(void* data, int64_t rows, int64_t cols, uint8_t code = kDLBfloat, uint8_t bits = 16, int ndim = 2)
      : shape{rows, cols} {
    t.data = data;
    t.device = {kDLCUDA, 0};
    t.ndim = ndim;
    t.dtype = {code, bits, 1};
    t.shape = shape;
  }
  View(const View&) = delete;
};

uint16_t bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace

int main() try {
  const int64_t D = 1024, H = 2816;
  twell_ffn_options opt;
  check(twell_ffn_options_default(&opt), "twell_ffn_options_default");
  opt.w_down_layout = TWELL_LAYOUT_HD;
  twell_ffn_plan* raw = nullptr;
  check(twell_ffn_plan_create(&raw, D, H, &opt, 0), "twell_ffn_plan_create");
  Plan plan(raw);
  int32_t gpus = 0;
  if (twell_device_count(&gpus) != TWELL_SUCCESS || gpus == 0) {
    const std::string why = twell_last_error();  // the next successful call clears it
    size_t bytes = 0;
    check(twell_ffn_workspace_size(plan.get(), 4096, &bytes), "twell_ffn_workspace_size");
    std::printf("no GPU (%s); a 4096-token call would need %zu bytes of workspace\n", why.c_str(), bytes);
    return 0;
  }
  std::vector<uint16_t> w(static_cast<size_t>(H * D));
  uint32_t r = 7;
  for (size_t i = 0; i < w.size(); ++i) {
    r = r * 1664525u + 1013904223u;
    w[i] =
        bf16(i % D == static_cast<size_t>(D - 1) ? -2.5f : (static_cast<float>(r >> 8) / 8388608.0f - 1.0f) * 0.054f);
  }
  DeviceBuffer wg(w.size() * 2), wu(w.size() * 2), wd(w.size() * 2), stats(TWELL_STATS_WORDS * 8);
  for (void* p : {wg.ptr, wu.ptr, wd.ptr}) cudaMemcpy(p, w.data(), w.size() * 2, cudaMemcpyHostToDevice);
  View vg(wg.ptr, H, D), vu(wu.ptr, H, D), vd(wd.ptr, H, D), vs(stats.ptr, TWELL_STATS_WORDS, 1, kDLUInt, 64, 1);
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  for (int64_t M : {1, 64, 4096}) {
    std::vector<uint16_t> xh(static_cast<size_t>(M * D));
    for (size_t i = 0; i < xh.size(); ++i) {
      r = r * 1664525u + 1013904223u;
      xh[i] = bf16(i % D == static_cast<size_t>(D - 1) ? 1.0f : static_cast<float>(r >> 8) / 8388608.0f - 1.0f);
    }
    size_t ws_bytes = 0;
    check(twell_ffn_workspace_size(plan.get(), M, &ws_bytes), "twell_ffn_workspace_size");
    DeviceBuffer x(xh.size() * 2), y(xh.size() * 2), ws(ws_bytes);
    cudaMemcpy(x.ptr, xh.data(), xh.size() * 2, cudaMemcpyHostToDevice);
    View vx(x.ptr, M, D), vy(y.ptr, M, D);
    check(twell_ffn_run(plan.get(), &vx.t, &vg.t, &vu.t, &vd.t, &vy.t, &vs.t, ws.ptr, ws_bytes, stream),
          "twell_ffn_run");
    uint64_t hs[TWELL_STATS_WORDS];
    cudaMemcpyAsync(hs, stats.ptr, sizeof(hs), cudaMemcpyDeviceToHost, stream);
    cudaStreamSynchronize(stream);
    std::printf("M=%lld: %.2f active per token, overflow rows %llu, path %llu\n", static_cast<long long>(M),
                static_cast<double>(hs[TWELL_STAT_ACTIVE]) / static_cast<double>(M),
                static_cast<unsigned long long>(hs[TWELL_STAT_OVERFLOW_ROWS]),
                static_cast<unsigned long long>(hs[TWELL_STAT_PATH]));
  }
  cudaStreamDestroy(stream);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "ffn_cpp: %s\n", e.what());
  return 1;
}
