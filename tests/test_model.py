"""Reference LM: gradients of every layer against finite differences (float64), the L1 term,
AdamW, determinism, the corpus hash, the sparsity instruments, checkpoints and the export.

Finite differences are central, step 1e-6, in float64; the analytic gradients must agree to
rtol 1e-5 (truncation error is O(eps²) ~ 1e-12 relative, rounding ~ 1e-16/1e-6 = 1e-10, so 1e-5
leaves a wide margin while any wrong term in a backward is off by O(1)). Inputs come from fixed
seeds so a ReLU kink never sits within eps of a sampled point by chance from run to run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig

import numpy as np
import pytest

from twell import reference as ref
from twell.lm import model as M
from twell.lm import sparsity as sp
from twell.lm import train as T
from twell.lm.corpus import SEPARATOR, STDLIB_FILES, stdlib_corpus, text_corpus

EPS = 1e-6
RTOL = 1e-5
ATOL = 1e-9


def numgrad(f, x, n_samples=None, rng=None, eps=EPS):
    """Central-difference gradient of scalar f() w.r.t. array x (perturbed in place).

    With n_samples, only that many random entries are checked; returns (indices, values).
    """
    flat = x.reshape(-1)
    if n_samples is None or n_samples >= flat.size:
        idx = np.arange(flat.size)
    else:
        idx = (rng or np.random.default_rng(0)).choice(flat.size, n_samples, replace=False)
    vals = np.empty(idx.size)
    for n, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        vals[n] = (fp - fm) / (2 * eps)
    return idx, vals


def check_grad(f, x, analytic, n_samples=None, rng=None):
    idx, num = numgrad(f, x, n_samples, rng)
    np.testing.assert_allclose(analytic.reshape(-1)[idx], num, rtol=RTOL, atol=ATOL)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

def test_embedding_grad(rng):
    table = rng.standard_normal((7, 5))
    ids = np.array([[0, 3, 3], [6, 0, 2]])          # repeated ids accumulate
    w = rng.standard_normal((2, 3, 5))
    f = lambda: float(np.sum(w * M.embedding_forward(ids, table)[0]))
    _, cache = M.embedding_forward(ids, table)
    check_grad(f, table, M.embedding_backward(w, cache))


def test_rmsnorm_grad(rng):
    x = rng.standard_normal((2, 3, 6))
    weight = 1 + 0.1 * rng.standard_normal(6)
    w = rng.standard_normal((2, 3, 6))
    f = lambda: float(np.sum(w * M.rmsnorm_forward(x, weight)[0]))
    y, cache = M.rmsnorm_forward(x, weight)
    dx, dweight = M.rmsnorm_backward(w, cache)
    check_grad(f, x, dx)
    check_grad(f, weight, dweight)
    # unit RMS before the gain
    np.testing.assert_allclose(np.sqrt(np.mean((y / weight) ** 2, -1)), 1, rtol=1e-4)


def test_rope_grad_and_properties(rng):
    T_, hd = 5, 6
    cos, sin = M.rope_tables(T_, hd, dtype=np.float64)
    x = rng.standard_normal((2, T_, hd))
    w = rng.standard_normal((2, T_, hd))
    f = lambda: float(np.sum(w * M.rope_apply(x, cos, sin)))
    check_grad(f, x, M.rope_apply_backward(w, cos, sin))
    y = M.rope_apply(x, cos, sin)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1))
    # q·k after RoPE depends only on the offset between positions
    q, k = rng.standard_normal(hd), rng.standard_normal(hd)
    rot = lambda v, p: M.rope_apply(np.tile(v, (T_, 1)), cos, sin)[p]
    np.testing.assert_allclose(rot(q, 3) @ rot(k, 1), rot(q, 4) @ rot(k, 2), rtol=1e-12)
    np.testing.assert_allclose(rot(q, 0), q)


def _attn_inputs(rng, B=2, T_=4, d=8):
    x = rng.standard_normal((B, T_, d))
    wqkv = 0.5 * rng.standard_normal((d, 3 * d))
    wo = 0.5 * rng.standard_normal((d, d))
    cos, sin = M.rope_tables(T_, d // 2, dtype=np.float64)
    return x, wqkv, wo, cos, sin


def test_attention_grad(rng):
    x, wqkv, wo, cos, sin = _attn_inputs(rng)
    w = rng.standard_normal(x.shape)
    f = lambda: float(np.sum(w * M.attention_forward(x, wqkv, wo, 2, cos, sin)[0]))
    _, cache = M.attention_forward(x, wqkv, wo, 2, cos, sin)
    dx, g = M.attention_backward(w, cache)
    check_grad(f, x, dx)
    check_grad(f, wqkv, g["wqkv"])
    check_grad(f, wo, g["wo"])


def test_attention_is_causal(rng):
    x, wqkv, wo, cos, sin = _attn_inputs(rng, T_=6)
    y0, _ = M.attention_forward(x, wqkv, wo, 2, cos, sin)
    x2 = x.copy()
    x2[:, 4:] += rng.standard_normal(x2[:, 4:].shape)
    y1, _ = M.attention_forward(x2, wqkv, wo, 2, cos, sin)
    np.testing.assert_array_equal(y0[:, :4], y1[:, :4])
    assert not np.allclose(y0[:, 4:], y1[:, 4:])


@pytest.mark.parametrize("activation,gated", [("relu", True), ("silu", True), ("relu", False)])
@pytest.mark.parametrize("l1", [0.0, 0.37])
def test_ffn_grad_with_l1(rng, activation, gated, l1):
    d, H = 6, 10
    x = rng.standard_normal((2, 3, d))
    wg = rng.standard_normal((H, d)) if gated else None
    wu, wd = rng.standard_normal((H, d)), rng.standard_normal((H, d))
    w = rng.standard_normal(x.shape)

    def f():
        y, cache = M.ffn_forward(x, wg, wu, wd, activation, gated)
        return float(np.sum(w * y)) + l1 * ref.l1_sum(cache[0]["h"])

    _, cache = M.ffn_forward(x, wg, wu, wd, activation, gated)
    if activation == "relu" and gated:
        assert (cache[0]["h"] == 0).any()                # the L1 kink is exercised
    dx, g = M.ffn_backward(w, cache, l1_coeff=l1)
    check_grad(f, x, dx)
    check_grad(f, wu, g["w_up"])
    check_grad(f, wd, g["w_down"])
    if gated:
        check_grad(f, wg, g["w_gate"])


def test_head_and_cross_entropy_grad(rng):
    x = rng.standard_normal((5, 4))
    emb = rng.standard_normal((9, 4))
    tgt = np.array([0, 8, 3, 3, 1])

    def f():
        return M.cross_entropy(M.head_forward(x, emb)[0], tgt)[0]

    logits, cache = M.head_forward(x, emb)
    loss, dlogits = M.cross_entropy(logits, tgt)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(loss, -np.mean(np.log(p[np.arange(5), tgt])), rtol=1e-12)
    dx, demb = M.head_backward(dlogits, cache)
    check_grad(f, x, dx)
    check_grad(f, emb, demb)


# ---------------------------------------------------------------------------------------------
# The whole LM and the L1 recipe
# ---------------------------------------------------------------------------------------------

def tiny_lm(activation="relu", gated=True, seed=0, L=2):
    cfg = M.ModelConfig(vocab_size=11, d_model=8, n_layers=L, n_heads=2, d_hidden=12,
                        max_seq_len=8, activation=activation, gated=gated, init_std=0.4,
                        dtype="float64")
    return M.TransformerLM(cfg, seed=seed)


@pytest.mark.parametrize("activation,gated", [("relu", True), ("silu", True), ("relu", False)])
def test_lm_grad_full(activation, gated):
    lm = tiny_lm(activation, gated)
    r = np.random.default_rng(7)
    ids = r.integers(0, 11, (2, 5))
    tgt = r.integers(0, 11, (2, 5))
    lam = 0.05
    out, grads = lm.loss_and_grads(ids, tgt, lam)
    if activation == "relu":
        assert 0 < np.mean([np.mean(h == 0) for h in out["h"]]) < 1
    f = lambda: lm.forward(ids, tgt, lam, keep_cache=False)[0]["loss"]
    assert set(grads) == set(lm.params)
    for name, p in lm.params.items():
        check_grad(f, p, grads[name], n_samples=12, rng=np.random.default_rng(len(name)))


def test_l1_term_definition_and_gradient():
    lm = tiny_lm(L=3)
    r = np.random.default_rng(3)
    ids, tgt = r.integers(0, 11, (3, 4)), r.integers(0, 11, (3, 4))
    out0, g0 = lm.loss_and_grads(ids, tgt, 0.0)
    lam = 0.8
    out1, g1 = lm.loss_and_grads(ids, tgt, lam)
    # l1 = mean over layers of (mean over tokens of sum_j |h_j|)
    expect = np.mean([np.abs(h).sum(axis=1).mean() for h in out1["h"]])
    np.testing.assert_allclose(out1["l1"], expect, rtol=1e-12)
    np.testing.assert_allclose(out1["loss"], out1["ce"] + lam * expect, rtol=1e-12)
    np.testing.assert_allclose(out0["ce"], out1["ce"], rtol=1e-12)
    # the gradient difference is exactly the gradient of lam * l1
    f = lambda: lam * lm.forward(ids, tgt, keep_cache=False)[0]["l1"]
    for name in ("l0.w_gate", "l1.w_up", "l2.w_gate", "l0.wqkv", "emb"):
        check_grad(f, lm.params[name], g1[name] - g0[name], n_samples=10,
                   rng=np.random.default_rng(1))
    assert np.allclose(g1["final_norm"], g0["final_norm"])   # after the last FFN: untouched


def test_forward_shapes_and_float32():
    cfg = M.ModelConfig(d_model=16, n_layers=2, n_heads=2, d_hidden=32, max_seq_len=16)
    lm = M.TransformerLM(cfg, seed=0)
    ids, tgt = np.random.default_rng(0).integers(0, 256, (2, 3, 16))
    out, grads = lm.loss_and_grads(ids, tgt, 0.01)
    assert out["logits"].shape == (48, 256) and out["logits"].dtype == np.float32
    assert [h.shape for h in out["h"]] == [(48, 32)] * 2
    assert all(g.dtype == np.float32 for g in grads.values())
    assert abs(out["ce"] - np.log(256)) < 0.1               # near-uniform at init
    with pytest.raises(ValueError):
        lm.forward(np.zeros((1, 17), dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# Optimiser, schedule, determinism
# ---------------------------------------------------------------------------------------------

def test_adamw_step_matches_formula():
    p = {"w": np.array([[1.0, -2.0]]), "g": np.array([0.5])}
    opt = T.AdamW(p, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    w0, g0 = p["w"].copy(), p["g"].copy()
    grads = {"w": np.array([[0.3, -0.1]]), "g": np.array([2.0])}
    lr = 0.01
    for _ in range(2):
        opt.step(p, grads, lr)
    # by hand: constant gradient g -> m_hat = g, v_hat = g^2 at every step
    w = w0.copy()
    gg = g0.copy()
    for _ in (1, 2):
        w = w * (1 - lr * 0.1) - lr * grads["w"] / (np.abs(grads["w"]) + 1e-8)
        gg = gg - lr * grads["g"] / (np.abs(grads["g"]) + 1e-8)   # no decay on 1-D gains
    np.testing.assert_allclose(p["w"], w, rtol=1e-12)
    np.testing.assert_allclose(p["g"], gg, rtol=1e-12)


def test_clip_and_schedules():
    g = {"a": np.array([3.0]), "b": np.array([[4.0]])}
    assert T.clip_grad_norm(g, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose([g["a"][0], g["b"][0, 0]], [0.6, 0.8])
    assert T.clip_grad_norm(g, 10.0) == pytest.approx(1.0)
    cfg = T.TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_frac=0.1,
                        l1_lambda=2.0, l1_warmup_steps=20)
    assert T.lr_at(0, cfg) == pytest.approx(0.1)
    assert T.lr_at(9, cfg) == pytest.approx(1.0)
    assert T.lr_at(99, cfg) == pytest.approx(0.1)
    lrs = [T.lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert T.l1_at(0, cfg) == pytest.approx(0.1) and T.l1_at(19, cfg) == 2.0
    assert T.l1_at(50, T.TrainConfig(l1_lambda=0.3)) == 0.3


def _tiny_corpus():
    data = np.frombuffer((b"def f(x):\n    return x + 1\n" * 200), dtype=np.uint8)
    from twell.lm.corpus import Corpus
    return Corpus(train=data[:4000].copy(), val=data[4000:].copy(), meta={"sha256": "x"})


def _tiny_run(seed, l1=0.01, steps=4):
    mc = M.ModelConfig(d_model=16, n_layers=2, n_heads=2, d_hidden=32, max_seq_len=16)
    tc = T.TrainConfig(steps=steps, batch_size=4, seq_len=16, l1_lambda=l1, eval_every=2,
                       eval_batches=1, warmup_steps=2, seed=seed, reinit_dead_every=2)
    return T.train(mc, tc, _tiny_corpus())


def test_training_is_deterministic():
    m1, a = _tiny_run(seed=5)
    m2, b = _tiny_run(seed=5)
    m3, _ = _tiny_run(seed=6)
    for k in m1.params:
        np.testing.assert_array_equal(m1.params[k], m2.params[k])
    assert a["history"]["ce"] == b["history"]["ce"]
    assert a["evals"][-1]["val_ce"] == b["evals"][-1]["val_ce"]
    assert not np.array_equal(m1.params["emb"], m3.params["emb"])
    assert len(a["evals"]) == 2 and "histogram" in a["evals"][-1]["layers"][0]
    json.dumps(a, default=T._json_default)                    # metrics are JSON-serialisable


def test_training_reduces_loss():
    _, met = _tiny_run(seed=0, l1=0.0, steps=30)
    ce = met["history"]["ce"]
    assert np.mean(ce[-5:]) < np.mean(ce[:5]) - 0.5


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------

def test_stdlib_corpus_hash_is_stable():
    a = stdlib_corpus()
    b = stdlib_corpus()
    assert a.sha256 == b.sha256 and np.array_equal(a.train, b.train)
    # the hash is sha256 of the files in the pinned order joined by the separator
    root = sysconfig.get_paths()["stdlib"]
    h = hashlib.sha256()
    for i, rel in enumerate(a.meta["files"]):
        with open(os.path.join(root, *rel.split("/")), "rb") as f:
            h.update(f.read())
        if i + 1 < len(a.meta["files"]):
            h.update(SEPARATOR)
    assert h.hexdigest() == a.sha256
    assert a.meta["files"] == [f for f in STDLIB_FILES if f not in a.meta["missing"]]
    assert a.train.size + a.val.size == a.meta["n_bytes"] + len(SEPARATOR) * (len(a.meta["files"]) - 1)
    assert 0.08 < a.val.size / (a.train.size + a.val.size) < 0.12
    assert a.train.dtype == np.uint8 and a.meta["python_version"]
    # the split does not change the hash
    assert stdlib_corpus(val_fraction=0.2).sha256 == a.sha256


def test_text_corpus(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"hello world\n" * 500)
    c = text_corpus(str(p))
    assert c.sha256 == hashlib.sha256(b"hello world\n" * 500).hexdigest()
    assert c.train.size == 5400 and c.val.size == 600
    (tmp_path / "small.txt").write_bytes(b"x")
    with pytest.raises(ValueError):
        text_corpus(str(tmp_path / "small.txt"))


# ---------------------------------------------------------------------------------------------
# Instruments
# ---------------------------------------------------------------------------------------------

def test_instruments_on_hand_made_activations():
    H = 600                                          # tiles of 256, 256, 88 columns
    h = np.zeros((4, H), dtype=np.float32)
    h[0, [1, 2, 300]] = [1.0, -2.0, 0.5]             # 3 active, negative values count too
    h[1, :40] = 1.0                                   # 40 in tile 0: over capacity 31
    h[2, 512:600] = 3.0                               # 88 in the partial last tile
    # row 3: all zero
    counts = sp.active_counts(h)
    np.testing.assert_array_equal(counts, [3, 40, 88, 0])
    np.testing.assert_array_equal(sp.tile_counts(h), [[2, 1, 0], [40, 0, 0], [0, 0, 88], [0, 0, 0]])
    np.testing.assert_array_equal(sp.tile_counts(h, tile_cols=100)[2], [0, 0, 0, 0, 0, 88])
    tw = sp.twell_overflow(h, slots=32)
    assert tw == {"capacity": 31, "rows_rate": 0.5, "tiles_rate": 2 / 12, "max_tile_count": 88}
    assert sp.twell_overflow(h, slots=64)["rows_rate"] == 0.25
    assert sp.hybrid_overflow_rate(h, 32) == 0.5
    assert sp.hybrid_overflow_rate(h, 40) == 0.25
    assert sp.hybrid_overflow_rate(counts, 2) == 0.75
    hist = sp.active_histogram(counts, H)
    assert hist.size == H + 1 and hist[0] == 1 and hist[3] == 1 and hist[88] == 1 and hist.sum() == 4
    st = sp.layer_stats(h, histogram=True)
    assert st["active_mean"] == pytest.approx(131 / 4)
    assert st["active_max"] == 88
    assert st["zero_fraction"] == pytest.approx(1 - 131 / 2400)
    assert st["dead_fraction"] == pytest.approx(1 - (3 + 38 + 88) / 600)   # cols 1, 2 shared
    assert st["hybrid_overflow"]["32"] == 0.5 and st["twell_overflow_rows"] == 0.5
    tr = sp.NeuronActivity(H)
    tr.update(h[:2])
    tr.update(h[2:])
    assert tr.tokens == 4 and tr.dead_fraction() == pytest.approx(st["dead_fraction"])
    assert tr.firing_rate()[1] == 0.5 and tr.summary()["max_firing_rate"] == 0.5
    assert 45 in tr.dead_neurons() and 300 not in tr.dead_neurons()


def test_instruments_agree_with_format_encoder():
    fmt = pytest.importorskip("twell.format")
    r = np.random.default_rng(0)
    g = r.standard_normal((64, 700)).astype(np.float32) - 1.8   # ~3.6% positive, some overflow
    g[5, :300] = 1.0
    packed = fmt.encode(g, slots=32)
    h = np.maximum(g, 0)
    tw = sp.twell_overflow(h, slots=32)
    assert tw["max_tile_count"] == packed.stats["max_tile_count"]
    assert tw["rows_rate"] * 64 == packed.stats["overflow_rows"]
    assert tw["tiles_rate"] * 64 * 3 == packed.stats["overflow_tiles"]


# ---------------------------------------------------------------------------------------------
# Checkpoint and export
# ---------------------------------------------------------------------------------------------

def test_checkpoint_roundtrip(tmp_path):
    lm = tiny_lm()
    path = str(tmp_path / "ck.npz")
    T.save_checkpoint(path, lm, {"note": "x"})
    lm2, meta = T.load_checkpoint(path)
    assert meta == {"note": "x"} and lm2.cfg == lm.cfg
    ids = np.random.default_rng(0).integers(0, 11, (2, 6))
    np.testing.assert_array_equal(lm.forward(ids, keep_cache=False)[0]["logits"],
                                  lm2.forward(ids, keep_cache=False)[0]["logits"])


def test_export_layout_reproduces_h(tmp_path):
    cfg = M.ModelConfig(d_model=16, n_layers=2, n_heads=2, d_hidden=32, max_seq_len=8)
    lm = M.TransformerLM(cfg, seed=1)
    ids = np.random.default_rng(0).integers(0, 256, (3, 8))
    path = str(tmp_path / "e.npz")
    T.export_ffn(lm, ids, path, meta={"label": "t"}, batch_size=2)
    meta, arrays = T.load_export(path)
    assert meta["format"] == "twell-ffn-export" and meta["tokens"] == 24 and meta["label"] == "t"
    np.testing.assert_array_equal(arrays["tokens"], ids)
    for layer in range(2):
        x = arrays[f"x_{layer}"]
        assert x.shape == (24, 16) and arrays[f"h_{layer}"].shape == (24, 32)
        assert arrays[f"w_down_{layer}"].shape == (32, 16)
        y, cache = ref.ffn_forward(x, arrays[f"w_gate_{layer}"], arrays[f"w_up_{layer}"],
                                   arrays[f"w_down_{layer}"])
        h = arrays[f"h_{layer}"]
        np.testing.assert_array_equal(cache["h"] == 0, h == 0)    # same sparsity pattern
        np.testing.assert_allclose(cache["h"], h, rtol=1e-4, atol=1e-6)   # BLAS blocking differs


# ---------------------------------------------------------------------------------------------
# The two commands, on tiny settings
# ---------------------------------------------------------------------------------------------

def test_demo_quick(tmp_path):
    from twell.lm import demo
    res = demo.run_demo(str(tmp_path), quick=True, progress=False, plots=False, gpu=False,
                        save_model=True, report=None)
    assert set(res["runs"]) == {"dense", f"L1 {demo.DEMO_L1:g}"}
    assert res["demo"]["steps"] == 40 and res["demo"]["params"] > 0
    assert "validation CE" in res["table"] and "within_5pct" in res["verdict"]
    written = json.loads((tmp_path / "demo_metrics.json").read_text())
    assert written["runs"]["dense"]["corpus"]["sha256"] == res["runs"]["dense"]["corpus"]["sha256"]
    meta, arrays = T.load_export(str(tmp_path / "ffn_export_l1.npz"))
    assert meta["n_layers"] == 2 and arrays["h_0"].shape[1] == 128
    # the same seed gives the L1 run the dense run's initial weights and batches
    d, s = res["runs"]["dense"]["history"], res["runs"][f"L1 {demo.DEMO_L1:g}"]["history"]
    assert d["ce"][0] == s["ce"][0] and d["l1_lambda"][0] == 0 and s["l1_lambda"][0] > 0


def test_train_ref_cli(tmp_path):
    import argparse
    p = T.add_train_ref_args(argparse.ArgumentParser())
    args = p.parse_args(["--out", str(tmp_path), "--l1", "0", "0.01", "--steps", "6",
                         "--d-model", "16", "--layers", "1", "--heads", "2", "--hidden", "64",
                         "--seq-len", "16", "--batch-size", "4", "--eval-every", "3",
                         "--eval-batches", "1", "--export", "--export-tokens", "32",
                         "--no-plots", "--quiet"])
    assert T.main_train_ref(args) == 0
    runs = json.loads((tmp_path / "metrics.json").read_text())["runs"]
    assert set(runs) == {"dense", "L1 0.01"}
    assert len(runs["dense"]["evals"]) == 2
    lm, meta = T.load_checkpoint(str(tmp_path / "checkpoint_L1_0.01.npz"))
    assert lm.cfg.d_hidden == 64 and meta["label"] == "L1 0.01"
    emeta, arrays = T.load_export(str(tmp_path / "ffn_export_L1_0.01.npz"))
    assert arrays["x_0"].shape == (32, 16) and emeta["l1_lambda"] == 0.01


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    _, a = _tiny_run(seed=0, l1=0.0)
    _, b = _tiny_run(seed=0, l1=0.05)
    paths = T.plot_runs({"dense": a, "L1 0.05": b}, str(tmp_path), prefix="t_")
    assert [os.path.basename(p) for p in paths] == ["t_loss.png", "t_active.png", "t_histogram.png"]
    assert all(os.path.getsize(p) > 1000 for p in paths)


@pytest.mark.gpu
def test_gpu_check_on_trained_model():
    """The demo's GPU step: kernels on a (quickly) trained model's real activations vs NumPy."""
    from twell.lm import demo
    mc, tc = demo.demo_configs(quick=True)
    lm, _ = T.train(mc, tc, _tiny_corpus())
    vx, _ = T.val_windows(_tiny_corpus().val, 8, tc.seq_len)
    res = demo.gpu_check(lm, vx, slots=32)
    assert res["ran"], res
    assert res["ok"], res
