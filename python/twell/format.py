"""The TwELL format in NumPy: the executable specification (format version 1).

A row of H hidden columns is cut into ``ceil(H / 256)`` tiles of 256 columns
(the last may be partial). Each tile owns ``slots`` uint32 words (32, 64 or
128), so the packed matrix is ``[M, ceil(H/256) * slots]`` uint32:

* word 0: the tile's TRUE number of values > 0 (may exceed the capacity
  ``slots - 1``);
* words 1..: the entries in ascending column order, at most ``slots - 1``;
  bits 0-15 hold the column within the tile, bits 16-31 the bf16 bits of
  the value (fp32 pre-activation kept iff > 0, rounded to nearest even);
* the remaining words are zero.

A tile whose count exceeds the capacity keeps its first ``slots - 1`` entries
and its row is listed as overflowed (ascending row list). The GPU kernels
(``twell_pack`` and the gate GEMM's epilogue) must write exactly these words
for the same fp32 values; ``tests/test_format.py`` and the GPU tests hold
them to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TILE_COLS = 256
SLOTS_CHOICES = (32, 64, 128)
FORMAT_VERSION = 1

__all__ = [
    "TILE_COLS",
    "SLOTS_CHOICES",
    "FORMAT_VERSION",
    "Packed",
    "tiles_for",
    "row_words",
    "float_to_bf16_bits",
    "bf16_bits_to_float",
    "round_to_bf16",
    "encode",
    "decode",
    "tile_counts",
    "check_packed",
]


def tiles_for(hidden: int) -> int:
    return -(-int(hidden) // TILE_COLS)


def row_words(hidden: int, slots: int = 32) -> int:
    _check_slots(slots)
    return tiles_for(hidden) * slots


def _check_slots(slots: int) -> None:
    if slots not in SLOTS_CHOICES:
        raise ValueError(f"slots must be one of {SLOTS_CHOICES}, got {slots}")


def float_to_bf16_bits(values) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), round to nearest even (NaN kept quiet)."""
    f = np.ascontiguousarray(values, dtype=np.float32)
    bits = f.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(f)
    out = rounded.astype(np.uint16)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def bf16_bits_to_float(bits) -> np.ndarray:
    b = np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16
    return b.view(np.float32)


def round_to_bf16(values) -> np.ndarray:
    """Round fp32 values to the nearest bf16 and return them as float32."""
    return bf16_bits_to_float(float_to_bf16_bits(values))


@dataclass
class Packed:
    """A TwELL matrix and what the encoder learned while packing it."""

    words: np.ndarray          # [M, tiles * slots] uint32
    hidden: int
    slots: int
    overflow_rows: np.ndarray  # int32, ascending
    stats: dict

    @property
    def rows(self) -> int:
        return self.words.shape[0]


def _tiled(pre: np.ndarray, fill) -> np.ndarray:
    m, h = pre.shape
    t = tiles_for(h)
    padded = np.full((m, t * TILE_COLS), fill, dtype=pre.dtype)
    padded[:, :h] = pre
    return padded.reshape(m, t, TILE_COLS)


def tile_counts(pre) -> np.ndarray:
    """[M, tiles] true count of values > 0 per tile."""
    pre = np.asarray(pre)
    return (_tiled(pre, 0) > 0).sum(axis=2)


def encode(pre, slots: int = 32) -> Packed:
    """Pack fp32 pre-activations [M, H] (ReLU fused: only values > 0 are kept)."""
    _check_slots(slots)
    pre = np.asarray(pre, dtype=np.float32)
    if pre.ndim != 2:
        raise ValueError(f"pre must be [M, H], got shape {list(pre.shape)}")
    m, h = pre.shape
    t = tiles_for(h)
    cap = slots - 1
    tiles = _tiled(pre, np.float32(0))
    positive = tiles > 0
    counts = positive.sum(axis=2)
    rank = np.cumsum(positive, axis=2) - 1          # entry index within the tile
    keep = positive & (rank < cap)
    cols = np.broadcast_to(np.arange(TILE_COLS, dtype=np.uint32), tiles.shape)
    entry = (float_to_bf16_bits(tiles).astype(np.uint32) << 16) | cols

    words = np.zeros((m, t, slots), dtype=np.uint32)
    words[:, :, 0] = counts
    r_idx, t_idx, c_idx = np.nonzero(keep)
    words[r_idx, t_idx, rank[r_idx, t_idx, c_idx] + 1] = entry[r_idx, t_idx, c_idx]

    over_tile = counts > cap
    overflow_rows = np.nonzero(over_tile.any(axis=1))[0].astype(np.int32)
    stats = {  # the statistics words of the C ABI, in their order (twell._options.STATS_FIELDS)
        "rows": m,
        "active": int(counts.sum()),
        "overflow_rows": int(overflow_rows.size),
        "overflow_tiles": int(over_tile.sum()),
        "max_tile_count": int(counts.max()) if counts.size else 0,
        "max_row_count": int(counts.sum(axis=1).max()) if m else 0,
        "path": 0,
        "format": FORMAT_VERSION,
    }
    return Packed(words.reshape(m, t * slots), h, slots, overflow_rows, stats)


def decode(words, hidden: int, slots: int = 32):
    """Dense float32 [M, H] from packed words (stored entries only) and [M, tiles] counts.

    An overflowed tile decodes to its stored prefix; use the counts (or the
    encoder's overflow list) to tell.
    """
    _check_slots(slots)
    words = np.asarray(words, dtype=np.uint32)
    m = words.shape[0]
    t = tiles_for(hidden)
    if words.shape != (m, t * slots):
        raise ValueError(f"packed has shape {list(words.shape)}, expected [{m}, {t * slots}]")
    w = words.reshape(m, t, slots)
    counts = w[:, :, 0].astype(np.int64)
    stored = np.minimum(counts, slots - 1)
    slot_idx = np.arange(1, slots)
    valid = slot_idx[None, None, :] <= stored[:, :, None]
    entries = w[:, :, 1:]
    cols = (entries & 0xFFFF).astype(np.int64)
    vals = bf16_bits_to_float((entries >> 16).astype(np.uint16))
    dense = np.zeros((m, t * TILE_COLS), dtype=np.float32)
    r_idx, t_idx, s_idx = np.nonzero(valid)
    dense[r_idx, t_idx * TILE_COLS + cols[r_idx, t_idx, s_idx]] = vals[r_idx, t_idx, s_idx]
    return dense[:, :hidden], counts


def check_packed(words, hidden: int, slots: int = 32) -> list[str]:
    """Invariants every producer must keep; returns a list of violations ([] = valid)."""
    _check_slots(slots)
    words = np.asarray(words, dtype=np.uint32)
    m = words.shape[0]
    t = tiles_for(hidden)
    problems = []
    if words.shape != (m, t * slots):
        return [f"shape {list(words.shape)} != [{m}, {t * slots}]"]
    w = words.reshape(m, t, slots)
    counts = w[:, :, 0].astype(np.int64)
    width = np.full(t, TILE_COLS)
    width[-1] = hidden - (t - 1) * TILE_COLS
    if (counts > width[None, :]).any():
        problems.append("a count exceeds the tile width")
    stored = np.minimum(counts, slots - 1)
    slot_idx = np.arange(1, slots)[None, None, :]
    valid = slot_idx <= stored[:, :, None]
    entries = w[:, :, 1:]
    if (entries[~valid] != 0).any():
        problems.append("a word past the stored entries is not zero")
    cols = (entries & 0xFFFF).astype(np.int64)
    vals = bf16_bits_to_float((entries >> 16).astype(np.uint16))
    if (np.where(valid, cols, 0) >= width[None, :, None]).any():
        problems.append("an entry column is outside its tile")
    if (np.where(valid, vals, 1.0) < 0).any() or np.isnan(np.where(valid, vals, 1.0)).any():
        problems.append("an entry value is negative or NaN")
    both = valid[:, :, 1:] & valid[:, :, :-1]
    if (np.where(both, np.diff(cols, axis=2), 1) <= 0).any():
        problems.append("entries are not in strictly ascending column order")
    return problems
