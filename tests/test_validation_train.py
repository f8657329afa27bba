"""Training C ABI: argument validation and buffer-size rules, through the real library (no GPU needed).

As in test_validation.py, tensors carry fake device pointers that are never
dereferenced: every call here either fails its checks or stops at
TWELL_ERROR_NO_DEVICE on a machine without a GPU.
"""

import pytest

from conftest import library_required
from test_validation import FAKE, Tensors, _has_gpu, _status
from twell import _ffi

STEP = 1 << 32          # fake tensors 4 GiB apart never overlap
MIB = 1 << 20


@pytest.fixture(scope="module")
def lib():
    if _ffi.lib is None:
        if library_required():
            pytest.fail(f"libtwell is required here but unavailable: {_ffi.unavailable_reason}")
        pytest.skip(f"libtwell not built: {_ffi.unavailable_reason}")
    return _ffi.lib


def _options(lib, **kw):
    o = _ffi.ffi.new("twell_train_options *")
    assert lib.twell_train_options_default(o) == 0
    for k, v in kw.items():
        setattr(o, k, v)
    return o


def _plan(lib, d=2048, h=5632, **kw):
    p = _ffi.ffi.new("twell_train_plan **")
    assert lib.twell_train_plan_create(p, d, h, _options(lib, **kw), 0) == 0, _ffi.ffi.string(lib.twell_last_error())
    return _ffi.ffi.gc(p[0], lib.twell_train_plan_destroy)


def _size(lib, fn, plan, m):
    n = _ffi.ffi.new("size_t *")
    assert fn(plan, m, n) == 0, _ffi.ffi.string(lib.twell_last_error())
    return int(n[0])


def _align(n):
    return (n + 255) // 256 * 256


@pytest.mark.parametrize("d,h,kw,expected,fragment", [
    (2047, 5632, {}, "TWELL_ERROR_UNSUPPORTED", "d_model is 2047"),
    (2048, 0, {}, "TWELL_ERROR_INVALID_ARGUMENT", "hidden is 0, expected a positive size"),
    (2048, 5632, {"ell_width": 12}, "TWELL_ERROR_INVALID_ARGUMENT", "options.ell_width is 12"),
    (2048, 5632, {"ell_width": 264}, "TWELL_ERROR_INVALID_ARGUMENT", "options.ell_width is 264"),
    (2048, 5632, {"slots": 16}, "TWELL_ERROR_INVALID_ARGUMENT", "options.slots is 16"),
    (2048, 5632, {"w_down_layout": 5}, "TWELL_ERROR_INVALID_ARGUMENT", "options.w_down_layout is 5"),
    (2048, 5632, {"path": 3}, "TWELL_ERROR_INVALID_ARGUMENT", "options.path is 3"),
    (2048, 5632, {"kernels": 7}, "TWELL_ERROR_INVALID_ARGUMENT", "options.kernels is 7"),
    (2048, 5632, {"tail_chunk_rows": 5}, "TWELL_ERROR_INVALID_ARGUMENT", "options.tail_chunk_rows is 5"),
])
def test_train_plan_rejects_options(lib, d, h, kw, expected, fragment):
    plan = _ffi.ffi.new("twell_train_plan **")
    _status(lib, lib.twell_train_plan_create(plan, d, h, _options(lib, **kw), 0), expected, fragment)
    assert plan[0] == _ffi.ffi.NULL
    _status(lib, lib.twell_train_supported(d, h, _options(lib, **kw)), expected, fragment)


def test_saved_sizes_per_route(lib):
    m, h, w = 1000, 5632, 64  # _plan's shape: D = 2048, H = 5632
    hybrid = _size(lib, lib.twell_train_saved_size, _plan(lib, path=1), m)
    dense = _size(lib, lib.twell_train_saved_size, _plan(lib, path=2), m)
    auto = _size(lib, lib.twell_train_saved_size, _plan(lib, path=0), m)
    assert hybrid == 256 + _align(4 * m) + _align(m) + _align(4 * m) + 3 * _align(4 * m * w)
    assert dense == 256 + _align(4 * m) + 2 * _align(2 * m * h)    # header, counts, g and u in bf16
    assert auto == dense                                            # AUTO below 3072 rows: the dense route
    for rows, route in ((3071, 2), (3072, 1), (4096, 1)):          # from 3072 rows it starts on the hybrid
        want = _size(lib, lib.twell_train_saved_size, _plan(lib, path=route), rows)
        assert _size(lib, lib.twell_train_saved_size, _plan(lib, path=0), rows) == want, rows
    n = _ffi.ffi.new("size_t *")
    plan = _plan(lib)  # held: destroying it (a successful call) would clear the message
    _status(lib, lib.twell_train_saved_size(plan, -1, n), "TWELL_ERROR_INVALID_ARGUMENT", "rows is -1")


def test_workspace_sizes_per_route(lib):
    d, h = 2048, 5632
    lt_stats_misc = 32 * MIB + 256 + 256
    for m in (1, 4096, 8192):   # one chunk: no fp32 accumulators
        dense = _size(lib, lib.twell_train_workspace_size, _plan(lib, path=2), m)
        assert dense == lt_stats_misc + _align(4 * m) + 3 * _align(2 * m * h), m
    m = 20000                   # several chunks of 8192 rows: + three fp32 [H, D] accumulators
    dense = _size(lib, lib.twell_train_workspace_size, _plan(lib, path=2), m)
    assert dense == lt_stats_misc + _align(4 * m) + 3 * _align(2 * 8192 * h) + 3 * 4 * h * d
    for m in (1, 300, 16384, 65536):
        hybrid = _size(lib, lib.twell_train_workspace_size, _plan(lib, path=1), m)
        auto = _size(lib, lib.twell_train_workspace_size, _plan(lib, path=0), m)
        c = min(m, 1024)
        dense_min = lt_stats_misc + _align(4 * m) + 3 * _align(2 * c * h) + (3 * 4 * h * d if c < m else 0)
        assert auto == max(hybrid, dense_min), m


@pytest.mark.parametrize("path", [0, 1])
def test_train_memory_budget_2048x5632(lib, path):
    """AUTO (on its first route) and hybrid plans: saved state + workspace at D = 2048, H = 5632 at most 250 MiB at
    M = 16384 (28% of the 880 MiB that dense PyTorch holds beyond inputs, weights and gradients,
    bench/results/2026-12-03c_h200_bench_train.md: the training issue's bar), growing by at most 2.5 KiB per token
    (at W = 64: the saved state, 777 bytes, the backward's dg, du and sorted entries, 24 W, and its histogram)."""
    plan = _plan(lib, path=path)
    total = {m: _size(lib, lib.twell_train_saved_size, plan, m) + _size(lib, lib.twell_train_workspace_size, plan, m)
             for m in (16384, 65536)}
    assert total[16384] <= 250 * MIB, f"{total[16384] / MIB:.1f} MiB at M = 16384"
    assert total[65536] - total[16384] <= 2560 * (65536 - 16384), total


def _fwd_args(T, m=4, d=2048, h=5632, dh=False):
    return dict(x=T((m, d), data=FAKE), wg=T((h, d), data=FAKE + STEP), wu=T((h, d), data=FAKE + 2 * STEP),
                wd=T((d, h) if dh else (h, d), data=FAKE + 3 * STEP), y=T((m, d), data=FAKE + 4 * STEP),
                l1=T((1,), "f32", data=FAKE + 5 * STEP), active=T((m,), "i32", data=FAKE + 6 * STEP),
                stats=T((16,), "u64", data=FAKE + 7 * STEP), saved=FAKE + 8 * STEP, saved_bytes=1 << 31,
                ws=FAKE + 9 * STEP, ws_bytes=1 << 31)


def _forward(lib, plan, a):
    ffi = _ffi.ffi
    return lib.twell_train_forward(plan, a["x"], a["wg"], a["wu"], a["wd"], a["y"], a["l1"], a["active"],
                                   ffi.cast("void *", a["saved"]), a["saved_bytes"], a["stats"],
                                   ffi.cast("void *", a["ws"]), a["ws_bytes"], ffi.NULL)


@pytest.mark.parametrize("case,expected,fragments", [
    ("x_width", "TWELL_ERROR_INVALID_ARGUMENT", ["x has shape [4, 1024], expected [M, 2048]"]),
    ("wd_layout", "TWELL_ERROR_INVALID_ARGUMENT",
     ["w_down (layout TWELL_LAYOUT_HD, [H, D]) has shape [2048, 5632], expected [5632, 2048]"]),
    ("y_rows", "TWELL_ERROR_INVALID_ARGUMENT", ["y has shape [5, 2048], expected [4, 2048]"]),
    ("y_alias_x", "TWELL_ERROR_INVALID_ARGUMENT", ["y overlaps x"]),
    ("l1_shape", "TWELL_ERROR_INVALID_ARGUMENT", ["l1 has shape [2], expected [1]"]),
    ("active_shape", "TWELL_ERROR_INVALID_ARGUMENT", ["active has shape [3], expected [4]"]),
    ("stats_shape", "TWELL_ERROR_INVALID_ARGUMENT", ["stats has shape [8], expected [16]"]),
    ("saved_null", "TWELL_ERROR_INVALID_ARGUMENT", ["saved is NULL"]),
    ("saved_small", "TWELL_ERROR_INVALID_ARGUMENT", ["saved is too small", "twell_train_saved_size"]),
    ("saved_misaligned", "TWELL_ERROR_INVALID_ARGUMENT", ["saved is not 256-byte aligned"]),
    ("workspace_small", "TWELL_ERROR_WORKSPACE", ["workspace is too small", "twell_train_workspace_size"]),
    ("saved_in_workspace", "TWELL_ERROR_INVALID_ARGUMENT", ["saved overlaps workspace"]),
    ("saved_over_y", "TWELL_ERROR_INVALID_ARGUMENT", ["saved overlaps y"]),
])
def test_train_forward_rejects(lib, case, expected, fragments):
    T = Tensors()
    a = _fwd_args(T)
    if case == "x_width":
        a["x"] = T((4, 1024), data=FAKE)
    elif case == "wd_layout":
        a["wd"] = T((2048, 5632), data=FAKE + 3 * STEP)
    elif case == "y_rows":
        a["y"] = T((5, 2048), data=FAKE + 4 * STEP)
    elif case == "y_alias_x":
        a["y"] = T((4, 2048), data=FAKE + 4096)
    elif case == "l1_shape":
        a["l1"] = T((2,), "f32", data=FAKE + 5 * STEP)
    elif case == "active_shape":
        a["active"] = T((3,), "i32", data=FAKE + 6 * STEP)
    elif case == "stats_shape":
        a["stats"] = T((8,), "u64", data=FAKE + 7 * STEP)
    elif case == "saved_null":
        a["saved"] = 0
    elif case == "saved_small":
        a["saved_bytes"] = 1000
    elif case == "saved_misaligned":
        a["saved"] += 16
    elif case == "workspace_small":
        a["ws_bytes"] = 1000
    elif case == "saved_in_workspace":
        a["saved"] = a["ws"] + 4096
    elif case == "saved_over_y":
        a["saved"] = FAKE + 4 * STEP
    plan = _plan(lib)
    _status(lib, _forward(lib, plan, a), expected, *fragments)


def test_train_forward_dense_route_needs_its_sizes(lib):
    """A DENSE plan asks for the dense saved state (g and u of every row): the hybrid size is refused."""
    T = Tensors()
    a = _fwd_args(T)
    a["saved_bytes"] = _size(lib, lib.twell_train_saved_size, _plan(lib, path=1), 4)
    plans = {path: _plan(lib, path=path) for path in (0, 1, 2)}
    _status(lib, _forward(lib, plans[2], a), "TWELL_ERROR_INVALID_ARGUMENT", "saved is too small")
    if not _has_gpu(lib):
        for path in (0, 1, 2):
            _status(lib, _forward(lib, plans[path], _fwd_args(T)), "TWELL_ERROR_NO_DEVICE")
        dh = _plan(lib, w_down_layout=1)
        _status(lib, _forward(lib, dh, _fwd_args(T, dh=True)), "TWELL_ERROR_NO_DEVICE")


def _bwd_args(T, m=4, d=2048, h=5632):
    return dict(dy=T((m, d), data=FAKE), x=T((m, d), data=FAKE + STEP), wg=T((h, d), data=FAKE + 2 * STEP),
                wu=T((h, d), data=FAKE + 3 * STEP), wd=T((h, d), data=FAKE + 4 * STEP),
                dx=T((m, d), data=FAKE + 5 * STEP), dwg=T((h, d), data=FAKE + 6 * STEP),
                dwu=T((h, d), data=FAKE + 7 * STEP), dwd=T((h, d), data=FAKE + 8 * STEP),
                stats=T((16,), "u64", data=FAKE + 9 * STEP), saved=FAKE + 10 * STEP, saved_bytes=1 << 31,
                ws=FAKE + 11 * STEP, ws_bytes=1 << 31, c=0.01, acc=0)


def _backward(lib, plan, a):
    ffi = _ffi.ffi
    return lib.twell_train_backward(plan, a["dy"], a["c"], a["x"], a["wg"], a["wu"], a["wd"],
                                    ffi.cast("void *", a["saved"]), a["saved_bytes"], a["dx"], a["dwg"], a["dwu"],
                                    a["dwd"], a["acc"], a["stats"], ffi.cast("void *", a["ws"]), a["ws_bytes"],
                                    ffi.NULL)


@pytest.mark.parametrize("case,expected,fragments", [
    ("x_rows", "TWELL_ERROR_INVALID_ARGUMENT", ["x has shape [5, 2048], expected [4, 2048]"]),
    ("dx_shape", "TWELL_ERROR_INVALID_ARGUMENT", ["dx has shape [4, 1024], expected [4, 2048]"]),
    ("dwd_layout", "TWELL_ERROR_INVALID_ARGUMENT",
     ["dw_down (layout TWELL_LAYOUT_HD, [H, D]) has shape [2048, 5632], expected [5632, 2048]"]),
    ("dwg_alias_wg", "TWELL_ERROR_INVALID_ARGUMENT", ["dw_gate overlaps w_gate"]),
    ("nan_coeff", "TWELL_ERROR_INVALID_ARGUMENT", ["l1_coeff is nan, expected a finite float"]),
    ("accumulate", "TWELL_ERROR_INVALID_ARGUMENT", ["accumulate is 2, expected 0 or 1"]),
    ("saved_small", "TWELL_ERROR_INVALID_ARGUMENT", ["saved is too small", "twell_train_saved_size"]),
    ("workspace_small", "TWELL_ERROR_WORKSPACE", ["workspace is too small", "twell_train_workspace_size"]),
])
def test_train_backward_rejects(lib, case, expected, fragments):
    T = Tensors()
    a = _bwd_args(T)
    if case == "x_rows":
        a["x"] = T((5, 2048), data=FAKE + STEP)
    elif case == "dx_shape":
        a["dx"] = T((4, 1024), data=FAKE + 5 * STEP)
    elif case == "dwd_layout":
        a["dwd"] = T((2048, 5632), data=FAKE + 8 * STEP)
    elif case == "dwg_alias_wg":
        a["dwg"] = T((5632, 2048), data=FAKE + 2 * STEP)
    elif case == "nan_coeff":
        a["c"] = float("nan")
    elif case == "accumulate":
        a["acc"] = 2
    elif case == "saved_small":
        a["saved_bytes"] = 1000
    elif case == "workspace_small":
        a["ws_bytes"] = 1000
    plan = _plan(lib)
    _status(lib, _backward(lib, plan, a), expected, *fragments)
    if case == "x_rows" and not _has_gpu(lib):
        _status(lib, _backward(lib, plan, _bwd_args(T)), "TWELL_ERROR_NO_DEVICE")


def _backward_scaled(lib, plan, a, scale):
    ffi = _ffi.ffi
    return lib.twell_train_backward_scaled(plan, a["dy"], a["c"], scale, a["x"], a["wg"], a["wu"], a["wd"],
                                           ffi.cast("void *", a["saved"]), a["saved_bytes"], a["dx"], a["dwg"],
                                           a["dwu"], a["dwd"], a["acc"], a["stats"], ffi.cast("void *", a["ws"]),
                                           a["ws_bytes"], ffi.NULL)


@pytest.mark.parametrize("case,fragments", [
    ("host", ["l1_scale is in", "host"]),
    ("dtype", ["l1_scale has dtype bfloat16, expected float32"]),
    ("shape", ["l1_scale has shape [2], expected [1]"]),
    ("alias_dx", ["dx overlaps l1_scale"]),
])
def test_train_backward_scaled_checks_the_l1_scale(lib, case, fragments):
    """The device-side L1 coefficient (the autograd gradient of the forward's l1) is checked like
    every tensor: CUDA memory, float32 [1], not overlapping an output."""
    T = Tensors()
    a = _bwd_args(T)
    if case == "host":
        scale = T((1,), "f32", data=FAKE + 12 * STEP, device_type=1)
    elif case == "dtype":
        scale = T((1,), "bf16", data=FAKE + 12 * STEP)
    elif case == "shape":
        scale = T((2,), "f32", data=FAKE + 12 * STEP)
    else:
        scale = T((1,), "f32", data=FAKE + 5 * STEP)  # = dx's data
    plan = _plan(lib)  # bound: a plan destroyed before the message is read would clear it
    _status(lib, _backward_scaled(lib, plan, a, scale), "TWELL_ERROR_INVALID_ARGUMENT", *fragments)
    if case == "host" and not _has_gpu(lib):  # valid arguments (NULL scale, or a device scale): no device
        _status(lib, _backward_scaled(lib, plan, _bwd_args(T), _ffi.ffi.NULL), "TWELL_ERROR_NO_DEVICE")
        _status(lib, _backward_scaled(lib, plan, _bwd_args(T), T((1,), "f32", data=FAKE + 12 * STEP)),
                "TWELL_ERROR_NO_DEVICE")


def test_train_replay_controls(lib):
    """Replay of repeated eager calls: on by default, 0..64 graphs, counts and the last route readable
    without a GPU (nothing has run: 0 replays, 0 captures, no route yet)."""
    plan = _plan(lib)
    r, c, route = _ffi.ffi.new("int64_t *"), _ffi.ffi.new("int64_t *"), _ffi.ffi.new("int32_t *")
    assert lib.twell_train_plan_replay_counts(plan, r, c) == 0 and (r[0], c[0]) == (0, 0)
    assert lib.twell_train_plan_last_route(plan, route) == 0 and route[0] == 0
    assert lib.twell_train_plan_set_replay(plan, 0) == 0 and lib.twell_train_plan_set_replay(plan, 64) == 0
    _status(lib, lib.twell_train_plan_set_replay(plan, 65), "TWELL_ERROR_INVALID_ARGUMENT", "max_graphs is 65")
    _status(lib, lib.twell_train_plan_set_replay(plan, -1), "TWELL_ERROR_INVALID_ARGUMENT", "max_graphs is -1")
    _status(lib, lib.twell_train_plan_set_replay(_ffi.ffi.NULL, 8), "TWELL_ERROR_INVALID_ARGUMENT", "plan is NULL")
    _status(lib, lib.twell_train_plan_replay_counts(_ffi.ffi.NULL, r, c), "TWELL_ERROR_INVALID_ARGUMENT",
            "plan is NULL")
    _status(lib, lib.twell_train_plan_last_route(plan, _ffi.ffi.NULL), "TWELL_ERROR_INVALID_ARGUMENT", "path is NULL")


def test_train_plan_python_replay_controls(lib):
    from twell import train_ops

    plan = train_ops.TrainPlan(2048, 5632)
    assert plan.replay_counts() == (0, 0) and plan.last_route() is None
    plan.set_replay(0)
    with pytest.raises(_ffi.InvalidArgumentError, match="max_graphs is 100"):
        plan.set_replay(100)
    with pytest.raises(_ffi.InvalidArgumentError, match="max_graphs"):
        plan.set_replay(1.5)
