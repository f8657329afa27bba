"""The CUDA sources depend on each other one way only (CPU, reads the #include lines).

Layers, highest first; a file may include headers of its own folder and of any lower layer:

    capi                               the C ABI: argument checks, status mapping
    ffn, train                         the inference and training pipelines
    gate_gemm, sparse_ffn, fallback    one folder per kernel operation
    format                             the TwELL format: packer, unpacker, overflow compaction
                                       (the portable gate GEMM packs with it)
    common                             shared device helpers, error plumbing, PDL, PTX wrappers

Folders of one layer never include each other (ffn and train share code through a lower
layer), no file includes upward, and the public header include/twell/twell.h, which every
layer may include, includes nothing from cuda/. Every quoted include must resolve to a file,
so a header that moves without its includes being fixed fails here too.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA = ROOT / "cuda"
PUBLIC_HEADER = ROOT / "include" / "twell" / "twell.h"
SEARCH_PATH = (CUDA, ROOT / "include")  # the library's -I directories, in order

LAYER = {
    "capi": 4,
    "ffn": 3,
    "train": 3,
    "gate_gemm": 2,
    "sparse_ffn": 2,
    "fallback": 2,
    "format": 1,
    "common": 0,
}

# Known violations, each with a comment saying why and to be removed when fixed:
# (including file, included header). None at present.
ALLOWED: set[tuple[str, str]] = set()

INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]')
SOURCE_SUFFIXES = {".h", ".cuh", ".cu", ".cpp", ".c"}


def _includes(path: Path):
    """(line number, delimiter, name) of every #include of `path`."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = INCLUDE.match(line)
        if match:
            yield number, match.group(1), match.group(2)


def _resolve(including: Path, name: str) -> Path | None:
    for folder in (including.parent, *SEARCH_PATH):
        candidate = (folder / name).resolve()
        if candidate.is_file():
            return candidate
    return None


def _layer_of(path: Path) -> str | None:
    """The cuda/ folder of `path`, or None for the public header."""
    if path == PUBLIC_HEADER.resolve():
        return None
    return path.relative_to(CUDA).parts[0]


def _rel(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix()


def _sources():
    return sorted(p for p in CUDA.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file())


def test_every_source_is_in_a_layer():
    outside = sorted({_rel(p) for p in _sources() if len(p.relative_to(CUDA).parts) < 2 or _layer_of(p) not in LAYER})
    assert not outside, "files outside the known layers (add the folder to LAYER): " + ", ".join(outside)


def test_includes_point_down():
    problems = []
    used_allowances = set()
    for source in _sources():
        here = _layer_of(source)
        if here not in LAYER:
            continue  # reported by test_every_source_is_in_a_layer
        for number, delim, name in _includes(source):
            target = _resolve(source, name)
            if target is None:
                if delim == '"':
                    problems.append(f"{_rel(source)}:{number} -> {name} (does not resolve)")
                continue  # a system header
            if not target.is_relative_to(ROOT):
                continue
            if target != PUBLIC_HEADER.resolve() and not target.is_relative_to(CUDA):
                problems.append(f"{_rel(source)}:{number} -> {name} (outside cuda/ and include/)")
                continue
            there = _layer_of(target)
            if there is None or there == here:
                continue  # the public header, or the same folder
            if there in LAYER and LAYER[there] < LAYER[here]:
                continue
            if (_rel(source), name) in ALLOWED:
                used_allowances.add((_rel(source), name))
                continue
            kind = "sideways" if LAYER.get(there) == LAYER[here] else "upward"
            problems.append(f"{_rel(source)}:{number} -> {name} ({here} -> {there}, {kind})")
    stale = sorted(ALLOWED - used_allowances)
    assert not problems, "includes against the layering:\n  " + "\n  ".join(problems)
    assert not stale, f"allow-list entries that no longer occur (remove them): {stale}"


def test_public_header_includes_only_system_headers():
    problems = [
        f"{_rel(PUBLIC_HEADER)}:{number} -> {name}"
        for number, delim, name in _includes(PUBLIC_HEADER)
        if delim == '"' or (CUDA / name).is_file()
    ]
    assert not problems, "the public header must include only system headers:\n  " + "\n  ".join(problems)
