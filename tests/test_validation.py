"""Argument validation through the real library, before any CUDA call (runs without a GPU).

Tensors here carry fake device pointers: they are never dereferenced, because
every call either fails its checks or (on a machine without a GPU) stops at
TWELL_ERROR_NO_DEVICE.
"""

import numpy as np
import pytest

from conftest import library_required
from twell import _ffi

FAKE = 0x7F0000000000
CODES = {"bf16": (4, 16), "f32": (2, 32), "u32": (1, 32), "i32": (0, 32), "u64": (1, 64), "f16": (2, 16)}


@pytest.fixture(scope="module")
def lib():
    if _ffi.lib is None:
        if library_required():
            pytest.fail(f"libtwell is required here but unavailable: {_ffi.unavailable_reason}")
        pytest.skip(f"libtwell not built: {_ffi.unavailable_reason}")
    return _ffi.lib


def _has_gpu(lib):
    n = _ffi.ffi.new("int32_t *")
    return lib.twell_device_count(n) == 0 and n[0] > 0


class Tensors:
    """Builds DLTensor descriptors and keeps their memory alive."""

    def __init__(self):
        self.keep = []

    def __call__(self, shape, dtype="bf16", *, data=FAKE, device_type=2, device_id=0, strides=None, offset=0):
        ffi = _ffi.ffi
        t = ffi.new("DLTensor *")
        sh = ffi.new("int64_t[]", list(shape))
        t.data = ffi.cast("void *", data)
        t.device.device_type = device_type
        t.device.device_id = device_id
        t.ndim = len(shape)
        t.dtype.code, t.dtype.bits = CODES[dtype]
        t.dtype.lanes = 1
        t.shape = sh
        self.keep += [t, sh]
        if strides is not None:
            st = ffi.new("int64_t[]", list(strides))
            t.strides = st
            self.keep.append(st)
        t.byte_offset = offset
        return t


def _status(lib, status, expected, *fragments):
    msg = _ffi.ffi.string(lib.twell_last_error()).decode()
    name = _ffi.ffi.string(lib.twell_status_string(status)).decode()
    assert name == expected, f"{name}: {msg}"
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"


# ---- twell_pack / twell_unpack -------------------------------------------------

def _pack_args(T, m=16, h=512, slots=32):
    return dict(pre=T((m, h), "f32"), packed=T((m, (h // 256 + (h % 256 > 0)) * slots), "u32", data=FAKE + (1 << 30)),
                rows=T((m,), "i32", data=FAKE + (2 << 30)), stats=T((8,), "u64", data=FAKE + (3 << 30)))


def _pack(lib, a, slots=32, ws=FAKE + (4 << 30), ws_bytes=1 << 20):
    ffi = _ffi.ffi
    return lib.twell_pack(a["pre"], slots, a["packed"], a["rows"], a["stats"], ffi.cast("void *", ws), ws_bytes,
                          ffi.NULL)


@pytest.mark.parametrize("case,expected,fragments", [
    ("null_pre", "TWELL_ERROR_INVALID_ARGUMENT", ["pre is NULL"]),
    ("host_pre", "TWELL_ERROR_INVALID_ARGUMENT", ["pre is in host (CPU) memory (DLPack device type 1)"]),
    ("int_pre", "TWELL_ERROR_INVALID_ARGUMENT", ["pre has dtype int32, expected bfloat16 or float32"]),
    ("f16_pre", "TWELL_ERROR_INVALID_ARGUMENT", ["pre has dtype float16"]),
    ("3d_pre", "TWELL_ERROR_INVALID_ARGUMENT", ["pre has 3 dimensions, expected 2"]),
    ("h_not_8", "TWELL_ERROR_UNSUPPORTED", ["pre has 510 columns", "multiple of 8"]),
    ("packed_shape", "TWELL_ERROR_INVALID_ARGUMENT", ["packed has shape [16, 63], expected [16, 64]"]),
    ("packed_dtype", "TWELL_ERROR_INVALID_ARGUMENT", ["packed has dtype int32, expected uint32"]),
    ("packed_strided", "TWELL_ERROR_INVALID_ARGUMENT", ["packed has row stride 128", "compact"]),
    ("rows_len", "TWELL_ERROR_INVALID_ARGUMENT", ["overflow_rows has shape [15], expected [16]"]),
    ("stats_len", "TWELL_ERROR_INVALID_ARGUMENT", ["stats has shape [4], expected [8]"]),
    ("misaligned", "TWELL_ERROR_INVALID_ARGUMENT", ["pre data pointer is not 16-byte aligned"]),
    ("offset_misaligned", "TWELL_ERROR_INVALID_ARGUMENT", ["pre data pointer is not 16-byte aligned"]),
    ("inner_stride", "TWELL_ERROR_INVALID_ARGUMENT", ["pre has inner stride 2, expected 1"]),
    ("row_stride_small", "TWELL_ERROR_INVALID_ARGUMENT", ["pre has row stride 256 < 512 columns"]),
    ("row_stride_unaligned", "TWELL_ERROR_INVALID_ARGUMENT",
     ["pre row stride (514 elements) is not a multiple of 16 bytes"]),
    ("null_data", "TWELL_ERROR_INVALID_ARGUMENT", ["pre has NULL data"]),
    ("alias", "TWELL_ERROR_INVALID_ARGUMENT", ["packed overlaps pre"]),
    ("other_device", "TWELL_ERROR_INVALID_ARGUMENT", ["packed is on CUDA device 1 but pre is on device 0"]),
    ("no_workspace", "TWELL_ERROR_WORKSPACE", ["workspace is NULL", "twell_pack_workspace_size"]),
    ("small_workspace", "TWELL_ERROR_WORKSPACE", ["workspace is too small (10 bytes)"]),
    ("bad_slots", "TWELL_ERROR_INVALID_ARGUMENT", ["slots is 33, expected 32, 64 or 128"]),
])
def test_pack_rejects(lib, case, expected, fragments):
    T = Tensors()
    a = _pack_args(T)
    ws, ws_bytes, slots = FAKE + (4 << 30), 1 << 20, 32
    if case == "null_pre":
        a["pre"] = _ffi.ffi.NULL
    elif case == "host_pre":
        a["pre"] = T((16, 512), "f32", device_type=1)
    elif case == "int_pre":
        a["pre"] = T((16, 512), "i32")
    elif case == "f16_pre":
        a["pre"] = T((16, 512), "f16")
    elif case == "3d_pre":
        a["pre"] = T((2, 8, 512), "f32")
    elif case == "h_not_8":
        a = _pack_args(T, h=510)
    elif case == "packed_shape":
        a["packed"] = T((16, 63), "u32", data=FAKE + (1 << 30))
    elif case == "packed_dtype":
        a["packed"] = T((16, 64), "i32", data=FAKE + (1 << 30))
    elif case == "packed_strided":
        a["packed"] = T((16, 64), "u32", data=FAKE + (1 << 30), strides=(128, 1))
    elif case == "rows_len":
        a["rows"] = T((15,), "i32", data=FAKE + (2 << 30))
    elif case == "stats_len":
        a["stats"] = T((4,), "u64", data=FAKE + (3 << 30))
    elif case == "misaligned":
        a["pre"] = T((16, 512), "f32", data=FAKE + 4)
    elif case == "offset_misaligned":
        a["pre"] = T((16, 512), "f32", offset=8)
    elif case == "inner_stride":
        a["pre"] = T((16, 512), "f32", strides=(1024, 2))
    elif case == "row_stride_small":
        a["pre"] = T((16, 512), "f32", strides=(256, 1))
    elif case == "row_stride_unaligned":
        a["pre"] = T((16, 512), "f32", strides=(514, 1))
    elif case == "null_data":
        a["pre"] = T((16, 512), "f32", data=0)
    elif case == "alias":
        a["packed"] = T((16, 64), "u32", data=FAKE + 1024)
    elif case == "other_device":
        a["packed"] = T((16, 64), "u32", data=FAKE + (1 << 30), device_id=1)
    elif case == "no_workspace":
        ws = 0
    elif case == "small_workspace":
        ws_bytes = 10
    elif case == "bad_slots":
        slots = 33
    _status(lib, _pack(lib, a, slots=slots, ws=ws, ws_bytes=ws_bytes), expected, *fragments)


def test_valid_pack_without_gpu_reports_no_device(lib):
    if _has_gpu(lib):
        pytest.skip("a GPU is present (the fake pointers would be used)")
    T = Tensors()
    _status(lib, _pack(lib, _pack_args(T)), "TWELL_ERROR_NO_DEVICE")


def test_unpack_rejects(lib):
    T = Tensors()
    ffi = _ffi.ffi
    packed = T((4, 64), "u32")
    _status(lib, lib.twell_unpack(packed, 32, T((4, 500), "bf16", data=FAKE + (1 << 30)), ffi.NULL),
            "TWELL_ERROR_UNSUPPORTED", "dense has 500 columns")
    _status(lib, lib.twell_unpack(packed, 32, T((4, 600), "bf16", data=FAKE + (1 << 30)), ffi.NULL),
            "TWELL_ERROR_INVALID_ARGUMENT", "packed has shape [4, 64], expected [4, 96]")
    _status(lib, lib.twell_unpack(packed, 32, T((4, 512), "f32", data=FAKE + (1 << 30)), ffi.NULL),
            "TWELL_ERROR_INVALID_ARGUMENT", "dense has dtype float32, expected bfloat16")


# ---- FFN plan ------------------------------------------------------------------

def _options(lib, **kw):
    o = _ffi.ffi.new("twell_ffn_options *")
    assert lib.twell_ffn_options_default(o) == 0
    for k, v in kw.items():
        setattr(o, k, v)
    return o


@pytest.mark.parametrize("d,h,kw,expected,fragment", [
    (2047, 5632, {}, "TWELL_ERROR_UNSUPPORTED", "d_model is 2047"),
    (2048, 0, {}, "TWELL_ERROR_INVALID_ARGUMENT", "hidden is 0, expected a positive size"),
    (32768, 5632, {}, "TWELL_ERROR_UNSUPPORTED", "expected a multiple of 8 in [8, 16384]"),
    (2048, 5632, {"slots": 16}, "TWELL_ERROR_INVALID_ARGUMENT", "options.slots is 16"),
    (2048, 5632, {"gated": 2}, "TWELL_ERROR_INVALID_ARGUMENT", "options.gated is 2"),
    (2048, 5632, {"w_down_layout": 5}, "TWELL_ERROR_INVALID_ARGUMENT", "options.w_down_layout is 5"),
    (2048, 5632, {"path": 3}, "TWELL_ERROR_INVALID_ARGUMENT", "options.path is 3"),
    (2048, 5632, {"kernels": 7}, "TWELL_ERROR_INVALID_ARGUMENT", "options.kernels is 7"),
    (2048, 5632, {"chunk_rows": 3}, "TWELL_ERROR_INVALID_ARGUMENT", "options.chunk_rows is 3"),
    (2048, 5632, {"dense_threshold": 1.5}, "TWELL_ERROR_INVALID_ARGUMENT", "options.dense_threshold"),
])
def test_plan_rejects_options(lib, d, h, kw, expected, fragment):
    plan = _ffi.ffi.new("twell_ffn_plan **")
    _status(lib, lib.twell_ffn_plan_create(plan, d, h, _options(lib, **kw), 0), expected, fragment)
    assert plan[0] == _ffi.ffi.NULL
    _status(lib, lib.twell_ffn_supported(d, h, _options(lib, **kw)), expected, fragment)


@pytest.fixture
def plan(lib):
    def make(d=2048, h=5632, **kw):
        p = _ffi.ffi.new("twell_ffn_plan **")
        assert lib.twell_ffn_plan_create(p, d, h, _options(lib, **kw), 0) == 0, _ffi.ffi.string(lib.twell_last_error())
        return _ffi.ffi.gc(p[0], lib.twell_ffn_plan_destroy)
    return make


def _ffn_args(T, m=4, d=2048, h=5632, dh=False, gated=True):
    base = FAKE
    step = 1 << 30
    return dict(x=T((m, d), data=base), wg=T((h, d), data=base + step) if gated else _ffi.ffi.NULL,
                wu=T((h, d), data=base + 2 * step), wd=T((d, h) if dh else (h, d), data=base + 3 * step),
                y=T((m, d), data=base + 4 * step), stats=_ffi.ffi.NULL)


def _run(lib, plan, a, ws=FAKE + (8 << 30), ws_bytes=1 << 40):
    ffi = _ffi.ffi
    return lib.twell_ffn_run(plan, a["x"], a["wg"], a["wu"], a["wd"], a["y"], a["stats"], ffi.cast("void *", ws),
                             ws_bytes, ffi.NULL)


@pytest.mark.parametrize("case,expected,fragments", [
    ("x_width", "TWELL_ERROR_INVALID_ARGUMENT", ["x has shape [4, 1024], expected [M, 2048]"]),
    ("x_dtype", "TWELL_ERROR_INVALID_ARGUMENT", ["x has dtype float32, expected bfloat16"]),
    ("x_host", "TWELL_ERROR_INVALID_ARGUMENT", ["x is in host (CPU) memory (DLPack device type 1)"]),
    ("wg_missing", "TWELL_ERROR_INVALID_ARGUMENT", ["w_gate is NULL"]),
    ("wu_shape", "TWELL_ERROR_INVALID_ARGUMENT", ["w_up has shape [5632, 1024], expected [5632, 2048]"]),
    ("wd_wrong_layout", "TWELL_ERROR_INVALID_ARGUMENT",
     ["w_down (layout TWELL_LAYOUT_HD, [H, D]) has shape [2048, 5632], expected [5632, 2048]"]),
    ("y_rows", "TWELL_ERROR_INVALID_ARGUMENT", ["y has shape [5, 2048], expected [4, 2048]"]),
    ("y_alias_x", "TWELL_ERROR_INVALID_ARGUMENT", ["y overlaps x"]),
    ("stats_shape", "TWELL_ERROR_INVALID_ARGUMENT", ["stats has shape [7], expected [8]"]),
    ("plan_device", "TWELL_ERROR_INVALID_ARGUMENT", ["y is on CUDA device 1 but the plan was made for device 0"]),
    ("workspace", "TWELL_ERROR_WORKSPACE", ["workspace is too small", "twell_ffn_workspace_size"]),
    ("workspace_align", "TWELL_ERROR_INVALID_ARGUMENT", ["workspace is not 256-byte aligned"]),
])
def test_run_rejects(lib, plan, case, expected, fragments):
    T = Tensors()
    p = plan()
    a = _ffn_args(T)
    ws, ws_bytes = FAKE + (8 << 30), 1 << 40
    if case == "x_width":
        a["x"] = T((4, 1024))
    elif case == "x_dtype":
        a["x"] = T((4, 2048), "f32")
    elif case == "x_host":
        a["x"] = T((4, 2048), device_type=1)
    elif case == "wg_missing":
        a["wg"] = _ffi.ffi.NULL
    elif case == "wu_shape":
        a["wu"] = T((5632, 1024), data=FAKE + (2 << 30))
    elif case == "wd_wrong_layout":
        a["wd"] = T((2048, 5632), data=FAKE + (3 << 30))
    elif case == "y_rows":
        a["y"] = T((5, 2048), data=FAKE + (4 << 30))
    elif case == "y_alias_x":
        a["y"] = T((4, 2048), data=FAKE + 4096)
    elif case == "stats_shape":
        a["stats"] = T((7,), "u64", data=FAKE + (5 << 30))
    elif case == "plan_device":
        a["y"] = T((4, 2048), data=FAKE + (4 << 30), device_id=1)
    elif case == "workspace":
        ws_bytes = 1000
    elif case == "workspace_align":
        ws = FAKE + (8 << 30) + 16
    _status(lib, _run(lib, p, a, ws, ws_bytes), expected, *fragments)


def test_run_layouts_and_non_gated(lib, plan):
    T = Tensors()
    # [D, H] accepted for TWELL_LAYOUT_DH, [H, D] then refused
    p = plan(w_down_layout=1)
    a = _ffn_args(T)
    _status(lib, _run(lib, p, a), "TWELL_ERROR_INVALID_ARGUMENT",
            "w_down (layout TWELL_LAYOUT_DH, [D, H]) has shape [5632, 2048], expected [2048, 5632]")
    # non-gated plans refuse a gate weight
    p = plan(gated=0)
    a = _ffn_args(T)
    _status(lib, _run(lib, p, a), "TWELL_ERROR_INVALID_ARGUMENT", "w_gate must be NULL for a non-gated plan")
    if not _has_gpu(lib):
        _status(lib, _run(lib, plan(w_down_layout=1), _ffn_args(T, dh=True)), "TWELL_ERROR_NO_DEVICE")
        _status(lib, _run(lib, plan(gated=0), _ffn_args(T, gated=False)), "TWELL_ERROR_NO_DEVICE")


def test_workspace_size_grows_with_rows(lib, plan):
    p = plan()
    n = _ffi.ffi.new("size_t *")
    sizes = []
    for m in (1, 128, 4096, 65536):
        assert lib.twell_ffn_workspace_size(p, m, n) == 0
        sizes.append(n[0])
    assert sizes == sorted(sizes) and sizes[0] > 0
    _status(lib, lib.twell_ffn_workspace_size(p, -1, n), "TWELL_ERROR_INVALID_ARGUMENT", "rows is -1")


def test_no_device_is_a_status_not_a_crash(lib):
    if _has_gpu(lib):
        pytest.skip("a GPU is present")
    n = _ffi.ffi.new("int32_t *")
    _status(lib, lib.twell_device_count(n), "TWELL_ERROR_NO_DEVICE")
    assert n[0] == 0
    info = _ffi.ffi.new("twell_device_info *")
    _status(lib, lib.twell_get_device_info(0, info), "TWELL_ERROR_NO_DEVICE")


def test_python_raises_typed_errors_with_the_message(lib):
    from twell import ops

    with pytest.raises(_ffi.InvalidArgumentError, match=r"pre is a ndarray in host memory \(CPU\)"):
        ops.pack(np.zeros((4, 256), np.float32))
    with pytest.raises(_ffi.InvalidArgumentError, match="w_down_layout must be one of"):
        ops.FFNPlan(2048, 5632, w_down_layout="xx")
    with pytest.raises(_ffi.UnsupportedError, match="d_model is 100"):
        ops.FFNPlan(100, 5632)
    assert issubclass(_ffi.InvalidArgumentError, ValueError)


# The Python entry points over DLPack arrays name the bad argument before DLPack or the library see
# it (never a raw AttributeError / IndexError / TypeError, never DLPack's dtype message for host arrays).
def _bf16_host(shape):
    import ml_dtypes

    return np.zeros(shape, dtype=ml_dtypes.bfloat16)


_W = lambda: _bf16_host((256, 64))  # noqa: E731
BAD_DLPACK = [
    ("ffn x None", lambda ops: ops.ffn(None, _W(), _W(), _W()), r"^x is None, expected a CUDA array$"),
    ("ffn x list", lambda ops: ops.ffn([[1.0]], _W(), _W(), _W()),
     r"^x must be a CUDA array implementing __dlpack__ \(CuPy, PyTorch, JAX\), got list$"),
    ("ffn x str", lambda ops: ops.ffn("x", _W(), _W(), _W()), r"^x must be a CUDA array implementing __dlpack__"),
    ("ffn x bf16 numpy", lambda ops: ops.ffn(_bf16_host((4, 64)), _W(), _W(), _W()),
     r"^x is a ndarray in host memory \(CPU\); twell's kernels need CUDA device arrays"),
    ("ffn x f32 numpy", lambda ops: ops.ffn(np.zeros((4, 64), np.float32), _W(), _W(), _W()),
     r"^x is a ndarray in host"),
    ("gate_pack w None", lambda ops: ops.gate_pack(_bf16_host((4, 64)), None), r"^x is a ndarray in host|^w is None"),
    ("unpack hidden str", lambda ops: ops.unpack(_bf16_host((4, 32)), "256"), r"^packed is a ndarray in host"),
    ("plan d_model str", lambda ops: ops.FFNPlan("64", 256), r"^d_model must be an int, got str '64'$"),
    ("plan slots float", lambda ops: ops.FFNPlan(64, 256, slots=32.0), r"^slots must be an int, got float"),
    ("plan threshold str", lambda ops: ops.FFNPlan(64, 256, dense_threshold="0.1"),
     r"^dense_threshold must be a float"),
    ("read_stats None", lambda ops: ops.read_stats(None), r"^stats must be a uint64\[8\] array, got NoneType$"),
    ("read_stats shape", lambda ops: ops.read_stats(np.zeros(3, np.uint64)),
     r"^stats has shape \(3,\), expected \(8,\)$"),
    ("layer w_up None", lambda ops: ops.TwellFFN(None, None, _W()), r"^w_up is None, expected a CUDA array$"),
    ("layer w_up host", lambda ops: ops.TwellFFN(None, _W(), _W()), r"^w_up is a ndarray in host memory"),
]


@pytest.mark.parametrize("case", BAD_DLPACK, ids=[c[0] for c in BAD_DLPACK])
def test_dlpack_entry_points_name_the_bad_argument(lib, case):
    from twell import ops

    _, call, match = case
    with pytest.raises(_ffi.InvalidArgumentError, match=match):
        call(ops)


def test_train_ops_name_the_bad_argument(lib):
    from twell import train_ops

    with pytest.raises(_ffi.InvalidArgumentError, match=r"^x is a ndarray in host memory"):
        train_ops.forward(_bf16_host((4, 64)), _W(), _W(), _W())
    with pytest.raises(_ffi.InvalidArgumentError, match=r"^x must be a CUDA array implementing __dlpack__"):
        train_ops.forward([1, 2], _W(), _W(), _W())


@pytest.mark.parametrize("d,h,status,fragment", [
    (-8, 5632, "TWELL_ERROR_INVALID_ARGUMENT", "d_model is -8, expected a positive size"),
    (2048, 0, "TWELL_ERROR_INVALID_ARGUMENT", "hidden is 0, expected a positive size"),
    (2047, 5632, "TWELL_ERROR_UNSUPPORTED", "d_model is 2047, expected a multiple of 8 in [8, 16384]"),
    (16392, 5632, "TWELL_ERROR_UNSUPPORTED", "d_model is 16392, expected a multiple of 8 in [8, 16384]"),
])
def test_sizes_negative_invalid_unsupported_named(lib, d, h, status, fragment):
    for kind in ("ffn", "train"):
        opt = _ffi.ffi.new(f"twell_{kind}_options *")
        getattr(lib, f"twell_{kind}_options_default")(opt)
        _status(lib, getattr(lib, f"twell_{kind}_supported")(d, h, opt), status, fragment)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64", "int8", "uint16", "bool"])
@pytest.mark.parametrize("shape", [(4, 64), (64,), (2, 4, 64)])
def test_host_numpy_arrays_of_any_dtype_and_rank_are_named_as_host_memory(lib, dtype, shape):
    """The natural first try (a NumPy array, bf16 from ml_dtypes or any other dtype, any rank) is
    told it is in host memory, not that DLPack lacks a dtype or that a dimension is missing."""
    import ml_dtypes

    from twell import ops

    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    with pytest.raises(_ffi.InvalidArgumentError, match=r"^x is a ndarray in host memory \(CPU\)"):
        ops.ffn(np.zeros(shape, dtype=dt), _W(), _W(), _W())


def test_train_plan_arguments_are_named(lib):
    from twell import train_ops

    with pytest.raises(_ffi.InvalidArgumentError, match=r"^d_model must be an int, got str '64'$"):
        train_ops.TrainPlan("64", 256)
    with pytest.raises(_ffi.InvalidArgumentError, match=r"^ell_width must be an int, got float"):
        train_ops.TrainPlan(64, 256, ell_width=64.0)
