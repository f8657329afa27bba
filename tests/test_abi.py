"""One source of truth: the header, the exported symbols and the cffi declarations agree."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import twell
from conftest import library_required
from twell import _ffi

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "include" / "twell" / "twell.h"


def _declared_functions():
    text = _ffi.cdef_source(HEADER.read_text())
    return set(re.findall(r"\b(twell_\w+)\s*\(", text))


def _need_library():
    if _ffi.lib is None:
        if library_required():
            pytest.fail(f"libtwell is required here but unavailable: {_ffi.unavailable_reason}")
        pytest.skip(f"libtwell not built: {_ffi.unavailable_reason}")


def test_header_is_c99_clean(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "use.c"
    src.write_text('#include "twell/twell.h"\nint main(void) { return twell_version() == TWELL_VERSION ? 0 : 1; }\n')
    subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fsyntax-only",
                    f"-I{ROOT / 'include'}", str(src)], check=True)


def test_header_compiles_after_dlpack_h(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    # a minimal stand-in for dlpack.h: twell.h must then skip its own DLPack structs
    (tmp_path / "dlpack.h").write_text(
        "#define DLPACK_MAJOR_VERSION 1\n#include <stdint.h>\n"
        "typedef enum { kDLCPU = 1, kDLCUDA = 2 } DLDeviceType;\n"
        "typedef struct { DLDeviceType device_type; int32_t device_id; } DLDevice;\n"
        "typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } DLDataType;\n"
        "typedef struct { void* data; DLDevice device; int32_t ndim; DLDataType dtype; int64_t* shape;"
        " int64_t* strides; uint64_t byte_offset; } DLTensor;\n")
    src = tmp_path / "use.c"
    src.write_text('#include "dlpack.h"\n#include "twell/twell.h"\nint main(void) { return 0; }\n')
    subprocess.run([cc, "-std=c99", "-Wall", "-Werror", "-fsyntax-only", f"-I{tmp_path}",
                    f"-I{ROOT / 'include'}", str(src)], check=True)


def test_cdef_parses_and_declares_every_function():
    funcs = _declared_functions()
    assert {"twell_version", "twell_last_error", "twell_pack", "twell_unpack", "twell_ffn_run",
            "twell_ffn_plan_create", "twell_gate_pack"} <= funcs
    assert _ffi.ffi.sizeof("DLTensor") == 48
    assert _ffi.ffi.sizeof("twell_device_info") >= 256


def test_exported_symbols_match_header():
    _need_library()
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm")
    out = subprocess.run([nm, "-D", "--defined-only", str(_ffi.library_path)], check=True,
                         capture_output=True, text=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.strip()}
    exported = {s for s in exported if not s.startswith("_") or s.startswith("twell")}
    assert exported == _declared_functions(), (
        f"only exported: {sorted(exported - _declared_functions())}; "
        f"only declared: {sorted(_declared_functions() - exported)}")


def test_every_declared_function_resolves_through_cffi():
    _need_library()
    for name in _declared_functions():
        assert getattr(_ffi.lib, name) is not None


def test_versions_and_status_strings():
    _need_library()
    lib = _ffi.lib
    assert lib.twell_version() == lib.TWELL_VERSION
    assert _ffi.ffi.string(lib.twell_status_string(0)) == b"TWELL_SUCCESS"
    assert _ffi.ffi.string(lib.twell_status_string(6)) == b"TWELL_ERROR_WORKSPACE"
    assert _ffi.ffi.string(lib.twell_status_string(99)) == b"TWELL_STATUS_UNKNOWN"
    info = _ffi.ffi.string(lib.twell_build_info()).decode()
    assert f"twell {twell.__version__}" in info and f"format v{lib.TWELL_FORMAT_VERSION}" in info


def test_library_links_cuda_runtime_statically():
    _need_library()
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("no readelf")
    out = subprocess.run([readelf, "-d", str(_ffi.library_path)], check=True, capture_output=True, text=True).stdout
    needed = re.findall(r"\(NEEDED\).*\[(.*)\]", out)
    assert not any("cudart" in n for n in needed), needed
    assert not any("cublas" in n for n in needed), needed  # loaded with dlopen at run time


def test_fatbin_has_sm80_and_sm90a():
    _need_library()
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump is None:
        pytest.skip("cuobjdump not installed (pip install nvidia-cuda-cuobjdump)")
    out = subprocess.run([cuobjdump, "--list-elf", str(_ffi.library_path)], capture_output=True, text=True).stdout
    assert "sm_80" in out and "sm_90a" in out, out


def test_c_program_against_the_library(tmp_path):
    """tests/c/test_c_abi.c: a C99 user of the header, linked against libtwell, run here."""
    _need_library()
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    lib_dir = Path(_ffi.library_path).parent
    exe = tmp_path / "test_c_abi"
    subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", f"-I{ROOT / 'include'}",
                    str(ROOT / "tests" / "c" / "test_c_abi.c"), str(_ffi.library_path),
                    f"-Wl,-rpath,{lib_dir}", "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout
