"""Synthetic activity patterns shared by the tests and the benchmarks.

The synthetic FFN inputs (docs/design.md) give every gate pre-activation the law N(b_j, 1): x is
N(0, 1) with its last column 1, W_g's first D - 1 columns are N(0, 1/(D - 1)) and its last column
holds the per-neuron threshold b_j, so neuron j fires with probability Phi(b_j).

``trained`` imitates the activity of an LM trained with the L1 recipe (measured on held-out text:
7-16 active neurons per token, most neurons never active, a few hot ones): 10% of the H neurons
live, at shuffled positions; live neuron k (k = 1, 2, ...) fires with probability
p_k = min(0.65, c k^-1.2), c chosen so that 12 neurons are active per token on average; the others
never fire. At H = 5632 the 64 most frequent neurons carry about 74% of the activations and the
256 most frequent about 92%. The CUDA benchmark (bench/bench_ffn.cu) builds the same thresholds.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

__all__ = ["TRAINED", "trained_probabilities", "trained_thresholds"]

#: The trained pattern's parameters: live fraction, mean active neurons per token, the cap of p_k,
#: the decay exponent, and the threshold of a neuron that never fires.
TRAINED = {"live_fraction": 0.1, "mean_active": 12.0, "cap": 0.65, "alpha": 1.2, "dead_threshold": -30.0}


def trained_probabilities(hidden: int) -> np.ndarray:
    """p_k of the live neurons, k = 1..n_live (descending), n_live = round(0.1 * hidden) (at least 1)."""
    t = TRAINED
    n = max(1, round(t["live_fraction"] * hidden))
    k = np.arange(1, n + 1, dtype=np.float64)
    target = min(t["mean_active"], t["cap"] * n)  # a small H cannot reach 12 per token

    def total(c):
        return float(np.minimum(t["cap"], c * k ** -t["alpha"]).sum())

    lo, hi = 0.0, 1.0
    while total(hi) < target and hi < 1e12:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if total(mid) < target else (lo, mid)
    return np.minimum(t["cap"], hi * k ** -t["alpha"])


def trained_thresholds(hidden: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [hidden]: b_j = Phi^-1(p_k) for the live neurons at shuffled positions, the dead
    threshold (never fires) for the others."""
    p = trained_probabilities(hidden)
    b = np.full(hidden, TRAINED["dead_threshold"], dtype=np.float32)
    inv = NormalDist().inv_cdf
    b[rng.permutation(hidden)[:p.size]] = [inv(float(v)) for v in p]
    return b
