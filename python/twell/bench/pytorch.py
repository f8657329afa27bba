"""``twell bench-torch``: twell as PyTorch users call it, against dense PyTorch in the same process.

For D x H and each M it times, with the same bf16 inputs and two weight sets rotated (together
larger than L2):

- **eager**: ``twell.torch.ffn(x, w_gate, w_up, down_proj.weight, w_down_layout="dh")`` called in a
  loop, wall time per call (host time included: this is what an eager model waits for), against
  the dense PyTorch FFN ``F.linear(relu(F.linear(x, W_g)) * F.linear(x, W_u), W_down)``;
- **graph**: the same calls captured in a ``torch.cuda.CUDAGraph`` (path AUTO decided on the device
  at every replay), replayed in a loop, against the dense FFN captured the same way;
- **host time**: microseconds the host spends per call while the GPU is held by a sleeping kernel
  (so nothing waits for the GPU): ``twell.torch.ffn`` and the dense PyTorch FFN;
- **training step host overhead**: one forward + backward through autograd
  (``ffn_with_l1`` + ``torch.autograd.backward((y, l1), (dy, dl1))``), host time outside the C
  library's calls (which hold the launches and the kernels' host waits): Python, allocations,
  autograd and its engine; beside it the dense PyTorch FFN's forward + backward host time;
- **training steps** (M = 16, 2048, 16384): forward, L1 term and backward, eager and captured in
  one CUDA graph (no host sync inside twell's training calls), against the dense PyTorch FFN's
  step run the same two ways; and the host time of one captured step's replay.

Records (``bench_torch.json`` under ``--out``, schema of bench/README.md):
``{"bench": "ffn_torch", "D", "H", "M", "pattern", "density", "graph", "ms", "dense_ms",
"speedup_vs_dense", "relerr", "path_ran"}`` and ``{"bench": "host_time", "api": "torch", "op": "ffn" |
"train_step" | "dense_ffn" | "dense_train_step", "D", "H", "M", "host_us"}`` (``"graph": true`` for a
captured step's replay), and ``{"bench": "train_torch", "D", "H", "M", "graph", "ms", "dense_ms",
"speedup_vs_dense"}`` for whole training steps. Exit status 2 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

QUICK_M = (1, 16, 64, 2048, 16384, 65536)


def add_bench_torch_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--D", type=int, default=2048, help="d_model (default 2048)")
    p.add_argument("--H", type=int, default=5632, help="hidden (default 5632)")
    p.add_argument("--M", default=",".join(str(m) for m in QUICK_M), help="token counts, comma list")
    p.add_argument("--p", type=float, default=0.005, help="target active fraction (uniform pattern; default 0.005)")
    p.add_argument("--calls", type=int, default=200, help="calls per timing at M <= 64 (fewer above; default 200)")
    p.add_argument("--out", default="twell_bench_results", metavar="DIR", help="where bench_torch.json goes")
    p.add_argument("--no-train", action="store_true", help="skip the training-step overhead measurement")
    p.add_argument("--profile", action="store_true", help="print a cProfile of the Python side to stderr")
    return p


def inputs(torch, D, H, M, p, seed):
    from statistics import NormalDist

    g = torch.Generator(device="cuda").manual_seed(seed)
    thr = -NormalDist().inv_cdf(1 - p)
    x = torch.randn(M, D, device="cuda", generator=g)
    x[:, -1] = 1.0
    sets = []
    for _ in range(2):
        wg = torch.randn(H, D, device="cuda", generator=g) / (D - 1) ** 0.5
        wg[:, -1] = thr
        wu = torch.randn(H, D, device="cuda", generator=g) / D ** 0.5
        wd = torch.randn(D, H, device="cuda", generator=g) / H ** 0.5  # nn.Linear down_proj.weight [D, H]
        sets.append(tuple(t.to(torch.bfloat16) for t in (wg, wu, wd)))
    return x.to(torch.bfloat16), sets


def _wall_ms(torch, fn, calls):
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    reps = []
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        torch.cuda.synchronize()
        reps.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(reps)


def _host_us(torch, fn, calls):
    """Host microseconds per call while a sleeping kernel holds the stream (no waits for the GPU)."""
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    reps = []
    for _ in range(5):
        torch.cuda._sleep(400_000_000)  # ~0.2 s at 2 GHz: longer than the calls take to enqueue
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        reps.append((time.perf_counter() - t0) * 1e6 / calls)
        torch.cuda.synchronize()
    return statistics.median(reps)


def _graph(torch, fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graphs = []
    for k in range(2):  # one graph per weight set
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn(k)
        graphs.append((g, out))
    return graphs


def run(args) -> dict:
    import torch
    import torch.nn.functional as F

    import twell.torch as tt
    from twell.torch import _runtime as rt

    D, H = args.D, args.H
    recs = []
    for M in [int(m) for m in str(args.M).split(",") if m]:
        calls = args.calls if M <= 64 else max(10, args.calls // (10 if M <= 4096 else 50))
        x, sets = inputs(torch, D, H, M, args.p, seed=M)
        key = tt.new_plan_key()

        def twell_call(i):
            wg, wu, wd = sets[i % 2]
            return tt.ffn(x, wg, wu, wd, w_down_layout="dh", plan=key)

        def dense_call(i):
            wg, wu, wd = sets[i % 2]
            return F.linear(F.relu(F.linear(x, wg)) * F.linear(x, wu), wd)

        with torch.no_grad():
            y_t = twell_call(0).float()
            y_d = dense_call(0).float()
            relerr = float((y_t - y_d).norm() / y_d.norm())
            runner = next(r for r in rt.runners_of(key) if isinstance(r, rt.FFNRunner))
            ms = _wall_ms(torch, twell_call, calls)
            path = runner.last_stats()["path"]
            dense_ms = _wall_ms(torch, dense_call, calls)
            density = runner.last_stats()["active"] / max(1, M * H)
            base = {"D": D, "H": H, "M": M, "pattern": "uniform", "density": density}
            recs.append({"bench": "ffn_torch", **base, "graph": False, "path": "auto", "ms": ms, "dense_ms": dense_ms,
                         "speedup_vs_dense": dense_ms / ms, "relerr": relerr, "path_ran": path})
            if M <= 16384:
                n_host = 100 if M <= 2048 else 40
                host = _host_us(torch, twell_call, n_host)
                spent = {"lib": 0.0}
                lib, runner.lib = runner.lib, TimedLibrary(runner.lib, spent, lambda name: "lib", "twell_ffn_run")
                try:
                    _host_us(torch, twell_call, n_host)
                finally:
                    runner.lib = lib
                replays, captures = runner.replay_counts()  # whether the timed calls were replays
                recs.append({"bench": "host_time", "api": "torch", "op": "ffn", "D": D, "H": H, "M": M,
                             "host_us": host, "in_library_us": spent["lib"] * 1e6 / (3 + 5 * n_host),
                             "replays": replays, "replay_captures": captures})
                recs.append({"bench": "host_time", "api": "torch", "op": "dense_ffn", "D": D, "H": H, "M": M,
                             "host_us": _host_us(torch, dense_call, 100 if M <= 2048 else 40)})
            tg = _graph(torch, twell_call)
            dg = _graph(torch, dense_call)
            ms_g = _wall_ms(torch, lambda i: tg[i % 2][0].replay(), calls)
            dms_g = _wall_ms(torch, lambda i: dg[i % 2][0].replay(), calls)
            rel_g = float((tg[0][1].float() - dg[0][1].float()).norm() / dg[0][1].float().norm())
            recs.append({"bench": "ffn_torch", **base, "graph": True, "path": "auto", "ms": ms_g, "dense_ms": dms_g,
                         "speedup_vs_dense": dms_g / ms_g, "relerr": rel_g, "path_ran": runner.last_stats()["path"]})
            del tg, dg
            if M <= 64:
                recs.extend(_decode_graph_paths(torch, tt, rt, D, H, M, calls))
        print(json.dumps(recs[-1]), file=sys.stderr)
        if not args.no_train and M in (16, 2048):
            recs.append(_train_overhead(torch, tt, rt, x, sets[0], M, D, H))
            print(json.dumps(recs[-1]), file=sys.stderr)
            recs.append(_dense_train_host_us(torch, x, sets[0], M, D, H))
            print(json.dumps(recs[-1]), file=sys.stderr)
        if not args.no_train and M in (16, 2048, 16384):
            recs.extend(_train_steps(torch, tt, rt, x, sets[0], M, D, H, calls=max(5, calls // 4)))
            for r in recs[-4:]:
                print(json.dumps(r), file=sys.stderr)
        torch.cuda.empty_cache()
    return {"records": recs}


def timed(acc: dict, slot: str, fn):
    """fn, adding the seconds each call takes to acc[slot]."""
    def call(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[slot] = acc.get(slot, 0.0) + time.perf_counter() - t0

    return call


class TimedLibrary:
    """A runner's cffi library whose calls named ``prefix*`` add their seconds to acc[slot_of(name)]."""

    def __init__(self, lib, acc: dict, slot_of, prefix: str = "twell_train_"):
        self._lib, self._acc, self._slot_of, self._prefix = lib, acc, slot_of, prefix

    def __getattr__(self, name):
        fn = getattr(self._lib, name)
        return timed(self._acc, self._slot_of(name), fn) if name.startswith(self._prefix) else fn


def _decode_graph_paths(torch, tt, rt, D, H, M, calls):
    """Decode-sized calls captured in CUDA graphs, every path, at 0.5% and ~6% activity: what a
    captured AUTO call costs beside the fixed path it picks (records ``ffn_torch`` with ``path``)."""
    import torch.nn.functional as F

    out = []
    for p, paths in ((0.005, ("sparse", "dense")), (0.06, ("auto", "sparse", "dense"))):
        x, sets = inputs(torch, D, H, M, p, seed=M + 1)
        dg = _graph(torch, lambda i: F.linear(F.relu(F.linear(x, sets[i % 2][0])) * F.linear(x, sets[i % 2][1]),
                                              sets[i % 2][2]))
        dms = _wall_ms(torch, lambda i: dg[i % 2][0].replay(), calls)
        for path in paths:
            key = tt.new_plan_key()
            tg = _graph(torch, lambda i: tt.ffn(x, *sets[i % 2], w_down_layout="dh", path=path, plan=key))
            ms = _wall_ms(torch, lambda i: tg[i % 2][0].replay(), calls)
            runner = next(r for r in rt.runners_of(key) if isinstance(r, rt.FFNRunner))
            st = runner.last_stats()
            rel = float((tg[0][1].float() - dg[0][1].float()).norm() / dg[0][1].float().norm())
            out.append({"bench": "ffn_torch", "D": D, "H": H, "M": M, "pattern": "uniform",
                        "density": st["active"] / max(1, M * H), "graph": True, "path": path, "ms": ms,
                        "dense_ms": dms, "speedup_vs_dense": dms / ms, "relerr": rel, "path_ran": st["path"]})
            print(json.dumps(out[-1]), file=sys.stderr)
            del tg
            tt.release(key)
        del dg
    return out


def _train_runner_of(rt, key):
    """The training runner a plan key's calls made."""
    return next(r for r in rt.runners_of(key) if isinstance(r, rt.TrainRunner))


def _train_overhead(torch, tt, rt, x, weights, M, D, H):
    """Host time of one training forward + backward through autograd beyond the library's calls:
    ``ffn_with_l1`` and ``torch.autograd.backward((y, l1), (dy, dl1))`` timed on the host, minus
    the time inside the C library (which holds the launches and the kernels' host waits), so what
    is left is the PyTorch layer's own cost: Python, allocations, autograd and the engine's hand-off
    to its device thread. Grads are set to None before each step (no accumulation kernels)."""
    key = tt.new_plan_key()
    leaves = [t.detach().clone().requires_grad_() for t in (x, *weights)]
    dy = torch.randn_like(x)
    dl1 = torch.full((1,), 1e-3, dtype=torch.float32, device=x.device)
    spent = {"lib": 0.0}

    def step():
        for a in leaves:
            a.grad = None
        t0 = time.perf_counter()
        y, l1 = tt.ffn_with_l1(*leaves, w_down_layout="dh", plan=key)
        t1 = time.perf_counter()
        torch.autograd.backward((y, l1), (dy, dl1))
        return t1 - t0, time.perf_counter() - t1

    for _ in range(3):
        step()
    runner = _train_runner_of(rt, key)

    lib = runner.lib
    runner.lib = TimedLibrary(lib, spent, lambda name: "lib")
    try:
        n, fwd, bwd = 50, 0.0, 0.0
        torch.cuda.synchronize()
        for _ in range(n):
            f, b = step()
            fwd += f
            bwd += b
        torch.cuda.synchronize()
    finally:
        runner.lib = lib
    return {"bench": "host_time", "api": "torch", "op": "train_step", "D": D, "H": H, "M": M,
            "host_us": (fwd + bwd - spent["lib"]) * 1e6 / n, "forward_ms": fwd * 1e3 / n,
            "backward_ms": bwd * 1e3 / n, "in_library_ms": spent["lib"] * 1e3 / n,
            "path_ran": runner.last_stats()["path"]}


def _train_steps(torch, tt, rt, x, weights, M, D, H, calls):
    """Whole training steps (forward, the L1 term, backward; grads overwritten, not accumulated) as
    users run them: eager and captured in one CUDA graph, twell against the dense PyTorch FFN.
    Records ``train_torch`` (wall ms per step, both modes) and the host time of a captured step."""
    import torch.nn.functional as F

    leaves = [t.detach().clone().requires_grad_() for t in (x, *weights)]
    dy = torch.randn_like(x).float()
    key = tt.new_plan_key()

    def twell_step(_i):
        for a in leaves:
            a.grad = None
        y, l1 = tt.ffn_with_l1(*leaves, w_down_layout="dh", plan=key)
        ((y.float() * dy).sum() + 1e-4 * l1.sum()).backward()

    def dense_step(_i):
        for a in leaves:
            a.grad = None
        xx, wg, wu, wd = leaves
        y = F.linear(F.relu(F.linear(xx, wg)) * F.linear(xx, wu), wd)
        ((y.float() * dy).sum()).backward()

    out = []
    base = {"D": D, "H": H, "M": M, "pattern": "uniform"}
    twell_step(0)  # makes the layer's runner
    runner = _train_runner_of(rt, key)
    before = runner.replay_counts()
    ms = _wall_ms(torch, twell_step, calls)
    after = runner.replay_counts()
    dense_ms = _wall_ms(torch, dense_step, calls)
    # Whether the eager steps replayed their captured forms (forward and backward: two plan calls a
    # step; _wall_ms runs 3 + 3 * calls steps): a step that does not replay waits on the host.
    out.append({"bench": "train_torch", **base, "graph": False, "ms": ms, "dense_ms": dense_ms,
                "speedup_vs_dense": dense_ms / ms, "eager_plan_calls": 2 * (3 + 3 * calls),
                "eager_replays": after[0] - before[0], "eager_captures": after[1] - before[1]})
    graphs = []
    for step in (twell_step, dense_step):
        g = _graph(torch, step)[0][0]
        graphs.append(g)
    ms_g = _wall_ms(torch, lambda i: graphs[0].replay(), calls)
    dms_g = _wall_ms(torch, lambda i: graphs[1].replay(), calls)
    out.append({"bench": "train_torch", **base, "graph": True, "ms": ms_g, "dense_ms": dms_g,
                "speedup_vs_dense": dms_g / ms_g})
    # What an eager step costs beyond its kernels: its wall time back to back against the captured
    # step's (the same kernels with no host work between them).
    out[0]["beyond_graph_us"] = (ms - ms_g) * 1e3
    out[0]["dense_beyond_graph_us"] = (dense_ms - dms_g) * 1e3
    out.append({"bench": "host_time", "api": "torch", "op": "train_step", "graph": True, "D": D, "H": H, "M": M,
                "host_us": _host_us(torch, lambda i: graphs[0].replay(), 20)})
    out.append({"bench": "host_time", "api": "torch", "op": "dense_train_step", "graph": True, "D": D, "H": H,
                "M": M, "host_us": _host_us(torch, lambda i: graphs[1].replay(), 20)})
    del graphs
    return out


def _dense_train_host_us(torch, x, weights, M, D, H):
    """Host time of the dense PyTorch FFN's forward + backward (no host waits: timed while a
    sleeping kernel holds the stream)."""
    import torch.nn.functional as F

    leaves = [t.detach().clone().requires_grad_() for t in (x, *weights)]
    dy = torch.randn_like(x)

    def step(_i):
        for a in leaves:
            a.grad = None
        xx, wg, wu, wd = leaves
        y = F.linear(F.relu(F.linear(xx, wg)) * F.linear(xx, wu), wd)
        torch.autograd.backward(y, dy)

    return {"bench": "host_time", "api": "torch", "op": "dense_train_step", "D": D, "H": H, "M": M,
            "host_us": _host_us(torch, step, 20)}


def _profile(torch, tt, D, H):
    """cProfile of the Python side: 200 eager inference calls at M=1 and 20 training steps at M=16."""
    import cProfile
    import io
    import pstats

    out = io.StringIO()
    x, sets = inputs(torch, D, H, 16, 0.005, seed=7)
    wg, wu, wd = sets[0]
    key = tt.new_plan_key()
    x1 = x[:1].contiguous()
    with torch.no_grad():
        for _ in range(5):
            tt.ffn(x1, wg, wu, wd, w_down_layout="dh", plan=key)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            tt.ffn(x1, wg, wu, wd, w_down_layout="dh", plan=key)
        pr.disable()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(14)
    leaves = [t.detach().clone().requires_grad_() for t in (x, wg, wu, wd)]
    for k in range(22):
        if k == 2:
            pr = cProfile.Profile()
            pr.enable()
        y, l1 = tt.ffn_with_l1(*leaves, w_down_layout="dh", plan=key)
        (y.float().sum() + 1e-3 * l1.sum()).backward()
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(18)
    return out.getvalue()


def main_bench_torch(args) -> int:
    try:
        import torch
    except ImportError:
        print("twell bench-torch: PyTorch is not installed", file=sys.stderr)
        return 2
    import twell

    if not torch.cuda.is_available() or not twell.available():
        why = twell.why_unavailable() or "PyTorch sees no CUDA device"
        print(f"twell bench-torch: no GPU ({why})", file=sys.stderr)
        return 2
    from .ffn import git_commit

    doc = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
           "torch": torch.__version__, "command": " ".join(sys.argv)}
    doc.update(run(args))
    if args.profile:
        import twell.torch as tt

        print(_profile(torch, tt, args.D, args.H), file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_torch.json").write_text(json.dumps(doc, indent=1))
    md = ["| M | density | mode | path | twell ms | dense ms | speedup | ran | relerr |",
          "|---:|---:|---|---|---:|---:|---:|---|---:|"]
    for r in doc["records"]:
        if r["bench"] == "ffn_torch":
            ran = {1: "sparse", 2: "dense"}.get(r["path_ran"], r["path_ran"])
            mode = "graph" if r["graph"] else "eager"
            md.append(f"| {r['M']} | {r['density']:.4f} | {mode} | {r.get('path', 'auto')} | {r['ms']:.4f} "
                      f"| {r['dense_ms']:.4f} | {r['speedup_vs_dense']:.2f}x | {ran} | {r['relerr']:.1e} |")
    md += ["", "| training step | M | twell ms | dense ms | speedup | eager beyond graph us (twell / dense) |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in doc["records"]:
        if r["bench"] == "train_torch":
            beyond = f"{r['beyond_graph_us']:.0f} / {r['dense_beyond_graph_us']:.0f}" if "beyond_graph_us" in r else ""
            md.append(f"| {'graph' if r['graph'] else 'eager'} | {r['M']} | {r['ms']:.4f} | {r['dense_ms']:.4f} | "
                      f"{r['speedup_vs_dense']:.2f}x | {beyond} |")
    md += ["", "| op | mode | M | host us |", "|---|---|---:|---:|"]
    for r in doc["records"]:
        if r["bench"] == "host_time":
            lib = f" ({r['in_library_us']:.1f} in twell_ffn_run)" if "in_library_us" in r else ""
            md.append(f"| {r['op']} | {'graph' if r.get('graph') else 'eager'} | {r['M']} | {r['host_us']:.1f}{lib} |")
    (out / "bench_torch.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"twell bench-torch: wrote {out / 'bench_torch.json'}, {out / 'bench_torch.md'}", file=sys.stderr)
    return 0


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m twell.bench.pytorch", description=__doc__.split("\n\n")[0])
    add_bench_torch_args(p)
    return main_bench_torch(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_main())
