"""The inference FFN (gate GEMM + TwELL + sparse consumer + exact fallback) against the float64 oracle.

Tolerance: relative Frobenius error < 1e-2 over the checked rows, and < 5e-2 per
row. Expected error: y is rounded to bf16 once (relative 2^-9 ~ 2e-3 rms), the
gate values are bf16 in the TwELL words (another ~2e-3), the fallback rounds h
to bf16 (~2e-3); 1e-2 leaves room for fp32 summation order but catches a
single dropped or double-counted neuron. Rows whose reference is exactly 0
(every gate negative) must be exactly 0. Large M: all rows whose tiles
overflow plus 192 sampled rows are compared (the FFN is row-independent, so
the reference on a subset of rows is exact).
"""

import numpy as np
import pytest

import gpu_support as gs
from twell import format as fmt
from twell import ops

pytestmark = pytest.mark.gpu

SHAPES = [(2048, 5632), (4096, 14336), (896, 4864), (1024, 2816)]
NAN_BF16 = 0xFFFF


def _rows_to_check(dev, prob, xd, wgd, slots=32, gated=True, sample=192, rng=None):
    m = prob.x.shape[0]
    if m <= 512:
        return np.arange(m)
    # find the overflowing rows from fp32 pre-activations computed on the GPU
    import cupy as cp

    pre = cp.asarray(prob.x) @ cp.asarray(prob.w_gate if gated else prob.w_up).T
    counts = fmt.tile_counts(cp.asnumpy(pre)) if m * pre.shape[1] <= 60_000_000 else None
    if counts is None:
        over = []
        for r0 in range(0, m, 4096):
            c = fmt.tile_counts(cp.asnumpy(pre[r0:r0 + 4096]))
            over.extend((np.nonzero((c > slots - 1).any(axis=1))[0] + r0).tolist())
        over = np.array(over, dtype=np.int64)
    else:
        over = np.nonzero((counts > slots - 1).any(axis=1))[0]
    rng = rng or np.random.default_rng()
    over = over[:256]
    sampled = rng.choice(m, size=min(sample, m), replace=False)
    return np.unique(np.concatenate([over, sampled, [0, m - 1]]))


def _check(dev, prob, y_dev, rows, gated=True, tol=1e-2):
    y = dev.host_f32(y_dev)
    assert not np.isnan(y).any(), "a row was not written (NaN poison left)"
    y_ref, _ = prob.reference(rows, gated)
    got = y[rows].astype(np.float64)
    err = gs.rel_frobenius(got, y_ref)
    assert err < tol, f"relative Frobenius error {err:.3e} >= {tol}"
    ref_norm = np.linalg.norm(y_ref, axis=1)
    zero = ref_norm == 0
    assert np.all(got[zero] == 0), "rows with an all-negative gate must be exactly zero"
    floor = 1e-2 * max(float(ref_norm.mean()), 1e-30)
    row_err = np.linalg.norm(got - y_ref, axis=1) / np.maximum(ref_norm, floor)
    assert row_err.max() < 5e-2, f"worst row {rows[int(np.argmax(row_err))]}: {row_err.max():.3e}"
    return err


def _run(dev, prob, *, gated=True, layout="hd", path="sparse", kernels="auto", slots=32, stats=None):
    m, d, h = prob.shape
    x = dev.bf16(prob.x)
    wg = dev.bf16(prob.w_gate) if gated else None
    wu = dev.bf16(prob.w_up)
    wd = dev.bf16(prob.w_down if layout == "hd" else prob.w_down.T)
    y = dev.full((m, d), "bfloat16", NAN_BF16)
    ops.ffn(x, wg, wu, wd, gated=gated, slots=slots, w_down_layout=layout, path=path, kernels=kernels,
            out=y, stats=stats)
    return y, x, wg


@pytest.mark.parametrize("pattern", ["uniform", "uniform2", "skewed", "hot", "zero_rows", "dense_rows", "overflow",
                                     "trained"])
@pytest.mark.parametrize("m", [1, 7, 64, 129, 300, 4096])
def test_ffn_2048x5632(rng, pattern, m):
    dev = gs.adapter("cupy")
    prob = gs.synthetic_problem(rng, m, 2048, 5632, pattern)
    stats = dev.full((8,), "uint64", 0xABABABABABABABAB)
    y, x, wg = _run(dev, prob, stats=stats)
    _check(dev, prob, y, _rows_to_check(dev, prob, x, wg, rng=rng))
    st = ops.read_stats(stats)
    assert st["rows"] == m and st["path"] == 1 and st["format"] == 1
    assert st["overflow_rows"] <= m and st["max_tile_count"] <= 256


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("pattern", ["uniform", "skewed", "dense_rows", "overflow", "trained"])
@pytest.mark.parametrize("m", [1, 129, 4096])
def test_ffn_other_shapes(rng, shape, pattern, m):
    dev = gs.adapter("cupy")
    prob = gs.synthetic_problem(rng, m, *shape, pattern)
    y, x, wg = _run(dev, prob)
    _check(dev, prob, y, _rows_to_check(dev, prob, x, wg, rng=rng))


@pytest.mark.parametrize("pattern", ["uniform", "skewed", "overflow", "trained"])
def test_ffn_65536_tokens(rng, pattern):
    dev = gs.adapter("cupy")
    prob = gs.synthetic_problem(rng, 65536, 2048, 5632, pattern)
    y, x, wg = _run(dev, prob)
    _check(dev, prob, y, _rows_to_check(dev, prob, x, wg, rng=rng))


@pytest.mark.parametrize("kernels", ["portable", "auto"])
@pytest.mark.parametrize("path", ["sparse", "dense", "auto"])
@pytest.mark.parametrize("slots", [32, 64, 128])
def test_ffn_paths_kernels_slots(rng, kernels, path, slots):
    dev = gs.adapter("cupy")
    prob = gs.synthetic_problem(rng, 300, 1024, 2816, "skewed")
    for _ in range(2):    # AUTO decides from the previous call's statistics
        y, x, wg = _run(dev, prob, path=path, kernels=kernels, slots=slots)
        _check(dev, prob, y, np.arange(300))


@pytest.mark.parametrize("layout", ["hd", "dh"])
@pytest.mark.parametrize("gated", [True, False])
def test_ffn_layouts_and_non_gated(rng, layout, gated):
    dev = gs.adapter("cupy")
    prob = gs.synthetic_problem(rng, 300, 896, 4864, "dense_rows")
    if not gated:  # non-gated: h = relu(x W_u^T); shift W_u so it is sparse
        prob.w_up[:, -1] = prob.w_gate[:, -1]
    y, _, _ = _run(dev, prob, gated=gated, layout=layout)
    _check(dev, prob, y, np.arange(300), gated=gated)


def test_ffn_is_deterministic(rng):
    dev = gs.adapter("cupy")
    prob = gs.synthetic_problem(rng, 4096, 2048, 5632, "skewed")
    y1, _, _ = _run(dev, prob)
    y2, _, _ = _run(dev, prob)
    np.testing.assert_array_equal(dev.host(y1).view(np.uint16), dev.host(y2).view(np.uint16))


@pytest.mark.parametrize("m", [1, 16, 64])
def test_ffn_decode_sized_is_deterministic(rng, m):
    """M <= 64 runs the decode-sized pipeline (cluster split, PDL chain): bitwise equal runs."""
    dev = gs.adapter("cupy")
    prob = gs.synthetic_problem(rng, m, 2048, 5632, "dense_rows" if m > 1 else "hot")
    y1, _, _ = _run(dev, prob)
    y2, _, _ = _run(dev, prob)
    np.testing.assert_array_equal(dev.host(y1).view(np.uint16), dev.host(y2).view(np.uint16))


@pytest.mark.parametrize("slots", [32, 64, 128])
@pytest.mark.parametrize("gated,layout", [(True, "hd"), (True, "dh"), (False, "hd")])
@pytest.mark.parametrize("shape", [(2048, 5632), (64, 264)])
@pytest.mark.parametrize("m", [1, 16, 33, 64])
def test_ffn_decode_sized(rng, slots, gated, layout, shape, m):
    """Small M with every slots value, both W_d layouts, non-gated, and stats written
    without stats init (poisoned beforehand): they match the count words of an independent
    gate_pack of the same input (which may use another gate kernel above 16 tokens, so
    pre-activations within rounding of zero may land on either side)."""
    dev = gs.adapter("cupy")
    prob = gs.synthetic_problem(rng, m, *shape, "dense_rows" if m > 1 else "hot")  # m = 1: the consumer's row
    if not gated:
        prob.w_up[:, -1] = prob.w_gate[:, -1]
    stats = dev.full((8,), "uint64", 0xABABABABABABABAB)
    y, x, wg = _run(dev, prob, gated=gated, layout=layout, slots=slots, stats=stats)
    _check(dev, prob, y, np.arange(m), gated=gated)
    st = ops.read_stats(stats)
    assert st["rows"] == m and st["path"] == 1 and st["format"] == 1
    d, h = shape
    plan = ops.FFNPlan(d, h, slots=slots)
    packed = dev.full((m, fmt.row_words(h, slots)), "uint32", 0xDEADBEEF)
    rows = dev.full((m,), "int32", -7)
    gst = dev.full((8,), "uint64", 0xABABABABABABABAB)
    plan.gate_pack(x, wg if gated else dev.bf16(prob.w_up), packed=packed, overflow_rows=rows, stats=gst)
    _, counts = fmt.decode(dev.host(packed), h, slots)
    flagged = np.nonzero((counts > slots - 1).any(axis=1))[0]
    pre = prob.x.astype(np.float64) @ (prob.w_gate if gated else prob.w_up).astype(np.float64).T
    near_zero = int((np.abs(pre) < 1e-3 * float(np.abs(pre).mean())).sum())
    assert abs(st["overflow_rows"] - len(flagged)) <= near_zero
    assert abs(st["active"] - int(counts.sum())) <= near_zero
    assert abs(st["max_tile_count"] - int(counts.max())) <= near_zero
    assert abs(st["max_row_count"] - int(counts.sum(axis=1).max())) <= near_zero


def test_ffn_on_a_side_stream(rng):
    dev = gs.adapter("cupy")
    prob = gs.synthetic_problem(rng, 1000, 1024, 2816, "hot")
    s = dev.stream()
    with dev.use_stream(s):
        y, _, _ = _run(dev, prob)
        s.synchronize()
    _check(dev, prob, y, np.arange(1000))


def test_ffn_with_torch_tensors(rng):
    pytest.importorskip("torch")
    dev = gs.adapter("torch")
    prob = gs.synthetic_problem(rng, 129, 1024, 2816, "skewed")
    y, _, _ = _run(dev, prob)
    _check(dev, prob, y, np.arange(129))
    import torch

    assert isinstance(y, torch.Tensor)
    y2 = ops.ffn(dev.bf16(prob.x), dev.bf16(prob.w_gate), dev.bf16(prob.w_up), dev.bf16(prob.w_down))
    assert isinstance(y2, torch.Tensor) and y2.dtype == torch.bfloat16


def test_twell_ffn_class_and_stats(rng):
    dev = gs.adapter("cupy")
    prob = gs.synthetic_problem(rng, 512, 1024, 2816, "overflow")
    layer = ops.TwellFFN(dev.bf16(prob.w_gate), dev.bf16(prob.w_up), dev.bf16(prob.w_down))
    y = layer(dev.bf16(prob.x))
    _check(dev, prob, y, np.arange(512))
    st = layer.last_stats()
    _, pre = prob.reference()
    exp = fmt.encode(pre.astype(np.float32), 32)
    near_zero = int((np.abs(pre) < 1e-3).sum())
    assert abs(st["active"] - exp.stats["active"]) <= near_zero
    assert abs(st["overflow_rows"] - exp.stats["overflow_rows"]) <= near_zero
    assert st["overflow_rows"] > 0 and st["max_row_count"] >= exp.stats["max_row_count"] - near_zero


@pytest.mark.parametrize("kernels", ["auto", "portable"])
@pytest.mark.parametrize("slots", [32, 128])
@pytest.mark.parametrize("shape", [(2048, 5632), (896, 4864), (64, 264)])
@pytest.mark.parametrize("m", [1, 7, 129, 300])
def test_gate_pack_matches_oracle(rng, kernels, slots, shape, m):
    """Exact positions except values within rounding of zero; values to bf16 tolerance."""
    dev = gs.adapter("cupy")
    d, h = shape
    prob = gs.synthetic_problem(rng, m, d, h, "overflow" if slots == 32 else "uniform2")
    x, wg = dev.bf16(prob.x), dev.bf16(prob.w_gate)
    plan = ops.FFNPlan(d, h, slots=slots, kernels=kernels)
    packed = dev.full((m, fmt.row_words(h, slots)), "uint32", 0xDEADBEEF)
    rows = dev.full((m,), "int32", -7)
    stats = dev.full((8,), "uint64", 0xABABABABABABABAB)
    plan.gate_pack(x, wg, packed=packed, overflow_rows=rows, stats=stats)
    got = dev.host(packed)
    assert fmt.check_packed(got, h, slots) == []
    pre = prob.x.astype(np.float64) @ prob.w_gate.astype(np.float64).T
    exp = fmt.encode(pre.astype(np.float32), slots)
    scale = float(np.abs(pre).mean())
    ambiguous = np.abs(pre) < 1e-3 * scale
    got_dense, got_counts = fmt.decode(got, h, slots)
    exp_dense, exp_counts = fmt.decode(exp.words, h, slots)
    amb_tiles = fmt.tile_counts(np.where(ambiguous, 1.0, -1.0))
    assert np.all(np.abs(got_counts - exp_counts) <= amb_tiles)
    both = (got_counts <= slots - 1) & (exp_counts <= slots - 1) & (amb_tiles == 0)
    cols = np.repeat(both, 256, axis=1)[:, :h]
    np.testing.assert_array_equal(got_dense[cols] > 0, exp_dense[cols] > 0)
    np.testing.assert_allclose(got_dense[cols], exp_dense[cols], rtol=1e-2, atol=1e-2 * scale)
    st = ops.read_stats(stats)
    assert st["rows"] == m and st["format"] == 1
    assert abs(st["active"] - exp.stats["active"]) <= int(ambiguous.sum())
    n = st["overflow_rows"]
    listed = dev.host(rows)[:n]
    assert np.all(np.diff(listed) > 0)
    flagged = np.nonzero((got_counts > slots - 1).any(axis=1))[0]
    np.testing.assert_array_equal(listed, flagged)


def test_gate_pack_is_deterministic(rng):
    dev = gs.adapter("cupy")
    prob = gs.synthetic_problem(rng, 4096, 2048, 5632, "overflow")
    x, wg = dev.bf16(prob.x), dev.bf16(prob.w_gate)
    a = dev.host(ops.gate_pack(x, wg)[0])
    b = dev.host(ops.gate_pack(x, wg)[0])
    np.testing.assert_array_equal(a, b)
