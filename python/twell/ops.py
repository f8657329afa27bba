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

import ctypes

import numpy as np

from . import _ffi
from .format import STATS_FIELDS, tiles_for

__all__ = ["pack", "unpack", "read_stats", "FFNPlan", "ffn", "gate_pack", "TwellFFN"]

_capsule_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_get_pointer.restype = ctypes.c_void_p
_capsule_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.restype = ctypes.c_int
_capsule_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]

# DLManagedTensorVersioned: {DLPackVersion (8 B), manager_ctx, deleter, flags (8 B each)} then DLTensor.
_VERSIONED_DLTENSOR_OFFSET = 32

_LAYOUTS = {"hd": 0, "dh": 1}
_PATHS = {"auto": 0, "sparse": 1, "dense": 2}
_KERNELS = {"auto": 0, "portable": 1, "sm90": 2}


def _framework(arr) -> str:
    mod = type(arr).__module__.split(".")[0]
    if mod in ("cupy", "torch"):
        return mod
    if mod in ("jax", "jaxlib"):
        return "jax"
    return mod


def _is_torch(arr) -> bool:
    return type(arr).__module__.split(".")[0] == "torch"


def _check_array(arr, name: str):
    """A named error for anything that is not a CUDA array (before DLPack or the library see it)."""
    if arr is None:
        raise _ffi.InvalidArgumentError(f"{name} is None, expected a CUDA array")
    if not hasattr(arr, "__dlpack__") or not hasattr(arr, "__dlpack_device__"):
        raise _ffi.InvalidArgumentError(
            f"{name} must be a CUDA array implementing __dlpack__ (CuPy, PyTorch, JAX), got {type(arr).__name__}")
    dev_type = int(arr.__dlpack_device__()[0])
    if dev_type != 2:  # kDLCUDA
        where = {1: "host memory (CPU)", 3: "pinned host memory", 13: "CUDA managed memory"}.get(
            dev_type, f"DLPack device type {dev_type}")
        hint = " (cupy.asarray(...) or torch.as_tensor(..., device='cuda') copies it to the GPU)" if dev_type == 1 else ""
        raise _ffi.InvalidArgumentError(
            f"{name} is a {type(arr).__name__} in {where}; twell's kernels need CUDA device arrays{hint}")


def _shape2(arr, name: str, what: str = "[M, D]"):
    shape = tuple(int(s) for s in arr.shape)
    if len(shape) != 2:
        raise _ffi.InvalidArgumentError(f"{name} must be 2-D {what}, got shape {shape}")
    return shape


def _check_int(value, name: str, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise _ffi.InvalidArgumentError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise _ffi.InvalidArgumentError(f"{name} is {value}, expected >= {low}")
    return int(value)


def _device_of(arr):
    if hasattr(arr, "__dlpack_device__"):
        dev_type, dev_id = arr.__dlpack_device__()
        return int(dev_type), int(dev_id)
    raise _ffi.InvalidArgumentError(f"{type(arr).__name__} does not implement __dlpack__ (expected a CUDA array)")


def current_stream(arr) -> int:
    """The stream (as an integer cudaStream_t) that ops on ``arr`` run on."""
    fw = _framework(arr)
    if fw == "cupy":
        import cupy

        return int(cupy.cuda.get_current_stream().ptr)
    if fw == "torch":
        import torch

        if arr.is_cuda:
            return int(torch.cuda.current_stream(arr.device).cuda_stream)
    return 0


class _Borrowed:
    """DLTensor views of arrays, kept alive (with their capsules) for one call."""

    def __init__(self, stream: int):
        self.stream = stream
        self._keep = []

    def __call__(self, arr, name: str = "array"):
        if arr is None:
            return _ffi.ffi.NULL
        if _framework(arr) == "torch" and getattr(arr, "requires_grad", False):
            arr = arr.detach()
        _check_array(arr, name)
        dev_type = _device_of(arr)[0]
        try:
            if dev_type == 2:  # CUDA: make the producer's work visible on our stream
                capsule = arr.__dlpack__(stream=self.stream if self.stream else 1)
            else:
                capsule = arr.__dlpack__()
        except TypeError:
            capsule = arr.__dlpack__()
        except BufferError as exc:
            raise _ffi.InvalidArgumentError(f"cannot export {type(arr).__name__} through DLPack: {exc}") from exc
        if _capsule_is_valid(capsule, b"dltensor"):
            ptr = _capsule_get_pointer(capsule, b"dltensor")
        elif _capsule_is_valid(capsule, b"dltensor_versioned"):
            ptr = _capsule_get_pointer(capsule, b"dltensor_versioned") + _VERSIONED_DLTENSOR_OFFSET
        else:
            raise _ffi.InvalidArgumentError("__dlpack__ returned a capsule that is not a DLPack tensor")
        self._keep.append((arr, capsule))
        return _ffi.ffi.cast("DLTensor *", ptr)


def _empty_like_framework(ref, shape, dtype: str):
    """A new CUDA array on ref's device, from ref's framework (CuPy for others)."""
    fw = _framework(ref)
    dev_type, dev = _device_of(ref)
    if dev_type == 1:  # host array: allocate on the host too (the library will refuse it by name)
        return np.empty(tuple(shape), dtype=np.uint16 if dtype == "bfloat16" else np.dtype(dtype))
    if fw == "torch":
        import torch

        tdt = {"bfloat16": torch.bfloat16, "uint32": torch.uint32, "int32": torch.int32,
               "uint64": torch.uint64, "uint8": torch.uint8, "float32": torch.float32}[dtype]
        return torch.empty(tuple(shape), dtype=tdt, device=f"cuda:{dev}")
    import cupy

    if dtype == "bfloat16":
        import ml_dtypes

        npdt = ml_dtypes.bfloat16
    else:
        npdt = np.dtype(dtype)
    with cupy.cuda.Device(dev):
        out = cupy.empty(tuple(shape), dtype=npdt)
    if fw not in ("cupy",):
        mod = __import__(fw)
        from_dlpack = getattr(getattr(mod, "numpy", mod), "from_dlpack", None) or getattr(mod, "from_dlpack", None)
        if from_dlpack is not None:
            return from_dlpack(out)
    return out


def _workspace(ref, nbytes: int):
    """uint8 device buffer of at least nbytes, 256-byte aligned (returns (array, pointer))."""
    buf = _empty_like_framework(ref, (max(int(nbytes), 1) + 256,), "uint8")
    ptr = _data_ptr(buf)
    pad = (-ptr) % 256
    return buf, ptr + pad


def _data_ptr(arr) -> int:
    fw = _framework(arr)
    if fw == "torch":
        return int(arr.data_ptr())
    if fw == "cupy":
        return int(arr.data.ptr)
    if isinstance(arr, np.ndarray):
        return int(arr.ctypes.data)
    b = _Borrowed(0)
    t = b(arr)
    return int(_ffi.ffi.cast("uintptr_t", t.data)) + int(t.byte_offset)


def _zeros_like_framework(ref, shape, dtype: str):
    out = _empty_like_framework(ref, shape, dtype)
    out[...] = 0
    return out


def read_stats(stats) -> dict:
    """Device statistics tensor (uint64[8]) -> dict (synchronises with the device)."""
    if stats is None or not hasattr(stats, "shape"):
        raise _ffi.InvalidArgumentError(f"stats must be a uint64[8] array, got {type(stats).__name__}")
    if tuple(stats.shape) != (len(STATS_FIELDS),):
        raise _ffi.InvalidArgumentError(f"stats has shape {tuple(stats.shape)}, expected ({len(STATS_FIELDS)},)")
    fw = _framework(stats)
    if fw == "torch":
        host = stats.cpu().view(__import__("torch").int64).numpy().view(np.uint64)
    elif fw == "cupy":
        host = stats.get()
    else:
        host = np.asarray(stats)
    return {k: int(v) for k, v in zip(STATS_FIELDS, host.astype(np.uint64))}


def pack(pre, slots: int = 32, *, packed=None, overflow_rows=None, stats=None):
    """Dense pre-activations [M, H] (fp32 or bf16) -> (packed, overflow_rows, stats) on the GPU.

    The first ``stats['overflow_rows']`` entries of overflow_rows are valid.
    """
    lib = _ffi.require()
    _check_array(pre, "pre")
    m, h = _shape2(pre, "pre", "[M, H]")
    slots = _check_int(slots, "slots")
    words = tiles_for(h) * slots
    if packed is None:
        packed = _empty_like_framework(pre, (m, words), "uint32")
    if overflow_rows is None:
        overflow_rows = _empty_like_framework(pre, (m,), "int32")
    if stats is None:
        stats = _empty_like_framework(pre, (8,), "uint64")
    nbytes = _ffi.ffi.new("size_t *")
    _ffi.check(lib.twell_pack_workspace_size(m, nbytes))
    ws, ws_ptr = _workspace(pre, nbytes[0])
    b = _Borrowed(current_stream(pre))
    _ffi.check(lib.twell_pack(b(pre, "pre"), slots, b(packed, "packed"), b(overflow_rows, "overflow_rows"), b(stats, "stats"),
                              _ffi.ffi.cast("void *", ws_ptr), nbytes[0], _ffi.ffi.cast("void *", b.stream)))
    return packed, overflow_rows, stats


def unpack(packed, hidden: int, slots: int = 32, *, out=None):
    """TwELL -> dense bf16 [M, hidden] (stored entries only)."""
    lib = _ffi.require()
    _check_array(packed, "packed")
    m, _ = _shape2(packed, "packed", "[M, words]")
    hidden = _check_int(hidden, "hidden", 1)
    slots = _check_int(slots, "slots")
    if out is None:
        out = _empty_like_framework(packed, (m, hidden), "bfloat16")
    b = _Borrowed(current_stream(packed))
    _ffi.check(lib.twell_unpack(b(packed, "packed"), slots, b(out, "out"), _ffi.ffi.cast("void *", b.stream)))
    return out


class FFNPlan:
    """A twell_ffn_plan: shapes and options fixed, weights passed per call.

    ``run(x, w_gate, w_up, w_down)`` returns y; ``gate_pack(x, w)`` returns the
    TwELL of relu(x w^T). The plan keeps a workspace buffer between calls
    (grown as needed). Not thread-safe: use one plan per thread.
    """

    def __init__(self, d_model: int, hidden: int, *, gated: bool = True, slots: int = 32,
                 w_down_layout: str = "hd", path: str = "auto", kernels: str = "auto",
                 chunk_rows: int = 0, dense_threshold: float = 0.008, device: int = 0):
        lib = _ffi.require()
        d_model = _check_int(d_model, "d_model")
        hidden = _check_int(hidden, "hidden")
        slots = _check_int(slots, "slots")
        chunk_rows = _check_int(chunk_rows, "chunk_rows")
        device = _check_int(device, "device")
        if isinstance(dense_threshold, bool) or not isinstance(dense_threshold, (int, float)):
            raise _ffi.InvalidArgumentError(f"dense_threshold must be a float, got {type(dense_threshold).__name__}")
        if w_down_layout not in _LAYOUTS:
            raise _ffi.InvalidArgumentError(f"w_down_layout must be one of {sorted(_LAYOUTS)}, got {w_down_layout!r}")
        if path not in _PATHS:
            raise _ffi.InvalidArgumentError(f"path must be one of {sorted(_PATHS)}, got {path!r}")
        if kernels not in _KERNELS:
            raise _ffi.InvalidArgumentError(f"kernels must be one of {sorted(_KERNELS)}, got {kernels!r}")
        opt = _ffi.ffi.new("twell_ffn_options *")
        _ffi.check(lib.twell_ffn_options_default(opt))
        opt.gated = 1 if gated else 0
        opt.slots = slots
        opt.w_down_layout = _LAYOUTS[w_down_layout]
        opt.path = _PATHS[path]
        opt.kernels = _KERNELS[kernels]
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
        if self._ws is None or self._ws_bytes < need or _framework(self._ws) != _framework(ref):
            self._ws, self._ws_ptr = _workspace(ref, need)
            self._ws_bytes = need
        return self._ws_ptr, self._ws_bytes

    def run(self, x, w_gate, w_up, w_down, *, out=None, stats=None):
        _check_array(x, "x")
        m, _ = _shape2(x, "x")
        for name, arr in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
            if arr is not None or name != "w_gate":
                _check_array(arr, name)
        if out is None:
            out = _empty_like_framework(x, (m, self.d_model), "bfloat16")
        ws_ptr, ws_bytes = self._workspace_for(x, m)
        b = _Borrowed(current_stream(x))
        _ffi.check(_ffi.lib.twell_ffn_run(self._plan, b(x, "x"), b(w_gate, "w_gate"), b(w_up, "w_up"),
                                          b(w_down, "w_down"), b(out, "out"), b(stats, "stats"),
                                          _ffi.ffi.cast("void *", ws_ptr), ws_bytes,
                                          _ffi.ffi.cast("void *", b.stream)))
        return out

    def gate_pack(self, x, w, *, packed=None, overflow_rows=None, stats=None):
        _check_array(x, "x")
        _check_array(w, "w")
        m, _ = _shape2(x, "x")
        if packed is None:
            packed = _empty_like_framework(x, (m, tiles_for(self.hidden) * self.slots), "uint32")
        if overflow_rows is None:
            overflow_rows = _empty_like_framework(x, (m,), "int32")
        if stats is None:
            stats = _empty_like_framework(x, (8,), "uint64")
        ws_ptr, ws_bytes = self._workspace_for(x, m)
        b = _Borrowed(current_stream(x))
        _ffi.check(_ffi.lib.twell_gate_pack(self._plan, b(x, "x"), b(w, "w"), b(packed, "packed"),
                                            b(overflow_rows, "overflow_rows"), b(stats, "stats"),
                                            _ffi.ffi.cast("void *", ws_ptr), ws_bytes,
                                            _ffi.ffi.cast("void *", b.stream)))
        return packed, overflow_rows, stats


_PLANS: dict = {}


def _plan_for(d_model, hidden, device, **options) -> FFNPlan:
    key = (d_model, hidden, device, tuple(sorted(options.items())))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = FFNPlan(d_model, hidden, device=device, **options)
    return plan


def ffn(x, w_gate, w_up, w_down, *, gated: bool = True, slots: int = 32, w_down_layout: str = "hd",
        path: str = "auto", kernels: str = "auto", out=None, stats=None):
    """y = FFN(x) with TwELL sparsity (plans are cached per shape and options).

    gated: y = (relu(x w_gate^T) * (x w_up^T)) W_d; non-gated (w_gate=None): y = relu(x w_up^T) W_d.
    W_d is w_down as [H, D] (w_down_layout="hd") or nn.Linear's [D, H] ("dh").
    """
    if _is_torch(x) and out is None and stats is None:  # PyTorch: the custom op's fast path (twell.torch)
        from .torch import ffn as torch_ffn

        return torch_ffn(x, w_gate if gated else None, w_up, w_down, w_down_layout=w_down_layout, slots=slots,
                         path=path, kernels=kernels)
    _check_array(x, "x")
    _check_array(w_up, "w_up")
    _, d_model = _shape2(x, "x")
    hidden, _ = _shape2(w_up, "w_up", "[H, D]")
    plan = _plan_for(d_model, hidden, _device_of(x)[1], gated=gated, slots=slots,
                     w_down_layout=w_down_layout, path=path, kernels=kernels)
    return plan.run(x, w_gate if gated else None, w_up, w_down, out=out, stats=stats)


def gate_pack(x, w, *, slots: int = 32, kernels: str = "auto"):
    """(packed, overflow_rows, stats) = TwELL(relu(x w^T)) through the gate GEMM kernels."""
    _check_array(x, "x")
    _check_array(w, "w")
    _, d_model = _shape2(x, "x")
    hidden, _ = _shape2(w, "w", "[H, D]")
    plan = _plan_for(d_model, hidden, _device_of(x)[1], gated=True, slots=slots,
                     w_down_layout="hd", path="sparse", kernels=kernels)
    return plan.gate_pack(x, w)


class TwellFFN:
    """A sparse FFN layer holding its weights (bf16 CUDA arrays of one framework) and its own plan.

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
                _check_array(arr, name)
        self.w_gate, self.w_up, self.w_down = w_gate, w_up, w_down
        self.gated = w_gate is not None
        hidden, d_model = _shape2(w_up, "w_up", "[H, D]")
        self.options = dict(w_down_layout=w_down_layout, slots=slots, path=path, kernels=kernels)
        self._torch = _is_torch(w_up)
        if self._torch:
            from .torch import _runtime as rt

            self.plan_key = rt.new_plan_key()
            self._runner = rt.ffn_runner(self.plan_key, d_model, hidden, _device_of(w_up)[1], self.gated, slots,
                                         rt.option_code(rt._PATHS, "path", path),
                                         rt.option_code(rt._KERNELS, "kernels", kernels))
            self._layout = rt.option_code(rt._LAYOUTS, "w_down_layout", w_down_layout)
            self.plan = None
        else:
            self.plan = FFNPlan(d_model, hidden, gated=self.gated, slots=slots, w_down_layout=w_down_layout,
                                path=path, kernels=kernels, device=_device_of(w_up)[1])
            self._stats = _zeros_like_framework(w_up, (len(STATS_FIELDS),), "uint64")

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
