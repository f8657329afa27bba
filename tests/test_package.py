"""The Python package's habits: one version, option tables from the header, plan keys, one-way imports."""

import ast
import importlib.metadata
import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import tomllib

import twell
from twell import _ffi, _options, _plans, format, ops, train_ops

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "include" / "twell" / "twell.h"
PACKAGE = Path(twell.__file__).resolve().parent


def _header_version() -> str:
    c = _ffi.constants
    return f"{c['TWELL_VERSION_MAJOR']}.{c['TWELL_VERSION_MINOR']}.{c['TWELL_VERSION_PATCH']}"


# ---------------------------------------------------------------------------
# One version: the header's TWELL_VERSION_*; everything else reads it or must agree with it.
# ---------------------------------------------------------------------------
def test_header_version_words_agree():
    c = _ffi.constants
    assert c["TWELL_VERSION"] == c["TWELL_VERSION_MAJOR"] * 10000 + c["TWELL_VERSION_MINOR"] * 100 + \
        c["TWELL_VERSION_PATCH"]


def test_python_version_is_the_headers():
    assert twell.__version__ == _header_version()


def test_pyproject_reads_the_version_from_the_header():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in cfg["project"] and "version" in cfg["project"]["dynamic"]
    meta = cfg["tool"]["scikit-build"]["metadata"]["version"]
    assert meta["provider"] == "scikit_build_core.metadata.regex"
    assert (ROOT / meta["input"]).resolve() == HEADER.resolve()
    # what scikit-build-core's regex provider does with these settings
    m = re.search(meta["regex"], HEADER.read_text(), re.MULTILINE)
    assert m is not None, "the pyproject regex no longer matches twell.h"
    assert meta["result"].format(*m.groups(), **m.groupdict()) == _header_version()


def test_cmake_project_version_agrees():
    text = (ROOT / "CMakeLists.txt").read_text()
    m = re.search(r"project\(twell VERSION (\S+)", text)
    assert m is not None
    literal = m.group(1)
    if re.fullmatch(r"[0-9.]+", literal):  # written out: must be the header's
        assert literal == _header_version()
    else:  # read from the header (file(STRINGS ...)): make sure it is twell.h that is read
        assert "include/twell/twell.h" in text and "TWELL_VERSION_" in text


def test_changelog_top_entry_is_the_current_version():
    m = re.search(r"^## \[?(\d+\.\d+\.\d+)", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert m is not None and m.group(1) == _header_version()


def test_library_and_installed_metadata_agree():
    if _ffi.lib is not None:
        assert _ffi.lib.twell_version() == _ffi.constants["TWELL_VERSION"]
    try:
        dist = importlib.metadata.distribution("twell")
    except importlib.metadata.PackageNotFoundError:
        return  # a source checkout on PYTHONPATH: nothing installed to compare
    files = [f for f in (dist.files or []) if str(f).endswith("twell/__init__.py")]
    if files and Path(dist.locate_file(files[0])).resolve().parent == PACKAGE:
        assert dist.version == twell.__version__


# ---------------------------------------------------------------------------
# Option tables and statistics words come from the header.
# ---------------------------------------------------------------------------
def test_option_tables_are_the_header_enums():
    c = _ffi.constants
    assert _options.LAYOUTS == {"hd": c["TWELL_LAYOUT_HD"], "dh": c["TWELL_LAYOUT_DH"]}
    assert _options.PATHS == {"auto": c["TWELL_PATH_AUTO"], "sparse": c["TWELL_PATH_SPARSE"],
                              "dense": c["TWELL_PATH_DENSE"]}
    assert _options.TRAIN_PATHS == {**_options.PATHS, "hybrid": c["TWELL_PATH_SPARSE"]}
    assert _options.KERNELS == {"auto": c["TWELL_KERNELS_AUTO"], "portable": c["TWELL_KERNELS_PORTABLE"],
                                "sm90": c["TWELL_KERNELS_SM90"]}


def test_stats_fields_cover_every_word_in_order():
    c = _ffi.constants
    assert len(_options.STATS_FIELDS) == c["TWELL_STATS_WORDS"]
    assert len(_options.TRAIN_STATS_FIELDS) == c["TWELL_TRAIN_STATS_WORDS"]
    for i, name in enumerate(_options.TRAIN_STATS_FIELDS):
        word = c.get(f"TWELL_STAT_{name.upper()}", c.get(f"TWELL_TSTAT_{name.upper()}"))
        assert word == i, name
    assert ops.read_stats(np.arange(8, dtype=np.uint64)) == {k: i for i, k in enumerate(_options.STATS_FIELDS)}
    assert train_ops.TRAIN_STATS_FIELDS is _options.TRAIN_STATS_FIELDS


def test_numpy_spec_agrees_with_the_header():
    c = _ffi.constants
    assert format.TILE_COLS == c["TWELL_TILE_COLS"]
    assert format.FORMAT_VERSION == c["TWELL_FORMAT_VERSION"]
    stats = format.encode(np.ones((2, 300), np.float32)).stats
    assert tuple(stats) == _options.STATS_FIELDS
    assert stats["format"] == c["TWELL_FORMAT_VERSION"]


def test_python_defaults_are_the_headers():
    c = _ffi.constants
    for fn in (ops.ffn, ops.gate_pack, ops.FFNPlan, ops.TwellFFN, train_ops.forward, train_ops.TrainPlan):
        params = inspect.signature(fn).parameters
        if "slots" in params:
            assert params["slots"].default == c["TWELL_SLOTS_DEFAULT"], fn
        if "ell_width" in params:
            assert params["ell_width"].default == c["TWELL_TRAIN_ELL_WIDTH_DEFAULT"], fn


def test_error_classes_carry_the_header_status_codes():
    for cls in (_ffi.InvalidArgumentError, _ffi.UnsupportedError, _ffi.NoDeviceError, _ffi.CudaError,
                _ffi.OutOfMemoryError, _ffi.WorkspaceError, _ffi.CublasError, _ffi.InternalError):
        name = "TWELL_ERROR_" + re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__[:-len("Error")]).upper()
        assert cls.status == _ffi.constants[name], cls


@pytest.mark.parametrize("table,value,code", [(_options.PATHS, "dense", 2), (_options.PATHS, 2, 2),
                                              (_options.TRAIN_PATHS, "hybrid", 1), (_options.KERNELS, "sm90", 2)])
def test_option_code_accepts_names_and_codes(table, value, code):
    assert _options.option_code(table, "opt", value) == code


@pytest.mark.parametrize("value", ["fast", 7, True, None, 1.0])
def test_option_code_names_the_option(value):
    with pytest.raises(twell.InvalidArgumentError, match=r"^path must be one of \['auto', 'dense', 'sparse'\]"):
        _options.option_code(_options.PATHS, "path", value)


# ---------------------------------------------------------------------------
# Plan keys: callers share a plan (and its AUTO history) only when they pass the same key.
# ---------------------------------------------------------------------------
def test_plan_cache_keys():
    cache = _plans.PlanCache()
    k1, k2 = _plans.new_plan_key(), _plans.new_plan_key()
    assert 0 < k1 < k2
    shape = (64, 256, 0, ())
    a = cache.get((0,) + shape, object)
    assert cache.get((0,) + shape, object) is a  # key 0: the shared anonymous plan
    b, c = cache.get((k1,) + shape, object), cache.get((k2,) + shape, object)
    assert len({id(a), id(b), id(c)}) == 3
    cache.release(k1)
    assert cache.get((k1,) + shape, object) is not b
    assert cache.get((k2,) + shape, object) is c


def test_functional_entry_points_take_a_plan_key():
    for fn in (ops.ffn, ops.gate_pack, train_ops.forward):
        assert inspect.signature(fn).parameters["plan"].default == 0, fn
    assert ops.new_plan_key is _plans.new_plan_key and train_ops.new_plan_key is _plans.new_plan_key


# ---------------------------------------------------------------------------
# Layout: the SDK never imports the reference LM or the benchmark drivers.
# ---------------------------------------------------------------------------
def _imported_from(path: Path):
    """(module file or package folder, imported names) of each ``from X import ...`` inside twell."""
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = path.parents[node.level - 1]
        elif (node.module or "").split(".")[0] == "twell":
            base, node.module = PACKAGE, ".".join(node.module.split(".")[1:])
        else:
            continue
        target = base.joinpath(*node.module.split(".")) if node.module else base
        yield target, [a.name for a in node.names]


def test_sdk_does_not_import_lm_or_bench():
    sdk = [p for p in PACKAGE.glob("*.py") if p.name != "cli.py"] + list((PACKAGE / "torch").glob("*.py"))
    for path in sdk:
        for target, names in _imported_from(path):
            parts = {target.name} | {n for n in names if target == PACKAGE}
            assert not parts & {"lm", "bench"}, f"{path.relative_to(PACKAGE)} imports {target.name} {names}"


def test_no_module_imports_a_private_name_of_another():
    """Shared helpers live in private modules (``_arrays``, ``_options``, ...) under public names;
    a ``_name`` imported from a public module is a helper that should move there."""
    for path in PACKAGE.rglob("*.py"):
        for target, names in _imported_from(path):
            if target.name.startswith("_"):
                continue
            private = [n for n in names if n.startswith("_") and not (target / f"{n}.py").exists()
                       and not (target / n).is_dir()]
            assert not private, f"{path.relative_to(PACKAGE)} imports {private} from {target.name}"
