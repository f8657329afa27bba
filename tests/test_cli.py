"""The twell command: every subcommand parses, and `twell info` works without a GPU."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import twell
from twell import cli


def test_info_json_runs_and_says_why_without_gpu(capsys):
    assert cli.main(["info", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["twell"]
    assert "kernels" in out
    if out.get("library") and out.get("gpus") == 0:
        assert out["kernels"].startswith("unavailable: ")


@pytest.mark.parametrize("sub", ["info", "demo", "train-ref", "bench", "bench-train", "bench-torch"])
def test_subcommands_have_help(sub):
    # prepend (not replace): the packages twell needs may come through PYTHONPATH too
    paths = [str(Path(twell.__file__).resolve().parent.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    r = subprocess.run([sys.executable, "-m", "twell.cli", sub, "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout


@pytest.mark.parametrize("argv, message", [
    (["train-ref", "--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    (["train-ref", "--text", "/nonexistent/corpus.txt"], "argument --text: no such file: '/nonexistent/corpus.txt'"),
    (["train-ref", "--d-model", "30", "--heads", "4", "--steps", "1"], "d_model=30 is not a multiple of n_heads=4"),
    (["train-ref", "--out", "/proc/twell-cannot-write-here", "--steps", "1"],
     "cannot write to --out /proc/twell-cannot-write-here"),
    (["train-ref", "--l1", "-1"], "argument --l1: expected a number >= 0, got '-1'"),
    (["train-ref", "--lr", "nan"], "argument --lr: expected a number > 0, got 'nan'"),
    (["train-ref", "--batch-size", "two"], "argument --batch-size: expected an integer >= 1, got 'two'"),
    (["demo", "--minutes", "0"], "argument --minutes: expected a number > 0, got '0'"),
    (["demo", "--steps", "-3"], "argument --steps: expected an integer >= 1, got '-3'"),
    (["demo", "--text", "/nonexistent"], "argument --text: no such file: '/nonexistent'"),
    (["demo", "--out", "/proc/twell-cannot-write-here", "--quick"],
     "cannot write to --out /proc/twell-cannot-write-here"),
])
def test_bad_values_get_one_line_errors_and_exit_2(argv, message, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"twell {argv[0]}: error: "), err


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"twell {twell.__version__} (")
    with pytest.raises(SystemExit):
        cli.main(["train-ref", "--help"])
    out = capsys.readouterr().out
    assert "(default: 0.04)" in out or "(default: [0.04])" in out
    assert "(default: train_ref_out)" in out


@pytest.mark.parametrize("record, synced", [("2026-12-03c_h200_bench_train.json", "1.99×"),
                                            ("2026-12-03b_h200_bench_train.json", None)])
def test_bench_train_redraws_committed_records(tmp_path, record, synced):
    """`--from-json` rebuilds the Markdown table without a GPU, for records timed back to back (with
    the synced column) and for the earlier ones (synced only: the column reads '-')."""
    from twell.bench import train

    src = Path(__file__).resolve().parent.parent / "bench" / "results" / record
    args = train.add_bench_train_args(argparse.ArgumentParser()).parse_args(
        ["--from-json", str(src), "--out", str(tmp_path), "--no-plots"])
    assert train.main_bench_train(args) == 0
    md = (tmp_path / "bench_train.md").read_text()
    head = [line for line in md.splitlines() if line.startswith("| D |")][0]
    assert "| step speedup | synced |" in head
    rows = [line for line in md.splitlines() if line.startswith("| 2048 | 5632 | 16384 | uniform 0.5% |")]
    assert rows, md
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    col = [c.strip() for c in head.strip("|").split("|")].index("synced")
    assert cells[col] == (synced if synced else "-")
