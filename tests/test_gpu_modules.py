"""SparseMLP on the GPU against dense PyTorch on the same weights: forward, the four gradients and the
L1 term (gated; non-gated inference), inside autocast with fp32 parameters, under torch.compile,
under DistributedDataParallel with one process, under activation checkpointing and a compiled
training step, a sparsified transformers Llama generating the same greedy tokens as the dense
model, and its static-cache decode step replayed from a CUDA graph.

Tolerances as in test_gpu_torch.py: relative Frobenius < 1e-2 (bf16 outputs, fp32 accumulation).
"""

import os

import pytest

torch = pytest.importorskip("torch")

import gpu_support as gs  # noqa: E402
import twell.torch as tt  # noqa: E402

pytestmark = pytest.mark.gpu
BF = torch.bfloat16
TOL = 1e-2
D, H = 256, 768


def _rel(a, b):
    return gs.rel_frobenius(a.detach().float().cpu().numpy(), b.detach().float().cpu().numpy())


def _layer(gated=True, dtype=BF, seed=0, thr=1.8):
    """A layer whose gate is sparse (about 4% active) on unit-normal inputs."""
    torch.manual_seed(seed)
    m = tt.SparseMLP(D, H, gated=gated, device="cuda", dtype=dtype)
    with torch.no_grad():
        for lin in (m.gate_proj, m.up_proj) if gated else (m.up_proj,):
            lin.weight.copy_(torch.randn(H, D, device="cuda") / D ** 0.5)
        first = m.gate_proj if gated else m.up_proj
        first.weight[:, -1] = -thr  # x[:, -1] = 1: a bias of -thr on every neuron (the ReLU's input)
        m.down_proj.weight.copy_(torch.randn(D, H, device="cuda") / H ** 0.5)
    return m


def _x(m, shape=(4, 64)):
    x = torch.randn(*shape, D, device="cuda")
    x[..., -1] = 1.0
    return x.to(BF)


def _dense(m, x):
    wg = m.gate_proj.weight if m.gated else None
    wu, wd = m.up_proj.weight, m.down_proj.weight
    xf = x.float()
    if wg is not None:
        h = torch.relu(xf @ wg.float().t()) * (xf @ wu.float().t())
    else:
        h = torch.relu(xf @ wu.float().t())
    return h @ wd.float().t(), h


@pytest.mark.parametrize("gated", [True, False])
def test_inference_matches_dense(gated):
    m = _layer(gated)
    x = _x(m)
    with torch.no_grad():
        y = m(x)
        ref, h = _dense(m, x)
    assert y.shape == x.shape and y.dtype == BF
    assert _rel(y, ref) < TOL
    assert 0 < m.last_stats()["active"] < 0.2 * x.numel() // D * H
    assert m.l1 is None


def test_training_forward_backward_and_l1_match_dense():
    m = _layer()
    x = _x(m).requires_grad_()
    lam = 20.0  # large enough that the L1 term's share of the gradient is visible
    y = m(x)
    loss = (y.float() * torch.linspace(-1, 1, D, device="cuda")).sum() + lam * m.l1.sum() / m.tokens
    loss.backward()
    got = [x.grad, m.gate_proj.weight.grad, m.up_proj.weight.grad, m.down_proj.weight.grad]

    ref = _layer()  # same seed: same weights, fp32 math
    params = [p.detach().float().requires_grad_() for p in (ref.gate_proj.weight, ref.up_proj.weight,
                                                            ref.down_proj.weight)]
    xr = x.detach().float().requires_grad_()
    h = torch.relu(xr @ params[0].t()) * (xr @ params[1].t())
    yr = h @ params[2].t()
    l1r = h.abs().sum()
    assert abs(float(m.l1) - float(l1r)) / float(l1r) < TOL
    assert _rel(y, yr) < TOL
    lossr = (yr * torch.linspace(-1, 1, D, device="cuda")).sum() + lam * l1r / m.tokens
    lossr.backward()
    want = [xr.grad, *[p.grad for p in params]]
    for name, g, w in zip(("x", "gate", "up", "down"), got, want):
        assert g is not None and _rel(g, w) < TOL, name
    # the L1 term moves the gradients by more than the tolerance: it is really there
    params0 = [p.detach().float().requires_grad_() for p in params]
    h0 = torch.relu(xr.detach() @ params0[0].t()) * (xr.detach() @ params0[1].t())
    ((h0 @ params0[2].t()) * torch.linspace(-1, 1, D, device="cuda")).sum().backward()
    assert _rel(params0[0].grad, want[1]) > 5 * TOL


def test_autocast_with_fp32_parameters():
    m = _layer(dtype=torch.float32)
    x = _x(m).float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
    ref, _ = _dense(m, x.to(BF))
    assert y.dtype == BF and _rel(y, ref) < TOL
    y.float().sum().backward()
    assert m.up_proj.weight.grad.dtype == torch.float32 and torch.isfinite(m.up_proj.weight.grad).all()
    with torch.autocast("cuda", dtype=torch.float16), pytest.raises(Exception, match="bf16 only"):
        m(x)


def test_torch_compile_matches_eager():
    m = _layer()
    m.path = "sparse"  # AUTO may route the second call densely (exact too, but other rounding)
    x = _x(m)
    with torch.no_grad():
        want = m(x)
        got = torch.compile(m)(x)
    assert torch.equal(got, want)


def test_ddp_with_one_process():
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        m = _layer()
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        x = _x(m)
        y = ddp(x)
        (y.float().sum() + tt.l1_loss(ddp, 1.0)).backward()
        ref, _ = _dense(m, x)
        assert _rel(y, ref) < TOL and m.gate_proj.weight.grad is not None
    finally:
        dist.destroy_process_group()


def test_sparsified_llama_decodes_greedily_like_the_dense_model():
    """Every token the sparsified model picks greedily is the dense model's pick given the same
    prefix, up to near-ties (bf16 rounding may decide between logits closer than 2% of their
    spread; with random weights such ties occur)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=D, intermediate_size=H, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, hidden_act="relu",
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(3)
    dense = transformers.LlamaForCausalLM(cfg).to("cuda", BF).eval()
    sparse = transformers.LlamaForCausalLM(cfg).to("cuda", BF).eval()
    sparse.load_state_dict(dense.state_dict())
    tt.sparsify(sparse)
    ids = torch.randint(0, 128, (2, 5), device="cuda")
    with torch.no_grad():
        seq = sparse.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        logits = dense(seq).logits.float()
    assert seq.shape == (2, 17)
    steps = logits[:, 4:-1]  # the dense model's logits for each generated position
    picked = steps.gather(-1, seq[:, 5:, None]).squeeze(-1)
    margin = steps.max(-1).values - picked
    assert (margin <= 0.02 * steps.std()).all(), margin
    assert sum(1 for m in tt.sparse_mlps(sparse) if m.last_stats()["rows"] > 0) == 2


def test_activation_checkpointing_gives_the_same_gradients():
    """torch.utils.checkpoint around the layer (non-reentrant): the forward runs again in the
    backward, and the gradients (the L1 term's included) are those of the plain run."""
    from torch.utils.checkpoint import checkpoint

    grads = []
    for ckpt in (False, True):
        m = _layer()
        m.path = "sparse"  # one route for both runs (AUTO could switch on its history)
        x = _x(m).requires_grad_()
        y = checkpoint(m, x, use_reentrant=False) if ckpt else m(x)
        (y.float().sum() + tt.l1_loss(m, 20.0)).backward()
        grads.append([x.grad, m.gate_proj.weight.grad, m.up_proj.weight.grad, m.down_proj.weight.grad])
    for name, a, b in zip(("x", "gate", "up", "down"), *grads):
        assert a is not None and b is not None and _rel(b, a) < 1e-3, name


def test_compiled_training_step_matches_eager():
    """torch.compile of the layer in training (the training op traced with its fake implementation,
    autograd through its registered backward) gives the eager gradients."""
    torch._dynamo.reset()
    grads = []
    for compiled in (False, True):
        m = _layer()
        m.path = "sparse"
        f = torch.compile(m) if compiled else m
        x = _x(m).requires_grad_()
        y = f(x)
        (y.float().sum() + tt.l1_loss(m, 20.0)).backward()
        grads.append([x.grad, m.gate_proj.weight.grad, m.up_proj.weight.grad, m.down_proj.weight.grad])
    for name, a, b in zip(("x", "gate", "up", "down"), *grads):
        assert b is not None and _rel(b, a) < 1e-3, name


def test_static_cache_decode_step_replays_in_a_cuda_graph():
    """bench-model's decoding: a sparsified Llama with a static KV cache, one greedy step captured
    in a CUDA graph and replayed, picks the tokens the same steps pick eagerly."""
    transformers = pytest.importorskip("transformers")
    from twell.bench import model as bm

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=D, intermediate_size=H, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, hidden_act="relu",
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(5)
    model = tt.sparsify(transformers.LlamaForCausalLM(cfg).to("cuda", BF).eval())
    for m in tt.sparse_mlps(model):
        m.path = "sparse"
    ids = torch.randint(0, 128, (2, 6), device="cuda")

    def decode(graph: bool, steps: int = 8):
        dec = bm.GreedyDecoder(torch, transformers, model, ids, 32)  # a fresh cache each time
        if graph:
            dec.capture()
        picked = []
        for _ in range(steps):
            picked.append(dec.tok.clone())
            dec.step()
        torch.cuda.synchronize()
        return torch.cat(picked, 1)

    assert torch.equal(decode(graph=True), decode(graph=False))


def test_training_workspace_is_not_held_per_layer():
    """A training call takes its workspace from PyTorch's caching allocator and gives it back: a
    stack of layers trained through twell holds nothing between steps beyond the gradients, and
    the stack's peak memory grows by far less than one workspace per layer."""
    from twell.torch import _runtime as rt

    layers = [_layer(seed=s) for s in range(4)]
    x = _x(layers[0], shape=(8, 256))
    torch.cuda.synchronize()
    grads = sum(p.numel() * p.element_size() for m in layers for p in m.parameters())

    def step():
        y = x
        for m in layers:
            y = m(y)
        (y.float().sum() + tt.l1_loss(torch.nn.ModuleList(layers), 1e-3)).backward()
        torch.cuda.synchronize()

    step()  # plans made, grads allocated
    for m in layers:
        m.zero_grad(set_to_none=True)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    held = torch.cuda.memory_allocated() - before
    peak = torch.cuda.max_memory_allocated() - before
    runners = [r for r in rt._runners.values() if isinstance(r, rt.TrainRunner)]
    ws = max(max(r._need.values()) for r in runners if r._need)
    assert held <= grads + (1 << 20), (held, grads)
    assert peak < grads + 2 * ws, (peak, grads, ws)  # four layers' calls share the allocator's block
