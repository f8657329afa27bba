"""``twell bench``: run the CUDA benchmark program and keep its results.

The measuring is done by ``bench_ffn`` (bench/bench_ffn.cu, built with
``-DTWELL_BUILD_BENCH=ON``), a standalone C++/CUDA program that times twell
against a dense cuBLASLt FFN in the same process and prints one JSON object per
line. This driver finds and runs it, then writes under ``--out``:

- ``bench_ffn.jsonl``: bench_ffn's lines as they arrive (kept if a run breaks);
- ``bench_ffn.json``: ``{"device", "date", "commit", "suite", "command",
  "environment", "records": [...]}`` (records are bench_ffn's lines, as is);
- ``bench_ffn.md``: a Markdown table of the main numbers;
- ``speedup_vs_M.png`` and ``speedup_vs_density.png`` (if matplotlib is
  installed; otherwise a message says they were skipped).

``--from-json FILE`` redraws the table and plots from an earlier
bench_ffn.json (or bench_ffn.jsonl) without a GPU. The module also runs as a
plain script (``python python/twell/bench/ffn.py``), which needs nothing but the
standard library (and matplotlib for the plots). Field meanings and methodology: bench/README.md.

Exit status: 0 ok; 1 the program reported failures (a twell call failed, or a
relative error over tolerance) or could not be found; 2 no GPU; 3 the program
hit a fatal CUDA/cuBLAS error.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

__all__ = ["add_bench_args", "main_bench", "find_executable", "gpu_available", "write_markdown", "write_plots",
           "git_commit", "fmt_cell"]

_REPO_ROOT = Path(__file__).resolve().parents[3]
_EXE_NAME = "bench_ffn"


def add_bench_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--suite", choices=["quick", "full"], default="quick",
                   help="preset configurations (quick: ~1-2 min on an H100; full: M, density, pattern and "
                        "kernel sweeps). Ignored when --bench-args names --D/--H/--M.")
    p.add_argument("--out", default="twell_bench_results", metavar="DIR",
                   help="directory for bench_ffn.json, bench_ffn.md and the plots")
    p.add_argument("--exe", default=None, metavar="PATH",
                   help="the bench_ffn program (default: $TWELL_BENCH_EXE, else the newest build/**/bench_ffn)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement (bench_ffn default: 50)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (bench_ffn default: 5)")
    p.add_argument("--kernels", default=None, metavar="K[,K]",
                   help="auto, portable, sm90 (comma list); overrides the suite's choice")
    p.add_argument("--bench-args", default="", metavar="ARGS",
                   help="more arguments for bench_ffn, one string (e.g. \"--D 2048 --H 5632 --M 1,65536 "
                        "--pattern skewed\"); with --D/--H/--M the suite is not passed")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="do not run anything: redraw the table and plots from an earlier bench_ffn.json or "
                        "bench_ffn.jsonl")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before bench_ffn is stopped (default 3600)")
    return p


# ---------------------------------------------------------------------------
# Finding things
# ---------------------------------------------------------------------------
def _is_exe(p) -> bool:
    return p is not None and os.path.isfile(p) and os.access(p, os.X_OK)


def find_executable(explicit: str | None = None) -> tuple[str | None, str]:
    """(path, how) of bench_ffn: explicit > $TWELL_BENCH_EXE > newest build/**/bench_ffn."""
    if explicit:
        return (explicit if _is_exe(explicit) else None), f"--exe {explicit}"
    env = os.environ.get("TWELL_BENCH_EXE")
    if env:
        return (env if _is_exe(env) else None), f"$TWELL_BENCH_EXE={env}"
    found = []
    for root in {_REPO_ROOT, Path.cwd()}:
        found += glob.glob(str(root / "build" / "**" / _EXE_NAME), recursive=True)
    found = [f for f in found if _is_exe(f)]
    if not found:
        return None, f"no build/**/{_EXE_NAME} under {_REPO_ROOT} or {Path.cwd()}"
    found.sort(key=os.path.getmtime, reverse=True)
    return found[0], "newest build/**/" + _EXE_NAME


def gpu_available() -> tuple[bool, str]:
    """Whether a CUDA GPU is visible, and why not (the library's word first, then nvidia-smi)."""
    try:
        from .. import _ffi  # ImportError when run as a plain script
    except Exception as e:  # cffi missing, broken header, ...
        _ffi = None
        lib_reason = f"twell's bindings did not load ({e})"
    else:
        lib_reason = _ffi.unavailable_reason if _ffi.lib is None else ""
    if _ffi is not None and _ffi.lib is not None:
        n = _ffi.ffi.new("int32_t *")
        status = _ffi.lib.twell_device_count(n)
        if status == 0 and n[0] > 0:
            return True, ""
        return False, _ffi.ffi.string(_ffi.lib.twell_last_error()).decode() or "no CUDA device is visible"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            r = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
            if r.returncode == 0 and "GPU" in r.stdout:
                return True, ""
            return False, (r.stderr or r.stdout).strip() or "nvidia-smi lists no GPU"
        except (OSError, subprocess.SubprocessError) as e:
            return False, f"nvidia-smi failed: {e}"
    return False, "no CUDA driver or GPU found (no nvidia-smi" + (f"; {lib_reason}" if lib_reason else "") + ")"


def git_commit() -> str:
    """The source commit for a record: $TWELL_COMMIT, else `git rev-parse HEAD`, else "unknown"."""
    env = os.environ.get("TWELL_COMMIT")  # set by bench/run_gpu.sh callers where the copy has no .git
    if env:
        return env
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=10)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------
def fmt_cell(v, spec: str) -> str:
    """A table cell: ``format(v, spec)``, "-" for a missing value, str(v) when spec does not apply."""
    if v is None:
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def write_markdown(doc: dict, path: Path) -> None:
    recs = doc.get("records", [])
    lines = [
        "# bench_ffn results",
        "",
        f"- device: {doc.get('device', '?')}",
        f"- date: {doc.get('date', '?')}",
        f"- commit: {doc.get('commit', 'unknown')}",
    ]
    env = doc.get("environment") or {}
    if env:
        lines.append(f"- ceilings: device copy {fmt_cell(env.get('copy_gbps'), '.0f')} GB/s (read+write), "
                     f"cuBLASLt bf16 8192^3 {fmt_cell(env.get('gemm_peak_tflops'), '.0f')} TFLOP/s")
    lines += [
        "- speedup = baseline ms / ms (baseline: the cuBLASLt dense FFN; for gate_pack the cuBLASLt gate GEMM); "
        "floor % = floor_ms / ms; mem = twell workspace / dense intermediates",
        "",
        "| bench | D | H | M | pattern | p | kernels | S | act/tok | ovf rows | path | ms | baseline ms | speedup "
        "| gate TFLOP/s | floor % | mem | relerr |",
        "|---|---:|---:|---:|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in recs:
        if r.get("bench") in ("environment", "config"):
            continue
        if r.get("error") and r.get("ms") is None:
            lines.append(f"| {r.get('bench')} | {r.get('D')} | {r.get('H')} | {r.get('M')} | {r.get('pattern')} "
                         f"| {fmt_cell(r.get('p'), 'g')} | {r.get('kernels')} | {r.get('slots')} | FAILED: "
                         f"{str(r['error']).replace('|', '/')} ||||||||||")
            continue
        ff = r.get("floor_fraction")
        lines.append(
            "| " + " | ".join([
                str(r.get("bench")), str(r.get("D")), str(r.get("H")), str(r.get("M")), str(r.get("pattern")),
                fmt_cell(r.get("p"), "g"), str(r.get("kernels")), str(r.get("slots")),
                fmt_cell(r.get("active_per_token"), ".2f"), fmt_cell(r.get("overflow_rows"), ".0f"),
                str(r.get("path", "-")), fmt_cell(r.get("ms"), ".4f"), fmt_cell(r.get("dense_ms"), ".4f"),
                fmt_cell(r.get("speedup_vs_dense"), ".2f"),
                fmt_cell(r.get("tflops"), ".1f"), fmt_cell(None if ff is None else 100 * ff, ".1f"),
                fmt_cell(r.get("peak_mem_ratio"), ".3f"),
                fmt_cell(r.get("relerr"), ".2e") + ("" if r.get("relerr_ok", True) else " (FAIL)"),
            ]) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_plots(doc: dict, out: Path) -> list[str]:
    """speedup_vs_M.png and speedup_vs_density.png; returns the files written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("twell bench: matplotlib is not installed: skipping the plots (pip install matplotlib)",
              file=sys.stderr)
        return []
    recs = [r for r in doc.get("records", [])
            if r.get("bench") in ("ffn_sparse", "ffn_auto", "ffn_dense") and r.get("speedup_vs_dense") is not None]
    written = []
    title_dev = doc.get("device", "?")

    # Speedup vs M: uniform, per (D, H, bench, kernels, slots, p).
    series: dict[tuple, list] = {}
    for r in recs:
        if r.get("pattern") != "uniform":
            continue
        key = (r["D"], r["H"], r["bench"], r.get("kernels"), r.get("slots"), r.get("p"))
        series.setdefault(key, []).append((r["M"], r["speedup_vs_dense"]))
    series = {k: sorted(v) for k, v in series.items() if len({m for m, _ in v}) >= 2}
    if series:
        fig, ax = plt.subplots(figsize=(8, 5))
        for (D, H, bench, kern, slots, p), pts in sorted(series.items(), key=lambda kv: str(kv[0])):
            ax.plot([m for m, _ in pts], [s for _, s in pts], marker="o",
                    label=f"{bench} D={D} H={H} p={p:g} {kern} S={slots}")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens per call)")
        ax.set_ylabel("speedup vs cuBLASLt dense FFN")
        ax.set_title(f"twell FFN speedup vs M (uniform pattern), {title_dev}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        f = out / "speedup_vs_M.png"
        fig.savefig(f, dpi=120)
        plt.close(fig)
        written.append(str(f))

    # Speedup vs measured density, at each (D, H)'s largest M.
    groups: dict[tuple, list] = {}
    for r in recs:
        if r.get("density") is None:
            continue
        groups.setdefault((r["D"], r["H"], r["M"]), []).append(r)
    best: dict[tuple, int] = {}
    for D, H, M in groups:
        best[(D, H)] = max(best.get((D, H), 0), M)
    pts: dict[tuple, list] = {}
    for (D, H, M), rs in groups.items():
        if best[(D, H)] != M:
            continue
        for r in rs:
            key = (D, H, M, r["bench"], r.get("kernels"), r.get("slots"))
            pts.setdefault(key, []).append((r["density"], r["speedup_vs_dense"], r.get("pattern")))
    pts = {k: v for k, v in pts.items() if len(v) >= 2}
    if pts:
        fig, ax = plt.subplots(figsize=(8, 5))
        markers = {"uniform": "o", "skewed": "s", "hot": "^", "dense": "x", "trained": "D"}
        for i, ((D, H, M, bench, kern, slots), v) in enumerate(sorted(pts.items(), key=lambda kv: str(kv[0]))):
            color = f"C{i % 10}"
            v = sorted(v)
            uni = [(d, s) for d, s, pat in v if pat == "uniform"]
            if len(uni) >= 2:
                ax.plot([d for d, _ in uni], [s for _, s in uni], color=color, lw=1)
            for d, s, pat in v:
                ax.scatter([d], [s], color=color, marker=markers.get(pat, "o"))
            ax.plot([], [], color=color, label=f"{bench} D={D} H={H} M={M} {kern} S={slots}")
        for pat, mk in markers.items():
            ax.scatter([], [], color="black", marker=mk, label=pat)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("measured density (active gate entries / (M*H))")
        ax.set_ylabel("speedup vs cuBLASLt dense FFN")
        ax.set_title(f"twell FFN speedup vs density, {title_dev}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        f = out / "speedup_vs_density.png"
        fig.savefig(f, dpi=120)
        plt.close(fig)
        written.append(str(f))
    if not written:
        print("twell bench: not enough records for a plot (need 2+ values of M or of density in one series)",
              file=sys.stderr)
    return written


def _write_outputs(doc: dict, out: Path, plots: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_ffn.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_markdown(doc, out / "bench_ffn.md")
    files = [str(out / "bench_ffn.json"), str(out / "bench_ffn.md")]
    if plots:
        files += write_plots(doc, out)
    print("twell bench: wrote " + ", ".join(files), file=sys.stderr)


def _load_results(path: Path) -> dict:
    """An earlier bench_ffn.json, or bench_ffn's raw JSON lines (bench_ffn.jsonl)."""
    text = path.read_text()
    try:
        doc = json.loads(text)
        if isinstance(doc, dict) and "records" in doc:
            return doc
    except ValueError:
        pass
    env, records = {}, []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        if rec.get("bench") == "environment":
            env = rec
        else:
            records.append(rec)
    if not records and not env:
        raise ValueError("neither a bench_ffn.json document nor bench_ffn JSON lines")
    return {"device": env.get("device", "unknown"), "date": env.get("date", "unknown"), "commit": "unknown",
            "environment": env, "records": records}


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
def main_bench(args) -> int:
    out = Path(args.out)
    if args.from_json:
        try:
            doc = _load_results(Path(args.from_json))
        except (OSError, ValueError) as e:
            print(f"twell bench: cannot read {args.from_json}: {e}", file=sys.stderr)
            return 1
        _write_outputs(doc, out, not args.no_plots)
        return 0

    ok, why = gpu_available()
    if not ok:
        print(f"twell bench: no GPU: {why}. The benchmarks need a CUDA GPU (compute capability 8.0+); "
              "`twell bench --from-json FILE` redraws earlier results without one.", file=sys.stderr)
        return 2

    exe, how = find_executable(args.exe)
    if exe is None:
        print(f"twell bench: bench_ffn not found ({how}). Build it with\n"
              "  cmake -S . -B build/bench -G Ninja -DTWELL_BUILD_BENCH=ON && cmake --build build/bench\n"
              "or pass --exe / set $TWELL_BENCH_EXE.", file=sys.stderr)
        return 1

    extra = shlex.split(args.bench_args or "")
    cmd = [exe]
    if not any(a in ("--D", "--H", "--M", "--suite") for a in extra):
        cmd += ["--suite", args.suite]
    if args.reps is not None:
        cmd += ["--reps", str(args.reps)]
    if args.warmup is not None:
        cmd += ["--warmup", str(args.warmup)]
    if args.kernels:
        cmd += ["--kernels", args.kernels]
    cmd += extra
    print("twell bench: " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr)

    records, env, bad_lines = [], {}, []
    out.mkdir(parents=True, exist_ok=True)
    raw = open(out / "bench_ffn.jsonl", "w")  # the raw lines as they come: kept if anything below fails
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1)
    except OSError as e:
        print(f"twell bench: cannot start {exe}: {e}", file=sys.stderr)
        return 1
    timed_out = []

    def _stop():
        timed_out.append(True)
        proc.kill()

    timer = threading.Timer(args.timeout, _stop)
    timer.daemon = True
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.strip()
            if not line:
                continue
            raw.write(line + "\n")
            raw.flush()
            try:
                rec = json.loads(line)
            except ValueError:
                bad_lines.append(line)
                continue
            if rec.get("bench") == "environment":
                env = rec
            else:
                records.append(rec)
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.kill()
        proc.wait()
        rc = 130
    finally:
        timer.cancel()
        raw.close()
    if timed_out:
        print(f"twell bench: bench_ffn ran past --timeout {args.timeout:g} s and was stopped", file=sys.stderr)
        rc = 124
    if bad_lines:
        print(f"twell bench: {len(bad_lines)} line(s) of bench_ffn's stdout were not JSON (first: {bad_lines[0]!r})",
              file=sys.stderr)
    if rc == 2:
        print("twell bench: bench_ffn found no GPU (its message is above)", file=sys.stderr)
        return 2

    doc = {
        "device": env.get("device") or next((r.get("device") for r in records if r.get("device")), "unknown"),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "suite": None if any(a in ("--D", "--H", "--M") for a in extra) else args.suite,
        "command": cmd,
        "exit_status": rc,
        "environment": env,
        "records": records,
    }
    if records or env:
        _write_outputs(doc, out, not args.no_plots)
    failed = [r for r in records if r.get("error")]
    if failed:
        print(f"twell bench: {len(failed)} record(s) report an error (field 'error')", file=sys.stderr)
    if rc == 0:
        return 1 if failed else 0
    if rc in (1, 3, 124, 130):
        return 3 if rc == 3 else 1
    print(f"twell bench: bench_ffn exited with status {rc}", file=sys.stderr)
    return 1


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m twell.bench.ffn", description=__doc__.split("\n\n")[0])
    add_bench_args(p)
    return main_bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_main())
