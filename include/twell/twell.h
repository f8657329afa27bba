/*
 * twell: activation-sparse transformer feed-forward kernels (public C ABI).
 *
 * One header, C99-clean, no CUDA headers needed. Every function returns a
 * twell_status (0 = success); on failure twell_last_error() holds a
 * thread-local message naming the argument and what was expected. Nothing in
 * the library prints, asserts or exits.
 *
 * Tensors cross the ABI as DLPack DLTensor descriptors (shape and strides in
 * elements; strides == NULL means compact row-major). Streams cross as void*
 * holding a cudaStream_t (NULL = the legacy default stream). Argument checks
 * run before any CUDA call, so they work on machines without a GPU, and a
 * rejected call leaves its outputs untouched.
 *
 * Lifecycle (modelled on CUTLASS): *_supported() is a cheap query that does no
 * GPU work; *_workspace_size() says how many bytes of device workspace a call
 * needs; the caller owns the workspace and the stream; plans own nothing but
 * host-side decisions (no pointers to your tensors are cached).
 *
 * The block between CDEF-BEGIN and CDEF-END is also fed to cffi by the Python
 * bindings (preprocessor lines other than integer #defines are dropped there),
 * so it holds only integer #defines, typedefs and prototypes.
 */
#ifndef TWELL_TWELL_H_
#define TWELL_TWELL_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
#define TWELL_EXTERN_C extern "C"
#else
#define TWELL_EXTERN_C
#endif

#if defined(_WIN32)
#define TWELL_API TWELL_EXTERN_C
#else
#define TWELL_API TWELL_EXTERN_C __attribute__((visibility("default")))
#endif

/* CDEF-BEGIN */

/* ===================================================================== */
/* Version                                                               */
/* ===================================================================== */

#define TWELL_VERSION_MAJOR 0
#define TWELL_VERSION_MINOR 1
#define TWELL_VERSION_PATCH 0
/* major * 10000 + minor * 100 + patch; compare with twell_version(). */
#define TWELL_VERSION 100
/* Version of the packed TwELL layout described below. */
#define TWELL_FORMAT_VERSION 1

/* ===================================================================== */
/* DLPack 1.x tensor descriptors (declared here so no dlpack.h is needed;  */
/* skipped when dlpack.h was included first).                            */
/* ===================================================================== */
#if !defined(DLPACK_MAJOR_VERSION) && !defined(DLPACK_VERSION)
typedef enum {
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3,
  kDLOpenCL = 4,
  kDLVulkan = 7,
  kDLMetal = 8,
  kDLVPI = 9,
  kDLROCM = 10,
  kDLROCMHost = 11,
  kDLExtDev = 12,
  kDLCUDAManaged = 13,
  kDLOneAPI = 14,
  kDLWebGPU = 15,
  kDLHexagon = 16,
  kDLMAIA = 17
} DLDeviceType;

typedef struct {
  DLDeviceType device_type;
  int32_t device_id;
} DLDevice;

typedef enum {
  kDLInt = 0,
  kDLUInt = 1,
  kDLFloat = 2,
  kDLOpaqueHandle = 3,
  kDLBfloat = 4,
  kDLComplex = 5,
  kDLBool = 6
} DLDataTypeCode;

typedef struct {
  uint8_t code;   /* a DLDataTypeCode */
  uint8_t bits;   /* 16 for bf16, 32 for fp32 / uint32 / int32 */
  uint16_t lanes; /* must be 1 */
} DLDataType;

typedef struct {
  void* data;          /* device pointer (plus byte_offset) */
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;      /* [ndim] */
  int64_t* strides;    /* [ndim] in elements, or NULL for compact row-major */
  uint64_t byte_offset;
} DLTensor;
#endif /* DLPack */

/* ===================================================================== */
/* Status and errors                                                     */
/* ===================================================================== */
typedef enum {
  TWELL_SUCCESS = 0,
  TWELL_ERROR_INVALID_ARGUMENT = 1, /* a tensor or option is wrong (message names it) */
  TWELL_ERROR_UNSUPPORTED = 2,      /* valid, but this build or device cannot do it */
  TWELL_ERROR_NO_DEVICE = 3,        /* no CUDA driver or no GPU */
  TWELL_ERROR_CUDA = 4,             /* a CUDA runtime error (message has its name) */
  TWELL_ERROR_OUT_OF_MEMORY = 5,
  TWELL_ERROR_WORKSPACE = 6,        /* workspace NULL or smaller than *_workspace_size() */
  TWELL_ERROR_CUBLAS = 7,           /* a cuBLASLt call failed */
  TWELL_ERROR_INTERNAL = 8          /* a bug in twell: please report it */
} twell_status;

/* Static string naming a status ("TWELL_ERROR_INVALID_ARGUMENT"). */
TWELL_API const char* twell_status_string(twell_status status);
/* Message of the last failed call on this thread ("" after a success). */
TWELL_API const char* twell_last_error(void);

/* Library version, TWELL_VERSION encoding; compare with the header's. */
TWELL_API int32_t twell_version(void);
/* Static description of the build: version, CUDA version, compiled archs. */
TWELL_API const char* twell_build_info(void);

/* ===================================================================== */
/* Devices                                                               */
/* ===================================================================== */
typedef struct {
  int32_t device;                 /* CUDA ordinal */
  int32_t cc_major, cc_minor;     /* compute capability */
  int32_t sm_count;
  int64_t global_mem_bytes;
  int64_t l2_bytes;
  int32_t smem_per_block_optin;   /* bytes */
  int32_t has_sm90a_kernels;      /* 1: the Hopper (wgmma/TMA) path can run here */
  char name[256];
} twell_device_info;

/* Number of CUDA devices; TWELL_ERROR_NO_DEVICE (count = 0) without a driver/GPU. */
TWELL_API twell_status twell_device_count(int32_t* count);
TWELL_API twell_status twell_get_device_info(int32_t device, twell_device_info* info);

/* ===================================================================== */
/* The TwELL format (version TWELL_FORMAT_VERSION = 1)                   */
/*                                                                       */
/* A row of H hidden columns is cut into ceil(H / 256) tiles of 256       */
/* columns (the last may be partial). Each tile owns `slots` uint32 words */
/* (slots = 32, 64 or 128), so a packed row has ceil(H/256) * slots words */
/* and the packed matrix is [M, ceil(H/256) * slots] uint32, row-major.   */
/*   word 0      : the tile's TRUE count of values > 0 (may exceed the    */
/*                 capacity slots - 1)                                    */
/*   words 1..   : entries in ascending column order, at most slots - 1:  */
/*                 bits 0-15  = column index within the tile (0..255)     */
/*                 bits 16-31 = bf16 bits of the value (> 0)              */
/*   the rest    : zero                                                   */
/* Values: fp32 pre-activations are kept iff > 0 (ReLU fused), then       */
/* rounded to bf16 (round to nearest even). A tile whose count exceeds    */
/* slots - 1 keeps its first slots - 1 entries and its row is listed as   */
/* overflowed: the row list (int32, ascending, unique) and its length     */
/* (stats word TWELL_STAT_OVERFLOW_ROWS) are written on the device.       */
/* Consumers compute overflowed rows exactly by a dense fallback.         */
/* ===================================================================== */
#define TWELL_TILE_COLS 256
#define TWELL_SLOTS_DEFAULT 32

/* Device-side statistics: a uint64 tensor of TWELL_STATS_WORDS words.   */
/* Written by the kernels with integer atomics (order-independent), so   */
/* they can be read at any time without a host synchronisation.          */
#define TWELL_STATS_WORDS 8
#define TWELL_STAT_ROWS 0            /* tokens in the call */
#define TWELL_STAT_ACTIVE 1          /* sum of true counts (active gate entries) */
#define TWELL_STAT_OVERFLOW_ROWS 2   /* rows with a tile over capacity (= list length; 0 on the dense path) */
#define TWELL_STAT_OVERFLOW_TILES 3  /* tiles over capacity */
#define TWELL_STAT_MAX_TILE_COUNT 4  /* largest true count in one tile */
#define TWELL_STAT_MAX_ROW_COUNT 5   /* largest active count in one row (sparse twell_ffn_run only; else 0) */
#define TWELL_STAT_PATH 6            /* a twell_path: what the call ran */
#define TWELL_STAT_FORMAT 7          /* TWELL_FORMAT_VERSION, written by every call */

/* Words per packed row for H hidden columns. */
TWELL_API twell_status twell_packed_row_words(int64_t hidden, int32_t slots, int64_t* words);

/* Device workspace bytes twell_pack() needs for M rows. */
TWELL_API twell_status twell_pack_workspace_size(int64_t rows, size_t* bytes);

/*
 * Dense pre-activations -> TwELL (the reference packer; the gate GEMM's
 * epilogue writes the same words from the same fp32 values).
 *   pre           [M, H] float32 or bfloat16, CUDA, inner stride 1
 *   slots         32, 64 or 128
 *   packed        [M, ceil(H/256)*slots] uint32, CUDA, compact (output)
 *   overflow_rows [M] int32, CUDA (output: first stats[2] entries valid)
 *   stats         [TWELL_STATS_WORDS] uint64, CUDA (output, overwritten)
 *   workspace     >= twell_pack_workspace_size(M) bytes of device memory
 *   stream        cudaStream_t or NULL
 */
TWELL_API twell_status twell_pack(const DLTensor* pre, int32_t slots, DLTensor* packed, DLTensor* overflow_rows,
                                  DLTensor* stats, void* workspace, size_t workspace_bytes, void* stream);

/*
 * TwELL -> dense bf16 [M, H]: scatters the stored entries (at most slots-1
 * per tile: an overflowed tile decodes to its stored prefix) and zeros the
 * rest. A count word above 256 or an entry column outside the tile is
 * ignored rather than followed.
 */
TWELL_API twell_status twell_unpack(const DLTensor* packed, int32_t slots, DLTensor* dense, void* stream);

/* ===================================================================== */
/* Inference: the sparse FFN plan                                        */
/*                                                                       */
/* gated:     y = (relu(x W_g^T) * (x W_u^T)) W_d                         */
/* non-gated: y = relu(x W_u^T) W_d                                       */
/* x [M, D], W_g and W_u [H, D] (nn.Linear layout), W_d [H, D]            */
/* (TWELL_LAYOUT_HD) or [D, H] (TWELL_LAYOUT_DH = nn.Linear down_proj).   */
/* All bf16 (fp32 accumulation), D and H multiples of 8 (D <= 16384),    */
/* M >= 0 (M = 0 only writes the statistics).                          */
/* ===================================================================== */
typedef enum {
  TWELL_LAYOUT_HD = 0, /* W_d as [H, D]: row j is neuron j's output vector */
  TWELL_LAYOUT_DH = 1  /* W_d as [D, H]: nn.Linear down_proj.weight (transposed into workspace per call) */
} twell_layout;

typedef enum {
  TWELL_PATH_AUTO = 0,   /* choose from the previous call's statistics (no host sync) */
  TWELL_PATH_SPARSE = 1, /* gate GEMM + TwELL + sparse consumer (+ exact fallback rows) */
  TWELL_PATH_DENSE = 2   /* three dense GEMMs through cuBLASLt */
} twell_path;

typedef enum {
  TWELL_KERNELS_AUTO = 0,     /* sm_90a kernels where they run, else portable */
  TWELL_KERNELS_PORTABLE = 1, /* never use the sm_90a kernels (testable on Hopper) */
  TWELL_KERNELS_SM90 = 2      /* require the sm_90a kernels (UNSUPPORTED elsewhere) */
} twell_kernels;

typedef struct {
  int32_t gated;          /* 1 (default): gated FFN; 0: h = relu(x W_u^T) */
  int32_t slots;          /* TwELL words per tile: 32 (default), 64, 128 */
  int32_t w_down_layout;  /* a twell_layout; default TWELL_LAYOUT_HD */
  int32_t path;           /* a twell_path; default TWELL_PATH_AUTO */
  int32_t kernels;        /* a twell_kernels; default TWELL_KERNELS_AUTO */
  int32_t chunk_rows;     /* rows per chunk of the dense paths' workspace; 0 = default (4096) */
  double dense_threshold; /* AUTO goes dense when the last call had more than this fraction
                             of active gate entries (default 0.012) or of overflow rows (x4).
                             Why 0.012: the sparse consumer reads 4*D bytes of weights per
                             active entry through L1/L2 (~8 TB/s on an H200) while the dense
                             path adds two GEMMs (~670 TFLOP/s): they break even near
                             density = cache bandwidth [B/s] / GEMM rate [FLOP/s] ~ 1.2%
                             (measured: 1.5x at 0.5%, 0.74x at 2%) */
} twell_ffn_options;

typedef struct twell_ffn_plan twell_ffn_plan;

/* Fill *options with the defaults above. */
TWELL_API twell_status twell_ffn_options_default(twell_ffn_options* options);

/* Cheap check of shapes and options against this build (no GPU work). */
TWELL_API twell_status twell_ffn_supported(int64_t d_model, int64_t hidden, const twell_ffn_options* options);

/* Create a plan for one (D, H, options) on `device`; reads device properties. */
TWELL_API twell_status twell_ffn_plan_create(twell_ffn_plan** plan, int64_t d_model, int64_t hidden,
                                             const twell_ffn_options* options, int32_t device);
TWELL_API twell_status twell_ffn_plan_destroy(twell_ffn_plan* plan);

/*
 * Eager calls replayed as CUDA graphs (on by default, 8 graphs per plan):
 * the second time a plan sees the same call (path, M, every pointer and
 * stride, the workspace), it captures the call's launch sequence on a stream
 * of its own and from then on replays it with one cudaGraphLaunch (about
 * 2 us of host time instead of about 5 us per kernel launch). The result is
 * bit-identical to the eager launches. max_graphs = 0 turns it off (every
 * call launches its kernels one by one); at most 64.
 */
TWELL_API twell_status twell_ffn_plan_set_replay(twell_ffn_plan* plan, int32_t max_graphs);
/* Calls replayed from a graph, and graphs captured, by this plan so far. */
TWELL_API twell_status twell_ffn_plan_replay_counts(const twell_ffn_plan* plan, int64_t* replays, int64_t* captures);

/* Device workspace bytes a run over M tokens needs (any path). */
TWELL_API twell_status twell_ffn_workspace_size(const twell_ffn_plan* plan, int64_t rows, size_t* bytes);

/*
 * y = FFN(x). w_gate must be NULL for a non-gated plan. stats may be NULL;
 * if given it is overwritten with this call's statistics (device side).
 *
 * TWELL_PATH_AUTO, eager: the plan reads a recent call's statistics back
 * through an asynchronous copy (issued at most every 4th call, never a host
 * wait) and picks the path from them (dense_threshold above).
 *
 * CUDA graphs: every path may be captured (stream capture in any mode).
 * A captured AUTO call decides on the device at every replay (the decision
 * is never frozen at capture). Decode-sized calls (M <= 64 on sm_90 devices)
 * capture the decode pipeline and an IF node whose body is the dense path:
 * the decode consumer sums the replay's own stored TwELL entries and, above
 * 2 H of them, computes nothing and sets the node's condition (so the replay's
 * own input decides, and the body runs only when taken). Other calls decide from the
 * statistics of the plan's previous replay: a one-thread kernel sets the
 * condition of an IF/ELSE graph node whose bodies are the dense and the
 * sparse path; such a graph is subject to CUDA's rules for conditional nodes
 * (one instantiation at a time, not clonable, not usable as a child graph).
 * Eager and captured calls keep separate AUTO histories. The plan must outlive the graphs
 * that captured it, and the workspace given at capture is used by every
 * replay (keep it alive and do not reuse it concurrently).
 *
 * Not thread-safe per plan: use one plan per thread or serialise calls.
 */
TWELL_API twell_status twell_ffn_run(twell_ffn_plan* plan, const DLTensor* x, const DLTensor* w_gate,
                                     const DLTensor* w_up, const DLTensor* w_down, DLTensor* y, DLTensor* stats,
                                     void* workspace, size_t workspace_bytes, void* stream);

/*
 * Only the gate GEMM with the TwELL packing epilogue: packed = TwELL(relu(x W^T))
 * with the plan's slots and kernels. W is W_g (or W_u for a non-gated FFN).
 *   packed [M, ceil(H/256)*slots] uint32, overflow_rows [M] int32, stats as above.
 */
TWELL_API twell_status twell_gate_pack(twell_ffn_plan* plan, const DLTensor* x, const DLTensor* w, DLTensor* packed,
                                       DLTensor* overflow_rows, DLTensor* stats, void* workspace,
                                       size_t workspace_bytes, void* stream);

/* ===================================================================== */
/* Training: the hybrid ELL + dense-tail FFN forward and backward        */
/*                                                                       */
/* Gated ReLU FFN only (h = relu(x W_g^T) * (x W_u^T), y = h W_d), bf16   */
/* tensors, fp32 accumulation. Same layouts and checks as inference: x    */
/* [M, D], W_g and W_u [H, D], W_d [H, D] (TWELL_LAYOUT_HD) or [D, H]     */
/* (TWELL_LAYOUT_DH); D and H multiples of 8, D <= 16384, M >= 0.         */
/*                                                                       */
/* Forward: gate GEMM -> TwELL -> per row either an ELL row (the row's    */
/* true active count <= ell_width and no TwELL tile over capacity) or a   */
/* dense TAIL row; ELL rows: u sampled at the active positions only, h,   */
/* y = h W_d; tail rows: exact dense GEMMs over the gathered rows, in     */
/* chunks of tail_chunk_rows (bounded workspace, any number of tail rows).*/
/* Nothing is dropped: every row is computed exactly by one of the two.   */
/* The raw L1 sum (sum over tokens and neurons of |h|, fp32) and the L0   */
/* count per token are produced in the same call. The state the backward */
/* needs goes to a caller-owned byte buffer ("saved", see docs/          */
/* training.md for its layout): counts, ELL columns / g / u, tail list.   */
/* Backward: dh = dy W_d^T at active positions + c * sign(h) (loss +=     */
/* c * sum |h|); dg, du through the gate; dx; dW_g, dW_u, dW_d from the   */
/* neuron-major (transposed) view built by a deterministic counting sort, */
/* tail rows through dense GEMMs. All reductions have a fixed order:      */
/* results are bitwise reproducible run to run.                           */
/*                                                                       */
/* Routes (options.path): TWELL_PATH_SPARSE = the hybrid route above;    */
/* TWELL_PATH_DENSE = the dense route: the nine GEMMs of a dense FFN step  */
/* through cuBLASLt (chunks of up to 8192 rows), g and u of every row      */
/* saved in bf16 (saved size ~4*M*H bytes), for activity where sparse      */
/* does not pay; TWELL_PATH_AUTO (default) = dense below 3072 rows (the    */
/* hybrid step's part that M does not shrink costs more there than         */
/* sparsity saves), else hybrid until a forward shows that dense pays      */
/* (more than a quarter of the rows in the tail, or mean activity over     */
/* 1.1% of H; 0.65% when W_u and W_d exceed the L2 cache), then dense      */
/* until a dense forward shows the opposite. The choice follows the plan's */
/* previous forward (use one plan per layer); an AUTO plan's               */
/* twell_train_saved_size answers for the route its next forward takes,   */
/* so query it before each forward (a smaller buffer keeps the hybrid     */
/* route). The route taken: twell_train_plan_last_route, and the saved   */
/* state's header.                                                        */
/*                                                                       */
/* Host synchronisation: none in a captured call (any route, AUTO too:    */
/* the tail chunks and the backward's route are conditional graph nodes  */
/* decided on the device at every replay). An eager call that the plan    */
/* has seen before (same M, pointers, strides, sizes, l1_coeff) is        */
/* replayed as that captured form (twell_train_plan_set_replay), so a     */
/* steady training loop does not wait either. The first sighting runs     */
/* eagerly: the hybrid forward waits once for the tail-row count (to size */
/* the tail GEMMs), every backward once for the saved header (checked     */
/* against the call: a mismatch is TWELL_ERROR_INVALID_ARGUMENT). In a    */
/* graph or a replay the header is checked on the device: a mismatch      */
/* fills dx and the weight gradients with NaN. Eager, replayed and        */
/* captured calls give the same bits (the same tail chunk sizes).         */
/* ===================================================================== */
#define TWELL_TRAIN_STATS_WORDS 16
/* Words 0-7 as TWELL_STAT_* (ROWS, ACTIVE, OVERFLOW_ROWS = rows with a   */
/* TwELL tile over capacity, OVERFLOW_TILES, MAX_TILE_COUNT,              */
/* MAX_ROW_COUNT, PATH, FORMAT); ACTIVE, OVERFLOW_* and MAX_TILE_COUNT    */
/* are 0 in the backward's statistics. Then:                              */
#define TWELL_TSTAT_TAIL_ROWS 8        /* rows computed by the dense tail */
#define TWELL_TSTAT_ELL_ROWS 9         /* rows computed in the ELL part */
#define TWELL_TSTAT_ELL_WIDTH 10       /* the plan's ell_width */
#define TWELL_TSTAT_TAIL_CHUNKS 11     /* dense tail chunks run */
#define TWELL_TSTAT_HOST_SYNCS 12      /* host synchronisations in the call */
#define TWELL_TSTAT_ELL_ENTRIES 13     /* active entries stored in ELL rows */
#define TWELL_TSTAT_MAX_NEURON_COUNT 14 /* backward: most ELL tokens of one neuron */
#define TWELL_TSTAT_PHASE 15           /* 1 = forward, 2 = backward */
/* TWELL_STAT_PATH values of the training calls: TWELL_PATH_SPARSE (1) = */
/* every row in ELL, TWELL_PATH_DENSE (2) = every row dense (the dense    */
/* route, or a hybrid call whose rows all went to the tail; TAIL_ROWS = M */
/* either way), TWELL_TRAIN_PATH_HYBRID = some of each. */
#define TWELL_TRAIN_PATH_HYBRID 3
#define TWELL_TRAIN_ELL_WIDTH_DEFAULT 64
#define TWELL_TRAIN_TAIL_CHUNK_DEFAULT 1024

typedef struct {
  int32_t ell_width;       /* W: ELL entries per row, multiple of 8 in [8, 256]; default 64 */
  int32_t slots;           /* TwELL words per tile of the gate output: 32 (default), 64, 128 */
  int32_t w_down_layout;   /* a twell_layout; default TWELL_LAYOUT_HD */
  int32_t path;            /* TWELL_PATH_AUTO (default): hybrid or dense route by
                              M and the previous forward; _SPARSE: hybrid; _DENSE: dense */
  int32_t kernels;         /* a twell_kernels (gate GEMM); default TWELL_KERNELS_AUTO */
  int32_t tail_chunk_rows; /* rows per dense-tail chunk (workspace bound); 0 = default 1024 */
} twell_train_options;

typedef struct twell_train_plan twell_train_plan;

TWELL_API twell_status twell_train_options_default(twell_train_options* options);
/* Cheap check of shapes and options against this build (no GPU work). */
TWELL_API twell_status twell_train_supported(int64_t d_model, int64_t hidden, const twell_train_options* options);
TWELL_API twell_status twell_train_plan_create(twell_train_plan** plan, int64_t d_model, int64_t hidden,
                                               const twell_train_options* options, int32_t device);
TWELL_API twell_status twell_train_plan_destroy(twell_train_plan* plan);

/* Bytes of the saved state a forward over M tokens writes (caller-owned, */
/* 256-byte aligned device memory, kept until the matching backward).    */
/* For a TWELL_PATH_AUTO plan: the size of the route its next forward    */
/* prefers (it changes when the plan switches routes).                   */
TWELL_API twell_status twell_train_saved_size(const twell_train_plan* plan, int64_t rows, size_t* bytes);
/* Device workspace bytes for a forward or a backward over M tokens. Any  */
/* AUTO plan's answer is enough for both routes (the dense route's chunk   */
/* is the largest that fits the workspace given, at least min(M, 1024)    */
/* rows); while the plan prefers the dense route (as twell_train_saved_size */
/* last answered: ask it first), the answer is larger: room for 4096 dense */
/* rows per chunk. For a backward, give the size its forward was given.    */
TWELL_API twell_status twell_train_workspace_size(const twell_train_plan* plan, int64_t rows, size_t* bytes);

/*
 * Forward.
 *   x [M, D], w_gate / w_up [H, D], w_down per the plan's layout: bf16 CUDA
 *   y       [M, D] bf16 (output)
 *   l1      [1] float32 (output, may be NULL): sum over tokens and neurons of |h|
 *   active  [M] int32 (output, may be NULL): neurons with g > 0 per token
 *           (the true L0 count, never clamped)
 *   saved   >= twell_train_saved_size(M) bytes, 256-byte aligned (output)
 *   stats   [TWELL_TRAIN_STATS_WORDS] uint64 (output, may be NULL)
 *   workspace >= twell_train_workspace_size(M) bytes, 256-byte aligned
 */
TWELL_API twell_status twell_train_forward(twell_train_plan* plan, const DLTensor* x, const DLTensor* w_gate,
                                           const DLTensor* w_up, const DLTensor* w_down, DLTensor* y, DLTensor* l1,
                                           DLTensor* active, void* saved, size_t saved_bytes, DLTensor* stats,
                                           void* workspace, size_t workspace_bytes, void* stream);

/*
 * Backward of the forward that wrote `saved` (same x and weights), with
 * loss += l1_coeff * sum |h|.
 *   dy [M, D] bf16; dx [M, D] bf16 (output)
 *   dw_gate, dw_up [H, D] bf16, dw_down in the plan's W_d layout (outputs):
 *   overwritten, or (accumulate = 1) dw = bf16(fp32(dw) + gradient)
 *   stats [TWELL_TRAIN_STATS_WORDS] uint64 (output, may be NULL)
 */
TWELL_API twell_status twell_train_backward(twell_train_plan* plan, const DLTensor* dy, double l1_coeff,
                                            const DLTensor* x, const DLTensor* w_gate, const DLTensor* w_up,
                                            const DLTensor* w_down, const void* saved, size_t saved_bytes, DLTensor* dx,
                                            DLTensor* dw_gate, DLTensor* dw_up, DLTensor* dw_down, int32_t accumulate,
                                            DLTensor* stats, void* workspace, size_t workspace_bytes, void* stream);

/*
 * The same with the L1 coefficient partly in device memory:
 *   coefficient = l1_coeff * l1_scale[0]
 *   l1_scale [1] float32, CUDA (may be NULL: then l1_coeff alone)
 * Framework autograd passes the gradient of the forward's l1 output here
 * (l1_coeff = 1), so no host synchronisation is needed to read it.
 */
TWELL_API twell_status twell_train_backward_scaled(twell_train_plan* plan, const DLTensor* dy, double l1_coeff,
                                                   const DLTensor* l1_scale, const DLTensor* x, const DLTensor* w_gate,
                                                   const DLTensor* w_up, const DLTensor* w_down, const void* saved,
                                                   size_t saved_bytes, DLTensor* dx, DLTensor* dw_gate, DLTensor* dw_up,
                                                   DLTensor* dw_down, int32_t accumulate, DLTensor* stats,
                                                   void* workspace, size_t workspace_bytes, void* stream);

/*
 * Eager calls replayed as CUDA graphs (on by default, 8 graphs per plan, as
 * twell_ffn_plan_set_replay): the second time the plan sees the same forward
 * (route, M, pointers, strides, workspace size) or backward (M, l1_coeff,
 * accumulate, pointers, strides, buffer sizes), it captures the call's
 * captured form (above) on a stream of its own and replays it from then on:
 * no host synchronisation, one cudaGraphLaunch. max_graphs = 0 turns it off;
 * at most 64. A replayed AUTO forward's activity reaches the route choice
 * asynchronously (a later forward takes it in).
 */
TWELL_API twell_status twell_train_plan_set_replay(twell_train_plan* plan, int32_t max_graphs);
/* Calls replayed from a graph, and graphs captured, by this plan so far. */
TWELL_API twell_status twell_train_plan_replay_counts(const twell_train_plan* plan, int64_t* replays,
                                                      int64_t* captures);
/* The route of the plan's last forward (eager, replayed or captured):      */
/* TWELL_PATH_SPARSE = hybrid, TWELL_PATH_DENSE = dense; 0 before any.      */
TWELL_API twell_status twell_train_plan_last_route(const twell_train_plan* plan, int32_t* path);

/* CDEF-END */

#endif /* TWELL_TWELL_H_ */
