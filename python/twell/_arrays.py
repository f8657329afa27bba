"""CUDA arrays of any framework, for the ops modules (``ops``, ``train_ops``): named argument checks,
DLPack borrowing, the caller's stream, and allocation through the first input's framework.

Private: the public entry points are in :mod:`twell.ops` and :mod:`twell.train_ops`.
"""

from __future__ import annotations

import ctypes

import numpy as np

from . import _ffi

_capsule_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_get_pointer.restype = ctypes.c_void_p
_capsule_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.restype = ctypes.c_int
_capsule_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]

# DLManagedTensorVersioned: {DLPackVersion (8 B), manager_ctx, deleter, flags (8 B each)} then DLTensor.
_VERSIONED_DLTENSOR_OFFSET = 32


def framework(arr) -> str:
    """The array's framework by its type's top-level module: "cupy", "torch", "jax", ..."""
    mod = type(arr).__module__.split(".")[0]
    if mod in ("cupy", "torch"):
        return mod
    if mod in ("jax", "jaxlib"):
        return "jax"
    return mod


def is_torch(arr) -> bool:
    return framework(arr) == "torch"


def check_array(arr, name: str):
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
        hint = ""
        if dev_type == 1:
            hint = " (cupy.asarray(...) or torch.as_tensor(..., device='cuda') copies it to the GPU)"
        raise _ffi.InvalidArgumentError(
            f"{name} is a {type(arr).__name__} in {where}; twell's kernels need CUDA device arrays{hint}")


def shape2(arr, name: str, what: str = "[M, D]"):
    """The shape of a 2-D array, or a named error saying which shape (``what``) was expected."""
    shape = tuple(int(s) for s in arr.shape)
    if len(shape) != 2:
        raise _ffi.InvalidArgumentError(f"{name} must be 2-D {what}, got shape {shape}")
    return shape


def check_int(value, name: str, low: int | None = None) -> int:
    """value as an int (bools and floats refused by name), at least ``low`` when given."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise _ffi.InvalidArgumentError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise _ffi.InvalidArgumentError(f"{name} is {value}, expected >= {low}")
    return int(value)


def device_of(arr):
    """(DLPack device type, device id) of an array."""
    if hasattr(arr, "__dlpack_device__"):
        dev_type, dev_id = arr.__dlpack_device__()
        return int(dev_type), int(dev_id)
    raise _ffi.InvalidArgumentError(f"{type(arr).__name__} does not implement __dlpack__ (expected a CUDA array)")


def current_stream(arr) -> int:
    """The stream (as an integer cudaStream_t) that ops on ``arr`` run on."""
    fw = framework(arr)
    if fw == "cupy":
        import cupy

        return int(cupy.cuda.get_current_stream().ptr)
    if fw == "torch":
        import torch

        if arr.is_cuda:
            return int(torch.cuda.current_stream(arr.device).cuda_stream)
    return 0


class Borrowed:
    """DLTensor views of arrays, kept alive (with their capsules) for one call."""

    def __init__(self, stream: int):
        self.stream = stream
        self._keep = []

    def __call__(self, arr, name: str = "array"):
        if arr is None:
            return _ffi.ffi.NULL
        if is_torch(arr) and getattr(arr, "requires_grad", False):
            arr = arr.detach()
        check_array(arr, name)
        dev_type = device_of(arr)[0]
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


def empty(ref, shape, dtype: str):
    """A new CUDA array on ref's device, from ref's framework (CuPy for others)."""
    fw = framework(ref)
    dev_type, dev = device_of(ref)
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


def workspace(ref, nbytes: int):
    """uint8 device buffer of at least nbytes, 256-byte aligned (returns (array, pointer))."""
    buf = empty(ref, (max(int(nbytes), 1) + 256,), "uint8")
    ptr = data_ptr(buf)
    pad = (-ptr) % 256
    return buf, ptr + pad


def data_ptr(arr) -> int:
    fw = framework(arr)
    if fw == "torch":
        return int(arr.data_ptr())
    if fw == "cupy":
        return int(arr.data.ptr)
    if isinstance(arr, np.ndarray):
        return int(arr.ctypes.data)
    b = Borrowed(0)
    t = b(arr)
    return int(_ffi.ffi.cast("uintptr_t", t.data)) + int(t.byte_offset)


def zeros(ref, shape, dtype: str):
    out = empty(ref, shape, dtype)
    out[...] = 0
    return out


def host_words(stats) -> np.ndarray:
    """A device statistics tensor's words as host uint64 (synchronises with the device)."""
    fw = framework(stats)
    if fw == "torch":
        import torch

        return stats.cpu().view(torch.int64).numpy().view(np.uint64)
    if fw == "cupy":
        return stats.get().astype(np.uint64)
    return np.asarray(stats).astype(np.uint64)
