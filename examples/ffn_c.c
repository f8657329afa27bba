/* A C99 user of twell: one sparse FFN call on a GPU (or, without one, the plan and its sizes).
 * Build: see examples/CMakeLists.txt. Run: ./ffn_c [M]                                          */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <cuda_runtime_api.h>
#include <twell/twell.h>

#define TW(call)                                                                                  \
  do {                                                                                            \
    twell_status s_ = (call);                                                                     \
    if (s_ != TWELL_SUCCESS) {                                                                    \
      fprintf(stderr, "%s failed: %s: %s\n", #call, twell_status_string(s_), twell_last_error()); \
      return 1;                                                                                   \
    }                                                                                             \
  } while (0)

static DLTensor matrix(void* data, int64_t* shape, int ndim, uint8_t code, uint8_t bits) {
  DLTensor t;
  t.data = data;
  t.device.device_type = kDLCUDA;
  t.device.device_id = 0;
  t.ndim = ndim;
  t.dtype.code = code;
  t.dtype.bits = bits;
  t.dtype.lanes = 1;
  t.shape = shape;
  t.strides = NULL; /* compact row-major */
  t.byte_offset = 0;
  return t;
}

/* bf16 bits of a float (round to nearest even; no NaN inputs here) */
static uint16_t bf16(float f) {
  union {
    float f;
    uint32_t u;
  } v;
  v.f = f;
  return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

int main(int argc, char** argv) {
  const int64_t D = 1024, H = 2816, M = argc > 1 ? atoll(argv[1]) : 16;
  twell_ffn_options opt;
  twell_ffn_plan* plan = NULL;
  size_t ws_bytes = 0;
  int32_t gpus = 0;
  if (twell_version() != TWELL_VERSION) {
    fprintf(stderr, "header %d but library %d\n", TWELL_VERSION, twell_version());
    return 1;
  }
  TW(twell_ffn_options_default(&opt));
  TW(twell_ffn_plan_create(&plan, D, H, &opt, 0));
  TW(twell_ffn_workspace_size(plan, M, &ws_bytes));
  printf("twell %d: plan for D=%lld H=%lld, workspace for M=%lld: %zu bytes\n", twell_version(), (long long)D,
         (long long)H, (long long)M, ws_bytes);
  if (twell_device_count(&gpus) != TWELL_SUCCESS || gpus == 0) {
    printf("no GPU: %s\n", twell_last_error());
    twell_ffn_plan_destroy(plan);
    return 0;
  }
  {
    size_t nx = (size_t)(M * D), nw = (size_t)(H * D);
    uint16_t* host = (uint16_t*)malloc(sizeof(uint16_t) * (nx > nw ? nx : nw));
    void *x, *wg, *wu, *wd, *y, *ws;
    uint64_t* stats;
    uint64_t hs[TWELL_STATS_WORDS];
    int64_t sx[2] = {M, D}, sw[2] = {H, D}, ss[1] = {TWELL_STATS_WORDS};
    DLTensor tx, twg, twu, twd, ty, tst;
    size_t i;
    unsigned r = 12345;
    if (cudaMalloc(&x, nx * 2) || cudaMalloc(&y, nx * 2) || cudaMalloc(&wg, nw * 2) || cudaMalloc(&wu, nw * 2) ||
        cudaMalloc(&wd, nw * 2) || cudaMalloc(&ws, ws_bytes) || cudaMalloc((void**)&stats, sizeof(hs))) {
      fprintf(stderr, "cudaMalloc failed\n");
      return 1;
    }
    /* x ~ U(-1, 1) with the last column 1; W_g's last column -2.5 makes ~0.6% of neurons fire */
    for (i = 0; i < nx; ++i) {
      r = r * 1664525u + 1013904223u;
      host[i] = bf16(i % D == (size_t)D - 1 ? 1.0f : (float)(r >> 8) / 8388608.0f - 1.0f);
    }
    cudaMemcpy(x, host, nx * 2, cudaMemcpyHostToDevice);
    for (i = 0; i < nw; ++i) {
      r = r * 1664525u + 1013904223u;
      host[i] = bf16(i % D == (size_t)D - 1 ? -2.5f : ((float)(r >> 8) / 8388608.0f - 1.0f) * 0.054f);
    }
    cudaMemcpy(wg, host, nw * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(wu, host, nw * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(wd, host, nw * 2, cudaMemcpyHostToDevice);
    tx = matrix(x, sx, 2, kDLBfloat, 16);
    ty = matrix(y, sx, 2, kDLBfloat, 16);
    twg = matrix(wg, sw, 2, kDLBfloat, 16);
    twu = matrix(wu, sw, 2, kDLBfloat, 16);
    twd = matrix(wd, sw, 2, kDLBfloat, 16);
    tst = matrix(stats, ss, 1, kDLUInt, 64);
    TW(twell_ffn_run(plan, &tx, &twg, &twu, &twd, &ty, &tst, ws, ws_bytes, NULL));
    cudaMemcpy(hs, stats, sizeof(hs), cudaMemcpyDeviceToHost);
    printf("y = FFN(x) for %llu tokens: %.2f active neurons per token, %llu overflow rows, path %llu\n",
           (unsigned long long)hs[TWELL_STAT_ROWS], (double)hs[TWELL_STAT_ACTIVE] / (double)M,
           (unsigned long long)hs[TWELL_STAT_OVERFLOW_ROWS], (unsigned long long)hs[TWELL_STAT_PATH]);
    free(host);
    cudaFree(x);
    cudaFree(y);
    cudaFree(wg);
    cudaFree(wu);
    cudaFree(wd);
    cudaFree(ws);
    cudaFree(stats);
  }
  TW(twell_ffn_plan_destroy(plan));
  return 0;
}
