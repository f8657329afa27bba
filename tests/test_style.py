"""The tree follows its own style configuration: ruff (pyproject.toml) over the Python sources and
clang-format (.clang-format) over the C, C++ and CUDA sources. Both tools come with the test extra
(``pip install ".[test]"``); the checks skip where a tool is missing."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
C_DIRS = ("cuda", "include", "tests/c", "tests/cuda", "bench", "examples")
C_SUFFIXES = {".c", ".cc", ".cpp", ".cu", ".cuh", ".h"}


def _tool(name):
    """The tool beside this Python (a venv's bin/) or on PATH."""
    exe = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if exe is None:
        pytest.skip(f"{name} is not installed (pip install '.[test]')")
    return exe


def test_ruff_finds_nothing():
    r = subprocess.run([_tool("ruff"), "check", "--no-cache", "python", "tests", "bench"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_c_and_cuda_sources_are_clang_formatted():
    files = sorted(str(p.relative_to(ROOT)) for d in C_DIRS for p in (ROOT / d).rglob("*")
                   if p.suffix in C_SUFFIXES and "results" not in p.parts)
    assert len(files) > 30
    r = subprocess.run([_tool("clang-format"), "--dry-run", "--Werror", *files], cwd=ROOT, capture_output=True,
                       text=True)
    bad = sorted({line.split(":")[0] for line in r.stderr.splitlines() if ": error:" in line})
    assert r.returncode == 0, f"not clang-formatted (run clang-format -i on them): {bad}"
