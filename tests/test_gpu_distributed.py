"""Two processes on two GPUs (NCCL): DistributedDataParallel and FSDP2 runs of ``twell bench-model``'s
training (a tiny ReLU Llama, dense and sparsified with the L1 recipe) against the one-process run
with the same global batch: the losses after N steps agree to bf16 tolerance. Skips below 2 GPUs
(the host-side version, gloo on 2 processes, is in test_bench_model.py)."""

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import gpu_support as gs  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

ARGS = ["--D", "256", "--H", "768", "--layers", "2", "--heads", "4", "--kv-heads", "4", "--seq", "128",
        "--batch", "8", "--steps", "20", "--warmup", "5", "--skip", "5", "--eval-every", "10",
        "--eval-batches", "1", "--lam", "1e-3", "--l1-warmup", "5", "--no-progress"]


def _record(out, extra=(), procs=1):
    if procs == 1:
        cmd = [sys.executable, "-m", "twell.bench.model", *ARGS, "--decode-batches", "1", "--decode-steps", "2",
               "--prefill-tokens", "256", *extra, "--out", str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port",
               str(gs.free_port()), "-m", "twell.bench.model", *ARGS, *extra, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "bench_model.json").read_text())["records"][0]


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_gpus_train_like_one(tmp_path, engine):
    one = _record(tmp_path / "one")
    two = _record(tmp_path / engine, ["--distributed", engine], procs=2)
    assert two["gpus"] == 2 and two["engine"] == engine and two["steps"] == one["steps"]
    for key in ("val_loss", "dense_val_loss"):
        assert abs(two[key] - one[key]) < 2e-2 * one[key], (key, two[key], one[key])
