"""Shared test setup: GPU tests skip cleanly without a GPU; every test logs its seed."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import numpy as np
import pytest

# Prefer the installed package (it carries libtwell); fall back to the source tree.
try:
    import twell  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))


def _gpu_reason():
    try:
        import twell
    except Exception as exc:  # pragma: no cover
        return f"twell import failed: {exc}"
    why = twell.why_unavailable()
    if why is not None:
        return f"no CUDA GPU / kernels: {why}"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no GPU"
    except Exception as exc:
        return f"CuPy unavailable: {exc}"
    return None


_GPU_SKIP = None


def pytest_configure(config):
    """TWELL_TEST_NO_POOL=1 (set by the compute-sanitizer step of bench/run_gpu.sh): every CuPy
    array is its own cudaMalloc, so memcheck sees the true end of each buffer instead of a pool slab."""
    if os.environ.get("TWELL_TEST_NO_POOL") == "1":
        try:
            import cupy

            cupy.cuda.set_allocator(None)
            cupy.cuda.set_pinned_memory_allocator(None)
        except Exception:  # no CuPy: the GPU tests skip anyway
            pass


def pytest_collection_modifyitems(config, items):
    global _GPU_SKIP
    if any("gpu" in item.keywords for item in items):
        _GPU_SKIP = _gpu_reason()
        if _GPU_SKIP is not None:
            marker = pytest.mark.skip(reason=_GPU_SKIP)
            for item in items:
                if "gpu" in item.keywords:
                    item.add_marker(marker)


@pytest.fixture
def rng(request):
    """A fresh random generator per test; the seed is printed (shown on failure) and can be pinned."""
    seed = int(os.environ.get("TWELL_TEST_SEED", secrets.randbits(32)))
    print(f"[seed] {request.node.nodeid}: TWELL_TEST_SEED={seed}")
    return np.random.default_rng(seed)


def library_required() -> bool:
    """CI sets TWELL_REQUIRE_LIBRARY=1: then a missing libtwell fails instead of skipping."""
    return os.environ.get("TWELL_REQUIRE_LIBRARY") == "1"
