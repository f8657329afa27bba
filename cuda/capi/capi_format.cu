// C ABI: the TwELL format (pack / unpack).
#include <cinttypes>
#include <cstdio>

#include "capi/device_guard.h"
#include "common/errors.h"
#include "capi/plan_common.h"
#include "capi/tensor_check.h"
#include "format/pack.h"

using namespace twell;

namespace {

bool valid_slots(int32_t slots) { return slots == 32 || slots == 64 || slots == 128; }

twell_status check_slots(int32_t slots) {
  if (!valid_slots(slots)) return fail(TWELL_ERROR_INVALID_ARGUMENT, "slots is %d, expected 32, 64 or 128", slots);
  return TWELL_SUCCESS;
}

size_t flag_bytes(int64_t rows) { return (static_cast<size_t>(rows) + 16 + 255) / 256 * 256; }
size_t pack_workspace(int64_t rows) { return flag_bytes(rows); }

#define TRY TWELL_TRY

}  // namespace

extern "C" {

TWELL_API twell_status twell_packed_row_words(int64_t hidden, int32_t slots, int64_t* words) {
  if (words == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "words is NULL");
  if (hidden < 1) return fail(TWELL_ERROR_INVALID_ARGUMENT, "hidden is %" PRId64 ", expected >= 1", hidden);
  TRY(check_slots(slots));
  *words = tiles_for(hidden) * slots;
  return ok();
}

TWELL_API twell_status twell_pack_workspace_size(int64_t rows, size_t* bytes) {
  if (bytes == nullptr) return fail(TWELL_ERROR_INVALID_ARGUMENT, "bytes is NULL");
  if (rows < 0) return fail(TWELL_ERROR_INVALID_ARGUMENT, "rows is %" PRId64 ", expected >= 0", rows);
  *bytes = pack_workspace(rows);
  return ok();
}

TWELL_API twell_status twell_pack(const DLTensor* pre, int32_t slots, DLTensor* packed, DLTensor* overflow_rows,
                                  DLTensor* stats, void* workspace, size_t workspace_bytes, void* stream) {
  TRY(check_slots(slots));
  Mat p, out, rows, st;
  MatSpec ps{"pre", DType::kBF16};
  ps.alternate_dtype_f32 = true;
  ps.cols_multiple = 8;
  TRY(check_tensor(pre, ps, &p));
  const int64_t M = p.rows, H = p.cols, words = tiles_for(H) * slots;
  MatSpec os{"packed", DType::kU32};
  os.rows = M;
  os.cols = words;
  os.compact = true;
  TRY(check_tensor(packed, os, &out));
  MatSpec rs{"overflow_rows", DType::kI32, 1};
  rs.cols = M;
  rs.compact = true;
  rs.vector_aligned = false;
  TRY(check_tensor(overflow_rows, rs, &rows));
  MatSpec ss{"stats", DType::kU64, 1};
  ss.cols = TWELL_STATS_WORDS;
  ss.vector_aligned = false;
  TRY(check_tensor(stats, ss, &st));
  const Mat* all[] = {&p, &out, &rows, &st};
  const char* names[] = {"pre", "packed", "overflow_rows", "stats"};
  TRY(check_same_device(all, names, 4));
  for (int o = 1; o < 4; ++o) {
    for (int i = 0; i < o; ++i) TRY(check_no_alias(*all[o], names[o], *all[i], names[i]));
  }
  const size_t need = pack_workspace(M);
  if (workspace == nullptr || workspace_bytes < need) {
    return fail(TWELL_ERROR_WORKSPACE, "workspace is %s (%zu bytes), need %zu bytes (twell_pack_workspace_size)",
                workspace == nullptr ? "NULL" : "too small", workspace_bytes, need);
  }
  if (reinterpret_cast<uintptr_t>(workspace) % 256 != 0) {
    return fail(TWELL_ERROR_INVALID_ARGUMENT, "workspace is not 256-byte aligned");
  }
  DeviceGuard guard;
  cudaError_t err = guard.enter(p.device);
  if (err != cudaSuccess) return fail_cuda(err, "selecting the tensors' device");
  auto s = static_cast<cudaStream_t>(stream);
  auto* flags = static_cast<uint8_t*>(workspace);
  auto* stats_ptr = reinterpret_cast<u64*>(st.ptr);
  if ((err = stats_init(stats_ptr, M, TWELL_PATH_SPARSE, s, flags)) != cudaSuccess) return fail_cuda(err, "stats init");
  if (M > 0) {
    err = pack_rows(p.ptr, p.dtype == DType::kF32, p.ld, M, H, slots, reinterpret_cast<uint32_t*>(out.ptr), flags,
                    stats_ptr, s);
    if (err != cudaSuccess) return fail_cuda(err, "pack kernel");
    err = compact_flagged_rows(flags, M, reinterpret_cast<int32_t*>(rows.ptr), stats_ptr, s);
    if (err != cudaSuccess) return fail_cuda(err, "overflow compaction");
  }
  return ok();
}

TWELL_API twell_status twell_unpack(const DLTensor* packed, int32_t slots, DLTensor* dense, void* stream) {
  TRY(check_slots(slots));
  Mat d, in;
  MatSpec ds{"dense", DType::kBF16};
  ds.cols_multiple = 8;
  TRY(check_tensor(dense, ds, &d));
  MatSpec ps{"packed", DType::kU32};
  ps.rows = d.rows;
  ps.cols = tiles_for(d.cols) * slots;
  ps.compact = true;
  TRY(check_tensor(packed, ps, &in));
  const Mat* all[] = {&in, &d};
  const char* names[] = {"packed", "dense"};
  TRY(check_same_device(all, names, 2));
  TRY(check_no_alias(d, "dense", in, "packed"));
  DeviceGuard guard;
  cudaError_t err = guard.enter(d.device);
  if (err != cudaSuccess) return fail_cuda(err, "selecting the tensors' device");
  err = unpack_rows(reinterpret_cast<const uint32_t*>(in.ptr), d.rows, d.cols, slots, reinterpret_cast<bf16*>(d.ptr),
                    d.ld, static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) return fail_cuda(err, "unpack kernel");
  return ok();
}

}  // extern "C"
