"""twell: activation-sparse transformer feed-forward kernels.

The SDK (mirrors the C ABI of include/twell/twell.h):

* ``twell.format``    NumPy TwELL encoder/decoder (the executable spec)
* ``twell.reference`` NumPy float64 FFN forward/backward with the L1 term (the oracle)
* ``twell.ops``       inference ops over any ``__dlpack__`` CUDA array (CuPy, PyTorch, ...)
* ``twell.train_ops`` training forward/backward with the L1 term over the same arrays
* ``twell.torch``     PyTorch custom ops (autograd, torch.compile, CUDA graphs)

Around it:

* ``twell.lm``        the NumPy reference LM (model, training, corpus, sparsity instruments, demo)
* ``twell.bench``     the benchmark drivers (``twell bench``, ``bench-train``, ``bench-torch``)
* ``twell.cli``       the ``twell`` command (info, demo, train-ref, bench, ...)

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


def _version() -> str:
    """The header's TWELL_VERSION_* (the one place the version is written), else the installed metadata."""
    from . import _ffi

    c = _ffi.constants
    if "TWELL_VERSION_MAJOR" in c:
        return f"{c['TWELL_VERSION_MAJOR']}.{c['TWELL_VERSION_MINOR']}.{c['TWELL_VERSION_PATCH']}"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("twell")
    except PackageNotFoundError:
        return "unknown"


__version__ = _version()


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
