"""cffi (ABI mode) bindings of libtwell, declared from the public header.

The header's block between ``CDEF-BEGIN`` and ``CDEF-END`` is the single
source of truth: it is stripped of comments and of preprocessor lines (other
than ``#define NAME <integer>``) and fed to ``ffi.cdef``. The library is
looked up next to this module (wheel installs), in the package's search path
(editable installs), in ``build/`` of a source checkout, or at
``$TWELL_LIBRARY``.

``lib`` is None when the library is missing or cannot be loaded;
``unavailable_reason`` then says why. ``constants`` (the header's integer
``#define``s and enum values by name) needs only the header.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
from pathlib import Path

import cffi

__all__ = [
    "ffi",
    "lib",
    "header_path",
    "library_path",
    "unavailable_reason",
    "cdef_source",
    "constants",
    "TwellError",
    "InvalidArgumentError",
    "UnsupportedError",
    "NoDeviceError",
    "CudaError",
    "OutOfMemoryError",
    "WorkspaceError",
    "CublasError",
    "InternalError",
    "check",
    "require",
]

_PKG_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _PKG_DIR.parent.parent


def _package_dirs():
    dirs = [_PKG_DIR]
    spec = importlib.util.find_spec("twell")
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p) for p in spec.submodule_search_locations]
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _find_header():
    for d in _package_dirs():
        p = d / "include" / "twell" / "twell.h"
        if p.is_file():
            return p
    p = _REPO_ROOT / "include" / "twell" / "twell.h"
    return p if p.is_file() else None


def cdef_source(header_text: str) -> str:
    """The cffi declarations taken from the header's CDEF block."""
    m = re.search(r"/\* CDEF-BEGIN \*/(.*)/\* CDEF-END \*/", header_text, re.S)
    if m is None:
        raise RuntimeError("twell.h has no CDEF-BEGIN/CDEF-END block")
    text = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    lines = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            if re.fullmatch(r"#define\s+\w+\s+-?\d+", s):
                lines.append(s)
            continue
        lines.append(line.replace("TWELL_API ", ""))
    return "\n".join(lines)


def _find_library():
    env = os.environ.get("TWELL_LIBRARY")
    if env:
        return Path(env)
    for d in _package_dirs():
        for name in ("libtwell.so",):
            p = d / name
            if p.is_file():
                return p
    hits = sorted(glob.glob(str(_REPO_ROOT / "build" / "**" / "libtwell.so*"), recursive=True),
                  key=os.path.getmtime, reverse=True)
    return Path(hits[0]) if hits else None


def _no_kernels_reason():
    for d in _package_dirs():
        p = d / "NO_KERNELS.txt"
        if p.is_file():
            return "the CUDA library was not built: " + p.read_text().strip()
    return None


def _preload_cublaslt():
    """Make libcublasLt.so.13 from the nvidia-cublas wheel findable by libtwell's dlopen."""
    if os.environ.get("TWELL_CUBLASLT_PATH"):
        return
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations if spec and spec.submodule_search_locations else []):
        p = Path(base) / "cu13" / "lib" / "libcublasLt.so.13"
        if p.is_file():
            os.environ["TWELL_CUBLASLT_PATH"] = str(p)
            return


def _integer_constants(cdef: str) -> dict:
    """The integer #defines of the CDEF block and the values of its enums (as cffi parsed them)."""
    out = {name: int(value) for name, value in re.findall(r"^#define\s+(\w+)\s+(-?\d+)\s*$", cdef, re.M)}
    for enum in re.findall(r"typedef\s+enum\s*\{[^}]*\}\s*(\w+)\s*;", cdef):
        out.update(ffi.typeof(enum).relements)
    return out


ffi = cffi.FFI()
header_path = _find_header()
library_path = None
lib = None
unavailable_reason = None
constants: dict = {}

if header_path is None:
    unavailable_reason = "twell.h was not found (broken install?)"
else:
    _cdef = cdef_source(header_path.read_text())
    ffi.cdef(_cdef)
    constants = _integer_constants(_cdef)
    library_path = _find_library()
    if library_path is None:
        unavailable_reason = _no_kernels_reason() or (
            "libtwell.so was not found (build it with `pip install .` or CMake, or set TWELL_LIBRARY)")
    else:
        try:
            _preload_cublaslt()
            lib = ffi.dlopen(str(library_path))
        except OSError as exc:  # pragma: no cover - depends on the machine
            unavailable_reason = f"libtwell could not be loaded from {library_path}: {exc}"


class TwellError(RuntimeError):
    """A twell call failed; ``status`` is the library's status code."""

    status = None

    def __init__(self, message, status=None):
        super().__init__(message)
        if status is not None:
            self.status = status


class InvalidArgumentError(TwellError, ValueError):
    status = 1


class UnsupportedError(TwellError, NotImplementedError):
    status = 2


class NoDeviceError(TwellError):
    status = 3


class CudaError(TwellError):
    status = 4


class OutOfMemoryError(TwellError, MemoryError):
    status = 5


class WorkspaceError(TwellError, ValueError):
    status = 6


class CublasError(TwellError):
    status = 7


class InternalError(TwellError):
    status = 8


_BY_STATUS = {c.status: c for c in (InvalidArgumentError, UnsupportedError, NoDeviceError, CudaError,
                                    OutOfMemoryError, WorkspaceError, CublasError, InternalError)}


def require():
    """The loaded library, or raise UnsupportedError saying why there is none."""
    if lib is None:
        raise UnsupportedError(f"twell's CUDA library is unavailable: {unavailable_reason}")
    return lib


def check(status: int) -> None:
    """Raise the TwellError subclass for a non-zero status, with the library's message."""
    if status == 0:
        return
    name = ffi.string(lib.twell_status_string(status)).decode()
    message = ffi.string(lib.twell_last_error()).decode()
    cls = _BY_STATUS.get(int(status), TwellError)
    raise cls(f"{name}: {message}", int(status))
