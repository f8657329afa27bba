"""argparse value types and the error the CLI reports in one line (exit status 2)."""

from __future__ import annotations

import argparse
import os


class CliError(Exception):
    """A bad value or an unusable path given on the command line (reported without a traceback)."""


def _number(kind, low, strict, what):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v != v or (strict and v <= low) or (not strict and v < low):  # NaN, or out of range
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, 0, True, "an integer >= 1")
nonneg_int = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0.0, True, "a number > 0")
nonneg_float = _number(float, 0.0, False, "a number >= 0")


def existing_file(s: str) -> str:
    if not os.path.isfile(s):
        raise argparse.ArgumentTypeError(f"no such file: {s!r}")
    return s


def output_dir(path: str, option: str = "--out") -> str:
    """Create `path` (and check it is writable) or raise CliError naming the option."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".twell_write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise CliError(f"cannot write to {option} {path}: {e.strerror or e}") from None
    return os.path.abspath(path)
