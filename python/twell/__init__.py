"""twell: activation-sparse transformer feed-forward kernels.

* ``twell.format``    NumPy TwELL encoder/decoder (the executable spec)
* ``twell.reference`` NumPy float64 FFN forward/backward with the L1 term (the oracle)
* ``twell.ops``       GPU ops over any ``__dlpack__`` CUDA array (CuPy, PyTorch, ...)
* ``twell.cli``       the ``twell`` command (info, demo, train-ref, bench)

The NumPy parts work without a GPU or the compiled library;
``twell.available()`` says whether the kernels can run.
"""

from __future__ import annotations

from . import format, reference  # noqa: F401  (pure NumPy, always importable)
from ._ffi import (  # noqa: F401
    CublasError,
    CudaError,
    InternalError,
    InvalidArgumentError,
    NoDeviceError,
    OutOfMemoryError,
    TwellError,
    UnsupportedError,
    WorkspaceError,
)

__version__ = "0.1.0"


def library_available() -> bool:
    """True when libtwell was found and loaded (it may still see no GPU)."""
    from . import _ffi

    return _ffi.lib is not None


def available() -> bool:
    """True when the kernels can run: the library is loaded and a CUDA GPU is visible."""
    from . import _ffi

    if _ffi.lib is None:
        return False
    n = _ffi.ffi.new("int32_t *")
    return _ffi.lib.twell_device_count(n) == 0 and n[0] > 0


def why_unavailable() -> str | None:
    """None when available(), else a sentence saying why the kernels cannot run."""
    from . import _ffi

    if _ffi.lib is None:
        return _ffi.unavailable_reason
    n = _ffi.ffi.new("int32_t *")
    status = _ffi.lib.twell_device_count(n)
    if status != 0:
        return _ffi.ffi.string(_ffi.lib.twell_last_error()).decode()
    return None
