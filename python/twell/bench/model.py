"""``twell bench-model``: a whole model, trained and served through twell, against the same model dense.

A ``transformers`` ``LlamaForCausalLM`` with ReLU MLPs is built from a config (``--preset small``:
4 layers, D = 2048, H = 5632; ``llama8b``: Llama-3-8B's layer shape, D = 4096, H = 14336, 32 heads,
8 KV heads, 2 layers), on the byte-level corpus of ``twell.lm.corpus`` (standard-library sources:
no download; vocabulary 256). From one initialisation and on the same batches it is trained twice:

- **dense**: the model as built (PyTorch ops), with the L1 recipe computed by PyTorch from each
  MLP's hidden activations h (``--dense-recipe ce``: cross-entropy only, to see what the recipe
  itself costs in loss);
- **twell**: ``twell.torch.sparsify(model)`` (the same parameters in ``SparseMLP`` layers), with the
  L1 recipe ``loss = ce + lam * l1_loss`` (lam ramped up linearly over ``--l1-warmup`` steps).

So by default both runs optimise the same objective: equal losses and sparsity (up to bf16
rounding) say twell trains the same model, and the tokens/s compare the same work.

Both use fp32 master weights under ``torch.autocast(bfloat16)``, AdamW, the same learning-rate
warm-up and the same number of steps (``--steps``, or as many as the dense run does in
``--minutes``). Reported per run: tokens/s of the training steps (after ``--skip`` warm-up steps),
the training and validation loss curves, the validation loss at the end, peak GPU memory, and per
layer the sparsity of the trained model on validation text (active neurons per token, neurons
never active, the share of activations carried by the 64 and 256 most active neurons).

Then each trained model is served in bf16: **prefill** tokens/s over ``--prefill-tokens`` tokens
(windows of ``--seq`` tokens, no cache) and **decode** tokens/s at each batch of
``--decode-batches`` with a static KV cache, one decode step (model, greedy next token, position
update) captured in a CUDA graph and replayed (eager steps where capture fails; the record says
which).

``--distributed ddp|fsdp`` (under ``torchrun --nproc-per-node N -m twell.bench.model ...``): the
same two training runs with DistributedDataParallel or FSDP2 (``fully_shard`` per decoder layer),
one process per GPU, each taking its share of the same global batches (so the losses match the
one-process run's), no serving; the record adds ``"engine"``, ``"gpus"`` = processes and tokens/s
per GPU. Rank 0 writes it.

Records (``bench_model.json`` under ``--out``): ``{"bench": "model", "phase": "train" | "prefill" |
"decode", "batch", "layers", "D", "H", "gpus", "tokens_per_s", "dense_tokens_per_s",
"speedup_vs_dense", "val_loss", "dense_val_loss", "peak_mem_ratio", ...}``; ``loss_curves.png``
(matplotlib, optional). ``--device cpu`` runs the same code on the host with dense ops everywhere
(SparseMLP computes densely there): a smoke test of the driver, not a measurement.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

PRESETS = {
    "small": {"D": 2048, "H": 5632, "layers": 4, "heads": 16, "kv_heads": 16},
    "llama8b": {"D": 4096, "H": 14336, "layers": 2, "heads": 32, "kv_heads": 8},
}


def add_bench_model_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model shape (default small)")
    p.add_argument("--D", type=int, default=None, help="override the preset's d_model")
    p.add_argument("--H", type=int, default=None, help="override the preset's MLP width")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--heads", type=int, default=None, help="override the preset's attention heads")
    p.add_argument("--kv-heads", type=int, default=None, help="override the preset's KV heads")
    p.add_argument("--seq", type=int, default=1024, help="tokens per training window (default 1024)")
    p.add_argument("--batch", type=int, default=16, help="windows per step (default 16: 16384 tokens)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: --minutes)")
    p.add_argument("--minutes", type=float, default=2.0,
                   help="without --steps: as many steps as the dense run makes in this time (default 2)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate after warm-up (default 1e-3)")
    p.add_argument("--warmup", type=int, default=50, help="learning-rate warm-up steps (default 50)")
    p.add_argument("--lam", type=float, default=1e-4, help="L1 weight of the twell run (default 1e-4)")
    p.add_argument("--l1-warmup", type=int, default=200, help="steps of the L1 weight's linear ramp (default 200)")
    p.add_argument("--profile-steps", type=int, default=3,
                   help="training steps (forward + backward) profiled per run for the GPU-time breakdown (0: none)")
    p.add_argument("--dense-recipe", choices=["l1", "ce"], default="l1",
                   help="the dense run's loss: the same L1 recipe (default) or cross-entropy only")
    p.add_argument("--eval-every", type=int, default=100, help="validation loss every N steps (default 100)")
    p.add_argument("--eval-batches", type=int, default=4, help="validation windows = this x --batch (default 4)")
    p.add_argument("--skip", type=int, default=10, help="steps not timed at the start of a run (default 10)")
    p.add_argument("--prefill-tokens", type=int, default=16384, help="tokens per prefill measurement (16384)")
    p.add_argument("--decode-batches", default="1,16,64", help="decode batch sizes (default 1,16,64)")
    p.add_argument("--decode-steps", type=int, default=64, help="timed decode steps per batch (default 64)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens before decoding (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test: nothing is sparse)")
    p.add_argument("--distributed", choices=["none", "ddp", "fsdp"], default="none",
                   help="under torchrun: train (no serving) with DistributedDataParallel or FSDP2 (fully_shard), "
                        "one process per GPU, the global batch --batch split over the processes")
    p.add_argument("--out", default="twell_bench_results", metavar="DIR", help="where the JSON and PNG go")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def shape_of(args) -> dict:
    s = dict(PRESETS[args.preset])
    for k, a in (("D", args.D), ("H", args.H), ("layers", args.layers), ("heads", args.heads),
                 ("kv_heads", args.kv_heads)):
        if a is not None:
            s[k] = a
    return s


def build_model(torch, transformers, shape: dict, seq: int, seed: int):
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=shape["D"], intermediate_size=shape["H"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], hidden_act="relu", max_position_embeddings=max(seq, 4096),
        tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


class _Bar:
    """tqdm if installed (and wanted), else nothing."""

    def __init__(self, total, desc, enabled):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, post=None):
        if self.bar is not None:
            self.bar.update(1)
            if post:
                self.bar.set_postfix(post, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Batches:
    """The same random training windows for every run (seeded), and fixed validation windows."""

    def __init__(self, corpus, batch: int, seq: int, seed: int, eval_batches: int):
        self.train, self.val, self.batch, self.seq, self.seed = corpus.train, corpus.val, batch, seq, seed
        n = eval_batches * batch
        stride = max(1, (self.val.size - seq - 1) // max(n, 1))
        offs = np.arange(n) * stride
        self.val_windows = self._windows(self.val, offs)

    def _windows(self, data, offs):
        idx = offs[:, None] + np.arange(self.seq + 1)[None, :]
        return data[idx].astype(np.int64)

    def step(self, i: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, i))
        return self._windows(self.train, rng.integers(0, self.train.size - self.seq - 1, size=self.batch))


class Dist:
    """One process of a torchrun group (or the only process: world 1): its slice of every global
    batch, the wrapping of a model for DDP / FSDP2, and the reductions of what it measures."""

    def __init__(self, torch, engine: str, device_kind: str):
        self.torch, self.engine = torch, engine
        self.rank, self.world, self.local_rank, self.mesh = 0, 1, 0, None
        self.comm_device = "cpu"  # where the reductions' tensors live (NCCL needs them on the GPU)
        if engine == "none":
            return
        import os

        import torch.distributed as dist

        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_kind == "cuda":
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if device_kind == "cuda":
            self.comm_device = f"cuda:{self.local_rank}"
        if engine == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(device_kind, (self.world,))

    def device(self, kind: str):
        return self.torch.device(kind, self.local_rank) if kind == "cuda" else self.torch.device(kind)

    def part(self, windows: np.ndarray) -> np.ndarray:
        """This process's windows of a global batch (every world-th from its rank on)."""
        return windows[self.rank::self.world]

    def wrap(self, model):
        if self.engine == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            kw = {"device_ids": [self.local_rank]} if next(model.parameters()).is_cuda else {}
            return DDP(model, **kw)
        if self.engine == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:  # one shard unit per decoder layer, then the rest
                fully_shard(layer, mesh=self.mesh)
            fully_shard(model, mesh=self.mesh)
        return model

    def reduce(self, values, op: str = "sum"):
        """The element-wise sum (or max) of a list of floats over the processes."""
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        t = self.torch.tensor(values, dtype=self.torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.tolist()

    def agree(self, flag: bool) -> bool:
        """Rank 0's flag on every process."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = self.torch.tensor([1.0 if flag else 0.0], device=self.comm_device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def close(self):
        """Leave the group together: every process reaches the barrier before any destroys its side
        (the callers drop their DDP / FSDP modules first). A process that tore down gloo while its
        peer was still inside the group, or with a DDP reducer still holding the group, sometimes
        aborted at exit ("terminate called without an active exception": 2 runs in 36 on 2 cores)."""
        if self.engine != "none":
            import gc

            import torch.distributed as dist

            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


def _sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def record_dense_l1(model) -> int:
    """Make every dense ReLU MLP of a transformers Llama/Qwen model (``*.mlp`` with gate/up/down
    projections, not a SparseMLP) record its L1 term like SparseMLP does: ``l1`` = sum of |h| over
    the call (fp32 accumulation, in the autograd graph) and ``tokens``. Returns how many."""
    import torch

    import twell.torch as tt

    n = 0
    for name, mlp in model.named_modules():
        if not name.endswith(".mlp") or isinstance(mlp, tt.SparseMLP) or not hasattr(mlp, "gate_proj"):
            continue

        def forward(x, mlp=mlp):
            h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # LlamaMLP's own expression, h kept
            mlp.l1 = h.abs().sum(dtype=torch.float32) if mlp.training else None
            mlp.tokens = x.numel() // x.shape[-1]
            return mlp.down_proj(h)

        mlp.forward = forward
        n += 1
    return n


def l1_term(torch, model, lam: float):
    """The L1 recipe's term over every MLP that recorded one (SparseMLP or ``record_dense_l1``):
    lam * mean over the layers of (l1 / tokens), as ``twell.torch.l1_loss``."""
    terms = [m.l1 / max(m.tokens, 1) for _, m in model.named_modules() if getattr(m, "l1", None) is not None]
    if not terms:
        return 0.0
    return lam * torch.stack([t.reshape(()).float() for t in terms]).mean()


def _ce(torch, model, w, device):
    x = torch.as_tensor(w[:, :-1], device=device)
    y = torch.as_tensor(w[:, 1:], device=device)
    logits = model(input_ids=x, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def evaluate(torch, model, batches: Batches, device, autocast, dist: Dist) -> float:
    """Mean cross-entropy over the validation windows (each process takes its part of every batch)."""
    model.eval()
    total = count = 0.0
    with torch.no_grad(), autocast():
        for k in range(0, len(batches.val_windows), batches.batch):
            w = dist.part(batches.val_windows[k:k + batches.batch])
            total += float(_ce(torch, model, w, device)) * len(w)
            count += len(w)
    model.train()
    total, count = dist.reduce([total, count])
    return total / count


def train_run(torch, model, batches: Batches, steps: int, args, device, l1: bool, label: str,
              minutes=None, dist: Dist | None = None) -> dict:
    """Train in place; returns the run's record (curves, tokens/s of the global batch, peak memory,
    final val loss). With ``minutes`` (and steps = None) it runs until the time is spent (rank 0's
    clock decides, every 10 steps) and reports the steps."""
    dist = dist or Dist(torch, "none", device.type)
    autocast = _autocast(torch, device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    curve, val_curve = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = _Bar(steps, label, not args.no_progress and dist.rank == 0)
    t_start = t_timed = None
    timed_steps = 0
    i = 0
    deadline = None if minutes is None else time.perf_counter() + 60.0 * minutes
    going = True
    while (steps is not None and i < steps) or (steps is None and going):
        if i == args.skip:
            _sync(torch, device)
            t_timed = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (i + 1) / max(args.warmup, 1))
        with autocast():
            ce = _ce(torch, model, dist.part(batches.step(i)), device)
            loss = ce
            if l1:
                lam = args.lam * min(1.0, (i + 1) / max(args.l1_warmup, 1))
                loss = ce + l1_term(torch, model, lam)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        i += 1
        if i > args.skip:
            timed_steps += 1
        if i % 10 == 0 or i == 1:
            curve.append((i, dist.reduce([float(ce.detach())])[0] / dist.world))
            if steps is None:
                going = dist.agree(time.perf_counter() < deadline)
        if args.eval_every and i % args.eval_every == 0:
            val_curve.append((i, evaluate(torch, model, batches, device, autocast, dist)))
        bar.update({"ce": f"{curve[-1][1]:.3f}"} if curve else None)
        if t_start is None:
            t_start = time.perf_counter()
    _sync(torch, device)
    bar.close()
    elapsed = time.perf_counter() - (t_timed if t_timed is not None else t_start)
    profile = None
    if device.type == "cuda" and args.profile_steps > 0:
        def one_step(k):
            with autocast():
                ce = _ce(torch, model, dist.part(batches.step(i + k)), device)
                loss = ce + (l1_term(torch, model, args.lam) if l1 else 0.0)
            loss.backward()
            opt.zero_grad(set_to_none=True)  # timing only: no update
        try:
            profile = kernel_profile(torch, one_step, args.profile_steps)
        except Exception as e:  # noqa: BLE001 -- a breakdown that fails must not lose the benchmark
            profile = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    n = timed_steps if t_timed is not None else max(i - 1, 1)
    val = evaluate(torch, model, batches, device, autocast, dist)
    if not val_curve or val_curve[-1][0] != i:
        val_curve.append((i, val))
    elapsed = dist.reduce([elapsed], "max")[0]
    peak = None
    if device.type == "cuda":
        peak = int(dist.reduce([float(torch.cuda.max_memory_allocated(device))], "max")[0])
    return {"steps": i, "tokens_per_s": n * batches.batch * batches.seq / max(elapsed, 1e-9),
            "step_ms": 1e3 * elapsed / max(n, 1), "val_loss": val, "train_curve": curve, "val_curve": val_curve,
            "peak_mem_bytes": peak, "profile": profile}


def kernel_family(name: str) -> str:
    """A coarse family of a CUDA kernel's name, for a step's time breakdown."""
    n = name.lower()
    rules = (("twell", ("twell", "sparse_", "gate_pack", "ell_", "tail_", "wgrad", "convert_kernel", "fallback",
                        "gather_rows", "scatter_rows", "schedule_kernel", "sm90_gate", "pack_rows", "counting")),
             ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
             ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "ampere_", "cublas")),
             ("optimizer", ("multi_tensor", "adam", "foreach")),
             ("reduction", ("reduce", "norm")),
             ("elementwise / copy", ("elementwise", "vectorized", "copy", "cast", "fill", "memcpy", "memset",
                                     "index", "cat", "unrolled")))
    for family, keys in rules:
        if any(k in n for k in keys):
            return family
    return "other"


def kernel_profile(torch, step, steps: int) -> dict:
    """CUDA kernel time per step by family (``kernel_family``), and the 10 longest kernels, over
    ``steps`` profiled steps (after one unprofiled one): where a training step's GPU time goes."""
    from torch.profiler import ProfilerActivity, profile

    step(0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for k in range(steps):
            step(k + 1)
        torch.cuda.synchronize()
    fam, top = {}, []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if not us:
            continue
        ms = us / 1e3 / steps
        fam[kernel_family(e.key)] = fam.get(kernel_family(e.key), 0.0) + ms
        top.append({"name": e.key[:90], "ms_per_step": ms})
    top.sort(key=lambda r: -r["ms_per_step"])
    return {"steps": steps, "total_ms_per_step": sum(fam.values()),
            "families_ms_per_step": dict(sorted(fam.items(), key=lambda kv: -kv[1])), "top": top[:10]}


def _autocast(torch, device):
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib
    return contextlib.nullcontext


def layer_sparsity(torch, model, batches: Batches, device, dist: Dist | None = None) -> list:
    """Per MLP layer on the validation windows (bf16 inference): mean active neurons per token, the
    fraction of neurons never active, the share of activations carried by the 64 / 256 most active."""
    mlps = [m for name, m in model.named_modules() if name.endswith(".mlp")]
    counts = [None] * len(mlps)
    tokens = [0]

    def hook(k):
        def f(mod, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1])
            act = (torch.nn.functional.linear(x, mod.gate_proj.weight.to(x.dtype)) > 0)
            c = act.sum(0, dtype=torch.int64)
            counts[k] = c if counts[k] is None else counts[k] + c
            if k == 0:
                tokens[0] += x.shape[0]
        return f

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in enumerate(mlps)]
    try:
        model.eval()
        with torch.no_grad(), _autocast(torch, device)():
            for k in range(0, len(batches.val_windows), batches.batch):
                w = batches.val_windows[k:k + batches.batch] if dist is None else dist.part(
                    batches.val_windows[k:k + batches.batch])
                model(input_ids=torch.as_tensor(w[:, :-1], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train()
    if dist is not None and dist.world > 1:
        merged = dist.reduce([float(tokens[0])] + [float(v) for c in counts for v in c.tolist()])
        tokens[0] = merged[0]
        counts = [torch.tensor(merged[1 + k * c.numel():1 + (k + 1) * c.numel()]) for k, c in enumerate(counts)]
    out = []
    for k, c in enumerate(counts):
        c = c.cpu().numpy().astype(np.float64)
        total = max(c.sum(), 1.0)
        top = np.sort(c)[::-1]
        out.append({"layer": k, "active_per_token": float(c.sum() / max(tokens[0], 1)),
                    "dead_fraction": float(np.mean(c == 0)), "top64_share": float(top[:64].sum() / total),
                    "top256_share": float(top[:256].sum() / total)})
    return out


def _timed(torch, device, fn, reps: int) -> float:
    """Median seconds of fn() over reps (after one untimed call)."""
    fn()
    _sync(torch, device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(torch, device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def prefill_tokens_per_s(torch, model, batches: Batches, tokens: int, device) -> float:
    rows = max(1, tokens // batches.seq)
    w = np.concatenate([batches.step(10_000 + k) for k in range(-(-rows // batches.batch))])[:rows]
    x = torch.as_tensor(w[:, :-1], device=device)
    with torch.no_grad():
        s = _timed(torch, device, lambda: model(input_ids=x, use_cache=False), 3)
    return rows * batches.seq / s


def _static_cache(transformers, model, batch: int, max_len: int, device):
    """A StaticCache across transformers versions (newer ones size the batch at the first update)."""
    try:
        return transformers.StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:
        return transformers.StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len,
                                        device=device, dtype=next(model.parameters()).dtype)


def _cache_kwarg(model) -> str:
    """The name transformers' forward takes the KV cache by (``cache`` from 5.x on, else past_key_values)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class GreedyDecoder:
    """Greedy decoding after a prompt with a static KV cache (prefilled here): ``step()`` runs the
    model on ``tok`` at ``pos``, writes the argmax into ``tok`` and advances ``pos``, all in place,
    so ``capture()`` can record one step in a CUDA graph (after warm-up steps outside it) and make
    ``step`` its replay; ``reset()`` goes back to the first token after the prompt."""

    def __init__(self, torch, transformers, model, ids, max_len: int):
        self.torch, self.model, self.prompt = torch, model, ids.shape[1]
        device = ids.device
        self.cache = _static_cache(transformers, model, ids.shape[0], max_len, device)
        self.kv = _cache_kwarg(model)
        with torch.no_grad():
            out = model(input_ids=ids, **{self.kv: self.cache}, cache_position=torch.arange(self.prompt, device=device),
                        use_cache=True)
        self.first = out.logits[:, -1:].argmax(-1)
        self.tok = self.first.clone()
        self.pos = torch.tensor([self.prompt], device=device)
        self.step = self.eager_step

    def eager_step(self):
        with self.torch.no_grad():
            o = self.model(input_ids=self.tok, **{self.kv: self.cache}, cache_position=self.pos, use_cache=True)
            self.tok.copy_(o.logits[:, -1:].argmax(-1))
            self.pos.add_(1)

    def capture(self, warmup: int = 3):
        torch = self.torch
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):  # plans, workspaces, cuBLASLt: outside the graph
                self.eager_step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.eager_step()
        self.graph = graph
        self.step = graph.replay
        self.reset()

    def reset(self):
        self.tok.copy_(self.first)
        self.pos.fill_(self.prompt)
        # Newer transformers count the cached tokens in a device tensor per layer (and write at
        # that count, not at cache_position): rewind it too.
        for layer in getattr(self.cache, "layers", ()):
            n = getattr(layer, "cumulative_length", None)
            if isinstance(n, self.torch.Tensor):
                n.fill_(self.prompt)


def decode_tokens_per_s(torch, transformers, model, batch: int, prompt: int, steps: int, device, seed: int):
    """(tokens/s, graph used, note): greedy decoding of ``steps`` tokens per sequence after a prompt,
    one step replayed from a CUDA graph (on CUDA; eager steps where the capture fails, and the note
    says why)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, prompt), generator=g).to(device)
    dec = GreedyDecoder(torch, transformers, model, ids, prompt + 2 * steps + 8)
    note, used = "", False
    if device.type == "cuda":
        try:
            dec.capture()
            used = True
        except Exception as e:  # noqa: BLE001 -- any capture failure: time eager steps, say why
            torch.cuda.synchronize()
            note = f"graph capture failed ({type(e).__name__}: {str(e)[:160]}); eager steps"
            dec.step = dec.eager_step
    for _ in range(2):  # warm-up of what is timed
        dec.step()
    dec.reset()
    _sync(torch, device)
    t0 = time.perf_counter()
    for _ in range(steps):
        dec.step()
    _sync(torch, device)
    return batch * steps / (time.perf_counter() - t0), used, note


def run(args) -> dict:
    import torch
    import transformers

    import twell.torch as tt
    from twell.lm.corpus import load_corpus

    kind = torch.device(args.device).type
    dist = Dist(torch, args.distributed, kind)
    if args.distributed != "none" and args.batch % dist.world:
        raise SystemExit(f"twell bench-model: --batch {args.batch} is not a multiple of the {dist.world} processes")
    device = dist.device(kind)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    shape = shape_of(args)
    corpus = load_corpus()
    batches = Batches(corpus, args.batch, args.seq, args.seed, args.eval_batches)
    base = build_model(torch, transformers, shape, args.seq, args.seed).to(device)
    init = copy.deepcopy(base.state_dict())
    common = {"layers": shape["layers"], "D": shape["D"], "H": shape["H"], "gpus": dist.world, "preset": args.preset}
    if args.distributed != "none":
        common["engine"] = args.distributed
    runs = {}

    # dense first: it fixes the step count when --minutes is given
    if args.dense_recipe == "l1":
        record_dense_l1(base)
    dense_model = dist.wrap(base)
    runs["dense"] = train_run(torch, dense_model, batches, args.steps, args, device,
                              l1=args.dense_recipe == "l1", label="dense",
                              minutes=None if args.steps else args.minutes, dist=dist)
    steps = runs["dense"]["steps"]
    twell_model = build_model(torch, transformers, shape, args.seq, args.seed).to(device)
    twell_model.load_state_dict(init)
    del init
    twell_model = dist.wrap(tt.sparsify(twell_model))
    runs["twell"] = train_run(torch, twell_model, batches, steps, args, device, l1=True, label="twell",
                              dist=dist)
    for name, m in (("dense", dense_model), ("twell", twell_model)):
        runs[name]["sparsity"] = layer_sparsity(torch, m, batches, device, dist)

    d, t = runs["dense"], runs["twell"]
    recs = [{"bench": "model", "phase": "train", "batch": args.batch, "seq": args.seq, **common,
             "steps": steps, "tokens_per_s": t["tokens_per_s"], "dense_tokens_per_s": d["tokens_per_s"],
             "speedup_vs_dense": t["tokens_per_s"] / d["tokens_per_s"], "val_loss": t["val_loss"],
             "dense_val_loss": d["val_loss"], "val_loss_ratio": t["val_loss"] / d["val_loss"],
             "peak_mem_ratio": (t["peak_mem_bytes"] / d["peak_mem_bytes"]) if d["peak_mem_bytes"] else None,
             "peak_mem_bytes": t["peak_mem_bytes"], "dense_peak_mem_bytes": d["peak_mem_bytes"],
             "lam": args.lam, "dense_recipe": args.dense_recipe, "sparsity": t["sparsity"],
             "dense_sparsity": d["sparsity"], "step_ms": t["step_ms"], "dense_step_ms": d["step_ms"],
             "kernel_profile": t["profile"], "dense_kernel_profile": d["profile"]}]
    recs[-1]["tokens_per_s_per_gpu"] = t["tokens_per_s"] / dist.world
    recs[-1]["dense_tokens_per_s_per_gpu"] = d["tokens_per_s"] / dist.world
    if dist.rank == 0:
        print(json.dumps({k: v for k, v in recs[-1].items() if "sparsity" not in k and "profile" not in k}),
              file=sys.stderr)
    curves = {n: {"train": r["train_curve"], "val": r["val_curve"]} for n, r in runs.items()}
    if args.distributed != "none":  # the distributed benchmark trains only
        del dense_model, twell_model, base
        dist.close()
        return {"records": recs, "curves": curves, "corpus": corpus.meta, "rank": dist.rank}

    # serving, bf16
    for m in (dense_model, twell_model):
        m.to(torch.bfloat16).eval()
    pre = {n: prefill_tokens_per_s(torch, m, batches, args.prefill_tokens, device)
           for n, m in (("dense", dense_model), ("twell", twell_model))}
    recs.append({"bench": "model", "phase": "prefill", "batch": max(1, args.prefill_tokens // args.seq),
                 "seq": args.seq, "tokens": args.prefill_tokens, **common, "tokens_per_s": pre["twell"],
                 "dense_tokens_per_s": pre["dense"], "speedup_vs_dense": pre["twell"] / pre["dense"],
                 "val_loss": t["val_loss"], "dense_val_loss": d["val_loss"], "peak_mem_ratio": None})
    print(json.dumps(recs[-1]), file=sys.stderr)
    for b in [int(v) for v in str(args.decode_batches).split(",") if v]:
        res = {n: decode_tokens_per_s(torch, transformers, m, b, args.prompt, args.decode_steps, device, args.seed)
               for n, m in (("dense", dense_model), ("twell", twell_model))}
        recs.append({"bench": "model", "phase": "decode", "batch": b, "prompt": args.prompt,
                     "decode_steps": args.decode_steps, **common, "tokens_per_s": res["twell"][0],
                     "dense_tokens_per_s": res["dense"][0], "speedup_vs_dense": res["twell"][0] / res["dense"][0],
                     "graph": res["twell"][1], "dense_graph": res["dense"][1],
                     "note": "; ".join(v[2] for v in res.values() if v[2]), "val_loss": t["val_loss"],
                     "dense_val_loss": d["val_loss"], "peak_mem_ratio": None})
        print(json.dumps(recs[-1]), file=sys.stderr)
    return {"records": recs, "curves": curves, "corpus": corpus.meta, "rank": 0}


def plot_curves(curves: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        if c["train"]:
            ax.plot(*zip(*c["train"]), label=f"{name} train", alpha=0.6)
        if c["val"]:
            ax.plot(*zip(*c["val"]), "o-", label=f"{name} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def table(doc: dict) -> str:
    md = ["| phase | batch | twell tokens/s | dense tokens/s | speedup | val loss twell / dense | peak mem |",
          "|---|---:|---:|---:|---:|---|---:|"]
    for r in doc["records"]:
        mem = f"{r['peak_mem_ratio']:.2f}" if r.get("peak_mem_ratio") else ""
        graph = "" if r["phase"] != "decode" else (" (graph)" if r["graph"] else " (eager)")
        if r.get("engine"):
            graph = f" ({r['engine']}, {r['gpus']} processes)"
        md.append(f"| {r['phase']}{graph} | {r['batch']} | {r['tokens_per_s']:.0f} | {r['dense_tokens_per_s']:.0f} | "
                  f"{r['speedup_vs_dense']:.2f}x | {r['val_loss']:.4f} / {r['dense_val_loss']:.4f} | {mem} |")
    tr = doc["records"][0]
    prof = (tr.get("kernel_profile"), tr.get("dense_kernel_profile"))
    if all(p and "families_ms_per_step" in p for p in prof):
        md += ["", "| GPU time per training step (forward + backward) | twell ms | dense ms |", "|---|---:|---:|"]
        for f in sorted(set(prof[0]["families_ms_per_step"]) | set(prof[1]["families_ms_per_step"])):
            md.append(f"| {f} | {prof[0]['families_ms_per_step'].get(f, 0.0):.2f} | "
                      f"{prof[1]['families_ms_per_step'].get(f, 0.0):.2f} |")
        md.append(f"| all kernels | {prof[0]['total_ms_per_step']:.2f} | {prof[1]['total_ms_per_step']:.2f} |")
    md += ["", "| layer | active/token | dead | top-64 share | top-256 share |", "|---:|---:|---:|---:|---:|"]
    for s in tr["sparsity"]:
        md.append(f"| {s['layer']} | {s['active_per_token']:.1f} | {100 * s['dead_fraction']:.1f}% | "
                  f"{100 * s['top64_share']:.1f}% | {100 * s['top256_share']:.1f}% |")
    return "\n".join(md) + "\n"


def main_bench_model(args) -> int:
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"twell bench-model: needs PyTorch and transformers ({e})", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        import twell

        if not torch.cuda.is_available() or not twell.available():
            why = twell.why_unavailable() or "PyTorch sees no CUDA device"
            print(f"twell bench-model: no GPU ({why}); --device cpu runs the driver on the host", file=sys.stderr)
            return 2
    from .ffn import git_commit

    t0 = time.time()
    doc = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
           "processes": int(__import__("os").environ.get("WORLD_SIZE", "1")),
           "date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "torch": torch.__version__,
           "transformers": sys.modules["transformers"].__version__, "command": " ".join(sys.argv),
           "args": vars(args)}
    doc.update(run(args))
    doc["wall_s"] = time.time() - t0
    if doc.pop("rank") != 0:
        return 0  # one process of a torchrun group writes the records
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_model.json").write_text(json.dumps(doc, indent=1, default=str))
    md = table(doc)
    (out / "bench_model.md").write_text(md)
    plotted = plot_curves(doc["curves"], out / "loss_curves.png")
    print(md)
    print(f"twell bench-model: wrote {out / 'bench_model.json'}, {out / 'bench_model.md'}"
          f"{', ' + str(out / 'loss_curves.png') if plotted else ''} in {doc['wall_s']:.0f} s", file=sys.stderr)
    return 0


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m twell.bench.model", description=__doc__.split("\n\n")[0])
    add_bench_model_args(p)
    return main_bench_model(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_main())
