"""``twell bench-model`` without a GPU: the whole driver (two training runs from one initialisation,
the L1 recipe, validation, per-layer sparsity, prefill and static-cache decoding, the records, the
table) on a tiny transformers Llama on the host, where SparseMLP computes with dense ops. The
GPU run is the benchmark itself (bench/run_gpu.sh, step "model")."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from twell.bench import model as bm  # noqa: E402
from twell.cli import main  # noqa: E402

TINY = ["--device", "cpu", "--D", "32", "--H", "96", "--layers", "2", "--heads", "2", "--kv-heads", "2",
        "--seq", "16", "--batch", "2", "--steps", "12", "--warmup", "2", "--skip", "2", "--eval-every", "6",
        "--eval-batches", "1", "--prefill-tokens", "32", "--decode-batches", "1,2", "--decode-steps", "2",
        "--prompt", "3", "--no-progress"]


def _run(tmp_path, extra=()):
    assert main(["bench-model", *TINY, *extra, "--out", str(tmp_path)]) == 0
    return json.loads((tmp_path / "bench_model.json").read_text())


def test_bench_model_runs_end_to_end_and_writes_the_records(tmp_path):
    doc = _run(tmp_path)
    recs = doc["records"]
    assert [r["phase"] for r in recs] == ["train", "prefill", "decode", "decode"]
    keys = {"bench", "phase", "batch", "layers", "D", "H", "gpus", "tokens_per_s", "dense_tokens_per_s",
            "speedup_vs_dense", "val_loss", "dense_val_loss", "peak_mem_ratio"}
    for r in recs:
        assert keys <= set(r), keys - set(r)
        assert r["bench"] == "model" and r["gpus"] == 1 and (r["layers"], r["D"], r["H"]) == (2, 32, 96)
        assert r["tokens_per_s"] > 0 and r["dense_tokens_per_s"] > 0
    tr = recs[0]
    assert tr["steps"] == 12 and len(tr["sparsity"]) == 2
    for s in tr["sparsity"]:
        assert 0 <= s["active_per_token"] <= 96 and 0 <= s["dead_fraction"] <= 1
        assert 0 <= s["top64_share"] <= s["top256_share"] <= 1 + 1e-9
    assert [r["batch"] for r in recs[2:]] == [1, 2] and not recs[2]["graph"]  # no graphs on the host
    assert set(doc["curves"]) == {"dense", "twell"}
    assert doc["curves"]["twell"]["val"][-1][0] == 12
    assert "| train |" in (tmp_path / "bench_model.md").read_text()


def test_the_l1_recipe_changes_only_the_twell_run(tmp_path):
    """Same initialisation and batches: with lam = 0 the two runs are the same function trained the
    same way (equal losses); a large lam moves the twell run's loss and kills neurons."""
    same = _run(tmp_path / "a", ["--lam", "0"])["records"][0]
    assert abs(same["val_loss"] - same["dense_val_loss"]) < 1e-4
    strong = _run(tmp_path / "b", ["--lam", "0.5", "--l1-warmup", "1"])["records"][0]
    assert abs(strong["val_loss"] - strong["dense_val_loss"]) > 1e-3
    assert sum(s["dead_fraction"] for s in strong["sparsity"]) > sum(s["dead_fraction"] for s in
                                                                     strong["dense_sparsity"])


def test_shape_presets_and_overrides():
    p = bm.add_bench_model_args(__import__("argparse").ArgumentParser())
    assert bm.shape_of(p.parse_args([])) == bm.PRESETS["small"]
    s = bm.shape_of(p.parse_args(["--preset", "llama8b", "--layers", "3"]))
    assert (s["D"], s["H"], s["layers"], s["kv_heads"]) == (4096, 14336, 3, 8)
