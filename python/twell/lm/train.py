"""Training the reference LM: AdamW, gradient clipping, learning-rate schedule, the L1 recipe,
metrics, plots, checkpoints and the export of real FFN activations.

Library functions return data and never print; ``main_train_ref`` (``twell train-ref``) reports.

The L1 recipe: loss = CE + λ_t · mean_over_layers(mean_over_tokens(Σ_j |h_j|)), with λ_t = λ ·
min(1, step / l1_warmup_steps) (a linear warm-up ramp of the coefficient; 0 steps = constant λ).
Nothing else changes between the λ = 0 baseline and the L1 run: same init, same batches (both come
from the seed), same schedule.

Export layout (``export_ffn``; an ``.npz`` written with ``np.savez_compressed``), for layer l =
0 .. n_layers-1 and N = number of exported tokens::

    meta         0-d str array: JSON {"format": "twell-ffn-export", "version": 1, "n_layers",
                 "d_model", "d_hidden", "activation", "gated", "tokens", "seq_len",
                 "w_down_layout": "hd", "model": {...}, "corpus": {...}, ...}
    tokens       int32 [N / seq_len, seq_len]  the byte tokens the activations come from
    x_{l}        float32 [N, d]   FFN input of layer l (after its RMSNorm)
    w_gate_{l}   float32 [H, d]   gate projection (absent for a non-gated model)
    w_up_{l}     float32 [H, d]   up projection
    w_down_{l}   float32 [H, d]   down projection, layout "hd" (row j = neuron j's output)
    h_{l}        float32 [N, H]   hidden activations act(x w_gateᵀ) ⊙ (x w_upᵀ)

so ``twell.reference.ffn_forward(x_l, w_gate_l, w_up_l, w_down_l)`` reproduces ``h_l`` in float32
(up to the rounding of BLAS, which may sum in another order for another number of rows).

Checkpoint layout (``save_checkpoint``): ``config`` (0-d str array, JSON with "model" and
"meta") and one array ``param/<name>`` per parameter (names in twell.lm.model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np

from .._argtypes import CliError, existing_file, nonneg_float, nonneg_int, output_dir, positive_float, positive_int
from . import sparsity as sp
from .corpus import Corpus, load_corpus
from .model import ModelConfig, TransformerLM

__all__ = [
    "TrainConfig", "AdamW", "clip_grad_norm", "lr_at", "l1_at", "get_batch", "val_windows",
    "evaluate", "train", "save_checkpoint", "load_checkpoint", "export_ffn", "plot_runs",
    "write_json", "add_train_ref_args", "main_train_ref",
]


@dataclass
class TrainConfig:
    """Optimisation and measurement settings of one training run."""

    steps: int = 1200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_frac: float = 0.1        # cosine decays to lr · min_lr_frac
    warmup_steps: int = 50          # linear learning-rate warm-up
    weight_decay: float = 0.1       # decoupled, on matrices only (not on norm gains)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0          # global L2 norm; 0 disables
    l1_lambda: float = 0.0          # λ of the recipe; 0 = dense baseline
    l1_warmup_steps: int = 0        # linear ramp of λ from 0 over this many steps
    eval_every: int = 100
    eval_batches: int = 4           # validation = eval_batches · batch_size fixed windows
    seed: int = 0
    tile_cols: int = sp.TILE_COLS
    slots: int = sp.DEFAULT_SLOTS
    reinit_dead_every: int = 0      # experiment: re-initialise gate rows dead for this many steps
    reinit_dead_until: float = 0.75 # ... only before this fraction of training

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------------
# Optimiser and schedules
# ----------------------------------------------------------------------------------------------

class AdamW:
    """AdamW (decoupled weight decay, bias-corrected moments) over a dict of arrays, in place.

    Weight decay applies to parameters with ndim >= 2 (matrices, embeddings), not to norm gains.
    """

    def __init__(self, params: dict, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0):
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params: dict, grads: dict, lr: float) -> None:
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        c1, c2 = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t
        for k, p in params.items():
            g = grads[k]
            m, v = self.m[k], self.v[k]
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            if self.weight_decay and p.ndim >= 2:
                p *= 1.0 - lr * self.weight_decay
            p -= (lr / c1) * m / (np.sqrt(v / c2) + self.eps)

    def state_dict(self) -> dict:
        return {"t": self.t, "m": self.m, "v": self.v}


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Scale all gradients in place so their global L2 norm is at most max_norm; returns the norm
    before clipping (max_norm <= 0: no clipping)."""
    total = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    if max_norm > 0 and total > max_norm:
        s = max_norm / (total + 1e-12)
        for g in grads.values():
            g *= s
    return total


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr · min_lr_frac at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps - 1, 1)
    frac = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def l1_at(step: int, cfg: TrainConfig) -> float:
    """λ at a step: linear ramp over l1_warmup_steps, then constant."""
    if cfg.l1_warmup_steps <= 0:
        return cfg.l1_lambda
    return cfg.l1_lambda * min(1.0, (step + 1) / cfg.l1_warmup_steps)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def get_batch(data: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator):
    """Random windows: inputs and next-byte targets, int64 [B, T] each."""
    offs = rng.integers(0, data.size - seq_len - 1, size=batch_size)
    idx = offs[:, None] + np.arange(seq_len + 1)[None, :]
    w = data[idx].astype(np.int64)
    return w[:, :-1], w[:, 1:]


def val_windows(data: np.ndarray, n: int, seq_len: int):
    """n fixed windows evenly spaced over the validation split: (inputs, targets) [n, T]."""
    if data.size < seq_len + 2:
        raise ValueError(f"validation split has {data.size} bytes, needs more than {seq_len + 1}")
    offs = np.linspace(0, data.size - seq_len - 1, n).astype(np.int64)
    idx = offs[:, None] + np.arange(seq_len + 1)[None, :]
    w = data[idx].astype(np.int64)
    return w[:, :-1], w[:, 1:]


def evaluate(model: TransformerLM, inputs: np.ndarray, targets: np.ndarray, batch_size: int,
             tile_cols: int = sp.TILE_COLS, slots: int = sp.DEFAULT_SLOTS,
             histogram: bool = False) -> dict:
    """Validation cross-entropy and per-layer sparsity instruments on fixed windows."""
    ce_sum, n_tok, l1_sum = 0.0, 0, 0.0
    hs = [[] for _ in range(model.cfg.n_layers)]
    for s in range(0, inputs.shape[0], batch_size):
        x, y = inputs[s:s + batch_size], targets[s:s + batch_size]
        out, _ = model.forward(x, y, keep_cache=False)
        ce_sum += out["ce"] * y.size
        l1_sum += out["l1"] * y.size
        n_tok += y.size
        for i, h in enumerate(out["h"]):
            hs[i].append(h)
    layers = [sp.layer_stats(np.concatenate(h), tile_cols, slots, histogram=histogram) for h in hs]
    return {"val_ce": ce_sum / n_tok, "val_l1": l1_sum / n_tok, "tokens": n_tok, "layers": layers}


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------

def _reinit_dead_gates(model: TransformerLM, opt: AdamW, trackers, rng) -> list[int]:
    """Experiment: give gate rows of neurons dead over the tracking window a fresh random init
    (and zero their optimiser moments); their up/down rows are kept. Returns counts per layer."""
    std = model.cfg.init_std
    counts = []
    for i, tr in enumerate(trackers):
        dead = tr.dead_neurons()
        name = f"l{i}.w_gate" if model.cfg.gated else f"l{i}.w_up"
        w = model.params[name]
        if dead.size:
            w[dead] = (rng.standard_normal((dead.size, w.shape[1])) * std).astype(w.dtype)
            opt.m[name][dead] = 0
            opt.v[name][dead] = 0
        counts.append(int(dead.size))
        tr.reset()
    return counts


def train(model_cfg: ModelConfig, cfg: TrainConfig, corpus: Corpus, callback=None,
          model: TransformerLM | None = None):
    """Train a model; returns (model, metrics).

    Deterministic given cfg.seed: the init uses default_rng(seed), batches default_rng([seed, 1]),
    the dead-row experiment default_rng([seed, 2]) (bitwise on one machine with one BLAS thread
    count; BLAS may sum in another order with other thread counts).
    ``callback(step, record)`` is called after every step (record: that step's numbers, with
    ``eval`` added on evaluation steps).
    """
    if cfg.steps < 1 or cfg.eval_every < 1:
        raise ValueError(f"steps ({cfg.steps}) and eval_every ({cfg.eval_every}) must be >= 1")
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    model = model or TransformerLM(model_cfg, seed=cfg.seed)
    opt = AdamW(model.params, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay)
    batch_rng = np.random.default_rng([cfg.seed, 1])
    reinit_rng = np.random.default_rng([cfg.seed, 2])
    vx, vy = val_windows(corpus.val, cfg.eval_batches * cfg.batch_size, cfg.seq_len)
    L = model_cfg.n_layers
    # neuron activity on training batches: since the last evaluation (reported with it) and,
    # for the re-init experiment, since the last re-init
    trackers = [sp.NeuronActivity(model_cfg.d_hidden) for _ in range(L)]
    reinit_trackers = ([sp.NeuronActivity(model_cfg.d_hidden) for _ in range(L)]
                       if cfg.reinit_dead_every else [])
    hist = {k: [] for k in ("step", "ce", "l1", "loss", "lr", "l1_lambda", "grad_norm",
                            "active_mean", "seconds")}
    evals, reinits = [], []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        lr, lam = lr_at(step, cfg), l1_at(step, cfg)
        x, y = get_batch(corpus.train, cfg.batch_size, cfg.seq_len, batch_rng)
        out, grads = model.loss_and_grads(x, y, lam)
        gnorm = clip_grad_norm(grads, cfg.grad_clip)
        opt.step(model.params, grads, lr)
        active = []
        for i, h in enumerate(out["h"]):
            trackers[i].update(h)
            if reinit_trackers:
                reinit_trackers[i].update(h)
            active.append(float(np.count_nonzero(h)) / h.shape[0])
        rec = dict(step=step + 1, ce=out["ce"], l1=out["l1"], loss=out["loss"], lr=lr,
                   l1_lambda=lam, grad_norm=gnorm, active_mean=active,
                   seconds=time.perf_counter() - t0)
        for k in hist:            # 6 significant digits keep metrics files small
            hist[k].append(rec[k] if k == "step" else _round6(rec[k]))
        if (cfg.reinit_dead_every and (step + 1) % cfg.reinit_dead_every == 0
                and step + 1 <= cfg.reinit_dead_until * cfg.steps):
            reinits.append({"step": step + 1,
                            "dead_rows": _reinit_dead_gates(model, opt, reinit_trackers, reinit_rng)})
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            last = step + 1 == cfg.steps
            ev = evaluate(model, vx, vy, cfg.batch_size, cfg.tile_cols, cfg.slots, histogram=last)
            ev["step"] = step + 1
            ev["train_window"] = [tr.summary() for tr in trackers]
            for tr in trackers:
                tr.reset()
            evals.append(ev)
            rec["eval"] = ev
        if callback is not None:
            callback(step + 1, rec)
    wall = time.perf_counter() - t0
    final = evals[-1]
    metrics = {
        "model": model_cfg.to_dict(),
        "train": cfg.to_dict(),
        "params": model.num_params(),
        "corpus": corpus.meta,
        "environment": environment(),
        "wall_seconds": wall,
        "seconds_per_step": wall / max(cfg.steps, 1),
        "history": hist,
        "evals": evals,
        "reinit": reinits,
        "final": summarize(final),
    }
    return model, metrics


def _round6(v):
    if isinstance(v, list):
        return [_round6(a) for a in v]
    return float(f"{v:.6g}")


def summarize(ev: dict) -> dict:
    """Headline numbers of an evaluation: validation CE and sparsity averaged over layers."""
    layers = ev["layers"]
    return {
        "step": ev.get("step"),
        "val_ce": ev["val_ce"],
        "val_l1": ev["val_l1"],
        "zero_fraction": float(np.mean([l["zero_fraction"] for l in layers])),
        "active_mean": float(np.mean([l["active_mean"] for l in layers])),
        "active_max": int(max(l["active_max"] for l in layers)),
        "dead_fraction": float(np.mean([l["dead_fraction"] for l in layers])),
        "twell_overflow_rows": float(np.mean([l["twell_overflow_rows"] for l in layers])),
        "per_layer_active_mean": [l["active_mean"] for l in layers],
        "per_layer_zero_fraction": [l["zero_fraction"] for l in layers],
    }


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


# ----------------------------------------------------------------------------------------------
# Checkpoints, export, metrics files, plots
# ----------------------------------------------------------------------------------------------

def _json_array(obj) -> np.ndarray:
    return np.array(json.dumps(obj, default=_json_default))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_checkpoint(path: str, model: TransformerLM, meta: dict | None = None) -> None:
    """Parameters and config in one .npz (loads without pickle)."""
    arrays = {f"param/{k}": v for k, v in model.params.items()}
    arrays["config"] = _json_array({"model": model.cfg.to_dict(), "meta": meta or {}})
    np.savez(path, **arrays)


def load_checkpoint(path: str):
    """Returns (model, meta) from save_checkpoint's file."""
    with np.load(path, allow_pickle=False) as z:
        conf = json.loads(str(z["config"]))
        params = {k[len("param/"):]: z[k].copy() for k in z.files if k.startswith("param/")}
    return TransformerLM(ModelConfig.from_dict(conf["model"]), params=params), conf.get("meta", {})


def export_ffn(model: TransformerLM, inputs: np.ndarray, path: str | None = None,
               meta: dict | None = None, batch_size: int = 16) -> dict:
    """Per-layer FFN inputs, weights and activations on ``inputs`` [n, T] (layout: module doc).

    Returns the dict of arrays; writes it with np.savez_compressed if path is given.
    """
    cfg = model.cfg
    xs = [[] for _ in range(cfg.n_layers)]
    hs = [[] for _ in range(cfg.n_layers)]
    for s in range(0, inputs.shape[0], batch_size):
        out, _ = model.forward(inputs[s:s + batch_size], keep_cache=False, keep_ffn_inputs=True)
        for i in range(cfg.n_layers):
            xs[i].append(out["ffn_x"][i])
            hs[i].append(out["h"][i])
    info = {"format": "twell-ffn-export", "version": 1, "n_layers": cfg.n_layers,
            "d_model": cfg.d_model, "d_hidden": cfg.d_hidden, "activation": cfg.activation,
            "gated": cfg.gated, "tokens": int(inputs.size), "seq_len": int(inputs.shape[1]),
            "w_down_layout": "hd", "model": cfg.to_dict()}
    info.update(meta or {})
    arrays = {"meta": _json_array(info), "tokens": inputs.astype(np.int32)}
    f32 = np.float32
    for i in range(cfg.n_layers):
        arrays[f"x_{i}"] = np.concatenate(xs[i]).astype(f32)
        if cfg.gated:
            arrays[f"w_gate_{i}"] = model.params[f"l{i}.w_gate"].astype(f32)
        arrays[f"w_up_{i}"] = model.params[f"l{i}.w_up"].astype(f32)
        arrays[f"w_down_{i}"] = model.params[f"l{i}.w_down"].astype(f32)
        arrays[f"h_{i}"] = np.concatenate(hs[i]).astype(f32)
    if path:
        np.savez_compressed(path, **arrays)
    return arrays


def load_export(path: str) -> tuple[dict, dict]:
    """Reads export_ffn's file: (meta, arrays)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
        f.write("\n")


def _smooth(values, window: int):
    """Trailing mean over up to ``window`` values (no start-up bias, unlike an EMA)."""
    v = np.asarray(values, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(1, v.size + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


def plot_runs(runs: dict, out_dir: str, prefix: str = "") -> list[str]:
    """Loss curves, active neurons per token over steps (per layer), final histograms.

    runs: label -> metrics (from train). Returns the PNG paths written; raises ImportError
    if matplotlib is missing (callers report it and go on).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for c, (label, m) in zip(colors, runs.items()):
        h = m["history"]
        win = max(1, len(h["step"]) // 50)
        ax.plot(h["step"], _smooth(h["ce"], win), color=c, alpha=0.5, lw=1,
                label=f"{label} train (mean of {win} steps)")
        ev = m["evals"]
        ax.plot([e["step"] for e in ev], [e["val_ce"] for e in ev], "o-", color=c, ms=3,
                label=f"{label} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title("Reference LM: loss (CE only, without the L1 term)")
    lo = min(min(e["val_ce"] for e in m["evals"]) for m in runs.values())
    ax.set_ylim(max(lo - 0.3, 0), lo + 2.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{prefix}loss.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = ["-", "--", ":", "-."]
    for c, (label, m) in zip(colors, runs.items()):
        h = m["history"]
        act = np.asarray(h["active_mean"])
        for layer in range(act.shape[1]):
            ax.plot(h["step"], act[:, layer], styles[layer % 4], color=c, lw=1.2,
                    label=f"{label} layer {layer}")
    hidden = next(iter(runs.values()))["model"]["d_hidden"]
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"active neurons per token (of {hidden})")
    ax.set_title("FFN activity during training (training batches)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{prefix}active.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    edges = [0, 1]                       # bins 0, 1, 2-3, 4-7, ... (powers of two)
    while edges[-1] <= hidden:
        edges.append(edges[-1] * 2)
    names = [str(lo) if min(hi - 1, hidden) == lo else f"{lo}-{min(hi - 1, hidden)}"
             for lo, hi in zip(edges, edges[1:])]
    series = [(c, label, layer, np.asarray(ls["histogram"]))
              for c, (label, m) in zip(colors, runs.items())
              for layer, ls in enumerate(m["evals"][-1]["layers"]) if ls.get("histogram")]
    width = 0.8 / max(len(series), 1)
    for n, (c, label, layer, hist) in enumerate(series):
        frac = [hist[lo:hi].sum() / hist.sum() for lo, hi in zip(edges, edges[1:])]
        ax.bar(np.arange(len(frac)) + (n - (len(series) - 1) / 2) * width, frac, width, color=c,
               alpha=1.0 if layer % 2 == 0 else 0.55, hatch=None if layer % 2 == 0 else "//",
               label=f"{label} layer {layer}")
    ax.set_xticks(np.arange(len(names)), names, rotation=30, fontsize=8)
    ax.set_xlabel(f"active neurons in a token (of {hidden})")
    ax.set_ylabel("fraction of validation tokens")
    ax.set_title("Active neurons per token at the end of training")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{prefix}histogram.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------
# CLI: twell train-ref
# ----------------------------------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser, d=ModelConfig()) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=positive_int, default=d.d_model, help="model width D")
    g.add_argument("--layers", type=positive_int, default=d.n_layers, help="transformer layers")
    g.add_argument("--heads", type=positive_int, default=d.n_heads, help="attention heads (must divide D)")
    g.add_argument("--hidden", type=positive_int, default=d.d_hidden, help="FFN hidden width H")
    g.add_argument("--activation", choices=("relu", "silu"), default=d.activation,
                   help="gate nonlinearity (silu: the usual dense baseline, for comparison)")
    g.add_argument("--non-gated", action="store_true", help="h = act(x W_u^T), no gate")


def add_optim_args(p: argparse.ArgumentParser, d=TrainConfig()) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=positive_int, default=d.steps, help="training steps per run")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="sequences per step")
    g.add_argument("--seq-len", type=positive_int, default=d.seq_len, help="bytes per sequence")
    g.add_argument("--lr", type=positive_float, default=d.lr, help="peak AdamW learning rate")
    g.add_argument("--warmup", type=nonneg_int, default=d.warmup_steps, help="learning-rate warm-up steps")
    g.add_argument("--weight-decay", type=nonneg_float, default=d.weight_decay, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=nonneg_float, default=d.grad_clip, help="global gradient-norm clip (0: off)")
    g.add_argument("--l1-warmup", type=nonneg_int, default=None,
                   help="ramp λ linearly from 0 over this many steps (0: constant λ; "
                        "default: half of --steps)")
    g.add_argument("--eval-every", type=positive_int, default=d.eval_every, help="steps between evaluations")
    g.add_argument("--eval-batches", type=positive_int, default=d.eval_batches,
                   help="validation batches per evaluation")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed")
    g.add_argument("--slots", type=int, default=d.slots, choices=(32, 64, 128),
                   help="TwELL slots per 256-column tile for the overflow instrument")
    g.add_argument("--reinit-dead-every", type=nonneg_int, default=0,
                   help="experiment: every N steps re-initialise gate rows of neurons that did not "
                        "fire in the last N steps (0: off)")
    g.add_argument("--text", metavar="FILE", type=existing_file, help="train on this text file instead of the "
                   "built-in standard-library corpus")


def configs_from_args(args, l1_lambda: float) -> tuple[ModelConfig, TrainConfig]:
    mc = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                     d_hidden=args.hidden, max_seq_len=max(args.seq_len, 1),
                     activation=args.activation, gated=not args.non_gated)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                     warmup_steps=args.warmup, weight_decay=args.weight_decay,
                     grad_clip=args.grad_clip, l1_lambda=l1_lambda,
                     l1_warmup_steps=args.steps // 2 if args.l1_warmup is None else args.l1_warmup,
                     eval_every=args.eval_every, eval_batches=args.eval_batches, seed=args.seed,
                     slots=args.slots, reinit_dead_every=args.reinit_dead_every)
    return mc, tc


class _Progress:
    """tqdm bar if installed, else a line every ~10% of the run."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled, self.bar = total, desc, enabled, None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True,
                                file=sys.stderr)
            except ImportError:
                pass

    def __call__(self, step: int, rec: dict) -> None:
        if not self.enabled:
            return
        act = float(np.mean(rec["active_mean"]))
        post = {"ce": f"{rec['ce']:.3f}", "act/tok": f"{act:.1f}"}
        if "eval" in rec:
            post["val"] = f"{rec['eval']['val_ce']:.3f}"
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0 or "eval" in rec:
                self.bar.set_postfix(post, refresh=False)
        elif "eval" in rec or step == self.total:
            print(f"{self.desc}: step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in post.items()),
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_label(l1_lambda: float, activation: str = "relu") -> str:
    base = "dense" if l1_lambda == 0 else f"L1 {l1_lambda:g}"
    return base if activation == "relu" else f"{base} ({activation})"


def add_train_ref_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``twell train-ref``."""
    parser.add_argument("--out", default="train_ref_out", help="output folder (created)")
    parser.add_argument("--l1", type=nonneg_float, nargs="+", default=[0.04], metavar="LAMBDA",
                        help="λ of the L1 recipe; several values train one model each, same seed, "
                             "plotted together (0: dense baseline)")
    add_model_args(parser)
    add_optim_args(parser)
    parser.add_argument("--export", action="store_true",
                        help="write each run's FFN inputs/weights/activations on validation text "
                             "(ffn_export_<label>.npz; layout in docs/reference_model.md)")
    parser.add_argument("--export-tokens", type=positive_int, default=4096,
                        help="tokens of validation text to export")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in label).strip("_")


def main_train_ref(args) -> int:
    """``twell train-ref``: train one model per λ, write metrics.json, plots, checkpoints."""
    for lam in args.l1:  # every configuration is checked before anything is trained or written
        try:
            configs_from_args(args, lam)
        except ValueError as e:
            raise CliError(str(e)) from None
    args.out = output_dir(args.out)
    corpus = load_corpus(args.text)
    print(f"corpus: {corpus.meta['source']}, {corpus.meta['n_bytes']:,} bytes, "
          f"sha256 {corpus.sha256[:16]}..., Python {corpus.meta['python_version']}")
    runs = {}
    for lam in args.l1:
        mc, tc = configs_from_args(args, lam)
        label = run_label(lam, mc.activation)
        bar = _Progress(tc.steps, label, enabled=not args.quiet)
        model, metrics = train(mc, tc, corpus, callback=bar)
        bar.close()
        runs[label] = metrics
        slug = _slug(label)
        ckpt = os.path.join(args.out, f"checkpoint_{slug}.npz")
        save_checkpoint(ckpt, model, {"label": label, "corpus_sha256": corpus.sha256, "final": metrics["final"]})
        print(f"wrote {ckpt}")
        if args.export:
            n_seq = max(1, args.export_tokens // tc.seq_len)
            vx, _ = val_windows(corpus.val, n_seq, tc.seq_len)
            exp = os.path.join(args.out, f"ffn_export_{slug}.npz")
            export_ffn(model, vx, exp, meta={"label": label, "l1_lambda": lam, "corpus": corpus.meta})
            print(f"wrote {exp}")
        f = metrics["final"]
        print(f"{label}: val CE {f['val_ce']:.4f} nats/byte, zeros {100 * f['zero_fraction']:.2f}%, "
              f"active/token {f['active_mean']:.1f} (max {f['active_max']}), "
              f"{metrics['wall_seconds'] / 60:.1f} min, {model.num_params():,} params")
    write_json(os.path.join(args.out, "metrics.json"), {"runs": runs})
    if not args.no_plots:
        try:
            for p in plot_runs(runs, args.out):
                print(f"wrote {p}")
        except ImportError:
            print("matplotlib is not installed: no plots (pip install matplotlib)")
    print(f"wrote {os.path.join(args.out, 'metrics.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main_train_ref(add_train_ref_args(
        argparse.ArgumentParser(prog="twell train-ref", description=__doc__.split("\n")[0])).parse_args()))
