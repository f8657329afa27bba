"""Helpers for the GPU tests: synthetic FFN problems (docs/design.md) and
framework adapters (CuPy first, PyTorch for interop).

Inputs are drawn on the host in float32, rounded to bf16 there, and the same
bf16 values feed both the kernels and the float64 reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

import ml_dtypes
import numpy as np

from twell import format as fmt
from twell import patterns
from twell import reference as ref

BF16 = ml_dtypes.bfloat16
PATTERNS = ("uniform", "uniform2", "skewed", "hot", "zero_rows", "dense_rows", "overflow", "trained")


def round_bf16(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).astype(BF16).astype(np.float32)


@dataclass
class Problem:
    x: np.ndarray       # [M, D] float32 holding bf16 values
    w_gate: np.ndarray  # [H, D]
    w_up: np.ndarray    # [H, D]
    w_down: np.ndarray  # [H, D]
    pattern: str

    @property
    def shape(self):
        return self.x.shape[0], self.x.shape[1], self.w_up.shape[0]

    def reference(self, rows=None, gated=True):
        """float64 y (and the gate pre-activations) for the given rows (all by default)."""
        x = self.x if rows is None else self.x[rows]
        y, cache = ref.ffn_forward(x.astype(np.float64), self.w_gate.astype(np.float64) if gated else None,
                                   self.w_up.astype(np.float64), self.w_down.astype(np.float64), gated=gated)
        pre = cache["g"] if gated else cache["u"]
        return y, pre


@lru_cache(maxsize=2)
def base_weights(d, h):
    """Fresh bf16 weights once per shape and test session: W_g N(0, 1/(D-1)), W_u N(0, 1/D), W_d N(0, 1/H)."""
    rng = np.random.default_rng()
    wg = rng.standard_normal((h, d), dtype=np.float32) / np.float32(np.sqrt(max(d - 1, 1)))
    wu = rng.standard_normal((h, d), dtype=np.float32) / np.float32(np.sqrt(d))
    wd = rng.standard_normal((h, d), dtype=np.float32) / np.float32(np.sqrt(h))
    return round_bf16(wg), round_bf16(wu), round_bf16(wd)


def synthetic_problem(rng, m, d, h, pattern="uniform") -> Problem:
    """docs/design.md inputs: x N(0,1) with last column 1, W_g's last column -Phi^-1(1-p).

    uniform: p = 0.5% (~28 of 5632 active per token); uniform2: 2%; overflow: 25% (most tiles
    overflow); skewed: uniform 0.5% with each token's x scaled by exp(0.35 z); hot: uniform plus 8
    neurons active in ~80% of tokens; zero_rows: a third of the tokens have no active neuron;
    dense_rows: a fifth of the tokens have every neuron active; trained: a trained LM's concentrated
    activity (twell.patterns: 10% of neurons live, power-law firing rates, 12 active per token).
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}")
    wg, wu, wd = base_weights(d, h)
    wg = wg.copy()
    p = {"uniform2": 0.02, "overflow": 0.25}.get(pattern, 0.005)
    wg[:, -1] = round_bf16(-NormalDist().inv_cdf(1 - p))
    x = rng.standard_normal((m, d), dtype=np.float32)
    x[:, -1] = 1.0
    if pattern == "skewed":
        x[:, :-1] *= np.exp(0.35 * rng.standard_normal((m, 1), dtype=np.float32))
    elif pattern == "hot":
        wg[rng.choice(h, min(8, h), replace=False), -1] = round_bf16(-NormalDist().inv_cdf(0.2))
    elif pattern == "zero_rows":
        x[rng.choice(m, max(1, m // 3), replace=False), :-1] = 0.0
    elif pattern == "trained":
        wg[:, -1] = round_bf16(patterns.trained_thresholds(h, rng))
    elif pattern == "dense_rows":
        rows = rng.choice(m, max(1, m // 5), replace=False)
        x[rows, :-1] = 0.0
        x[rows, -1] = -1.0
    return Problem(round_bf16(x), wg, wu, wd, pattern)


def rel_frobenius(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / denom) if denom > 0 else float(np.linalg.norm(a))


class CupyAdapter:
    name = "cupy"

    def __init__(self):
        import cupy

        self.cp = cupy

    def bf16(self, a):
        return self.cp.asarray(np.ascontiguousarray(a, dtype=np.float32).astype(BF16))

    def f32(self, a):
        return self.cp.asarray(np.ascontiguousarray(a, dtype=np.float32))

    def host(self, a) -> np.ndarray:
        return self.cp.asnumpy(a)

    def host_f32(self, a) -> np.ndarray:
        return self.host(a).astype(np.float32)

    def full(self, shape, dtype, fill):
        if dtype == "bfloat16":
            out = self.cp.empty(shape, dtype=BF16)
            out.view(self.cp.uint16).fill(fill)
            return out
        return self.cp.full(shape, fill, dtype=np.dtype(dtype))

    def stream(self):
        return self.cp.cuda.Stream(non_blocking=True)

    def use_stream(self, s):
        return s

    def synchronize(self):
        self.cp.cuda.Device().synchronize()

    def bits(self, a) -> np.ndarray:
        return self.host(a).view(np.uint16) if self.host(a).dtype == BF16 else self.host(a)


class TorchAdapter:
    name = "torch"

    def __init__(self):
        import torch

        self.t = torch

    def bf16(self, a):
        return self.t.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to("cuda").to(self.t.bfloat16)

    def f32(self, a):
        return self.t.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to("cuda")

    def host(self, a) -> np.ndarray:
        if a.dtype == self.t.bfloat16:
            return a.view(self.t.int16).cpu().numpy().view(np.uint16).view(BF16)
        if a.dtype in (self.t.uint32, self.t.uint64):
            return a.view(self.t.int32 if a.dtype == self.t.uint32 else self.t.int64).cpu().numpy().view(
                np.uint32 if a.dtype == self.t.uint32 else np.uint64)
        return a.cpu().numpy()

    def host_f32(self, a) -> np.ndarray:
        return self.host(a).astype(np.float32)

    def full(self, shape, dtype, fill):
        t = self.t
        tdt = {"bfloat16": t.bfloat16, "uint32": t.uint32, "int32": t.int32, "uint64": t.uint64}[dtype]
        out = self.t.empty(shape, dtype=tdt, device="cuda")
        if dtype == "bfloat16":
            out.view(self.t.int16).fill_(np.int16(np.uint16(fill).view(np.int16)))
        elif dtype == "uint32":
            out.view(self.t.int32).fill_(int(np.uint32(fill).view(np.int32)))
        elif dtype == "uint64":
            out.view(self.t.int64).fill_(int(np.uint64(fill).view(np.int64)))
        else:
            out.fill_(fill)
        return out

    def stream(self):
        return self.t.cuda.Stream()

    def use_stream(self, s):
        return self.t.cuda.stream(s)

    def synchronize(self):
        self.t.cuda.synchronize()


def adapter(name: str):
    return CupyAdapter() if name == "cupy" else TorchAdapter()


def expected_pack(pre_f32: np.ndarray, slots: int) -> fmt.Packed:
    return fmt.encode(pre_f32, slots)


def free_port() -> int:
    """A TCP port nothing listens on now (for torchrun's rendezvous; a fixed one may be taken)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
