"""A training corpus that needs no download.

The default corpus is the source text (code, comments and docstrings) of a pinned list of pure-Python
standard-library modules: they ship with every CPython, so every user already has them. Tokens are
bytes (vocabulary 256), so no tokenizer is involved.

Reproducibility: the bytes of those files differ between Python versions (the standard library is
edited between releases), so every result records ``sha256`` of the exact corpus bytes and the
Python version that produced them. Two runs with the same hash trained on the same bytes; two runs
with different hashes say why their numbers may differ. A module missing from an installation (some
distributions strip sources) is skipped and listed in ``missing``; the hash covers what was used.

Split: each file is cut at 90% of its length; the first part goes to training, the rest to
validation, and the parts are concatenated in the pinned order. (Cutting the concatenation once
would make the validation set one or two whole modules, a different distribution.) A user's text
file (``Corpus.from_file``) is split the same way, as a single file.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass, field

import numpy as np

__all__ = ["STDLIB_FILES", "VAL_FRACTION", "Corpus", "load_corpus", "stdlib_corpus", "text_corpus"]

#: Pinned list of standard-library source files (paths relative to the stdlib directory), in the
#: order they are concatenated. Chosen to exist, as single files, in CPython 3.8 to 3.13.
STDLIB_FILES: tuple[str, ...] = (
    "argparse.py", "ast.py", "bisect.py", "calendar.py", "configparser.py", "contextlib.py",
    "copy.py", "csv.py", "dataclasses.py", "datetime.py", "difflib.py", "enum.py", "fractions.py",
    "functools.py", "heapq.py", "inspect.py", "ipaddress.py", "json/__init__.py",
    "json/decoder.py", "json/encoder.py", "logging/__init__.py", "optparse.py", "pickle.py",
    "posixpath.py", "pprint.py", "queue.py", "random.py", "shutil.py", "statistics.py",
    "string.py", "subprocess.py", "tarfile.py", "tempfile.py", "textwrap.py", "threading.py",
    "tokenize.py", "traceback.py", "typing.py", "collections/__init__.py", "_pydecimal.py",
)

#: Fraction of each file (its tail) that goes to the validation split.
VAL_FRACTION = 0.1

#: Bytes written between files, so the model sees where one ends.
SEPARATOR = b"\n\n# ==== next file ====\n\n"


@dataclass
class Corpus:
    """Byte-level corpus with a fixed train/validation split.

    ``train`` and ``val`` are uint8 arrays of byte tokens. ``meta`` is JSON-serialisable and is
    recorded with every result: source, sha256 of the whole corpus (all files in order, before the
    split), sizes, Python version, files used and missing.
    """

    train: np.ndarray
    val: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return self.meta["sha256"]


def _split(parts: list[bytes], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    train_chunks, val_chunks = [], []
    for i, data in enumerate(parts):
        cut = len(data) - int(round(len(data) * val_fraction))
        sep = SEPARATOR if i + 1 < len(parts) else b""
        train_chunks.append(data[:cut] + sep)
        val_chunks.append(data[cut:] + sep)
    train = np.frombuffer(b"".join(train_chunks), dtype=np.uint8).copy()
    val = np.frombuffer(b"".join(val_chunks), dtype=np.uint8).copy()
    return train, val


def _build(parts: list[bytes], meta: dict, val_fraction: float) -> Corpus:
    h = hashlib.sha256()
    for i, data in enumerate(parts):
        h.update(data)
        if i + 1 < len(parts):
            h.update(SEPARATOR)
    train, val = _split(parts, val_fraction)
    meta = dict(meta)
    meta.update(
        sha256=h.hexdigest(),
        n_bytes=int(sum(len(p) for p in parts) + len(SEPARATOR) * (len(parts) - 1)),
        n_train=int(train.size),
        n_val=int(val.size),
        val_fraction=val_fraction,
        python_version=platform.python_version(),
        python_implementation=platform.python_implementation(),
    )
    return Corpus(train=train, val=val, meta=meta)


def stdlib_corpus(files: tuple[str, ...] = STDLIB_FILES, stdlib_dir: str | None = None,
                  val_fraction: float = VAL_FRACTION) -> Corpus:
    """The default corpus: the pinned standard-library source files of the running Python."""
    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    parts, used, missing = [], [], []
    for rel in files:
        path = os.path.join(root, *rel.split("/"))
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            missing.append(rel)
            continue
        parts.append(data)
        used.append(rel)
    if not parts:
        raise FileNotFoundError(
            f"none of the pinned standard-library sources were found under {root!r} (this Python "
            "ships without .py sources); pass a text file instead (--text FILE)")
    meta = dict(source="python-stdlib", stdlib_dir=root, files=used, missing=missing)
    return _build(parts, meta, val_fraction)


def text_corpus(path: str, val_fraction: float = VAL_FRACTION) -> Corpus:
    """A user's text file (any bytes), split like a single stdlib file."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 1024:
        raise ValueError(f"{path!r} has {len(data)} bytes; a corpus needs at least 1024")
    meta = dict(source="file", path=os.path.abspath(path), files=[os.path.basename(path)],
                missing=[])
    return _build([data], meta, val_fraction)


def load_corpus(text: str | None = None, val_fraction: float = VAL_FRACTION) -> Corpus:
    """``text_corpus(text)`` if a path is given, else the default ``stdlib_corpus()``."""
    return text_corpus(text, val_fraction) if text else stdlib_corpus(val_fraction=val_fraction)
