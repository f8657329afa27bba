"""The C/C++ route of the README: the examples build with find_package(twell) against the installed
package's CMake config (``twell --cmake-dir``) and run (without a GPU they say so and exit 0)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import library_required

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _cmake_dir():
    from twell import _ffi

    for d in _ffi._package_dirs():
        if (d / "cmake" / "twellConfig.cmake").is_file():
            return d / "cmake"
    return None


def _tool(name):
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    return found


def test_cli_prints_the_cmake_dir():
    cm = _cmake_dir()
    r = subprocess.run([sys.executable, "-m", "twell.cli", "--cmake-dir"], capture_output=True, text=True)
    if cm is None:
        assert r.returncode == 1 and "no CMake package config" in r.stderr
    else:
        assert r.returncode == 0 and Path(r.stdout.strip()) == cm


def test_c_and_cpp_examples_build_and_run_against_the_installed_package(tmp_path):
    cm = _cmake_dir()
    if cm is None:
        if library_required() and os.environ.get("TWELL_REQUIRE_CMAKE_CONFIG") == "1":
            pytest.fail("the installed package has no CMake config")
        pytest.skip("twell is not installed as a package with its library (e.g. run from the source tree)")
    cmake = _tool("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    env = dict(os.environ)
    gen = ["-G", "Ninja"] if _tool("ninja") else []
    cfg = subprocess.run([cmake, "-S", str(EXAMPLES), "-B", str(tmp_path), *gen, f"-Dtwell_DIR={cm}"],
                         capture_output=True, text=True, env=env)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    build = subprocess.run([cmake, "--build", str(tmp_path)], capture_output=True, text=True, env=env)
    assert build.returncode == 0, build.stdout + build.stderr
    for exe in ("ffn_c", "ffn_cpp"):
        r = subprocess.run([str(tmp_path / exe)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "no GPU" in r.stdout or "active" in r.stdout, r.stdout
