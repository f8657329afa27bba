"""GPU ops over any CUDA array that implements ``__dlpack__`` (CuPy, PyTorch, JAX, ...).

Arrays are borrowed through DLPack (no copy) and the kernels run on the
current stream of the array's framework (CuPy's current stream, PyTorch's
``torch.cuda.current_stream()``; the legacy default stream for others).
Outputs are allocated through the framework of the first input (CuPy or
PyTorch) unless given with ``out=``/``packed=``/... . bf16 arrays: CuPy uses
``ml_dtypes.bfloat16``, PyTorch ``torch.bfloat16``.

Failures raise ``twell.TwellError`` subclasses that carry the library's
message (``InvalidArgumentError`` names the argument).
"""

from __future__ import annotations

from . import _ffi
from ._arrays import (
    Borrowed,
    check_array,
    check_int,
    current_stream,
    device_of,
    empty,
    framework,
    host_words,
    is_torch,
    shape2,
    workspace,
    zeros,
)
from ._options import KERNELS, LAYOUTS, PATHS, STATS_FIELDS, option_code
from ._plans import PlanCache, new_plan_key
from .format import tiles_for

__all__ = ["pack", "unpack", "read_stats", "FFNPlan", "ffn", "gate_pack", "TwellFFN", "new_plan_key", "release",
           "current_stream"]

def read_stats(stats) -> dict:
    """Device statistics tensor (uint64[8]) -> dict (synchronises with the device)."""
    if stats is None or not hasattr(stats, "shape"):
        raise _ffi.InvalidArgumentError(f"stats must be a uint64[8] array, got {type(stats).__name__}")
    if tuple(stats.shape) != (len(STATS_FIELDS),):
        raise _ffi.InvalidArgumentError(f"stats has shape {tuple(stats.shape)}, expected ({len(STATS_FIELDS)},)")
    return {k: int(v) for k, v in zip(STATS_FIELDS, host_words(stats))}


def pack(pre, slots: int = 32, *, packed=None, overflow_rows=None, stats=None):
    """Dense pre-activations [M, H] (fp32 or bf16) -> (packed, overflow_rows, stats) on the GPU.

    The first ``stats['overflow_rows']`` entries of overflow_rows are valid.
    """
    lib = _ffi.require()
    check_array(pre, "pre")
    m, h = shape2(pre, "pre", "[M, H]")
    slots = check_int(slots, "slots")
    words = tiles_for(h) * slots
    if packed is None:
        packed = empty(pre, (m, words), "uint32")
    if overflow_rows is None:
        overflow_rows = empty(pre, (m,), "int32")
    if stats is None:
        stats = empty(pre, (8,), "uint64")
    nbytes = _ffi.ffi.new("size_t *")
    _ffi.check(lib.twell_pack_workspace_size(m, nbytes))
    ws, ws_ptr = workspace(pre, nbytes[0])
    b = Borrowed(current_stream(pre))
    _ffi.check(lib.twell_pack(b(pre, "pre"), slots, b(packed, "packed"), b(overflow_rows, "overflow_rows"),
                              b(stats, "stats"), _ffi.ffi.cast("void *", ws_ptr), nbytes[0],
                              _ffi.ffi.cast("void *", b.stream)))
    return packed, overflow_rows, stats


def unpack(packed, hidden: int, slots: int = 32, *, out=None):
    """TwELL -> dense bf16 [M, hidden] (stored entries only)."""
    lib = _ffi.require()
    check_array(packed, "packed")
    m, _ = shape2(packed, "packed", "[M, words]")
    hidden = check_int(hidden, "hidden", 1)
    slots = check_int(slots, "slots")
    if out is None:
        out = empty(packed, (m, hidden), "bfloat16")
    b = Borrowed(current_stream(packed))
    _ffi.check(lib.twell_unpack(b(packed, "packed"), slots, b(out, "out"), _ffi.ffi.cast("void *", b.stream)))
    return out


class FFNPlan:
    """A twell_ffn_plan: shapes and options fixed, weights passed per call.

    ``run(x, w_gate, w_up, w_down)`` returns y; ``gate_pack(x, w)`` returns the
    TwELL of relu(x w^T). The plan keeps a workspace buffer between calls
    (grown as needed). With ``path="auto"`` each call's route follows this plan's previous call.
    Not thread-safe: use one plan per thread.
    """

    def __init__(self, d_model: int, hidden: int, *, gated: bool = True, slots: int = 32,
                 w_down_layout: str = "hd", path: str = "auto", kernels: str = "auto",
                 chunk_rows: int = 0, dense_threshold: float = 0.012, device: int = 0):
        lib = _ffi.require()
        d_model = check_int(d_model, "d_model")
        hidden = check_int(hidden, "hidden")
        slots = check_int(slots, "slots")
        chunk_rows = check_int(chunk_rows, "chunk_rows")
        device = check_int(device, "device")
        if isinstance(dense_threshold, bool) or not isinstance(dense_threshold, (int, float)):
            raise _ffi.InvalidArgumentError(f"dense_threshold must be a float, got {type(dense_threshold).__name__}")
        layout = option_code(LAYOUTS, "w_down_layout", w_down_layout)
        path_code = option_code(PATHS, "path", path)
        kernels_code = option_code(KERNELS, "kernels", kernels)
        opt = _ffi.ffi.new("twell_ffn_options *")
        _ffi.check(lib.twell_ffn_options_default(opt))
        opt.gated = 1 if gated else 0
        opt.slots = slots
        opt.w_down_layout = layout
        opt.path = path_code
        opt.kernels = kernels_code
        opt.chunk_rows = chunk_rows
        opt.dense_threshold = dense_threshold
        handle = _ffi.ffi.new("twell_ffn_plan **")
        _ffi.check(lib.twell_ffn_plan_create(handle, d_model, hidden, opt, device))
        self._plan = _ffi.ffi.gc(handle[0], lib.twell_ffn_plan_destroy)
        self.d_model, self.hidden, self.gated, self.slots = d_model, hidden, gated, slots
        self.device = device
        self._ws = None
        self._ws_ptr = 0
        self._ws_bytes = 0

    def workspace_size(self, rows: int) -> int:
        n = _ffi.ffi.new("size_t *")
        _ffi.check(_ffi.lib.twell_ffn_workspace_size(self._plan, int(rows), n))
        return int(n[0])

    def _workspace_for(self, ref, rows: int):
        need = self.workspace_size(rows)
        if self._ws is None or self._ws_bytes < need or framework(self._ws) != framework(ref):
            self._ws, self._ws_ptr = workspace(ref, need)
            self._ws_bytes = need
        return self._ws_ptr, self._ws_bytes

    def run(self, x, w_gate, w_up, w_down, *, out=None, stats=None):
        check_array(x, "x")
        m, _ = shape2(x, "x")
        for name, arr in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
            if arr is not None or name != "w_gate":
                check_array(arr, name)
        if out is None:
            out = empty(x, (m, self.d_model), "bfloat16")
        ws_ptr, ws_bytes = self._workspace_for(x, m)
        b = Borrowed(current_stream(x))
        _ffi.check(_ffi.lib.twell_ffn_run(self._plan, b(x, "x"), b(w_gate, "w_gate"), b(w_up, "w_up"),
                                          b(w_down, "w_down"), b(out, "out"), b(stats, "stats"),
                                          _ffi.ffi.cast("void *", ws_ptr), ws_bytes,
                                          _ffi.ffi.cast("void *", b.stream)))
        return out

    def gate_pack(self, x, w, *, packed=None, overflow_rows=None, stats=None):
        check_array(x, "x")
        check_array(w, "w")
        m, _ = shape2(x, "x")
        if packed is None:
            packed = empty(x, (m, tiles_for(self.hidden) * self.slots), "uint32")
        if overflow_rows is None:
            overflow_rows = empty(x, (m,), "int32")
        if stats is None:
            stats = empty(x, (8,), "uint64")
        ws_ptr, ws_bytes = self._workspace_for(x, m)
        b = Borrowed(current_stream(x))
        _ffi.check(_ffi.lib.twell_gate_pack(self._plan, b(x, "x"), b(w, "w"), b(packed, "packed"),
                                            b(overflow_rows, "overflow_rows"), b(stats, "stats"),
                                            _ffi.ffi.cast("void *", ws_ptr), ws_bytes,
                                            _ffi.ffi.cast("void *", b.stream)))
        return packed, overflow_rows, stats


_PLANS = PlanCache()


def _plan_for(plan_key, d_model, hidden, device, **options) -> FFNPlan:
    plan_key = check_int(plan_key, "plan", 0)
    key = (plan_key, d_model, hidden, device, tuple(sorted(options.items())))
    return _PLANS.get(key, lambda: FFNPlan(d_model, hidden, device=device, **options))


def release(plan: int) -> None:
    """Drop the plans (and workspaces) that ``ffn`` and ``gate_pack`` made for plan key ``plan``."""
    _PLANS.release(plan)


def ffn(x, w_gate, w_up, w_down, *, gated: bool = True, slots: int = 32, w_down_layout: str = "hd",
        path: str = "auto", kernels: str = "auto", plan: int = 0, out=None, stats=None):
    """y = FFN(x) with TwELL sparsity.

    gated: y = (relu(x w_gate^T) * (x w_up^T)) W_d; non-gated (w_gate=None): y = relu(x w_up^T) W_d.
    W_d is w_down as [H, D] (w_down_layout="hd") or nn.Linear's [D, H] ("dh").

    Plans are cached by ``plan`` (a key), shape, options and device. ``plan=0`` (default) is one
    anonymous plan per shape and options, shared by every caller that passes no key: with
    ``path="auto"`` their calls steer one route history, and the plan is one thread's at a time.
    Pass a key of your own (``new_plan_key()``) for separate plans and AUTO history, or hold a
    ``TwellFFN`` / ``FFNPlan``.
    """
    if is_torch(x) and out is None and stats is None:  # PyTorch: the custom op's fast path (twell.torch)
        from .torch import ffn as torch_ffn

        return torch_ffn(x, w_gate if gated else None, w_up, w_down, w_down_layout=w_down_layout, slots=slots,
                         path=path, kernels=kernels, plan=plan)
    check_array(x, "x")
    check_array(w_up, "w_up")
    _, d_model = shape2(x, "x")
    hidden, _ = shape2(w_up, "w_up", "[H, D]")
    ffn_plan = _plan_for(plan, d_model, hidden, device_of(x)[1], gated=gated, slots=slots,
                         w_down_layout=w_down_layout, path=path, kernels=kernels)
    return ffn_plan.run(x, w_gate if gated else None, w_up, w_down, out=out, stats=stats)


def gate_pack(x, w, *, slots: int = 32, kernels: str = "auto", plan: int = 0):
    """(packed, overflow_rows, stats) = TwELL(relu(x w^T)) through the gate GEMM kernels.

    Plans are cached by ``plan``, shape and options as in ``ffn``."""
    check_array(x, "x")
    check_array(w, "w")
    _, d_model = shape2(x, "x")
    hidden, _ = shape2(w, "w", "[H, D]")
    gate_plan = _plan_for(plan, d_model, hidden, device_of(x)[1], gated=True, slots=slots,
                          w_down_layout="hd", path="sparse", kernels=kernels)
    return gate_plan.gate_pack(x, w)


class TwellFFN:
    """A sparse FFN layer holding its weights (bf16 CUDA arrays of one framework) and its own plan
    (so its AUTO route history is its own, never another caller's).

    >>> layer = TwellFFN(w_gate, w_up, w_down)           # w_down as [H, D]
    >>> y = layer(x)
    >>> layer.last_stats()                              # synchronises; zeros before the first call

    PyTorch weights run through the custom op (``twell.torch``, host time of a few microseconds
    per call); other frameworks through DLPack.
    """

    def __init__(self, w_gate, w_up, w_down, *, w_down_layout: str = "hd", slots: int = 32,
                 path: str = "auto", kernels: str = "auto"):
        for name, arr in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
            if arr is not None or name != "w_gate":
                check_array(arr, name)
        self.w_gate, self.w_up, self.w_down = w_gate, w_up, w_down
        self.gated = w_gate is not None
        hidden, d_model = shape2(w_up, "w_up", "[H, D]")
        self.options = dict(w_down_layout=w_down_layout, slots=slots, path=path, kernels=kernels)
        self._torch = is_torch(w_up)
        if self._torch:
            from .torch import _runtime as rt

            self.plan_key = rt.new_plan_key()
            self._runner = rt.ffn_runner(self.plan_key, d_model, hidden, device_of(w_up)[1], self.gated, slots,
                                         option_code(PATHS, "path", path), option_code(KERNELS, "kernels", kernels))
            option_code(LAYOUTS, "w_down_layout", w_down_layout)  # named error now rather than at the first call
            self.plan = None
        else:
            self.plan = FFNPlan(d_model, hidden, gated=self.gated, slots=slots, w_down_layout=w_down_layout,
                                path=path, kernels=kernels, device=device_of(w_up)[1])
            self._stats = zeros(w_up, (len(STATS_FIELDS),), "uint64")

    def __call__(self, x, *, out=None):
        if self._torch and out is None:
            from .torch import ffn as torch_ffn

            return torch_ffn(x, self.w_gate, self.w_up, self.w_down, plan=self.plan_key, **self.options)
        if self._torch:
            raise _ffi.InvalidArgumentError("out= is not supported for PyTorch layers (the op allocates y)")
        return self.plan.run(x, self.w_gate, self.w_up, self.w_down, out=out, stats=self._stats)

    def last_stats(self) -> dict:
        if self._torch:
            return self._runner.last_stats()
        return read_stats(self._stats)
