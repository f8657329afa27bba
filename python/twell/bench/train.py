"""``twell bench-train``: training step (forward + backward with the L1 term) vs dense PyTorch autograd.

For each configuration (D, H, M, activation pattern, ELL width, plan path) this builds the
synthetic inputs of docs/design.md on the GPU with PyTorch (x N(0,1) with
the last column 1; W_g N(0, 1/(D-1)) with the last column -Phi^-1(1-p); W_u
N(0, 1/D); W_d N(0, 1/H) as [H, D]; "skewed": each token's x but its last
column scaled by exp(0.35 z); "trained": the thresholds of ``twell.patterns``, a trained LM's
concentrated activity), all bf16, plus a random dy and the L1
coefficient c, and measures in the same process, on the same tensors:

- **dense**: PyTorch bf16 autograd (cuBLAS GEMMs):
  ``h = relu(x W_g^T) * (x W_u^T); y = h W_d; l1 = sum |h|``, then
  ``autograd.backward([y, l1], [dy, c])`` giving dx, dW_g, dW_u, dW_d;
- **twell**: ``train_ops.TrainPlan(D, H, path=...).forward`` + ``.backward``
  (same L1 term). ``path="auto"`` (the default) is timed after the warm-up
  steps, so the route the plan settled on is what is measured and recorded
  (``route``: hybrid or dense); ``"sparse"`` forces the hybrid route.

Times: forward alone and the full step (forward + backward), median over
``--reps`` steps run back to back as a training loop runs them (a CUDA event
between every two steps, one synchronisation at the end: a step's host time
counts where the host is slower than the GPU; twell's host synchronisations,
where a call has them, are inside the timed region). ``ms_synced`` /
``dense_ms_synced``: the same step with a synchronisation before each one (the
host time of issuing its first launch inside every interval; the method of the
records before 2026-12-03c).

Peak memory (bytes beyond inputs, weights and gradients: saved state plus
workspace and temporaries):

- dense (``dense_bytes``): over one fresh step (gradients set to None first),
  the largest sum of the caching allocator's live blocks allocated inside the
  step, the blocks of the step's outputs (y, dx, dW_g, dW_u, dW_d) excluded,
  from its alloc/free trace (``torch.cuda.memory._record_memory_history``):
  what autograd saves (relu(g), u, h; x is an input) plus its temporaries.
  Where the trace is unavailable: ``max_memory_allocated()`` minus the bytes
  allocated before the step minus every output's bytes (a lower bound, since
  some outputs do not exist yet at the peak); both are in the record;
- twell: ``plan.saved_size(M) + plan.workspace_size(M)`` (``twell_bytes``,
  used for the ratio), cross-checked by the same allocator measurement over a
  fresh step (twell allocates its saved state and workspace through torch):
  ``twell_alloc_bytes``.

Correctness: relative Frobenius errors of twell's (and the dense baseline's)
y, dx, dW_g, dW_u, dW_d and L1 against an fp32 computation (TF32 off) of the
same formulas on the same bf16 inputs.

Output under ``--out DIR``: ``bench_train.json`` (``{"device", "date",
"commit", "suite", "environment", "records": [...]}``, rewritten after every
configuration), ``bench_train.md`` (a Markdown table) and
``train_speedup.png`` (if matplotlib is installed). ``--from-json FILE``
redraws the table and plot without a GPU.

Exit status: 0 ok; 1 a configuration failed or a relative error of twell was
over ``--tol``; 2 no GPU (or no PyTorch with CUDA, or no twell library).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import statistics
import sys
import time
import traceback
import zlib
from pathlib import Path
from statistics import NormalDist

import numpy as np

from ..patterns import trained_thresholds
from .ffn import fmt_cell, git_commit  # shared with the inference benchmark

__all__ = ["add_bench_train_args", "main_bench_train", "suite_configs", "write_markdown", "write_plot"]

# (D, H, M, pattern, p, ell_width, path); path "auto" is what a plan does by default (the route it
# settles on after the warm-up steps is recorded), "sparse" forces the hybrid route for comparison.
_QUICK = [
    (2048, 5632, 16384, "uniform", 0.005, 64, "auto"),
    (2048, 5632, 32768, "uniform", 0.005, 64, "auto"),
    (2048, 5632, 65536, "uniform", 0.005, 64, "auto"),
    (2048, 5632, 16384, "skewed", 0.005, 64, "auto"),
    (2048, 5632, 16384, "skewed", 0.005, 64, "sparse"),
    (2048, 5632, 65536, "skewed", 0.005, 64, "auto"),
    (2048, 5632, 65536, "skewed", 0.005, 64, "sparse"),
    (2048, 5632, 16384, "trained", 0.005, 64, "auto"),
    (2048, 5632, 65536, "trained", 0.005, 64, "auto"),
    (2048, 5632, 16384, "uniform", 0.02, 64, "auto"),
    (2048, 5632, 16384, "uniform", 0.02, 256, "sparse"),
    (4096, 14336, 8192, "uniform", 0.005, 64, "auto"),
    (4096, 14336, 8192, "uniform", 0.005, 128, "sparse"),  # p*H = 72 per token: W = 64 sends most rows to the tail
]


def _full():
    out = []
    for m in (4096, 16384, 65536, 131072):
        for pat, p in (("uniform", 0.005), ("skewed", 0.005), ("trained", 0.005), ("uniform", 0.02)):
            for path in ("auto", "sparse"):
                out.append((2048, 5632, m, pat, p, 64, path))
    for m in (8192, 32768):
        for pat, p in (("uniform", 0.005), ("skewed", 0.005), ("uniform", 0.02)):
            out.append((4096, 14336, m, pat, p, 128, "auto"))
    return out


def suite_configs(args) -> list[tuple]:
    """The configurations to run: --D/--H/--M/--pattern when given, else the suite."""
    if args.M:
        d = args.D or 2048
        h = args.H or 5632
        out = []
        for m in (int(v) for v in str(args.M).split(",") if v.strip()):
            for pat in (v.strip() for v in args.pattern.split(",") if v.strip()):
                p = 0.02 if pat == "uniform2" else args.p
                for w in (int(v) for v in str(args.ell_width).split(",") if v.strip()):
                    for path in (v.strip() for v in args.path.split(",") if v.strip()):
                        out.append((d, h, m, "uniform" if pat == "uniform2" else pat, p, w, path))
        return out
    return list(_QUICK) if args.suite == "quick" else _full()


def _targets(pattern: str, p: float):
    """(speedup target, memory-ratio target) from the training-kernel issue (None where it states none): its
    speed goals (the trained pattern: its bar, 2.8x; its goal is 3.5x) and its memory bar (at most the
    published hybrid's 28%)."""
    if pattern == "skewed":
        return 1.5, None
    if pattern == "trained":
        return 2.8, 0.28
    if abs(p - 0.005) < 1e-9:
        return 2.5, 0.28
    if abs(p - 0.02) < 1e-9:
        return 1.1, None
    return None, None


def add_bench_train_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--suite", choices=["quick", "full"], default="quick",
                   help="preset configurations (quick: D,H = 2048,5632 at M 16384/65536, uniform 0.5%%, skewed, "
                        "uniform 2%% (W 64 and 256), plus 4096,14336 at M 8192; about a minute on an H100). "
                        "Ignored when --M is given.")
    p.add_argument("--out", default="twell_bench_results", metavar="DIR",
                   help="directory for bench_train.json, bench_train.md, train_speedup.png")
    p.add_argument("--D", type=int, default=None, help="model width for --M runs (default 2048)")
    p.add_argument("--H", type=int, default=None, help="hidden width for --M runs (default 5632)")
    p.add_argument("--M", default=None, metavar="M[,M]",
                   help="tokens per step (comma list): run these instead of the suite")
    p.add_argument("--pattern", default="uniform", metavar="P[,P]",
                   help="for --M runs: uniform, uniform2 (p = 0.02), skewed, trained (comma list; default uniform)")
    p.add_argument("--p", type=float, default=0.005, help="target active fraction of 'uniform' for --M runs (0.005)")
    p.add_argument("--ell-width", default="64", metavar="W[,W]", help="twell ELL width(s) for --M runs (default 64)")
    p.add_argument("--path", default="auto", metavar="P[,P]",
                   help="twell plan path(s) for --M runs: auto, sparse (= hybrid), dense (default auto)")
    p.add_argument("--reps", type=int, default=20, help="timed runs per measurement (median; default 20, at least 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    p.add_argument("--l1-coeff", type=float, default=1e-4, help="L1 coefficient c (loss += c * sum|h|; default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the synthetic inputs (default 0)")
    p.add_argument("--tol", type=float, default=0.02, help="relative error limit for twell's outputs (default 0.02)")
    p.add_argument("--no-check", action="store_true", help="skip the fp32 reference (no relerr fields)")
    p.add_argument("--no-plots", action="store_true", help="skip train_speedup.png")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="do not run anything: redraw the table and plot from an earlier bench_train.json")
    return p


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def _nbytes(t) -> int:
    return 0 if t is None else int(t.numel()) * int(t.element_size())


def _warm(torch, fn, warmup: int, min_warm_s: float) -> None:
    """At least ``warmup`` untimed calls and at least ``min_warm_s`` seconds of them (at most 200)."""
    t0 = time.perf_counter()
    n = 0
    while n < max(warmup, 1) or (time.perf_counter() - t0 < min_warm_s and n < 200):
        fn()
        n += 1
        if n >= warmup:
            torch.cuda.synchronize()
    torch.cuda.synchronize()


def _time_ms(torch, fn, reps: int, warmup: int, min_warm_s: float = 0.15) -> tuple[float, float]:
    """(median, min) milliseconds per fn() as a training loop runs it: ``reps`` calls back to back
    (no synchronisation between them, so each call's host time overlaps the GPU work before it
    unless the host is the slower side), a CUDA event between every two calls, one
    synchronisation at the end; after the warm-up of ``_warm``."""
    _warm(torch, fn, warmup, min_warm_s)
    n = max(reps, 1)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    ev[0].record()
    for i in range(n):
        fn()
        ev[i + 1].record()
    ev[n].synchronize()
    ts = [ev[i].elapsed_time(ev[i + 1]) for i in range(n)]
    return float(statistics.median(ts)), float(min(ts))


def _time_synced_ms(torch, fn, reps: int, warmup: int, min_warm_s: float = 0.15) -> tuple[float, float]:
    """(median, min) milliseconds of fn() alone: a synchronisation before every call, so the host
    time of issuing the call's first launch is inside each timed interval (the method of the
    records before 2026-12-03c: an upper bound for a loop's step time)."""
    _warm(torch, fn, warmup, min_warm_s)
    ts = []
    for _ in range(max(reps, 1)):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return float(statistics.median(ts)), float(min(ts))


def make_inputs(torch, d: int, h: int, m: int, pattern: str, p: float, seed: int, device="cuda"):
    """Synthetic bf16 (x, W_g, W_u, W_d [H, D], dy) of docs/design.md, drawn on the device."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    f32, bf16 = torch.float32, torch.bfloat16
    x = torch.randn(m, d, generator=gen, device=device, dtype=f32)
    if pattern == "skewed":
        x[:, :-1] *= torch.exp(0.35 * torch.randn(m, 1, generator=gen, device=device, dtype=f32))
    elif pattern not in ("uniform", "trained"):
        raise ValueError(f"unknown pattern {pattern!r} (uniform, skewed, trained)")
    x[:, -1] = 1.0
    x = x.to(bf16)
    wg = torch.randn(h, d, generator=gen, device=device, dtype=f32) / math.sqrt(max(d - 1, 1))
    if pattern == "trained":  # twell.patterns: a trained LM's concentrated activity (p is not used)
        thr = trained_thresholds(h, np.random.default_rng(seed))
        wg[:, -1] = torch.from_numpy(thr).to(device)
    else:
        wg[:, -1] = -NormalDist().inv_cdf(1.0 - p)
    wg = wg.to(bf16)
    wu = (torch.randn(h, d, generator=gen, device=device, dtype=f32) / math.sqrt(d)).to(bf16)
    wd = (torch.randn(h, d, generator=gen, device=device, dtype=f32) / math.sqrt(h)).to(bf16)
    dy = torch.randn(m, d, generator=gen, device=device, dtype=f32).to(bf16)
    return x, wg, wu, wd, dy


def _warm_gpu(torch, seconds: float = 1.0) -> None:
    """Bring the GPU to its working clocks before the first measurement (bf16 GEMMs for ``seconds``)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(8):
            b = a @ a
        torch.cuda.synchronize()
    del a, b
    torch.cuda.empty_cache()


def _measure_step(torch, step, outputs) -> dict:
    """Run step() once and measure the device memory it holds beyond what was allocated before it and beyond
    its outputs (outputs(result) -> tensors that stay allocated after it: y and the gradients).

    - ``raw``: torch.cuda.max_memory_allocated() - memory_allocated() before;
    - ``lower_bound``: raw minus every output's bytes (an output may not exist yet at the peak);
    - ``exact``: from the caching allocator's alloc/free trace (torch.cuda.memory._record_memory_history):
      the largest sum of live blocks allocated inside the step, not counting the outputs' blocks; None if
      the trace is unavailable.
    """
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    tracing = False
    sentinel = None
    sentinel_bytes = 3 * 1024 * 1024 + 4096 * 7
    try:
        try:
            torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python",
                                                     max_entries=1 << 20, clear_history=True)
        except TypeError:   # older PyTorch: no clear_history
            torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python", max_entries=1 << 20)
        tracing = True
        s = torch.empty(sentinel_bytes, dtype=torch.uint8, device="cuda")   # alloc + free: marks the step's start
        sentinel = (int(s.untyped_storage().data_ptr()), sentinel_bytes)
        del s
    except Exception:
        pass
    result = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    snap = None
    if tracing:
        try:
            snap = torch.cuda.memory._snapshot()
        except Exception:
            snap = None
        finally:
            try:
                torch.cuda.memory._record_memory_history(enabled=None)
            except Exception:
                pass
    outs = [t for t in outputs(result) if t is not None]
    out_bytes = sum(_nbytes(t) for t in outs)
    res = {"raw": int(peak - base), "lower_bound": int(peak - base - out_bytes), "exact": None, "result": result}
    try:
        if snap is not None and sentinel is not None:
            res["exact"] = _trace_peak(snap, {int(t.untyped_storage().data_ptr()) for t in outs}, sentinel,
                                       torch.cuda.current_device())
    except Exception:
        res["exact"] = None
    return res


def _trace_peak(snap: dict, out_addrs: set, sentinel: tuple, device: int):
    """Peak of live bytes allocated after the sentinel (an allocation of its address and size immediately
    followed by its free; the step may reuse the address later), the outputs' final blocks excluded (frees of
    blocks allocated before the sentinel are ignored)."""
    sentinel_addr, sentinel_bytes = sentinel
    traces = snap.get("device_traces") or []
    if device >= len(traces):
        return None
    trace = traces[device]
    start = None
    frees = ("free_requested", "free_completed", "free")
    for i in range(len(trace) - 2, -1, -1):
        ev, nxt = trace[i], trace[i + 1]
        if ev.get("action") == "alloc" and ev.get("addr") == sentinel_addr and \
                sentinel_bytes <= ev.get("size", 0) < sentinel_bytes + (2 << 20) and \
                nxt.get("action") in frees and nxt.get("addr") == sentinel_addr:
            start = i
            break
    if start is None:
        return None
    window = trace[start + 1:]
    free_action = "free_completed" if any(ev.get("action") == "free_completed" for ev in window) else \
        ("free_requested" if any(ev.get("action") == "free_requested" for ev in window) else "free")
    last_alloc = {}
    for i, ev in enumerate(window):
        if ev.get("action") == "alloc" and ev.get("addr") in out_addrs:
            last_alloc[ev["addr"]] = i
    skip = set(last_alloc.values())
    live, cur, peak = {}, 0, 0
    for i, ev in enumerate(window):
        act = ev.get("action")
        if act == "alloc":
            if i in skip:
                continue
            live[ev["addr"]] = ev["size"]
            cur += ev["size"]
            peak = max(peak, cur)
        elif act == free_action:
            sz = live.pop(ev.get("addr"), None)
            if sz is not None:
                cur -= sz
    return int(peak)


class _Dense:
    """The dense baseline: PyTorch bf16 autograd on leaf views of the same tensors."""

    def __init__(self, torch, x, wg, wu, wd, dy, c: float):
        self.t = torch
        self.params = [a.detach().requires_grad_(True) for a in (x, wg, wu, wd)]
        self.dy = dy
        self.c = torch.tensor(float(c), dtype=x.dtype, device=x.device)   # l1's dtype (bf16)

    def forward(self):
        t = self.t
        x, wg, wu, wd = self.params
        h = t.relu(x @ wg.t()) * (x @ wu.t())     # autograd saves relu(g), u (and h below); g is freed
        y = h @ wd
        l1 = h.abs().sum()                          # bf16 result (fp32 accumulation), as a plain PyTorch user writes it
        return y, l1

    def step(self):
        for a in self.params:
            a.grad = None
        y, l1 = self.forward()
        self.t.autograd.backward([y, l1], [self.dy, self.c])
        return y, l1

    def grads(self):
        return [a.grad for a in self.params]


def _reference_errors(torch, x, wg, wu, wd, dy, c, outs: dict, chunk_rows: int = 8192) -> dict:
    """fp32 forward + backward (TF32 off), chunked over rows; relative Frobenius errors of each
    candidate's y, dx, dW_* and relative L1 error. outs: name -> dict(y, dx, dw_gate, dw_up, dw_down, l1)."""
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        f = torch.float32
        m, d = x.shape
        h = wg.shape[0]
        wgf, wuf, wdf = wg.to(f), wu.to(f), wd.to(f)
        dwg = torch.zeros(h, d, dtype=f, device=x.device)
        dwu = torch.zeros_like(dwg)
        dwd = torch.zeros_like(dwg)
        num = {k: {"y": 0.0, "dx": 0.0} for k in outs}
        den = {"y": 0.0, "dx": 0.0}
        l1 = 0.0
        for r0 in range(0, m, chunk_rows):
            r1 = min(m, r0 + chunk_rows)
            xc = x[r0:r1].to(f)
            dyc = dy[r0:r1].to(f)
            g = xc @ wgf.t()
            u = xc @ wuf.t()
            a = torch.relu(g)
            hh = a * u
            y = hh @ wdf
            l1 += float(hh.abs().sum(dtype=torch.float64))
            dh = dyc @ wdf.t() + c * torch.sign(hh)
            dg = dh * u * (g > 0)
            du = dh * a
            del g, u, a, dh
            dx = dg @ wgf + du @ wuf
            dwg += dg.t() @ xc
            dwu += du.t() @ xc
            dwd += hh.t() @ dyc
            del dg, du, hh
            for key, ref in (("y", y), ("dx", dx)):
                den[key] += float(torch.linalg.vector_norm(ref, dtype=torch.float64)) ** 2
                for k, o in outs.items():
                    if o.get(key) is not None:
                        diff = o[key][r0:r1].to(f) - ref
                        num[k][key] += float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2
            del y, dx, xc, dyc
        res = {}
        for k, o in outs.items():
            e = {}
            for key in ("y", "dx"):
                e[key] = math.sqrt(num[k][key]) / math.sqrt(den[key]) if den[key] > 0 else math.sqrt(num[k][key])
            for key, ref in (("dw_gate", dwg), ("dw_up", dwu), ("dw_down", dwd)):
                dn = float(torch.linalg.vector_norm(ref, dtype=torch.float64))
                nm = float(torch.linalg.vector_norm(o[key].to(f) - ref, dtype=torch.float64))
                e[key] = nm / dn if dn > 0 else nm
            if o.get("l1") is not None:
                e["l1"] = abs(float(o["l1"]) - l1) / l1 if l1 > 0 else abs(float(o["l1"]))
            res[k] = e
        return res
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32


# ---------------------------------------------------------------------------
# One configuration
# ---------------------------------------------------------------------------
def run_config(torch, train_ops, cfg: tuple, args) -> dict:
    d, h, m, pattern, p, width = cfg[:6]
    path = cfg[6] if len(cfg) > 6 else "auto"
    c = float(args.l1_coeff)
    reps, warmup = max(int(args.reps), 10), int(args.warmup)
    rec = {"bench": "train_step", "D": d, "H": h, "M": m, "pattern": pattern, "p": p, "ell_width": width,
           "path_option": path, "l1_coeff": c, "reps": reps, "warmup": warmup, "seed": args.seed,
           "dense": "torch bf16 autograd"}
    sp_target, mem_target = _targets(pattern, p)
    rec["target_speedup"], rec["target_mem_ratio"] = sp_target, mem_target
    seed = args.seed * 1000003 + (zlib.crc32(repr((d, h, m, pattern, p)).encode()) & 0xFFFF)
    x, wg, wu, wd, dy = make_inputs(torch, d, h, m, pattern, p, seed)
    torch.cuda.synchronize()

    # ---- twell ----
    plan = train_ops.TrainPlan(d, h, ell_width=width, path=path)
    bufs: dict = {}
    has_u64 = hasattr(torch, "uint64")

    def tw_forward():
        y, saved = plan.forward(x, wg, wu, wd, out=bufs.get("y"), saved=bufs.get("saved"), stats=bufs.get("fstats"),
                                l1=bufs.get("l1"), active=bufs.get("active"))
        bufs.update(y=y, saved=saved, fstats=saved.stats, l1=saved.l1, active=saved.active)

    def tw_step():
        tw_forward()
        if "bstats" not in bufs:
            bufs["bstats"] = torch.empty(16, dtype=torch.uint64, device=x.device) if has_u64 else None
        dx, dwg, dwu, dwd = plan.backward(dy, bufs["saved"], x, wg, wu, wd, l1_coeff=c, dx=bufs.get("dx"),
                                          dw_gate=bufs.get("dwg"), dw_up=bufs.get("dwu"), dw_down=bufs.get("dwd"),
                                          stats=bufs.get("bstats"))
        bufs.update(dx=dx, dwg=dwg, dwu=dwu, dwd=dwd)

    rec["ms"], rec["min_ms"] = _time_ms(torch, tw_step, reps, warmup)
    rec["ms_synced"] = _time_synced_ms(torch, tw_step, reps, warmup)[0]
    rec["fwd_ms"], rec["fwd_min_ms"] = _time_ms(torch, tw_forward, reps, warmup)
    # Fresh step for the allocator cross-check (saved state and workspace allocated inside it) and the outputs.
    bstats = bufs.get("bstats")
    bufs.clear()
    bufs["bstats"] = bstats
    plan.release_workspace()
    meas = _measure_step(torch, tw_step, lambda _: [bufs.get(k) for k in ("y", "dx", "dwg", "dwu", "dwd")])
    ex = meas["exact"]
    rec["twell_alloc_bytes"] = ex if ex is not None and meas["lower_bound"] <= ex <= meas["raw"] else \
        meas["lower_bound"]
    rec["twell_alloc_lower_bound"] = meas["lower_bound"]
    rec["twell_alloc_trace"] = ex
    rec["saved_bytes"] = plan.saved_size(m)
    rec["workspace_bytes"] = plan.workspace_size(m)
    rec["twell_bytes"] = rec["saved_bytes"] + rec["workspace_bytes"]
    fst = bufs["saved"].read_stats()
    bst = train_ops.read_train_stats(bstats) if bstats is not None else {}
    rec["active_per_token"] = fst["active"] / m if m else 0.0
    rec["density"] = fst["active"] / (m * h) if m else 0.0
    rec["tail_rows"] = fst["tail_rows"]
    rec["ell_rows"] = fst["ell_rows"]
    rec["max_row_count"] = fst["max_row_count"]
    rec["overflow_rows"] = fst["overflow_rows"]
    rec["path"] = fst["path"]
    rec["route"] = plan.last_route()
    # That step was the first sighting of fresh buffers (eager: the hybrid forward and the backward
    # wait once each); the timed steps were repeats, replayed as CUDA graphs. One more repeat gives
    # their host synchronisations.
    rec["host_syncs_first_call"] = fst["host_syncs"] + bst.get("host_syncs", 0)
    tw_step()
    tw_step()
    fst2 = bufs["saved"].read_stats()
    bst2 = train_ops.read_train_stats(bstats) if bstats is not None else {}
    rec["host_syncs"] = fst2["host_syncs"] + bst2.get("host_syncs", 0)
    rec["replays"], rec["replay_captures"] = plan.replay_counts()
    if bst:
        rec["max_neuron_count"] = bst["max_neuron_count"]
    tw = {"y": bufs["y"], "dx": bufs["dx"], "dw_gate": bufs["dwg"], "dw_up": bufs["dwu"], "dw_down": bufs["dwd"],
          "l1": float(bufs["l1"].float().cpu()[0])}
    del bufs
    plan.release_workspace()

    # ---- dense (PyTorch autograd) ----
    dense = _Dense(torch, x, wg, wu, wd, dy, c)

    def dn_fwd():
        dense.forward()

    def dn_step():
        dense.step()

    rec["dense_ms"], rec["dense_min_ms"] = _time_ms(torch, dn_step, reps, warmup)
    rec["dense_ms_synced"] = _time_synced_ms(torch, dn_step, reps, warmup)[0]
    rec["dense_fwd_ms"], rec["dense_fwd_min_ms"] = _time_ms(torch, dn_fwd, reps, warmup)
    for a in dense.params:
        a.grad = None
    meas = _measure_step(torch, dense.step, lambda res: [res[0]] + dense.grads())
    y_dense, l1_dense = meas["result"]
    rec["dense_peak_raw_bytes"] = meas["raw"]              # includes y and the gradients
    rec["dense_bytes_lower_bound"] = meas["lower_bound"]   # raw minus y and every gradient
    rec["dense_bytes_trace"] = meas["exact"]
    ex = meas["exact"]
    if ex is not None and meas["lower_bound"] <= ex <= meas["raw"]:
        rec["dense_bytes"], rec["dense_bytes_method"] = ex, "allocator trace (outputs' blocks excluded)"
    else:
        rec["dense_bytes"], rec["dense_bytes_method"] = meas["lower_bound"], "peak minus all outputs (lower bound)"
    del meas
    rec["dense_saved_bytes_model"] = 3 * m * h * 2      # relu(g), u, h in bf16 (x is an input)
    gx, gwg, gwu, gwd = dense.grads()
    dn = {"y": y_dense.detach(), "dx": gx, "dw_gate": gwg, "dw_up": gwu, "dw_down": gwd, "l1": float(l1_dense.detach())}
    del dense, y_dense, l1_dense

    # ---- ratios ----
    flops = 18.0 * m * d * h      # 3 forward GEMMs + 6 backward GEMMs of 2*M*D*H
    rec["dense_tflops"] = flops / (rec["dense_ms"] * 1e-3) / 1e12
    rec["speedup_vs_dense"] = rec["dense_ms"] / rec["ms"]
    rec["fwd_speedup"] = rec["dense_fwd_ms"] / rec["fwd_ms"]
    rec["speedup_synced"] = rec["dense_ms_synced"] / rec["ms_synced"]
    rec["bwd_ms"] = rec["ms"] - rec["fwd_ms"]
    rec["dense_bwd_ms"] = rec["dense_ms"] - rec["dense_fwd_ms"]
    rec["peak_mem_ratio"] = rec["twell_bytes"] / rec["dense_bytes"] if rec["dense_bytes"] > 0 else None
    rec["alloc_mem_ratio"] = rec["twell_alloc_bytes"] / rec["dense_bytes"] if rec["dense_bytes"] > 0 else None
    rec["meets_speedup"] = None if sp_target is None else bool(rec["speedup_vs_dense"] >= sp_target)
    rec["meets_memory"] = None if mem_target is None or rec["peak_mem_ratio"] is None else \
        bool(rec["peak_mem_ratio"] <= mem_target)

    # ---- correctness vs fp32 ----
    if not args.no_check:
        errs = _reference_errors(torch, x, wg, wu, wd, dy, c, {"twell": tw, "dense": dn})
        for k, v in errs["twell"].items():
            rec["relerr_" + k] = v
        for k, v in errs["dense"].items():
            rec["dense_relerr_" + k] = v
        worst = max(errs["twell"][k] for k in ("y", "dx", "dw_gate", "dw_up", "dw_down"))
        rec["relerr_ok"] = bool(worst < args.tol)
        if not rec["relerr_ok"]:
            rec["error"] = f"relative error {worst:.3e} over --tol {args.tol:g}"
    del tw, dn, x, wg, wu, wd, dy, plan
    gc.collect()
    torch.cuda.empty_cache()
    return rec


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------
def _label(r: dict) -> str:
    pat = r.get("pattern", "?")
    p = r.get("p")
    s = f"{pat} {100 * p:g}%" if pat == "uniform" and p is not None else str(pat)
    return s


def write_markdown(doc: dict, path: Path) -> None:
    env = doc.get("environment") or {}
    lines = [
        "# twell training-step benchmark",
        "",
        f"- device: {doc.get('device', '?')}",
        f"- date: {doc.get('date', '?')}",
        f"- commit: {doc.get('commit', 'unknown')}",
        f"- baseline: PyTorch {env.get('torch', '?')} bf16 autograd (cuBLAS), same tensors, same process; "
        "step = forward + backward with the L1 term; median of the timed steps, run back to back as a training "
        "loop runs them (synced: a synchronisation before every step, the method of earlier records)",
        "- speedup = dense ms / twell ms; mem = twell (saved state + workspace) / dense (most memory held during "
        "the step beyond inputs, weights, y and gradients, from the allocator's trace); relerr = relative Frobenius "
        "error vs fp32 on the same bf16 inputs",
        "",
        "| D | H | M | pattern | W | path → route | act/tok | tail rows | twell step ms | twell fwd ms | dense step ms "
        "| dense fwd ms | dense TFLOP/s | step speedup | synced | fwd speedup | target | mem | twell MiB "
        "| dense MiB | relerr y / dx / dWg / dWu / dWd |",
        "|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    mib = 1024.0 * 1024.0
    for r in doc.get("records", []):
        if r.get("bench") != "train_step":
            continue
        head = [str(r.get("D")), str(r.get("H")), str(r.get("M")), _label(r), str(r.get("ell_width")),
                f"{r.get('path_option', 'auto')} → {r.get('route', '?')}"]
        if r.get("ms") is None:
            lines.append("| " + " | ".join(head) + " | FAILED: " + str(r.get("error", "?")).replace("|", "/")
                         + " |" + " |" * 14)
            continue
        tgt = r.get("target_speedup")
        tgt_s = "-" if tgt is None else f"≥{tgt:g}× " + ("met" if r.get("meets_speedup") else "**not met**")
        mem = fmt_cell(r.get("peak_mem_ratio"), ".3f")
        if r.get("target_mem_ratio") is not None:
            mem += f" (≤{r['target_mem_ratio']:g} {'met' if r.get('meets_memory') else '**not met**'})"
        errs = " / ".join(fmt_cell(r.get("relerr_" + k), ".1e") for k in ("y", "dx", "dw_gate", "dw_up", "dw_down"))
        if r.get("relerr_ok") is False:
            errs += " (FAIL)"
        lines.append("| " + " | ".join(head + [
            fmt_cell(r.get("active_per_token"), ".1f"), fmt_cell(r.get("tail_rows"), "d"),
            fmt_cell(r.get("ms"), ".3f"), fmt_cell(r.get("fwd_ms"), ".3f"), fmt_cell(r.get("dense_ms"), ".3f"),
            fmt_cell(r.get("dense_fwd_ms"), ".3f"), fmt_cell(r.get("dense_tflops"), ".0f"),
            fmt_cell(r.get("speedup_vs_dense"), ".2f") + "×",
            "-" if r.get("speedup_synced") is None else fmt_cell(r["speedup_synced"], ".2f") + "×",
            fmt_cell(r.get("fwd_speedup"), ".2f") + "×", tgt_s, mem,
            fmt_cell(None if r.get("twell_bytes") is None else r["twell_bytes"] / mib, ".0f"),
            fmt_cell(None if r.get("dense_bytes") is None else r["dense_bytes"] / mib, ".0f"), errs]) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(doc: dict, out: Path) -> list[str]:
    """train_speedup.png: step / forward speedup and memory ratio per configuration (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("twell bench-train: matplotlib is not installed: skipping the plot (pip install matplotlib)",
              file=sys.stderr)
        return []
    recs = [r for r in doc.get("records", []) if r.get("bench") == "train_step" and r.get("ms") is not None]
    if not recs:
        print("twell bench-train: no successful record to plot", file=sys.stderr)
        return []
    labels = [f"{r['D']}x{r['H']}\nM={r['M']}\n{_label(r)}\nW={r.get('ell_width')}\n{r.get('route', '')}"
              for r in recs]
    xs = list(range(len(recs)))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(7, 1.3 * len(recs) + 2), 8), sharex=True)
    wdt = 0.38
    ax1.bar([i - wdt / 2 for i in xs], [r["speedup_vs_dense"] for r in recs], wdt, label="step (fwd + bwd)")
    ax1.bar([i + wdt / 2 for i in xs], [r.get("fwd_speedup") or 0 for r in recs], wdt, label="forward")
    for i, r in enumerate(recs):
        if r.get("target_speedup") is not None:
            ax1.plot([i - 0.45, i + 0.45], [r["target_speedup"]] * 2, color="red", lw=1.5,
                     label="target (issue 5)" if i == 0 or "target (issue 5)" not in
                     [t.get_label() for t in ax1.lines] else None)
    ax1.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax1.set_ylabel("speedup vs PyTorch dense")
    ax1.set_title(f"twell training step vs dense bf16 autograd, {doc.get('device', '?')}")
    ax1.grid(True, axis="y", alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.bar(xs, [r.get("peak_mem_ratio") or 0 for r in recs], 0.6, color="C2", label="twell / dense peak memory")
    ax2.axhline(0.40, color="red", lw=1.0, ls="--", label="target 0.40 (uniform 0.5%)")
    ax2.set_ylabel("peak memory ratio")
    ax2.grid(True, axis="y", alpha=0.3)
    ax2.legend(fontsize=8)
    ax2.set_xticks(xs)
    ax2.set_xticklabels(labels, fontsize=7)
    fig.tight_layout()
    f = out / "train_speedup.png"
    fig.savefig(f, dpi=120)
    plt.close(fig)
    return [str(f)]


def _write_outputs(doc: dict, out: Path, plots: bool, quiet: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_markdown(doc, out / "bench_train.md")
    files = [str(out / "bench_train.json"), str(out / "bench_train.md")]
    if plots:
        files += write_plot(doc, out)
    if not quiet:
        print("twell bench-train: wrote " + ", ".join(files), file=sys.stderr)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
def main_bench_train(args) -> int:
    out = Path(args.out)
    if args.from_json:
        try:
            doc = json.loads(Path(args.from_json).read_text())
            if not isinstance(doc, dict) or "records" not in doc:
                raise ValueError("not a bench_train.json document (no 'records')")
        except (OSError, ValueError) as e:
            print(f"twell bench-train: cannot read {args.from_json}: {e}", file=sys.stderr)
            return 1
        _write_outputs(doc, out, not args.no_plots)
        return 0

    try:
        import torch
    except ImportError as e:
        print(f"twell bench-train: PyTorch is needed for the dense baseline ({e})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("twell bench-train: no GPU: torch.cuda.is_available() is False. `--from-json FILE` redraws earlier "
              "results without one.", file=sys.stderr)
        return 2
    try:
        from .. import _ffi, train_ops
    except Exception as e:  # cffi missing, broken header
        print(f"twell bench-train: twell's bindings did not load: {e}", file=sys.stderr)
        return 2
    if _ffi.lib is None:
        print(f"twell bench-train: the twell library did not load: {_ffi.unavailable_reason}", file=sys.stderr)
        return 2

    configs = suite_configs(args)
    _warm_gpu(torch)
    doc = {
        "device": torch.cuda.get_device_name(0),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "suite": None if args.M else args.suite,
        "command": sys.argv,
        "environment": {"torch": torch.__version__, "cuda": torch.version.cuda,
                        "capability": list(torch.cuda.get_device_capability(0)),
                        "memory_bytes": torch.cuda.get_device_properties(0).total_memory},
        "records": [],
    }
    print(f"twell bench-train: {len(configs)} configuration(s) on {doc['device']} (torch {torch.__version__})",
          file=sys.stderr)
    failed = 0
    for cfg in configs:
        t0 = time.time()
        try:
            rec = run_config(torch, train_ops, cfg, args)
        except Exception as e:  # keep going: one broken configuration must not lose the others
            traceback.print_exc()
            d, h, m, pattern, p, w = cfg[:6]
            rec = {"bench": "train_step", "D": d, "H": h, "M": m, "pattern": pattern, "p": p, "ell_width": w,
                   "path_option": cfg[6] if len(cfg) > 6 else "auto", "error": f"{type(e).__name__}: {e}"}
            gc.collect()
            torch.cuda.empty_cache()
        rec["wall_s"] = round(time.time() - t0, 2)
        if rec.get("error"):
            failed += 1
        doc["records"].append(rec)
        print(json.dumps(rec), flush=True)
        _write_outputs(doc, out, False, quiet=True)
    _write_outputs(doc, out, not args.no_plots)
    if failed:
        print(f"twell bench-train: {failed} record(s) report an error (field 'error')", file=sys.stderr)
        return 1
    return 0


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m twell.bench.train", description=__doc__.split("\n\n")[0])
    add_bench_train_args(p)
    return main_bench_train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_main())
