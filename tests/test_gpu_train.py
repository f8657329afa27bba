"""Training forward/backward (hybrid ELL + dense tail) against the float64 oracle.

The oracle is reference.ffn_forward / ffn_backward's formulas evaluated in
float64 on the GPU with CuPy (checked against the NumPy reference itself on a
small case), on the same bf16-rounded inputs the kernels get.

Tolerances (relative Frobenius): y, dx, dW_* < 1e-2 (outputs are rounded to
bf16 once, ~2e-3 rms; the gate values in the ELL are bf16 as in the TwELL
words; the dense tail rounds h, dg, du to bf16 as GEMM operands); L1 < 2e-3
(hybrid route) or < 1e-2 (dense route: its L1 sums relu(g)·u over the bf16 g
and u it saves, as bf16 autograd does, so with few active terms, e.g. M = 1,
the rounding of each term, up to ~2^-8 relative, does not average out);
L0 per token exact up to a handful of gate values that round to the other
side of 0 in fp32 versus float64. Rows whose reference is 0 must be 0.
"""


import numpy as np
import pytest

import gpu_support as gs
from twell import reference as ref
from twell import train_ops

pytestmark = pytest.mark.gpu

NAN_BF16 = 0xFFFF
L1C = 0.05


def _problem(rng, m, d, h, pattern):
    prob = gs.synthetic_problem(rng, m, d, h, pattern)
    x, wg = prob.x, prob.w_gate
    _avoid_ambiguous_gates(rng, x, wg, pattern)
    dy = gs.round_bf16(rng.standard_normal((m, d), dtype=np.float32))
    return gs.Problem(x, wg, prob.w_up, prob.w_down, pattern), dy


def _avoid_ambiguous_gates(rng, x, wg, pattern, tau=2e-4, chunk=16384):
    """Resample (in place) the rows of x with a gate pre-activation within tau * scale of 0.

    dg = dh * u * [g > 0] jumps at g = 0, and tensor-core fp32 accumulation (the
    gate GEMM, cuBLAS) differs from float64 by up to ~1e-4 here (products are
    exact, the in-MMA alignment truncates), so a gate that close to 0 may land on
    the other side: its token's dx and its neuron's dW_g then differ by a whole
    dh * u term from the oracle, correctly for either side. The tests keep such
    ties out of the inputs instead of loosening every tolerance. Rows set by a
    pattern to all-zero / all-dense gates (g = -+threshold exactly) never qualify.
    """
    try:
        import cupy as xp
    except ImportError:  # pragma: no cover
        xp = np
    m, d = x.shape
    w = xp.asarray(wg, dtype=xp.float64)

    def bad_rows(rows):
        out = []
        for r0 in range(0, len(rows), chunk):
            sel = rows[r0:r0 + chunk]
            xs = xp.asarray(x[sel], dtype=xp.float64)
            g = xs @ w.T
            scale = xp.maximum(1.0, xp.linalg.norm(xs[:, :-1], axis=1) / np.sqrt(max(d - 1, 1)))
            hit = (xp.abs(g) < tau * scale[:, None]).any(axis=1)
            hit = hit.get() if hasattr(hit, "get") else hit
            out.append(sel[np.asarray(hit)])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    rows = bad_rows(np.arange(m))
    for _ in range(200):
        if len(rows) == 0:
            return
        new = rng.standard_normal((len(rows), d), dtype=np.float32)
        new[:, -1] = 1.0
        if pattern == "skewed":
            new[:, :-1] *= np.exp(0.35 * rng.standard_normal((len(rows), 1), dtype=np.float32))
        x[rows] = gs.round_bf16(new)
        rows = bad_rows(rows)
    raise RuntimeError(f"could not avoid gate values near 0 in {len(rows)} rows")


def _oracle(prob, dy, c, chunk=16384, rows_out=None):
    """float64 (CuPy) forward + backward; dW summed over all rows, y/dx/l0 for rows_out (all if None)."""
    import cupy as cp

    wg = cp.asarray(prob.w_gate, dtype=cp.float64)
    wu = cp.asarray(prob.w_up, dtype=cp.float64)
    wd = cp.asarray(prob.w_down, dtype=cp.float64)
    m = prob.x.shape[0]
    dwg = cp.zeros_like(wg)
    dwu = cp.zeros_like(wu)
    dwd = cp.zeros_like(wd)
    l1 = 0.0
    ys, dxs, l0s = [], [], []
    keep = None if rows_out is None else set(int(r) for r in rows_out)
    for r0 in range(0, m, chunk):
        x = cp.asarray(prob.x[r0:r0 + chunk], dtype=cp.float64)
        gy = cp.asarray(dy[r0:r0 + chunk], dtype=cp.float64)
        g = x @ wg.T
        u = x @ wu.T
        a = cp.maximum(g, 0)
        h = a * u
        y = h @ wd
        dh = gy @ wd.T + c * cp.sign(h)
        dg = dh * u * (g > 0)
        du = dh * a
        dx = dg @ wg + du @ wu
        dwg += dg.T @ x
        dwu += du.T @ x
        dwd += h.T @ gy
        l1 += float(cp.abs(h).sum())
        l0 = (g > 0).sum(axis=1)
        if keep is None:
            ys.append(cp.asnumpy(y))
            dxs.append(cp.asnumpy(dx))
            l0s.append(cp.asnumpy(l0))
        else:
            sel = np.array([r - r0 for r in rows_out if r0 <= r < r0 + x.shape[0]], dtype=np.int64)
            if len(sel):
                ys.append(cp.asnumpy(y[sel]))
                dxs.append(cp.asnumpy(dx[sel]))
                l0s.append(cp.asnumpy(l0[sel]))
        del g, u, a, h, dh, dg, du
    return dict(y=np.concatenate(ys), dx=np.concatenate(dxs), l0=np.concatenate(l0s), l1=l1,
                dw_gate=cp.asnumpy(dwg), dw_up=cp.asnumpy(dwu), dw_down=cp.asnumpy(dwd))


def _device_tensors(dev, prob, layout="hd"):
    """x, W_g, W_u, W_d of a problem as bf16 device arrays, W_d as [H, D] ("hd") or [D, H] ("dh")."""
    wd = prob.w_down if layout == "hd" else prob.w_down.T
    return tuple(dev.bf16(a) for a in (prob.x, prob.w_gate, prob.w_up, wd))


def _outputs(dev, y, saved, dx, dwg, dwu, dwd, bstats):
    """One step's outputs on the host, as _check takes them."""
    return dict(y=dev.host_f32(y), l1=float(dev.host(saved.l1)[0]), l0=dev.host(saved.active).astype(np.int64),
                dx=dev.host_f32(dx), dw_gate=dev.host_f32(dwg), dw_up=dev.host_f32(dwu), dw_down=dev.host_f32(dwd),
                fstats=saved.read_stats(), bstats=train_ops.read_train_stats(bstats))


def _run(dev, prob, dy, *, c=L1C, layout="hd", **opts):
    """Forward + backward through the functional API; the hybrid route unless opts name another."""
    opts.setdefault("path", "sparse")
    x, wg, wu, wd = _device_tensors(dev, prob, layout)
    m, d, h = prob.shape
    y = dev.full((m, d), "bfloat16", NAN_BF16)
    y, saved = train_ops.forward(x, wg, wu, wd, w_down_layout=layout, out=y, **opts)
    gdy = dev.bf16(dy)
    dx = dev.full((m, d), "bfloat16", NAN_BF16)
    bstats = dev.full((16,), "uint64", 0xABABABABABABABAB)
    dx, dwg, dwu, dwd = train_ops.backward(gdy, saved, x, wg, wu, wd, l1_coeff=c, dx=dx, stats=bstats)
    out = _outputs(dev, y, saved, dx, dwg, dwu, dwd, bstats)
    if layout == "dh":
        out["dw_down"] = out["dw_down"].T
    return out


def _errors(got, want, rows=None):
    """Relative Frobenius error of every output (plus L1 relative error and L0 mismatches)."""
    e = {}
    for k in ("y", "dx"):
        g = got[k] if rows is None else got[k][rows]
        e[k] = float("nan") if np.isnan(g).any() else gs.rel_frobenius(g, want[k])
    for k in ("dw_gate", "dw_up", "dw_down"):
        e[k] = float("nan") if np.isnan(got[k]).any() else gs.rel_frobenius(got[k], want[k])
    e["l1"] = abs(got["l1"] - want["l1"]) / want["l1"] if want["l1"] > 0 else abs(got["l1"])
    l0 = got["l0"] if rows is None else got["l0"][rows]
    e["l0_mismatch"] = int(np.abs(l0 - want["l0"]).sum())
    return e


def _diagnose(got, want, rows=None):
    """Worst rows of dx / y with their active counts (for failure messages)."""
    out = []
    for k in ("y", "dx"):
        g = (got[k] if rows is None else got[k][rows]).astype(np.float64)
        rn = np.linalg.norm(want[k], axis=1)
        re = np.linalg.norm(g - want[k], axis=1) / np.maximum(rn, 1e-30)
        for i in np.argsort(-re)[:3]:
            l0 = (got["l0"] if rows is None else got["l0"][rows])[i]
            out.append(f"{k} row {i}: rel {re[i]:.3e} |ref| {rn[i]:.3e} l0 got {l0} want {want['l0'][i]}")
    return "; ".join(out)


def _check(got, want, rows=None, tol=1e-2, what="", l1_tol=2e-3):
    e = _errors(got, want, rows)
    bad = [k for k in ("y", "dx", "dw_gate", "dw_up", "dw_down") if not e[k] < tol]
    if want["l1"] > 0:
        if not e["l1"] < l1_tol:
            bad.append("l1")
    elif got["l1"] != 0:
        bad.append("l1")
    if e["l0_mismatch"] > 4:
        bad.append("l0")
    zero = np.linalg.norm(want["y"], axis=1) == 0
    gy = got["y"] if rows is None else got["y"][rows]
    if not np.all(gy[zero] == 0):
        bad.append("zero rows")
    assert not bad, (f"{what}failed {bad}: errors {e}; tail rows {got['fstats']['tail_rows']}; "
                     f"{_diagnose(got, want, rows)}")
    return e


def _expected_tail_rows(prob, width, slots=32):
    import cupy as cp

    g = cp.asarray(prob.x) @ cp.asarray(prob.w_gate).T
    act = g > 0
    cnt = cp.asnumpy(act.sum(axis=1))
    h = act.shape[1]
    tiles = -(-h // 256)
    pad = cp.zeros((act.shape[0], tiles * 256), dtype=bool)
    pad[:, :h] = act
    tile_cnt = cp.asnumpy(pad.reshape(act.shape[0], tiles, 256).sum(axis=2))
    return (cnt > width) | (tile_cnt > slots - 1).any(axis=1)


def test_oracle_matches_numpy_reference(rng):
    prob, dy = _problem(rng, 7, 64, 512, "uniform2")
    want = _oracle(prob, dy, L1C)
    y, cache = ref.ffn_forward(prob.x.astype(np.float64), prob.w_gate.astype(np.float64),
                               prob.w_up.astype(np.float64), prob.w_down.astype(np.float64))
    dx, grads = ref.ffn_backward(dy.astype(np.float64), cache, l1_coeff=L1C)
    np.testing.assert_allclose(want["y"], y, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(want["dx"], dx, rtol=1e-9, atol=1e-12)
    for k in ("w_gate", "w_up", "w_down"):
        np.testing.assert_allclose(want["dw_" + k[2:]], grads[k], rtol=1e-9, atol=1e-12)
    assert abs(want["l1"] - ref.l1_sum(cache["h"])) < 1e-9 * max(1.0, want["l1"])


@pytest.mark.parametrize("pattern", ["uniform", "uniform2", "skewed", "hot", "zero_rows", "dense_rows", "overflow",
                                     "trained"])
@pytest.mark.parametrize("m", [1, 7, 129, 300, 2048])
def test_train_2048x5632(rng, pattern, m):
    dev = gs.adapter("cupy")
    prob, dy = _problem(rng, m, 2048, 5632, pattern)
    got = _run(dev, prob, dy)
    want = _oracle(prob, dy, L1C)
    _check(got, want)
    fs, bs = got["fstats"], got["bstats"]
    tail = _expected_tail_rows(prob, 64)
    assert fs["rows"] == m and fs["phase"] == 1 and bs["phase"] == 2 and fs["format"] == 1
    assert fs["tail_rows"] + fs["ell_rows"] == m and bs["tail_rows"] == fs["tail_rows"]
    assert abs(fs["tail_rows"] - int(tail.sum())) <= 2
    assert fs["ell_entries"] == bs["ell_entries"]
    assert fs["path"] == (1 if fs["tail_rows"] == 0 else (2 if fs["tail_rows"] == m else 3))


@pytest.mark.parametrize("shape", [(4096, 14336), (896, 4864), (1024, 2816), (512, 1000)])
@pytest.mark.parametrize("pattern", ["uniform", "skewed", "overflow", "trained"])
def test_train_other_shapes(rng, shape, pattern):
    dev = gs.adapter("cupy")
    prob, dy = _problem(rng, 129, *shape, pattern)
    _check(_run(dev, prob, dy), _oracle(prob, dy, L1C))


@pytest.mark.parametrize("opts", [dict(ell_width=8), dict(ell_width=256), dict(ell_width=32, tail_chunk_rows=16),
                                  dict(path="dense"), dict(kernels="portable"), dict(slots=64),
                                  dict(layout="dh"), dict(c=0.0)])
def test_train_options(rng, opts):
    dev = gs.adapter("cupy")
    prob, dy = _problem(rng, 300, 1024, 2816, "skewed")
    c = opts.pop("c", L1C)
    got = _run(dev, prob, dy, c=c, **opts)
    _check(got, _oracle(prob, dy, c), l1_tol=1e-2 if opts.get("path") == "dense" else 2e-3)
    if opts.get("path") == "dense":
        assert got["fstats"]["tail_rows"] == 300 and got["fstats"]["path"] == 2


def test_train_hot_neurons_split(rng):
    """Hot neurons in ~80% of 16384 tokens: their entries are split over several work items."""
    dev = gs.adapter("cupy")
    prob, dy = _problem(rng, 16384, 1024, 2816, "hot")
    got = _run(dev, prob, dy)
    _check(got, _oracle(prob, dy, L1C))
    assert got["bstats"]["max_neuron_count"] > 4096


def test_train_accumulate(rng):
    dev = gs.adapter("cupy")
    prob, dy = _problem(rng, 300, 1024, 2816, "skewed")
    m, d, h = prob.shape
    x, wg, wu, wd = _device_tensors(dev, prob)
    y, saved = train_ops.forward(x, wg, wu, wd)
    init = [gs.round_bf16(rng.standard_normal((h, d), dtype=np.float32)) for _ in range(3)]
    bufs = [dev.bf16(a) for a in init]
    train_ops.backward(dev.bf16(dy), saved, x, wg, wu, wd, l1_coeff=L1C, dw_gate=bufs[0], dw_up=bufs[1],
                       dw_down=bufs[2], accumulate=True)
    want = _oracle(prob, dy, L1C)
    for k, b, a in zip(("dw_gate", "dw_up", "dw_down"), bufs, init):
        err = gs.rel_frobenius(dev.host_f32(b), a + want[k])
        assert err < 1e-2, f"{k}: {err}"


@pytest.mark.parametrize("pattern", ["skewed", "hot", "dense_rows"])
def test_train_deterministic(rng, pattern):
    dev = gs.adapter("cupy")
    prob, dy = _problem(rng, 4096, 2048, 5632, pattern)
    a = _run(dev, prob, dy, ell_width=32, tail_chunk_rows=512)
    b = _run(dev, prob, dy, ell_width=32, tail_chunk_rows=512)
    for k in ("y", "dx", "dw_gate", "dw_up", "dw_down", "l0"):
        assert np.array_equal(a[k].view(np.uint32) if a[k].dtype == np.float32 else a[k],
                              b[k].view(np.uint32) if b[k].dtype == np.float32 else b[k]), f"{k} differs between runs"
    assert a["l1"] == b["l1"]


def test_train_non_default_stream(rng):
    import cupy as cp

    dev = gs.adapter("cupy")
    prob, dy = _problem(rng, 300, 1024, 2816, "uniform2")
    with cp.cuda.Stream(non_blocking=True) as s:
        got = _run(dev, prob, dy)
        s.synchronize()
    _check(got, _oracle(prob, dy, L1C))


@pytest.mark.parametrize("pattern", ["uniform", "skewed", "trained"])
def test_train_131072_tokens(rng, pattern):
    dev = gs.adapter("cupy")
    m = 131072
    prob, dy = _problem(rng, m, 2048, 5632, pattern)
    rows = np.unique(np.concatenate([rng.choice(m, 256, replace=False), [0, m - 1]]))
    got = _run(dev, prob, dy)
    want = _oracle(prob, dy, L1C, rows_out=rows)
    _check(got, want, rows=rows)
    assert got["fstats"]["rows"] == m


@pytest.mark.parametrize("layout", ["hd", "dh"])
def test_train_small_case(rng, layout):
    """Tiny mixed case (ELL rows, tail rows over several chunks, a partial tile, hot neurons) for
    compute-sanitizer; W_d as [D, H] too (its gradient staged as [H, D] and transposed)."""
    dev = gs.adapter("cupy")
    prob, dy = _problem(rng, 37, 256, 1000, "hot")
    prob.x[5, :-1] = 0.0
    prob.x[5, -1] = -1.0       # one fully dense row
    got = _run(dev, prob, dy, ell_width=8, tail_chunk_rows=16, layout=layout)
    _check(got, _oracle(prob, dy, L1C))


def test_train_small_hot_gemms(rng):
    """Small case with hot-neuron GEMMs (8 neurons in ~80% of 400 tokens, at least 256 ELL entries each), for
    compute-sanitizer: the hot selection and operand kernels run, between small cuBLASLt GEMMs."""
    dev = gs.adapter("cupy")
    prob, dy = _problem(rng, 400, 256, 1000, "hot")
    got = _run(dev, prob, dy)
    _check(got, _oracle(prob, dy, L1C))
    assert got["bstats"]["max_neuron_count"] >= 256, got["bstats"]


def test_train_small_dense_route(rng):
    """The dense route at a size compute-sanitizer's racecheck gets through (its activation, gather
    and accumulation kernels between small cuBLASLt GEMMs), with a fully dense row."""
    dev = gs.adapter("cupy")
    prob, dy = _problem(rng, 37, 256, 1000, "skewed")
    prob.x[3, :-1] = 0.0
    prob.x[3, -1] = -1.0
    got = _run(dev, prob, dy, path="dense")
    _check(got, _oracle(prob, dy, L1C), what="dense route: ", l1_tol=1e-2)
    assert got["fstats"]["path"] == 2 and got["bstats"]["path"] == 2, (got["fstats"], got["bstats"])


@pytest.mark.parametrize("kernels", ["auto", "portable"])
@pytest.mark.parametrize("rep", range(6))
def test_train_hot_129_repeat(rng, kernels, rep):
    """Repeats of a small hot-neuron case (fresh inputs each), both gate GEMM paths."""
    dev = gs.adapter("cupy")
    prob, dy = _problem(rng, 129, 2048, 5632, "hot")
    e = _check(_run(dev, prob, dy, kernels=kernels), _oracle(prob, dy, L1C))
    print("ERRORS", kernels, e)


def test_train_layer_class_accumulates(rng):
    """TwellTrainFFN: two backward calls accumulate into its gradient buffers."""
    dev = gs.adapter("cupy")
    prob, dy = _problem(rng, 129, 1024, 2816, "uniform")
    layer = train_ops.TwellTrainFFN(dev.bf16(prob.w_gate), dev.bf16(prob.w_up), dev.bf16(prob.w_down))
    x = dev.bf16(prob.x)
    want = _oracle(prob, dy, L1C)
    for _ in range(2):
        y = layer.forward(x)
        dx = layer.backward(dev.bf16(dy), l1_coeff=L1C)
    assert gs.rel_frobenius(dev.host_f32(y), want["y"]) < 1e-2
    assert gs.rel_frobenius(dev.host_f32(dx), want["dx"]) < 1e-2
    for k in ("w_gate", "w_up", "w_down"):
        err = gs.rel_frobenius(dev.host_f32(layer.grads[k]), 2 * want["dw_" + k[2:]])
        assert err < 1e-2, f"{k}: {err}"
    assert layer.last_stats()["rows"] == 129


# ---- the dense route (path="dense", and what path="auto" switches to) -----------------

@pytest.mark.parametrize("pattern", ["uniform2", "skewed", "zero_rows", "dense_rows"])
@pytest.mark.parametrize("m", [1, 129, 2048])
def test_train_dense_route(rng, pattern, m):
    dev = gs.adapter("cupy")
    prob, dy = _problem(rng, m, 2048, 5632, pattern)
    got = _run(dev, prob, dy, path="dense")
    _check(got, _oracle(prob, dy, L1C), what="dense route: ", l1_tol=1e-2)
    fs, bs = got["fstats"], got["bstats"]
    assert fs["path"] == 2 and bs["path"] == 2 and fs["tail_rows"] == m and fs["ell_rows"] == 0
    # The dense forward never waits; the backward waits for the saved header unless the call is a
    # replay (the functional API's shared plan may have seen these pool-recycled buffers before).
    assert fs["host_syncs"] == 0 and bs["host_syncs"] in (0, 1) and fs["phase"] == 1 and bs["phase"] == 2
    assert fs["active"] == int(got["l0"].sum()) and fs["max_row_count"] == int(got["l0"].max())


def _initial_grads(rng, dev, h, d, layout, accumulate):
    """Random bf16 starting values of dW_g, dW_u, dW_d (layout's W_d shape) and their device buffers
    for accumulate=True; ([...], [None] * 3) buffers otherwise."""
    init = [gs.round_bf16(rng.standard_normal(s, dtype=np.float32))
            for s in ((h, d), (h, d), (h, d) if layout == "hd" else (d, h))]
    return init, ([dev.bf16(a) for a in init] if accumulate else [None] * 3)


def _grad_and_reference(dev, k, got, start, want, layout, accumulate):
    """(gradient k as [H, D] on the host, the oracle's plus the starting value when accumulating)."""
    flip = k == "dw_down" and layout == "dh"
    g = dev.host_f32(got)
    base = (start.T if flip else start) if accumulate else 0.0
    return (g.T if flip else g), base + want[k]


@pytest.mark.parametrize("layout", ["hd", "dh"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_train_dense_route_chunks(rng, layout, accumulate):
    """M = 20000 > 8192 rows per chunk: weight gradients summed over 3 chunks in fp32, both W_d layouts."""
    dev = gs.adapter("cupy")
    prob, dy = _problem(rng, 20000, 512, 1024, "uniform2")
    m, d, h = prob.shape
    x, wg, wu, wd = _device_tensors(dev, prob, layout)
    plan = train_ops.TrainPlan(d, h, path="dense", w_down_layout=layout)
    y, saved = plan.forward(x, wg, wu, wd)
    init, bufs = _initial_grads(rng, dev, h, d, layout, accumulate)
    dx, dwg, dwu, dwd = plan.backward(dev.bf16(dy), saved, x, wg, wu, wd, l1_coeff=L1C, dw_gate=bufs[0],
                                      dw_up=bufs[1], dw_down=bufs[2], accumulate=accumulate)
    want = _oracle(prob, dy, L1C)
    assert saved.read_stats()["tail_chunks"] == 3
    assert gs.rel_frobenius(dev.host_f32(y), want["y"]) < 1e-2
    assert gs.rel_frobenius(dev.host_f32(dx), want["dx"]) < 1e-2
    for k, got, a in zip(("dw_gate", "dw_up", "dw_down"), (dwg, dwu, dwd), init):
        g, ref_rows = _grad_and_reference(dev, k, got, a, want, layout, accumulate)
        err = gs.rel_frobenius(g, ref_rows)
        assert err < 1e-2, f"{k}: {err}"


def test_train_dense_route_deterministic(rng):
    dev = gs.adapter("cupy")
    prob, dy = _problem(rng, 4096, 2048, 5632, "skewed")
    a = _run(dev, prob, dy, path="dense")
    b = _run(dev, prob, dy, path="dense")
    for k in ("y", "dx", "dw_gate", "dw_up", "dw_down", "l0"):
        assert np.array_equal(a[k], b[k]), f"{k} differs between runs"
    assert a["l1"] == b["l1"]


def test_train_auto_switches_routes(rng):
    """AUTO: dense below 3072 rows whatever the activity; from 3072, hybrid at first, dense after a
    forward at 2% activity, back to hybrid after one at 0.5%."""
    dev = gs.adapter("cupy")
    d, h, m = 1024, 2816, 4096
    plan = train_ops.TrainPlan(d, h, path="auto")
    hybrid_size = plan.saved_size(m)
    routes = []
    for pattern, rows in (("uniform", 1000), ("uniform2", m), ("uniform2", m), ("uniform2", m), ("uniform", m),
                          ("uniform", m), ("uniform", m)):
        prob, dy = _problem(rng, rows, d, h, pattern)
        x, wg, wu, wd = _device_tensors(dev, prob)
        y, saved = plan.forward(x, wg, wu, wd)
        bstats = dev.full((16,), "uint64", 0)
        dx, dwg, dwu, dwd = plan.backward(dev.bf16(dy), saved, x, wg, wu, wd, l1_coeff=L1C, stats=bstats)
        routes.append(plan.last_route())
        got = _outputs(dev, y, saved, dx, dwg, dwu, dwd, bstats)
        _check(got, _oracle(prob, dy, L1C), what=f"call {len(routes)} ({pattern}, {routes[-1]}): ",
               l1_tol=1e-2 if routes[-1] == "dense" else 2e-3)
    assert routes == ["dense", "hybrid", "dense", "dense", "dense", "hybrid", "hybrid"], routes
    assert plan.saved_size(m) == hybrid_size


def test_train_auto_dense_route_asks_for_full_chunks(rng):
    """AUTO preferring dense: workspace_size grows to room for 4096 dense rows per chunk, so the dense
    route runs M = 8192 in 2 chunks (the hybrid's workspace alone holds about 2300 dense rows)."""
    dev = gs.adapter("cupy")
    d, h, m = 1024, 2816, 8192
    plan = train_ops.TrainPlan(d, h, path="auto")
    hybrid_ws = plan.workspace_size(m)
    for _ in range(2):  # the first call runs hybrid and shows dense activity
        prob, dy = _problem(rng, m, d, h, "uniform2")
        x, wg, wu, wd = _device_tensors(dev, prob)
        y, saved = plan.forward(x, wg, wu, wd)
        bstats = dev.full((16,), "uint64", 0)
        dx, dwg, dwu, dwd = plan.backward(dev.bf16(dy), saved, x, wg, wu, wd, l1_coeff=L1C, stats=bstats)
    assert plan.last_route() == "dense"
    got = _outputs(dev, y, saved, dx, dwg, dwu, dwd, bstats)
    _check(got, _oracle(prob, dy, L1C), what="dense route, 2 chunks: ", l1_tol=1e-2)
    fs, bs = got["fstats"], got["bstats"]
    assert fs["tail_chunks"] == 2 and bs["tail_chunks"] == 2, (fs, bs)
    plan.saved_size(m)  # the route the next forward takes (dense), which workspace_size follows
    assert plan.workspace_size(m) > hybrid_ws


# ---- eager calls replayed as CUDA graphs (replay_cache.h): no host wait from the second sighting on ----

def _fixed_buffers(dev, plan, m, d, h, layout="hd"):
    """Output buffers kept across calls, as a training loop's allocator gives them back."""
    return dict(y=dev.full((m, d), "bfloat16", NAN_BF16), dx=dev.full((m, d), "bfloat16", NAN_BF16),
                dwg=dev.full((h, d), "bfloat16", NAN_BF16), dwu=dev.full((h, d), "bfloat16", NAN_BF16),
                dwd=dev.full((h, d) if layout == "hd" else (d, h), "bfloat16", NAN_BF16),
                fstats=dev.full((16,), "uint64", 0), bstats=dev.full((16,), "uint64", 0),
                l1=dev.full((1,), "float32", 0), active=dev.full((max(m, 1),), "int32", 0)[:m], saved=None)


def _refill(dev, arrays, values):
    """New contents, same device arrays (bf16 copied as raw 16-bit words)."""
    import cupy as cp

    for a, v in zip(arrays, values):
        a.view(cp.uint16)[...] = dev.bf16(v).view(cp.uint16)


def _fixed_step(dev, plan, bufs, ins, c=L1C):
    x, wg, wu, wd, gdy = ins
    _, saved = plan.forward(x, wg, wu, wd, out=bufs["y"], saved=bufs["saved"], stats=bufs["fstats"], l1=bufs["l1"],
                            active=bufs["active"])
    bufs["saved"] = saved
    plan.backward(gdy, saved, x, wg, wu, wd, l1_coeff=c, dx=bufs["dx"], dw_gate=bufs["dwg"], dw_up=bufs["dwu"],
                  dw_down=bufs["dwd"], stats=bufs["bstats"])
    out = {k: dev.bits(bufs[k]) for k in ("y", "dx", "dwg", "dwu", "dwd")}
    out["l1"] = float(dev.host(bufs["l1"])[0])
    out["l0"] = dev.host(bufs["active"]).copy()
    out["fstats"] = train_ops.read_train_stats(bufs["fstats"])
    out["bstats"] = train_ops.read_train_stats(bufs["bstats"])
    return out


@pytest.mark.parametrize("pattern,m,chunk", [("skewed", 300, 0), ("skewed", 2048, 256), ("dense_rows", 129, 0),
                                             ("uniform", 129, 0), ("hot", 1000, 128), ("overflow", 700, 0)])
@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_train_eager_replay_is_bitwise_the_eager_call(rng, pattern, m, chunk, path):
    """A plan with replay on: call 1 eager (one wait in forward and backward), call 2 captured and
    replayed, call 3 a replay (no wait): every output bitwise equal to a plan with replay off, and
    exact against the oracle; tail chunks at every padded size (tail counts across 128/256/512)."""
    dev = gs.adapter("cupy")
    prob, dy = _problem(rng, m, 1024, 2816, pattern)
    _, d, h = prob.shape
    ins = (*_device_tensors(dev, prob), dev.bf16(dy))
    off = train_ops.TrainPlan(d, h, path=path, tail_chunk_rows=chunk)
    off.set_replay(0)
    want_bits = _fixed_step(dev, off, _fixed_buffers(dev, off, m, d, h), ins)
    on = train_ops.TrainPlan(d, h, path=path, tail_chunk_rows=chunk)
    bufs = _fixed_buffers(dev, on, m, d, h)
    calls = [_fixed_step(dev, on, bufs, ins) for _ in range(3)]
    for i, got in enumerate(calls):
        for k in ("y", "dx", "dwg", "dwu", "dwd", "l0"):
            assert np.array_equal(got[k], want_bits[k]), f"call {i + 1}: {k} differs from the eager plan's"
        assert got["l1"] == want_bits["l1"], f"call {i + 1}: l1"
    replays, captures = on.replay_counts()
    assert captures == 2 and replays == 4, (replays, captures)  # forward and backward: captured at call 2
    first, last = calls[0], calls[2]
    hybrid = on.last_route() == "hybrid"
    assert last["fstats"]["host_syncs"] == 0 and last["bstats"]["host_syncs"] == 0
    assert first["bstats"]["host_syncs"] == 1 and first["fstats"]["host_syncs"] == (1 if hybrid else 0)
    for k in ("tail_rows", "ell_rows", "tail_chunks", "active", "path"):
        assert last["fstats"][k] == first["fstats"][k], k
    want = _oracle(prob, dy, L1C)
    got = dict(y=dev.host_f32(bufs["y"]), dx=dev.host_f32(bufs["dx"]), dw_gate=dev.host_f32(bufs["dwg"]),
               dw_up=dev.host_f32(bufs["dwu"]), dw_down=dev.host_f32(bufs["dwd"]), l1=last["l1"],
               l0=last["l0"].astype(np.int64), fstats=last["fstats"])
    _check(got, want, l1_tol=1e-2 if not hybrid else 2e-3)


def test_train_replay_follows_new_inputs_in_the_same_buffers(rng):
    """Replays read the buffers' current contents: new x / dy values (another tail count, crossing
    the padded chunk sizes) in the same arrays give the new exact results, with no host wait."""
    dev = gs.adapter("cupy")
    m, d, h = 2048, 1024, 2816
    plan = train_ops.TrainPlan(d, h, path="sparse", tail_chunk_rows=512)
    bufs = _fixed_buffers(dev, plan, m, d, h)
    ins = None
    tails = []
    for i, pattern in enumerate(("uniform", "skewed", "skewed", "uniform", "overflow", "dense_rows")):
        prob, dy = _problem(rng, m, d, h, pattern)
        if ins is None:
            ins = (*_device_tensors(dev, prob), dev.bf16(dy))
        else:
            _refill(dev, ins, (prob.x, prob.w_gate, prob.w_up, prob.w_down, dy))
        got = _fixed_step(dev, plan, bufs, ins)
        tails.append(got["fstats"]["tail_rows"])
        if i >= 2:
            assert got["fstats"]["host_syncs"] == 0 and got["bstats"]["host_syncs"] == 0, (i, pattern)
        res = dict(y=dev.host_f32(bufs["y"]), dx=dev.host_f32(bufs["dx"]), dw_gate=dev.host_f32(bufs["dwg"]),
                   dw_up=dev.host_f32(bufs["dwu"]), dw_down=dev.host_f32(bufs["dwd"]), l1=got["l1"],
                   l0=got["l0"].astype(np.int64), fstats=got["fstats"])
        _check(res, _oracle(prob, dy, L1C), what=f"call {i + 1} ({pattern}): ")
    assert len(set(tails)) >= 3, tails


def test_train_replayed_backward_marks_a_foreign_saved_state_with_nan(rng):
    """Eager, a saved state that is not this call's forward's is an error; once the call is replayed
    the check is on the device, and the replay fills dx and the weight gradients with NaN."""
    import cupy as cp

    dev = gs.adapter("cupy")
    prob, dy = _problem(rng, 300, 1024, 2816, "skewed")
    m, d, h = prob.shape
    ins = (*_device_tensors(dev, prob), dev.bf16(dy))
    plan = train_ops.TrainPlan(d, h, path="sparse")
    bufs = _fixed_buffers(dev, plan, m, d, h)
    for _ in range(3):
        _fixed_step(dev, plan, bufs, ins)
    saved = bufs["saved"]
    off = saved.ptr - saved.buffer.data.ptr
    hdr = saved.buffer[off:off + 64].view(cp.uint64)
    hdr[1] = m + 1  # the header of another M
    x, wg, wu, wd, gdy = ins
    plan.backward(gdy, saved, x, wg, wu, wd, l1_coeff=L1C, dx=bufs["dx"], dw_gate=bufs["dwg"], dw_up=bufs["dwu"],
                  dw_down=bufs["dwd"], stats=bufs["bstats"])
    for k in ("dx", "dwg", "dwu", "dwd"):
        assert np.isnan(dev.host_f32(bufs[k])).all(), k
    plan.set_replay(0)
    with pytest.raises(train_ops._ffi.InvalidArgumentError, match="saved was not written"):
        plan.backward(gdy, saved, x, wg, wu, wd, l1_coeff=L1C, dx=bufs["dx"], dw_gate=bufs["dwg"], dw_up=bufs["dwu"],
                      dw_down=bufs["dwd"], stats=bufs["bstats"])


def test_train_auto_switches_routes_while_replayed(rng):
    """AUTO with the same buffers every call (so calls replay): a replayed forward's activity reaches
    the route choice through the asynchronous read-back; the routes follow the activity as eagerly."""
    dev = gs.adapter("cupy")
    d, h, m = 1024, 2816, 4096
    plan = train_ops.TrainPlan(d, h, path="auto")
    bufs = _fixed_buffers(dev, plan, m, d, h)
    ins = None
    routes = []
    for pattern in ("uniform", "uniform", "uniform", "uniform2", "uniform2", "uniform2", "uniform", "uniform"):
        prob, dy = _problem(rng, m, d, h, pattern)
        if ins is None:
            ins = (*_device_tensors(dev, prob), dev.bf16(dy))
        else:
            _refill(dev, ins, (prob.x, prob.w_gate, prob.w_up, prob.w_down, dy))
        if bufs["saved"] is not None and bufs["saved"].nbytes < plan.saved_size(m):
            bufs["saved"] = None
        got = _fixed_step(dev, plan, bufs, ins)
        routes.append(plan.last_route())
        res = dict(y=dev.host_f32(bufs["y"]), dx=dev.host_f32(bufs["dx"]), dw_gate=dev.host_f32(bufs["dwg"]),
                   dw_up=dev.host_f32(bufs["dwu"]), dw_down=dev.host_f32(bufs["dwd"]), l1=got["l1"],
                   l0=got["l0"].astype(np.int64), fstats=got["fstats"])
        _check(res, _oracle(prob, dy, L1C), what=f"call {len(routes)} ({pattern}, {routes[-1]}): ",
               l1_tol=1e-2 if routes[-1] == "dense" else 2e-3)
    assert routes == ["hybrid"] * 4 + ["dense"] * 3 + ["hybrid"], routes
    assert plan.replay_counts()[0] > 0


# ---- hot neurons' weight gradients through GEMMs (train_kernels.cuh, "hot neurons") ----

@pytest.mark.parametrize("pattern,m", [("uniform2", 16384), ("trained", 4096), ("hot", 1000), ("hot", 255)])
@pytest.mark.parametrize("layout,accumulate", [("hd", False), ("dh", True)])
def test_train_hot_neuron_gemms(rng, pattern, m, layout, accumulate):
    """Neurons with many ELL entries take their weight gradients from dense GEMMs: every neuron
    qualifying (uniform 2% at 16384 tokens: the threshold search keeps the busiest 128), a trained
    model's few hot ones, a hot pattern with tail rows, and M below the hot floor (gathers only);
    both W_d layouts, overwrite and accumulate."""
    dev = gs.adapter("cupy")
    prob, dy = _problem(rng, m, 1024, 2816, pattern)
    _, d, h = prob.shape
    x, wg, wu, wd = _device_tensors(dev, prob, layout)
    plan = train_ops.TrainPlan(d, h, path="sparse", w_down_layout=layout)
    y, saved = plan.forward(x, wg, wu, wd)
    init, bufs = _initial_grads(rng, dev, h, d, layout, accumulate)
    bstats = dev.full((16,), "uint64", 0)
    dx, dwg, dwu, dwd = plan.backward(dev.bf16(dy), saved, x, wg, wu, wd, l1_coeff=L1C, dw_gate=bufs[0],
                                      dw_up=bufs[1], dw_down=bufs[2], accumulate=accumulate, stats=bstats)
    want = _oracle(prob, dy, L1C)
    assert gs.rel_frobenius(dev.host_f32(dx), want["dx"]) < 1e-2
    for k, got, a in zip(("dw_gate", "dw_up", "dw_down"), (dwg, dwu, dwd), init):
        g, ref_rows = _grad_and_reference(dev, k, got, a, want, layout, accumulate)
        err = gs.rel_frobenius(g, ref_rows)
        assert err < 1e-2, f"{k}: {err}"
        # per neuron too: a hot neuron's row wrong would hide in the whole-matrix norm
        per = np.linalg.norm(g - ref_rows, axis=1) / np.maximum(np.linalg.norm(ref_rows, axis=1), 1e-20)
        assert np.max(per[np.linalg.norm(want[k], axis=1) > 0]) < 3e-2, f"{k}: worst neuron {np.max(per)}"
    bs = train_ops.read_train_stats(bstats)
    if pattern == "uniform2":
        assert bs["max_neuron_count"] > 256
