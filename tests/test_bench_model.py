"""``twell bench-model`` without a GPU: the whole driver (two training runs from one initialisation,
the L1 recipe, validation, per-layer sparsity, prefill and static-cache decoding, the records, the
table) on a tiny transformers Llama on the host, where SparseMLP computes with dense ops. The
GPU run is the benchmark itself (bench/run_gpu.sh, step "model")."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import gpu_support as gs  # noqa: E402
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


def test_both_runs_follow_the_same_l1_recipe(tmp_path):
    """Same initialisation and batches, and by default the same objective: on the host (where
    SparseMLP computes densely) the dense run's PyTorch L1 term and twell's give the same losses
    and sparsity at a lam large enough to move them; with --dense-recipe ce only the twell run
    pays the L1 term (its loss moves, fewer of its neurons fire)."""
    args = ["--lam", "0.5", "--l1-warmup", "1"]
    same = _run(tmp_path / "a", args)["records"][0]
    assert same["dense_recipe"] == "l1"
    assert abs(same["val_loss"] - same["dense_val_loss"]) < 1e-4 * same["dense_val_loss"]
    for a, b in zip(same["sparsity"], same["dense_sparsity"]):
        assert abs(a["active_per_token"] - b["active_per_token"]) < 1e-6 * max(1.0, b["active_per_token"])
    ce = _run(tmp_path / "b", [*args, "--dense-recipe", "ce"])["records"][0]
    assert abs(ce["val_loss"] - ce["dense_val_loss"]) > 1e-3
    # Fewer active neurons per token under the L1 term (how many die outright within 12 steps
    # depends on the initialisation, which differs between torch versions: none did on the H200
    # machine's, 2026-12-03f).
    active = [sum(s["active_per_token"] for s in ce[k]) for k in ("sparsity", "dense_sparsity")]
    assert active[0] < 0.8 * active[1], active
    assert ce["dense_val_loss"] == pytest.approx(_run(tmp_path / "c", ["--lam", "0"])["records"][0]["val_loss"],
                                                 rel=1e-4)  # lam = 0: the plain model either way


def test_dense_l1_term_is_the_sparse_mlp_term():
    """record_dense_l1's term on a dense Llama MLP equals SparseMLP's on the same weights (host)."""
    import transformers

    import twell.torch as tt

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, hidden_act="relu")
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(cfg)
    sparse = transformers.LlamaForCausalLM(cfg)
    sparse.load_state_dict(dense.state_dict())
    assert bm.record_dense_l1(dense) == 2
    tt.sparsify(sparse)
    ids = torch.randint(0, 64, (2, 7))
    terms = []
    for m in (dense, sparse):
        m.train()
        out = m(input_ids=ids, use_cache=False).logits
        terms.append(bm.l1_term(torch, m, 0.3))
        assert out.shape == (2, 7, 64)
    assert float(terms[0].detach()) > 0
    assert float(terms[0].detach()) == pytest.approx(float(terms[1].detach()), rel=1e-5)
    assert float(terms[1].detach()) == pytest.approx(float(tt.l1_loss(sparse, 0.3).detach()), rel=1e-6)


def test_shape_presets_and_overrides():
    p = bm.add_bench_model_args(__import__("argparse").ArgumentParser())
    assert bm.shape_of(p.parse_args([])) == bm.PRESETS["small"]
    s = bm.shape_of(p.parse_args(["--preset", "llama8b", "--layers", "3"]))
    assert (s["D"], s["H"], s["layers"], s["kv_heads"]) == (4096, 14336, 3, 8)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_train_like_one(tmp_path, engine):
    """torchrun with 2 processes (gloo on the host): DistributedDataParallel or FSDP2, each process
    its half of the same global batches, gives the one-process run's losses (dense and twell, the
    L1 recipe included) and sparsity; rank 0 writes the record."""
    import os
    import subprocess
    import sys

    args = [*TINY, "--batch", "4", "--steps", "6", "--lam", "0.01", "--l1-warmup", "1"]
    one = _run(tmp_path / "one", args[len(TINY):])["records"][0]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(gs.free_port()), "-m", "twell.bench.model", *args,
           "--distributed", engine, "--out", str(tmp_path / engine)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / engine / "bench_model.json").read_text())["records"]
    assert len(two) == 1 and two[0]["gpus"] == 2 and two[0]["engine"] == engine
    assert two[0]["steps"] == one["steps"] == 6
    for key in ("val_loss", "dense_val_loss"):
        assert abs(two[0][key] - one[key]) < 1e-4 * one[key], (key, two[0][key], one[key])
    for a, b in zip(two[0]["sparsity"], one["sparsity"]):
        assert abs(a["active_per_token"] - b["active_per_token"]) < 1e-6 * max(1.0, b["active_per_token"])
    assert two[0]["tokens_per_s_per_gpu"] == pytest.approx(two[0]["tokens_per_s"] / 2)


def test_greedy_decoder_picks_generates_tokens_and_resets():
    """bench-model's decoder (static cache, in-place steps: what a CUDA graph replays) on the host:
    the tokens of transformers' own greedy generate(), and the same again after reset()."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, hidden_act="relu",
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              pad_token_id=0)[:, 5:]
    dec = bm.GreedyDecoder(torch, transformers, model, ids, 32)
    for _ in range(2):
        got = []
        for _ in range(6):
            got.append(dec.tok.clone())
            dec.step()
        assert torch.equal(torch.cat(got, 1), want)
        dec.reset()
