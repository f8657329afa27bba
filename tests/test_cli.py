"""The twell command: every subcommand parses, and `twell info` works without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from twell import cli


def test_info_json_runs_and_says_why_without_gpu(capsys):
    assert cli.main(["info", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["twell"]
    assert "kernels" in out
    if out.get("library") and out.get("gpus") == 0:
        assert out["kernels"].startswith("unavailable: ")


@pytest.mark.parametrize("sub", ["info", "demo", "train-ref", "bench", "bench-train"])
def test_subcommands_have_help(sub):
    import twell

    # prepend (not replace): the packages twell needs may come through PYTHONPATH too
    paths = [str(Path(twell.__file__).resolve().parent.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    r = subprocess.run([sys.executable, "-m", "twell.cli", sub, "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout
