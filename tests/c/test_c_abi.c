/* A C99 consumer of the public header: compiles with -std=c99 -pedantic -Werror and
 * checks version, status strings and argument validation through the real
 * library. Needs no GPU: validation runs before any CUDA call. */
#include <stdio.h>
#include <string.h>

#include "twell/twell.h"

static int failures = 0;

#define CHECK(cond)                                                                                          \
  do {                                                                                                       \
    if (!(cond)) {                                                                                           \
      fprintf(stderr, "FAILED %s:%d: %s (last error: %s)\n", __FILE__, __LINE__, #cond, twell_last_error()); \
      ++failures;                                                                                            \
    }                                                                                                        \
  } while (0)

static DLTensor matrix(void* data, int device_type, uint8_t code, uint8_t bits, int64_t* shape) {
  DLTensor t;
  memset(&t, 0, sizeof(t));
  t.data = data;
  t.device.device_type = (DLDeviceType)device_type;
  t.device.device_id = 0;
  t.ndim = 2;
  t.dtype.code = code;
  t.dtype.bits = bits;
  t.dtype.lanes = 1;
  t.shape = shape;
  return t;
}

int main(void) {
  int64_t words = 0;
  size_t bytes = 0;
  int32_t count = -1;
  twell_ffn_options opt;
  twell_ffn_plan* plan = NULL;
  static float host_pre[16 * 8];
  int64_t pre_shape[2] = {16, 8};
  int64_t packed_shape[2] = {16, 32};
  int64_t rows_shape[1] = {16};
  int64_t stats_shape[1] = {TWELL_STATS_WORDS};
  void* fake = (void*)(uintptr_t)0x100000; /* never dereferenced: checks fail or no device */
  DLTensor pre, packed, rows, stats;
  twell_status st;

  CHECK(twell_version() == TWELL_VERSION);
  CHECK(strstr(twell_build_info(), "twell") != NULL);
  CHECK(strcmp(twell_status_string(TWELL_ERROR_INVALID_ARGUMENT), "TWELL_ERROR_INVALID_ARGUMENT") == 0);

  CHECK(twell_packed_row_words(5632, 32, &words) == TWELL_SUCCESS && words == 22 * 32);
  CHECK(twell_packed_row_words(300, 64, &words) == TWELL_SUCCESS && words == 2 * 64);
  CHECK(twell_packed_row_words(5632, 16, &words) == TWELL_ERROR_INVALID_ARGUMENT);
  CHECK(strstr(twell_last_error(), "slots") != NULL);
  CHECK(twell_pack_workspace_size(1000, &bytes) == TWELL_SUCCESS && bytes >= 1000);

  /* host memory is refused, naming the argument */
  pre = matrix(host_pre, kDLCPU, kDLFloat, 32, pre_shape);
  packed = matrix(fake, kDLCUDA, kDLUInt, 32, packed_shape);
  rows = matrix(fake, kDLCUDA, kDLInt, 32, rows_shape);
  rows.ndim = 1;
  stats = matrix(fake, kDLCUDA, kDLUInt, 64, stats_shape);
  stats.ndim = 1;
  st = twell_pack(&pre, 32, &packed, &rows, &stats, fake, 1 << 20, NULL);
  CHECK(st == TWELL_ERROR_INVALID_ARGUMENT);
  CHECK(strstr(twell_last_error(), "pre") != NULL && strstr(twell_last_error(), "host") != NULL);

  /* wrong packed width */
  pre = matrix(fake, kDLCUDA, kDLFloat, 32, pre_shape);
  packed_shape[1] = 31;
  st = twell_pack(&pre, 32, &packed, &rows, &stats, fake, 1 << 20, NULL);
  CHECK(st == TWELL_ERROR_INVALID_ARGUMENT &&
        strstr(twell_last_error(), "packed has shape [16, 31], expected [16, 32]"));
  packed_shape[1] = 32;

  /* options and plans need no GPU until the first run */
  CHECK(twell_ffn_options_default(&opt) == TWELL_SUCCESS && opt.slots == 32 && opt.gated == 1);
  CHECK(twell_ffn_supported(2048, 5632, &opt) == TWELL_SUCCESS);
  CHECK(twell_ffn_supported(2047, 5632, &opt) == TWELL_ERROR_UNSUPPORTED && strstr(twell_last_error(), "d_model"));
  opt.slots = 48;
  CHECK(twell_ffn_supported(2048, 5632, &opt) == TWELL_ERROR_INVALID_ARGUMENT && strstr(twell_last_error(), "slots"));
  opt.slots = 32;
  CHECK(twell_ffn_plan_create(&plan, 2048, 5632, &opt, 0) == TWELL_SUCCESS && plan != NULL);
  CHECK(twell_ffn_workspace_size(plan, 4096, &bytes) == TWELL_SUCCESS && bytes > 0);
  CHECK(twell_ffn_run(plan, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0, NULL) == TWELL_ERROR_INVALID_ARGUMENT);
  CHECK(strstr(twell_last_error(), "x is NULL") != NULL);
  /* graph replay of eager calls: on by default, 0..64 graphs */
  {
    int64_t replays = -1, captures = -1;
    CHECK(twell_ffn_plan_replay_counts(plan, &replays, &captures) == TWELL_SUCCESS && replays == 0 && captures == 0);
    CHECK(twell_ffn_plan_set_replay(plan, 65) == TWELL_ERROR_INVALID_ARGUMENT &&
          strstr(twell_last_error(), "max_graphs"));
    CHECK(twell_ffn_plan_set_replay(plan, 0) == TWELL_SUCCESS);
    CHECK(twell_ffn_plan_set_replay(NULL, 4) == TWELL_ERROR_INVALID_ARGUMENT);
  }
  CHECK(twell_ffn_plan_destroy(plan) == TWELL_SUCCESS);

  st = twell_device_count(&count);
  CHECK(st == TWELL_SUCCESS || st == TWELL_ERROR_NO_DEVICE);
  printf("device count: %d (%s)\n", count, twell_status_string(st));

  if (failures) {
    fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  printf("c_abi: all checks passed\n");
  return 0;
}
