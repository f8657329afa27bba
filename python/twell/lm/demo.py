"""``twell demo``: see activation sparsity appear on your own CPU in a few minutes.

Trains the NumPy reference LM (twell.lm.model) twice on the built-in corpus (standard-library source,
no download), with the same seed, batches and schedule: once with λ = 0 (dense baseline, ReLU
gates) and once with the L1 recipe (loss = CE + λ · mean over layers of mean over tokens of
Σ_j |h_j|). It prints a comparison table (validation loss, zeros, active neurons per token, dead
neurons, TwELL / hybrid overflow), writes demo_metrics.json and PNG plots, and, when the GPU
kernels are available (``twell.available()``), runs them on the trained model's real activations
and checks them against NumPy (``gpu_check``). The CPU part needs nothing but NumPy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from .. import reference as ref
from .._argtypes import existing_file, nonneg_float, output_dir, positive_float, positive_int
from . import train as T
from .corpus import load_corpus
from .model import ModelConfig, TransformerLM

__all__ = ["DEMO_L1", "demo_configs", "run_demo", "gpu_check", "format_table",
           "add_demo_args", "main_demo"]

#: λ of the demo's L1 run (chosen on the default corpus and model; see docs/reference_model.md).
DEMO_L1 = 0.04


def demo_configs(quick: bool = False, l1_lambda: float = DEMO_L1, seed: int = 0,
                 steps: int | None = None) -> tuple[ModelConfig, T.TrainConfig]:
    """The demo's model and training settings (quick: a tiny smoke-test run of seconds)."""
    if quick:
        mc = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_hidden=128, max_seq_len=32)
        tc = T.TrainConfig(steps=40, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=5,
                           eval_every=20, eval_batches=2, l1_lambda=l1_lambda, seed=seed)
    else:
        mc = ModelConfig(d_model=128, n_layers=2, n_heads=4, d_hidden=512, max_seq_len=128)
        tc = T.TrainConfig(steps=1200, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=50,
                           eval_every=100, eval_batches=4, l1_lambda=l1_lambda, seed=seed)
    if steps is not None:
        tc.steps = steps
    tc.l1_warmup_steps = tc.steps // 2       # λ ramps up over the first half of the run
    return mc, tc


def _time_step(mc: ModelConfig, tc: T.TrainConfig, corpus, n: int = 5) -> float:
    """Seconds per training step on this machine (forward, backward, clip, AdamW): the fastest
    of n steps, so a moment of load from other programs does not cut the run short."""
    model = TransformerLM(mc, seed=tc.seed)
    opt = T.AdamW(model.params, weight_decay=tc.weight_decay)
    rng = np.random.default_rng(12345)
    times = []
    for i in range(n + 1):
        x, y = T.get_batch(corpus.train, tc.batch_size, tc.seq_len, rng)
        t0 = time.perf_counter()
        _, g = model.loss_and_grads(x, y, tc.l1_lambda)
        T.clip_grad_norm(g, tc.grad_clip)
        opt.step(model.params, g, 1e-4)
        if i:                                   # the first step warms caches and BLAS threads
            times.append(time.perf_counter() - t0)
    return float(np.min(times))


def _fmt_pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def format_table(dense: dict, sparse: dict) -> str:
    """Comparison table of two runs' metrics (from train)."""
    fd, fs = dense["final"], sparse["final"]
    ld, ls_ = dense["evals"][-1]["layers"], sparse["evals"][-1]["layers"]
    H = dense["model"]["d_hidden"]
    lam = sparse["train"]["l1_lambda"]
    slots = dense["train"]["slots"]

    def mean_layers(layers, key):
        return float(np.mean([l[key] for l in layers]))

    def hyb(layers, w):
        return float(np.mean([l["hybrid_overflow"][str(w)] for l in layers]))

    rel = fs["val_ce"] / fd["val_ce"] - 1
    rows = [
        ("validation CE (nats/byte)", f"{fd['val_ce']:.4f}", f"{fs['val_ce']:.4f} ({100 * rel:+.1f}%)"),
        ("FFN activations that are zero", _fmt_pct(fd["zero_fraction"]), _fmt_pct(fs["zero_fraction"])),
        (f"active neurons / token (of {H})", f"{fd['active_mean']:.1f}", f"{fs['active_mean']:.1f}"),
        ("  per layer", " ".join(f"{a:.1f}" for a in fd["per_layer_active_mean"]),
         " ".join(f"{a:.1f}" for a in fs["per_layer_active_mean"])),
        ("  p99 / max in one token",
         f"{mean_layers(ld, 'active_p99'):.0f} / {fd['active_max']}",
         f"{mean_layers(ls_, 'active_p99'):.0f} / {fs['active_max']}"),
        ("dead neurons (never active on val.)", _fmt_pct(fd["dead_fraction"]), _fmt_pct(fs["dead_fraction"])),
        ("max active in a 256-col tile", str(max(l["twell_max_tile_count"] for l in ld)),
         str(max(l["twell_max_tile_count"] for l in ls_))),
        (f"TwELL rows overflowing (S={slots})", _fmt_pct(fd["twell_overflow_rows"]),
         _fmt_pct(fs["twell_overflow_rows"])),
        ("hybrid rows > 32 active (dense tail)", _fmt_pct(hyb(ld, 32)), _fmt_pct(hyb(ls_, 32))),
        ("training time (min)", f"{dense['wall_seconds'] / 60:.1f}", f"{sparse['wall_seconds'] / 60:.1f}"),
    ]
    head = ("", "dense (λ=0)", f"L1 (λ={lam:g})")
    w0 = max(len(r[0]) for r in rows + [head])
    w1 = max(len(r[1]) for r in rows + [head])
    w2 = max(len(r[2]) for r in rows + [head])
    lines = [f"{head[0]:<{w0}}  {head[1]:>{w1}}  {head[2]:>{w2}}", "-" * (w0 + w1 + w2 + 4)]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c:>{w2}}" for a, b, c in rows]
    return "\n".join(lines)


def verdict(dense: dict, sparse: dict) -> dict:
    """The claim, checked: L1 run within 5% of the dense validation loss with > 95% zeros."""
    rel = sparse["final"]["val_ce"] / dense["final"]["val_ce"] - 1
    z = sparse["final"]["zero_fraction"]
    return {"val_ce_rel_diff": rel, "within_5pct": bool(rel <= 0.05),
            "zero_fraction": z, "over_95pct_zero": bool(z > 0.95), "over_99pct_zero": bool(z > 0.99)}


def gpu_check(model: TransformerLM, inputs: np.ndarray, slots: int = 32, rtol: float = 2e-2) -> dict:
    """Run the GPU kernels on the trained model's real FFN activations; compare with NumPy.

    For each layer: y = twell.ops.ffn(x, W_g, W_u, W_d) in bf16 against twell.reference in
    float64 on the same bf16-rounded inputs (relative Frobenius error; bf16 rounding of the gate
    values and of y bounds it near 1e-2), and twell.ops.gate_pack's statistics against
    twell.format.encode of the NumPy gate pre-activations. Needs CuPy and ml_dtypes; returns
    {"ran": False, "reason": ...} when anything needed is missing, never raises for that.
    """
    try:
        import twell
        if not twell.available():
            return {"ran": False, "reason": twell.why_unavailable() or "kernels unavailable"}
        import cupy
        import ml_dtypes

        from .. import format as fmt
        from .. import ops
    except ImportError as exc:
        return {"ran": False, "reason": f"missing module: {exc.name}"}
    arrays = T.export_ffn(model, inputs)
    bf16 = ml_dtypes.bfloat16
    layers = []
    ok = True
    for i in range(model.cfg.n_layers):
        xb = arrays[f"x_{i}"].astype(bf16)
        wg = arrays.get(f"w_gate_{i}")
        wgb = wg.astype(bf16) if wg is not None else None
        wub, wdb = arrays[f"w_up_{i}"].astype(bf16), arrays[f"w_down_{i}"].astype(bf16)
        f64 = lambda a: None if a is None else a.astype(np.float64)
        y_ref, cache = ref.ffn_forward(f64(xb), f64(wgb), f64(wub), f64(wdb),
                                       gated=model.cfg.gated, w_down_layout="hd")
        dev = lambda a: None if a is None else cupy.asarray(a)
        y = cupy.asnumpy(ops.ffn(dev(xb), dev(wgb), dev(wub), dev(wdb), gated=model.cfg.gated,
                                 slots=slots, w_down_layout="hd")).astype(np.float64)
        err = float(np.linalg.norm(y - y_ref) / max(np.linalg.norm(y_ref), 1e-30))
        rec = {"layer": i, "rows": int(xb.shape[0]), "ffn_rel_err": err, "ffn_ok": err <= rtol}
        if model.cfg.gated:
            pre = (f64(xb) @ f64(wgb).T).astype(np.float32)
            expect = fmt.encode(pre, slots=slots).stats
            _, _, stats = ops.gate_pack(dev(xb), dev(wgb), slots=slots)
            got = ops.read_stats(stats)
            rec["gate_pack_stats"] = got
            rec["format_stats"] = expect
            # GEMM rounding may flip gates within ~1 ulp of 0: allow a tiny count difference
            rec["gate_pack_ok"] = abs(got["active"] - expect["active"]) <= max(2, expect["active"] // 1000)
            ok &= rec["gate_pack_ok"]
        ok &= rec["ffn_ok"]
        layers.append(rec)
    return {"ran": True, "ok": bool(ok), "rtol": rtol, "layers": layers}


def run_demo(out_dir: str, minutes_budget: float = 8.0, quick: bool = False,
             l1_lambda: float = DEMO_L1, seed: int = 0, steps: int | None = None,
             text: str | None = None, progress: bool = True, plots: bool = True,
             save_model: bool = False, gpu: bool = True, report=print) -> dict:
    """Train λ = 0 and λ > 0, write demo_metrics.json and plots to out_dir; returns the summary.

    minutes_budget bounds both runs together: the step time is measured first and the step count
    is lowered (for both runs alike, recorded in the result) if the default would not fit.
    ``report`` receives the human-readable lines (print by default; None for silence).
    """
    say = report or (lambda *a, **k: None)
    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    corpus = load_corpus(text)
    mc, tc = demo_configs(quick, l1_lambda, seed, steps)
    say(f"corpus: {corpus.meta['source']} ({len(corpus.meta['files'])} files, "
        f"{corpus.meta['n_bytes']:,} bytes, sha256 {corpus.sha256[:16]}..., "
        f"Python {corpus.meta['python_version']})")
    step_s = _time_step(mc, tc, corpus)
    evals_per_run = tc.steps // tc.eval_every + 1
    eval_s = evals_per_run * tc.eval_batches * step_s / 3          # a forward is ~1/3 of a step
    planned = 2 * (tc.steps * step_s + eval_s) * 1.05
    budget_s = minutes_budget * 60 - (time.perf_counter() - t_start)
    requested = tc.steps
    if planned > budget_s:
        tc.steps = max(int(tc.steps * budget_s / planned), 20)
        tc.eval_every = max(tc.steps // 8, 1)
        tc.l1_warmup_steps = tc.steps // 2
    model_tmp = TransformerLM(mc, seed=seed)
    n_params = model_tmp.num_params()
    say(f"model: {mc.n_layers} layers, d={mc.d_model}, H={mc.d_hidden} (ReLU-gated FFN), "
        f"{mc.n_heads} heads, RoPE, tied head; {n_params:,} parameters")
    say(f"training: {tc.steps} steps x {tc.batch_size} x {tc.seq_len} bytes per run, "
        f"{step_s * 1000:.0f} ms/step measured here -> about "
        f"{2 * (tc.steps * step_s + eval_s) / 60:.1f} min for both runs"
        + (f" (lowered from {requested} steps to fit {minutes_budget:g} min)" if tc.steps < requested else ""))

    runs, models = {}, {}
    for lam in (0.0, l1_lambda):
        label = T.run_label(lam)
        run_cfg = T.TrainConfig.from_dict({**tc.to_dict(), "l1_lambda": lam})
        bar = T._Progress(run_cfg.steps, label, enabled=progress)
        model, metrics = T.train(mc, run_cfg, corpus, callback=bar)
        bar.close()
        runs[label], models[label] = metrics, model
    dense, sparse = runs[T.run_label(0.0)], runs[T.run_label(l1_lambda)]
    table = format_table(dense, sparse)
    v = verdict(dense, sparse)
    say("")
    say(table)
    say("")
    say(f"claim: L1 validation loss within 5% of dense: {'yes' if v['within_5pct'] else 'NO'} "
        f"({100 * v['val_ce_rel_diff']:+.1f}%); over 95% of FFN activations zero: "
        f"{'yes' if v['over_95pct_zero'] else 'NO'} ({100 * v['zero_fraction']:.2f}%; 99%: "
        f"{'yes' if v['over_99pct_zero'] else 'not reached'})")

    result = {
        "demo": {"quick": quick, "minutes_budget": minutes_budget, "requested_steps": requested,
                 "steps": tc.steps, "measured_step_seconds": step_s, "params": n_params},
        "verdict": v,
        "table": table,
        "runs": runs,
    }
    sparse_model = models[T.run_label(l1_lambda)]
    if save_model:
        ck = os.path.join(out_dir, "demo_l1_checkpoint.npz")
        T.save_checkpoint(ck, sparse_model, {"corpus_sha256": corpus.sha256, "final": sparse["final"]})
        n_seq = max(1, 4096 // tc.seq_len)
        vx, _ = T.val_windows(corpus.val, n_seq, tc.seq_len)
        ex = os.path.join(out_dir, "ffn_export_l1.npz")
        T.export_ffn(sparse_model, vx, ex, meta={"l1_lambda": l1_lambda, "corpus": corpus.meta})
        say(f"wrote {ck} and {ex}")
    if gpu:
        vx, _ = T.val_windows(corpus.val, max(1, 2048 // tc.seq_len), tc.seq_len)
        try:
            result["gpu_check"] = gpu_check(sparse_model, vx, slots=tc.slots)
        except Exception as exc:   # a kernel failure is a result to report, not a crash of the demo
            result["gpu_check"] = {"ran": True, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        g = result["gpu_check"]
        if not g["ran"]:
            say(f"GPU kernels: not run ({g['reason']})")
        else:
            say(f"GPU kernels on the trained model's activations: {'OK' if g.get('ok') else 'FAILED'}"
                + "".join(f"\n  layer {l['layer']}: FFN rel. error {l['ffn_rel_err']:.2e}"
                          for l in g.get("layers", [])) + (f"\n  {g['error']}" if "error" in g else ""))
    result["demo"]["minutes"] = (time.perf_counter() - t_start) / 60
    T.write_json(os.path.join(out_dir, "demo_metrics.json"), result)
    written = [os.path.join(out_dir, "demo_metrics.json")]
    if plots:
        try:
            written += T.plot_runs(runs, out_dir, prefix="demo_")
        except ImportError:
            say("matplotlib is not installed: no plots (pip install matplotlib)")
    say(f"wrote {', '.join(written)}")
    say(f"demo finished in {result['demo']['minutes']:.1f} min")
    return result


def add_demo_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``twell demo``."""
    parser.add_argument("--out", default="twell_demo", help="output folder (created)")
    parser.add_argument("--minutes", type=positive_float, default=8.0,
                        help="time budget for both runs; steps are lowered to fit (the step time depends "
                             "on the machine: it is measured at the start)")
    parser.add_argument("--l1", type=nonneg_float, default=DEMO_L1, metavar="LAMBDA", help="λ of the L1 run")
    parser.add_argument("--steps", type=positive_int, default=None, help="training steps per run")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--text", metavar="FILE", type=existing_file, help="train on this text file instead of the "
                        "built-in standard-library corpus")
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test run (seconds)")
    parser.add_argument("--save-model", action="store_true",
                        help="also write the L1 model's checkpoint and FFN export (.npz)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU kernel check")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main_demo(args) -> int:
    """``twell demo``; exit status 0 when it ran (the verdict is reported, not an error), 1 when
    the GPU check ran and failed."""
    args.out = output_dir(args.out)
    res = run_demo(args.out, minutes_budget=args.minutes, quick=args.quick, l1_lambda=args.l1,
                   seed=args.seed, steps=args.steps, text=args.text, progress=not args.quiet,
                   plots=not args.no_plots, save_model=args.save_model, gpu=not args.no_gpu)
    g = res.get("gpu_check", {})
    return 1 if g.get("ran") and not g.get("ok") else 0


if __name__ == "__main__":
    sys.exit(main_demo(add_demo_args(argparse.ArgumentParser(
        prog="twell demo", description=__doc__.split("\n")[0])).parse_args()))
