// The dense route of the training plan (see train.h and docs/training.md).
//
// When most tokens are active in more than ~1% of the neurons, the hybrid
// format's per-entry gathers cost more than dense tensor-core GEMMs, so the
// step is run as a dense FFN step: the nine GEMMs of forward + backward
// through cuBLASLt, plus two elementwise passes, with g and u saved in bf16
// (what an autograd framework saves, minus h and relu(g), which are cheap to
// recompute). No host synchronisation in the forward; the backward's one wait
// is the saved-header check the hybrid route makes too.
//
//   forward, per chunk of rows:  G = x W_g^T, U = x W_u^T  (bf16, into saved)
//                                h = bf16(relu(G) * U), per-row L1 and L0
//                                y = h W_d
//   backward, per chunk:         dH = dy W_d^T
//                                dh = dH + c sign(h); dG = dh U [G > 0]; dU = dh relu(G)
//                                dx = dG W_g + dU W_u
//                                dW_g += dG^T x, dW_u += dU^T x, dW_d += h^T dy
//
// Determinism: every reduction is either inside one cuBLASLt call (fixed
// algorithm per shape, no atomics) or a fixed-order block reduction here;
// chunks are summed in order by beta = 1 GEMMs.
#include <algorithm>

#include "common/errors.h"
#include "common/bf16x8.cuh"
#include "common/cublaslt.h"
#include "common/workspace.h"
#include "train/train.h"

namespace twell {
namespace {

constexpr int kThreads = 256;

// Workspace regions of the dense route for `chunk` rows per GEMM.
struct DenseWorkspace {
  size_t lt = 0, stats = 0, misc = 0, row_l1 = 0, a = 0, b = 0, c = 0, acc = 0, total = 0;
  bool accumulators = false;  // several chunks: weight gradients summed in fp32
};

DenseWorkspace dense_workspace(const TrainProblem& p, int64_t chunk) {
  DenseWorkspace w;
  WorkspaceRegions t;
  const size_t M = static_cast<size_t>(p.M), D = static_cast<size_t>(p.D), H = static_cast<size_t>(p.H);
  const size_t C = static_cast<size_t>(std::max<int64_t>(chunk, 1));
  w.accumulators = chunk < p.M;
  w.lt = t.take(kLtWorkspaceBytes);
  w.stats = t.take(kTrainStatsWords * sizeof(u64));
  w.misc = t.take(sizeof(u64));  // rows with more than W active neurons
  w.row_l1 = t.take(M * 4);
  w.a = t.take(C * H * 2);  // forward: h; backward: dH, then dG in place
  w.b = t.take(C * H * 2);  // backward: dU
  w.c = t.take(C * H * 2);  // backward: h
  w.acc = t.take(w.accumulators ? 3 * H * D * 4 : 0);
  w.total = t.end;
  return w;
}

unsigned grid_for(int64_t n, int per) { return static_cast<unsigned>(std::min<int64_t>((n + per - 1) / per, 1 << 16)); }

// h = relu(g) * u as computed by both passes (same bits in forward and backward).
__device__ __forceinline__ float gated(float g, float u) { return g > 0.f ? g * u : 0.f; }

// Fixed-order block sum (every thread gets the result).
__device__ float block_sum(float v, float* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  const float r = sh[0];
  __syncthreads();
  return r;
}

__global__ void dense_init_kernel(u64* stats, u64* header, int64_t M, int W, int64_t D, int64_t H, u64* over) {
  const int t = threadIdx.x;
  if (t < kTrainStatsWords) stats[t] = 0;
  __syncthreads();
  if (t == 0) {
    *over = 0;
    stats[TWELL_STAT_ROWS] = static_cast<u64>(M);
    stats[TWELL_STAT_PATH] = TWELL_PATH_DENSE;
    stats[TWELL_STAT_FORMAT] = TWELL_FORMAT_VERSION;
    stats[TWELL_TSTAT_ELL_WIDTH] = static_cast<u64>(W);
    stats[TWELL_TSTAT_PHASE] = 1;
    const u64 h[8] = {kSavedMagic,         static_cast<u64>(M), static_cast<u64>(M), static_cast<u64>(W),
                      static_cast<u64>(D), static_cast<u64>(H), kRouteDense,         0};
    for (int i = 0; i < 8; ++i) header[i] = h[i];
  }
}

// One CTA per row of the chunk: h (bf16, the y GEMM's operand), the row's L1
// (fp32 |relu(g) u| in a fixed order) and L0.
__global__ void __launch_bounds__(kThreads) dense_forward_act_kernel(const bf16* __restrict__ g,
                                                                     const bf16* __restrict__ u, int64_t H,
                                                                     bf16* __restrict__ h, float* __restrict__ row_l1,
                                                                     int32_t* __restrict__ counts, int W,
                                                                     u64* __restrict__ stats, u64* __restrict__ over) {
  __shared__ float sh[kThreads];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * H;
  const auto* g8 = reinterpret_cast<const uint4*>(g + off);
  const auto* u8 = reinterpret_cast<const uint4*>(u + off);
  auto* h8 = reinterpret_cast<uint4*>(h + off);
  float l1 = 0.f;
  int cnt = 0;
  for (int64_t c = threadIdx.x; c < H / 8; c += kThreads) {
    float gf[8], uf[8], hf[8];
    unpack8(g8[c], gf);
    unpack8(u8[c], uf);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      hf[i] = gated(gf[i], uf[i]);
      l1 += fabsf(hf[i]);
      cnt += gf[i] > 0.f ? 1 : 0;
    }
    h8[c] = pack8(hf);
  }
  const float tot = block_sum(l1, sh);
  const float n = block_sum(static_cast<float>(cnt), sh);  // exact: H < 2^24
  if (threadIdx.x == 0) {
    const int k = static_cast<int>(n);
    row_l1[blockIdx.x] = tot;
    counts[blockIdx.x] = k;
    if (k > 0) {  // integer atomics: order-independent
      atomicAdd(&stats[TWELL_STAT_ACTIVE], static_cast<u64>(k));
      atomicMax(&stats[TWELL_STAT_MAX_ROW_COUNT], static_cast<u64>(k));
    }
    if (k > W) atomicAdd(over, u64(1));
  }
}

// L1 = sum of the row sums in a fixed order (double), and the final statistics.
__global__ void __launch_bounds__(1024) dense_forward_final_kernel(const float* __restrict__ row_l1, int64_t M,
                                                                   float* l1_out, u64* stats, int64_t chunks) {
  __shared__ double sd[1024];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) s += static_cast<double>(row_l1[i]);
  sd[threadIdx.x] = s;
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k /= 2) {
    if (threadIdx.x < k) sd[threadIdx.x] += sd[threadIdx.x + k];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (l1_out != nullptr) *l1_out = static_cast<float>(sd[0]);
    stats[TWELL_TSTAT_TAIL_ROWS] = static_cast<u64>(M);
    stats[TWELL_TSTAT_TAIL_CHUNKS] = static_cast<u64>(chunks);
  }
}

// dH (in a) -> dG (in a), dU (in b), h (in c); flat over the chunk.
__global__ void __launch_bounds__(kThreads) dense_backward_elem_kernel(bf16* __restrict__ a, const bf16* __restrict__ g,
                                                                       const bf16* __restrict__ u, bf16* __restrict__ b,
                                                                       bf16* __restrict__ c, int64_t n8,
                                                                       float coef_host,
                                                                       const float* __restrict__ coef_scale) {
  const float coef = coef_scale != nullptr ? coef_host * *coef_scale : coef_host;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n8;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    float dhf[8], gf[8], uf[8], dg[8], du[8], hf[8];
    unpack8(reinterpret_cast<const uint4*>(a)[i], dhf);
    unpack8(reinterpret_cast<const uint4*>(g)[i], gf);
    unpack8(reinterpret_cast<const uint4*>(u)[i], uf);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const bool on = gf[k] > 0.f;
      hf[k] = gated(gf[k], uf[k]);
      const float sg = hf[k] > 0.f ? 1.f : (hf[k] < 0.f ? -1.f : 0.f);
      const float dh = dhf[k] + coef * sg;
      dg[k] = on ? dh * uf[k] : 0.f;
      du[k] = on ? dh * gf[k] : 0.f;
    }
    reinterpret_cast<uint4*>(a)[i] = pack8(dg);
    reinterpret_cast<uint4*>(b)[i] = pack8(du);
    reinterpret_cast<uint4*>(c)[i] = pack8(hf);
  }
}

// out[r, :] = bf16(acc[r, :] (+ out[r, :])): the fp32 sums of several chunks.
__global__ void finalize_grad_kernel(const float* __restrict__ acc, int64_t rows, int64_t cols, bf16* __restrict__ out,
                                     int64_t ld, int accumulate) {
  const int64_t n = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    bf16* o = out + r * ld + c;
    const float prev = accumulate ? __bfloat162float(*o) : 0.f;
    *o = __float2bfloat16_rn(acc[i] + prev);
  }
}

__global__ void dense_backward_stats_kernel(u64* stats, int64_t M, int W, int64_t chunks, int host_syncs) {
  const int t = threadIdx.x;
  if (t < kTrainStatsWords) stats[t] = 0;
  __syncthreads();
  if (t == 0) {
    stats[TWELL_STAT_ROWS] = static_cast<u64>(M);
    stats[TWELL_STAT_PATH] = TWELL_PATH_DENSE;
    stats[TWELL_STAT_FORMAT] = TWELL_FORMAT_VERSION;
    stats[TWELL_TSTAT_TAIL_ROWS] = static_cast<u64>(M);
    stats[TWELL_TSTAT_ELL_WIDTH] = static_cast<u64>(W);
    stats[TWELL_TSTAT_TAIL_CHUNKS] = static_cast<u64>(chunks);
    stats[TWELL_TSTAT_HOST_SYNCS] = static_cast<u64>(host_syncs);
    stats[TWELL_TSTAT_PHASE] = 2;
  }
}

twell_status gemm(void* lt, cudaStream_t s, const LtGemm& g) { return lt_gemm(g, lt, kLtWorkspaceBytes, s); }

}  // namespace

DenseSavedLayout train_dense_saved_layout(int64_t M, int64_t H) {
  DenseSavedLayout s;
  WorkspaceRegions t;
  const size_t mh = static_cast<size_t>(M) * static_cast<size_t>(H);
  s.header = t.take(8 * sizeof(u64));
  s.counts = t.take(static_cast<size_t>(M) * 4);
  s.g = t.take(mh * 2);
  s.u = t.take(mh * 2);
  s.total = t.end;
  return s;
}

size_t train_dense_workspace_bytes(const TrainProblem& p, int64_t chunk) { return dense_workspace(p, chunk).total; }

int64_t train_dense_chunk(const TrainProblem& p, size_t workspace_bytes) {
  const int64_t M = std::max<int64_t>(p.M, 1);
  const int64_t c = std::min(M, kDenseChunkMax);
  if (dense_workspace(p, c).total <= workspace_bytes) return c;
  // Several chunks (with the fp32 accumulators): the largest multiple of
  // kDenseChunkMin rows that fits, at most 64 layouts to try.
  for (int64_t r = (c - 1) / kDenseChunkMin * kDenseChunkMin; r >= kDenseChunkMin; r -= kDenseChunkMin) {
    if (dense_workspace(p, r).total <= workspace_bytes) return r;
  }
  return 0;
}

const u64* train_dense_over_width(const TrainProblem& p, const char* ws) {
  return reinterpret_cast<const u64*>(ws + dense_workspace(p, 1).misc);
}

u64* train_dense_stats(const TrainProblem& p, char* ws) {
  return reinterpret_cast<u64*>(ws + dense_workspace(p, 1).stats);
}

twell_status train_dense_forward_run(const TrainProblem& p, const TrainWeights& w, const TrainForwardOut& o,
                                     char* saved, char* ws, size_t ws_bytes, cudaStream_t s) {
  const int64_t M = p.M, D = p.D, H = p.H;
  const int64_t C = train_dense_chunk(p, ws_bytes);
  if (C == 0) {
    return fail(TWELL_ERROR_WORKSPACE, "workspace_bytes (%zu) is too small for the dense route (%zu at least)",
                ws_bytes, dense_workspace(p, std::min<int64_t>(M, kDenseChunkMin)).total);
  }
  const DenseWorkspace L = dense_workspace(p, C);
  const DenseSavedLayout S = train_dense_saved_layout(M, H);
  u64* stats = o.stats != nullptr ? o.stats : reinterpret_cast<u64*>(ws + L.stats);
  auto* header = reinterpret_cast<u64*>(saved + S.header);
  auto* counts = reinterpret_cast<int32_t*>(saved + S.counts);
  auto* g = reinterpret_cast<bf16*>(saved + S.g);
  auto* u = reinterpret_cast<bf16*>(saved + S.u);
  auto* over = reinterpret_cast<u64*>(ws + L.misc);
  auto* row_l1 = reinterpret_cast<float*>(ws + L.row_l1);
  auto* hb = reinterpret_cast<bf16*>(ws + L.a);
  void* lt = ws + L.lt;

  dense_init_kernel<<<1, 32, 0, s>>>(stats, header, M, p.W, D, H, over);
  TWELL_CUDA_STEP(cudaGetLastError(), "dense-route init kernel");
  int64_t chunks = 0;
  for (int64_t r0 = 0; r0 < M; r0 += C, ++chunks) {
    const int64_t n = std::min(C, M - r0);
    const MatRef<const bf16> x = w.x.rows_from(r0);
    bf16* gc = g + r0 * H;
    bf16* uc = u + r0 * H;
    TWELL_TRY(gemm(lt, s, {.m = n, .n = H, .k = D, .a = x, .b = w.w_gate, .trans_b = true, .c = {gc, H}}));
    TWELL_TRY(gemm(lt, s, {.m = n, .n = H, .k = D, .a = x, .b = w.w_up, .trans_b = true, .c = {uc, H}}));
    dense_forward_act_kernel<<<static_cast<unsigned>(n), kThreads, 0, s>>>(gc, uc, H, hb, row_l1 + r0, counts + r0, p.W,
                                                                           stats, over);
    TWELL_CUDA_STEP(cudaGetLastError(), "dense-route activation");
    // y = h W_d: W_d [H, D] as is, or [D, H] transposed.
    const MatRef<bf16> y = o.y.rows_from(r0);
    TWELL_TRY(
        gemm(lt, s, {.m = n, .n = D, .k = H, .a = {hb, H}, .b = w.w_down, .trans_b = p.w_down_dh, .c = {y.ptr, y.ld}}));
  }
  dense_forward_final_kernel<<<1, 1024, 0, s>>>(row_l1, M, o.l1, stats, chunks);
  TWELL_CUDA_STEP(cudaGetLastError(), "dense-route final kernel");
  if (o.active != nullptr) {
    TWELL_CUDA_STEP(cudaMemcpyAsync(o.active, counts, static_cast<size_t>(M) * 4, cudaMemcpyDeviceToDevice, s),
                    "active counts");
  }
  return TWELL_SUCCESS;
}

twell_status train_dense_backward_run(const TrainProblem& p, const TrainWeights& w, const TrainBackwardIO& io,
                                      const char* saved, char* ws, size_t ws_bytes, int host_syncs, cudaStream_t s) {
  const int64_t M = p.M, D = p.D, H = p.H;
  const int64_t C = train_dense_chunk(p, ws_bytes);
  if (C == 0) {
    return fail(TWELL_ERROR_WORKSPACE, "workspace_bytes (%zu) is too small for the dense route (%zu at least)",
                ws_bytes, dense_workspace(p, std::min<int64_t>(M, kDenseChunkMin)).total);
  }
  const DenseWorkspace L = dense_workspace(p, C);
  const DenseSavedLayout S = train_dense_saved_layout(M, H);
  const auto* g = reinterpret_cast<const bf16*>(saved + S.g);
  const auto* u = reinterpret_cast<const bf16*>(saved + S.u);
  auto* A = reinterpret_cast<bf16*>(ws + L.a);
  auto* B = reinterpret_cast<bf16*>(ws + L.b);
  auto* Cb = reinterpret_cast<bf16*>(ws + L.c);
  void* lt = ws + L.lt;
  const bool dh = p.w_down_dh;
  // Weight-gradient targets: the outputs themselves (one chunk; beta = 1 is
  // then exactly "dw = bf16(fp32(dw) + gradient)"), else fp32 accumulators.
  float* acc = reinterpret_cast<float*>(ws + L.acc);
  const size_t hd = static_cast<size_t>(H) * static_cast<size_t>(D);
  MatRef<void> tgt[3] = {{io.dw_gate.ptr, io.dw_gate.ld}, {io.dw_up.ptr, io.dw_up.ld}, {io.dw_down.ptr, io.dw_down.ld}};
  if (L.accumulators) {
    for (int q = 0; q < 3; ++q) tgt[q] = {acc + q * hd, (q == 2 && dh) ? H : D};
  }

  int64_t chunks = 0;
  for (int64_t r0 = 0; r0 < M; r0 += C, ++chunks) {
    const int64_t n = std::min(C, M - r0);
    const MatRef<const bf16> x = w.x.rows_from(r0);
    const MatRef<const bf16> dy = io.dy.rows_from(r0);
    const MatRef<bf16> dx = io.dx.rows_from(r0);
    // dH = dy W_d^T
    TWELL_TRY(gemm(lt, s, {.m = n, .n = H, .k = D, .a = dy, .b = w.w_down, .trans_b = !dh, .c = {A, H}}));
    const int64_t n8 = n * H / 8;
    dense_backward_elem_kernel<<<grid_for(n8, kThreads * 4), kThreads, 0, s>>>(A, g + r0 * H, u + r0 * H, B, Cb, n8,
                                                                               io.l1_coeff, io.l1_scale);
    TWELL_CUDA_STEP(cudaGetLastError(), "dense-route backward elementwise");
    // dx = dG W_g + dU W_u (the second product added to the first's bf16 result)
    TWELL_TRY(gemm(lt, s, {.m = n, .n = D, .k = H, .a = {A, H}, .b = w.w_gate, .c = {dx.ptr, dx.ld}}));
    TWELL_TRY(gemm(lt, s, {.m = n, .n = D, .k = H, .a = {B, H}, .b = w.w_up, .c = {dx.ptr, dx.ld}, .beta = 1.f}));
    // dW_g (+)= dG^T x, dW_u (+)= dU^T x, dW_d (+)= h^T dy ([H, D]) or dy^T h ([D, H])
    const float beta = (chunks > 0 || (io.accumulate && !L.accumulators)) ? 1.f : 0.f;
    const bool f32 = L.accumulators;
    TWELL_TRY(gemm(
        lt, s,
        {.m = H, .n = D, .k = n, .a = {A, H}, .trans_a = true, .b = x, .c = tgt[0], .c_is_f32 = f32, .beta = beta}));
    TWELL_TRY(gemm(
        lt, s,
        {.m = H, .n = D, .k = n, .a = {B, H}, .trans_a = true, .b = x, .c = tgt[1], .c_is_f32 = f32, .beta = beta}));
    if (dh) {
      TWELL_TRY(gemm(
          lt, s,
          {.m = D, .n = H, .k = n, .a = dy, .trans_a = true, .b = {Cb, H}, .c = tgt[2], .c_is_f32 = f32, .beta = beta}));
    } else {
      TWELL_TRY(gemm(
          lt, s,
          {.m = H, .n = D, .k = n, .a = {Cb, H}, .trans_a = true, .b = dy, .c = tgt[2], .c_is_f32 = f32, .beta = beta}));
    }
  }
  if (L.accumulators) {
    const int64_t rows[3] = {H, H, dh ? D : H}, cols[3] = {D, D, dh ? H : D};
    const MatRef<bf16> out[3] = {io.dw_gate, io.dw_up, io.dw_down};
    for (int q = 0; q < 3; ++q) {
      finalize_grad_kernel<<<grid_for(rows[q] * cols[q], 1024), 256, 0, s>>>(acc + q * hd, rows[q], cols[q], out[q].ptr,
                                                                             out[q].ld, io.accumulate ? 1 : 0);
      TWELL_CUDA_STEP(cudaGetLastError(), "dense-route gradient finalize");
    }
  }
  if (io.stats != nullptr) {
    dense_backward_stats_kernel<<<1, 32, 0, s>>>(io.stats, M, p.W, chunks, host_syncs);
    TWELL_CUDA_STEP(cudaGetLastError(), "dense-route backward statistics");
  }
  return TWELL_SUCCESS;
}

}  // namespace twell
