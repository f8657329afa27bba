"""The C ABI's option codes and statistics words, read from twell.h: no table here is typed by hand.

cffi parses the header's CDEF block (:mod:`twell._ffi`) whether or not libtwell loads, so these
tables exist without the compiled library. An option table maps an option's Python spelling (its
enum name without the prefix, in lower case) to its code:

* ``LAYOUTS``      ``twell_layout``:  {"hd": 0, "dh": 1}
* ``PATHS``        ``twell_path``:    {"auto": 0, "sparse": 1, "dense": 2}
* ``TRAIN_PATHS``  ``PATHS`` plus "hybrid", the training docs' name of its "sparse" route
* ``KERNELS``      ``twell_kernels``: {"auto": 0, "portable": 1, "sm90": 2}

``STATS_FIELDS`` names the uint64 words of an inference statistics tensor (``TWELL_STAT_*``, in
word order); ``TRAIN_STATS_FIELDS`` those of a training one (``TWELL_STAT_*`` then
``TWELL_TSTAT_*``).
"""

from __future__ import annotations

from . import _ffi

__all__ = ["LAYOUTS", "PATHS", "TRAIN_PATHS", "KERNELS", "STATS_FIELDS", "TRAIN_STATS_FIELDS", "option_code"]

if not _ffi.constants:
    raise ImportError(f"twell's option codes are read from twell.h: {_ffi.unavailable_reason}")


def _table(prefix: str) -> dict:
    """{name without prefix, lower case: value} of the header constants whose name starts with prefix."""
    return {k[len(prefix):].lower(): v for k, v in _ffi.constants.items() if k.startswith(prefix)}


def _fields(prefix: str) -> tuple:
    words = _table(prefix)
    return tuple(sorted(words, key=words.get))


LAYOUTS = _table("TWELL_LAYOUT_")
PATHS = _table("TWELL_PATH_")
TRAIN_PATHS = {**PATHS, "hybrid": PATHS["sparse"]}
KERNELS = _table("TWELL_KERNELS_")
STATS_FIELDS = _fields("TWELL_STAT_")
TRAIN_STATS_FIELDS = STATS_FIELDS + _fields("TWELL_TSTAT_")


def option_code(table: dict, name: str, value) -> int:
    """The code of option ``name`` given by its spelling (or already as one of its codes).

    Raises InvalidArgumentError naming the option and its choices otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value in table.values():
        return value
    if isinstance(value, str) and value in table:
        return table[value]
    raise _ffi.InvalidArgumentError(f"{name} must be one of {sorted(table)}, got {value!r}")
