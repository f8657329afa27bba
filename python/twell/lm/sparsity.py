"""Sparsity instruments for FFN hidden activations h [tokens, H].

A neuron is *active* for a token when its activation is non-zero (with ReLU gates: when the gate
pre-activation is > 0). Everything here takes h (or a boolean activity mask) and returns numbers;
nothing prints.

* ``active_counts`` / ``layer_stats``: active neurons per token (mean, percentiles, max, histogram),
  fraction of zeros.
* ``tile_counts`` / ``twell_overflow``: per-tile active counts for the TwELL layout (tiles of
  ``tile_cols`` columns, capacity ``slots - 1`` entries per tile) and how many rows and tiles
  overflow it (those rows go to the dense fallback).
* ``hybrid_overflow_rate``: fraction of rows with more than ``ell_width`` active entries (rows the
  hybrid ELL + dense-tail training format routes to the dense tail).
* ``NeuronActivity``: per-neuron firing counts accumulated over a window of tokens, giving the
  fraction of dead neurons (never active in the window) and the most popular neuron's firing rate.
"""

from __future__ import annotations

import numpy as np

from .. import format as fmt
from .. import reference as ref

__all__ = [
    "TILE_COLS", "DEFAULT_SLOTS", "DEFAULT_ELL_WIDTHS",
    "active_mask", "active_counts", "active_histogram", "tile_counts", "twell_overflow",
    "hybrid_overflow_rate", "layer_stats", "NeuronActivity",
]

TILE_COLS = fmt.TILE_COLS  # the format's tiles: the counts here are the ones the kernels see
DEFAULT_SLOTS = 32
DEFAULT_ELL_WIDTHS = (8, 16, 32, 64, 128)


def active_mask(h: np.ndarray) -> np.ndarray:
    """Boolean [M, H]: h != 0."""
    return np.asarray(h) != 0


def active_counts(h: np.ndarray) -> np.ndarray:
    """Active neurons per token (row), int64 [M]."""
    return np.asarray(ref.active_per_row(np.asarray(h)), dtype=np.int64)


def active_histogram(counts: np.ndarray, hidden: int) -> np.ndarray:
    """``hist[k]`` = number of tokens with exactly k active neurons, k = 0..hidden."""
    return np.bincount(np.asarray(counts, dtype=np.int64), minlength=hidden + 1)[: hidden + 1]


def tile_counts(h: np.ndarray, tile_cols: int = TILE_COLS) -> np.ndarray:
    """[M, ceil(H / tile_cols)] active entries per tile (the last tile may be partial)."""
    mask = active_mask(h)
    if tile_cols == fmt.TILE_COLS:
        return np.asarray(fmt.tile_counts(mask.astype(np.float32)), dtype=np.int64)
    m, hidden = mask.shape
    n_tiles = -(-hidden // tile_cols)
    padded = np.zeros((m, n_tiles * tile_cols), dtype=bool)
    padded[:, :hidden] = mask
    return padded.reshape(m, n_tiles, tile_cols).sum(axis=2, dtype=np.int64)


def twell_overflow(h: np.ndarray, tile_cols: int = TILE_COLS, slots: int = DEFAULT_SLOTS) -> dict:
    """How h fits TwELL with ``slots`` words per tile (capacity ``slots - 1``).

    Returns ``rows_rate`` (fraction of rows with any tile over capacity: they take the dense
    fallback), ``tiles_rate`` (fraction of tiles over capacity), ``max_tile_count`` and
    ``capacity``.
    """
    counts = tile_counts(h, tile_cols)
    cap = slots - 1
    over = counts > cap
    rows = counts.shape[0]
    return {
        "capacity": cap,
        "rows_rate": float(over.any(axis=1).mean()) if rows else 0.0,
        "tiles_rate": float(over.mean()) if over.size else 0.0,
        "max_tile_count": int(counts.max()) if counts.size else 0,
    }


def hybrid_overflow_rate(h_or_counts: np.ndarray, ell_width: int) -> float:
    """Fraction of rows with more than ``ell_width`` active entries (sent whole to the dense tail).

    Accepts h [M, H] or precomputed per-row counts [M].
    """
    a = np.asarray(h_or_counts)
    counts = a if a.ndim == 1 else active_counts(a)
    return float((counts > ell_width).mean()) if counts.size else 0.0


def layer_stats(h: np.ndarray, tile_cols: int = TILE_COLS, slots: int = DEFAULT_SLOTS,
                ell_widths=DEFAULT_ELL_WIDTHS, histogram: bool = False) -> dict:
    """All per-token instruments for one layer's h [M, H] (JSON-serialisable)."""
    h = np.asarray(h)
    m, hidden = h.shape
    counts = active_counts(h)
    tw = twell_overflow(h, tile_cols, slots)
    fired = active_mask(h).any(axis=0)
    out = {
        "tokens": int(m),
        "hidden": int(hidden),
        "active_mean": float(counts.mean()),
        "active_p50": float(np.percentile(counts, 50)),
        "active_p99": float(np.percentile(counts, 99)),
        "active_max": int(counts.max()),
        "zero_fraction": float(1.0 - counts.sum() / (m * hidden)),
        "dead_fraction": float(1.0 - fired.mean()),   # never active in these m tokens
        "tile_cols": tile_cols,
        "slots": slots,
        "twell_capacity": tw["capacity"],
        "twell_max_tile_count": tw["max_tile_count"],
        "twell_overflow_rows": tw["rows_rate"],
        "twell_overflow_tiles": tw["tiles_rate"],
        "hybrid_overflow": {str(w): hybrid_overflow_rate(counts, w) for w in ell_widths},
    }
    if histogram:
        out["histogram"] = active_histogram(counts, hidden).tolist()
    return out


class NeuronActivity:
    """Per-neuron firing counts over a window of tokens (e.g. the training batches since a reset).

    ``update(h)`` adds a batch; ``dead_fraction()`` is the fraction of neurons never active in the
    window; ``dead_neurons()`` their indices; ``firing_rate()`` per-neuron fraction of tokens.
    """

    def __init__(self, hidden: int):
        self.fires = np.zeros(hidden, dtype=np.int64)
        self.tokens = 0

    def update(self, h: np.ndarray) -> None:
        self.fires += np.count_nonzero(np.asarray(h), axis=0)
        self.tokens += h.shape[0]

    def reset(self) -> None:
        self.fires[:] = 0
        self.tokens = 0

    def dead_neurons(self) -> np.ndarray:
        return np.nonzero(self.fires == 0)[0]

    def dead_fraction(self) -> float:
        return float((self.fires == 0).mean())

    def firing_rate(self) -> np.ndarray:
        return self.fires / max(self.tokens, 1)

    def summary(self) -> dict:
        rate = self.firing_rate()
        return {"window_tokens": int(self.tokens), "dead_fraction": self.dead_fraction(),
                "max_firing_rate": float(rate.max()) if rate.size else 0.0}
