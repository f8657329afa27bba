"""The trained activity pattern (twell.patterns) against its definition: 10% of the neurons live,
p_k = min(0.65, c k^-1.2) with 12 active per token on average, about 74% of the activations in the
64 most frequent neurons and 92% in the 256 most frequent (at H = 5632), and the thresholds giving
those rates through N(b, 1) pre-activations."""

from statistics import NormalDist

import numpy as np

from twell import patterns


def test_trained_probabilities_follow_the_definition():
    p = patterns.trained_probabilities(5632)
    assert p.size == 563 and np.all(np.diff(p) <= 0) and p.max() == 0.65
    assert abs(p.sum() - 12.0) < 1e-6
    k = np.arange(1, p.size + 1)
    free = p < 0.65
    ratio = p[free] * k[free] ** 1.2
    assert np.allclose(ratio, ratio[0])  # one c for every uncapped neuron
    assert abs(p[:64].sum() / p.sum() - 0.74) < 0.01
    assert abs(p[:256].sum() / p.sum() - 0.92) < 0.01


def test_small_widths_keep_a_live_neuron_and_cap_the_mean():
    p = patterns.trained_probabilities(64)
    assert p.size == 6 and abs(p.sum() - min(12.0, 0.65 * 6)) < 1e-6


def test_trained_thresholds_give_the_rates_when_sampled():
    rng = np.random.default_rng(3)
    h = 5632
    b = patterns.trained_thresholds(h, rng)
    assert b.dtype == np.float32 and b.shape == (h,)
    live = b > patterns.TRAINED["dead_threshold"]
    assert live.sum() == 563
    assert not np.all(np.flatnonzero(live) == np.arange(563))  # shuffled positions
    rates = np.array([NormalDist().cdf(float(v)) for v in b[live]])
    assert abs(rates.sum() - 12.0) < 1e-3
    # a sampled batch: N(b, 1) pre-activations fire about 12 times per token, dead ones never
    z = rng.standard_normal((2000, h)).astype(np.float32) + b
    per_token = (z > 0).sum(axis=1)
    assert abs(per_token.mean() - 12.0) < 0.5
    assert not (z[:, ~live] > 0).any()
