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
#define TWELL_STAT_OVERFLOW_ROWS 2   /* rows with a tile over capacity (= list length) */
#define TWELL_STAT_OVERFLOW_TILES 3  /* tiles over capacity */
#define TWELL_STAT_MAX_TILE_COUNT 4  /* largest true count in one tile */
#define TWELL_STAT_MAX_ROW_COUNT 5   /* largest active count in one row */
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
TWELL_API twell_status twell_pack(const DLTensor* pre, int32_t slots, DLTensor* packed,
                                  DLTensor* overflow_rows, DLTensor* stats, void* workspace,
                                  size_t workspace_bytes, void* stream);

/*
 * TwELL -> dense bf16 [M, H]: scatters the stored entries (at most slots-1
 * per tile: an overflowed tile decodes to its stored prefix) and zeros the
 * rest. A count word above 256 or an entry column outside the tile is
 * ignored rather than followed.
 */
TWELL_API twell_status twell_unpack(const DLTensor* packed, int32_t slots, DLTensor* dense,
                                    void* stream);

/* ===================================================================== */
/* Inference: the sparse FFN plan                                        */
/*                                                                       */
/* gated:     y = (relu(x W_g^T) * (x W_u^T)) W_d                         */
/* non-gated: y = relu(x W_u^T) W_d                                       */
/* x [M, D], W_g and W_u [H, D] (nn.Linear layout), W_d [H, D]            */
/* (TWELL_LAYOUT_HD) or [D, H] (TWELL_LAYOUT_DH = nn.Linear down_proj).   */
/* All bf16 (fp32 accumulation), D and H multiples of 8, M >= 1.          */
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
  int32_t chunk_rows;     /* rows per chunk of the dense paths' workspace; 0 = default (8192) */
  double dense_threshold; /* AUTO goes dense when the last call had more than this fraction
                             of active gate entries (default 0.02) or overflow rows (x4) */
} twell_ffn_options;

typedef struct twell_ffn_plan twell_ffn_plan;

/* Fill *options with the defaults above. */
TWELL_API twell_status twell_ffn_options_default(twell_ffn_options* options);

/* Cheap check of shapes and options against this build (no GPU work). */
TWELL_API twell_status twell_ffn_supported(int64_t d_model, int64_t hidden,
                                           const twell_ffn_options* options);

/* Create a plan for one (D, H, options) on `device`; reads device properties. */
TWELL_API twell_status twell_ffn_plan_create(twell_ffn_plan** plan, int64_t d_model,
                                             int64_t hidden, const twell_ffn_options* options,
                                             int32_t device);
TWELL_API twell_status twell_ffn_plan_destroy(twell_ffn_plan* plan);

/* Device workspace bytes a run over M tokens needs (any path). */
TWELL_API twell_status twell_ffn_workspace_size(const twell_ffn_plan* plan, int64_t rows,
                                                size_t* bytes);

/*
 * y = FFN(x). w_gate must be NULL for a non-gated plan. stats may be NULL;
 * if given it is overwritten with this call's statistics (device side).
 * The plan remembers the previous call's statistics through an
 * asynchronous copy (never a host wait) for TWELL_PATH_AUTO.
 * Not thread-safe per plan: use one plan per thread or serialise calls.
 */
TWELL_API twell_status twell_ffn_run(twell_ffn_plan* plan, const DLTensor* x,
                                     const DLTensor* w_gate, const DLTensor* w_up,
                                     const DLTensor* w_down, DLTensor* y, DLTensor* stats,
                                     void* workspace, size_t workspace_bytes, void* stream);

/*
 * Only the gate GEMM with the TwELL packing epilogue: packed = TwELL(relu(x W^T))
 * with the plan's slots and kernels. W is W_g (or W_u for a non-gated FFN).
 *   packed [M, ceil(H/256)*slots] uint32, overflow_rows [M] int32, stats as above.
 */
TWELL_API twell_status twell_gate_pack(twell_ffn_plan* plan, const DLTensor* x,
                                       const DLTensor* w, DLTensor* packed,
                                       DLTensor* overflow_rows, DLTensor* stats, void* workspace,
                                       size_t workspace_bytes, void* stream);

/* CDEF-END */

#endif /* TWELL_TWELL_H_ */
