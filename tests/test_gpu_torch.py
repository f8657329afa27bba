"""The PyTorch layer on the GPU: the custom ops against the float64 oracle (forward, the four
gradients, the L1 term), torch.compile(fullgraph=True), CUDA graph capture and replay of every
inference path with sparsity changing between replays (AUTO switching inside the graph) and of
whole training steps whose dense tail changes between replays, the
caller's stream, determinism, graph replay of eager calls, W_d layouts, and the errors.

Tolerances as in test_gpu_train.py / test_gpu_ffn.py: relative Frobenius < 1e-2 against float64
(bf16 outputs, fp32 accumulation); rows whose reference is 0 must be exactly 0.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gpu_support as gs  # noqa: E402
import twell  # noqa: E402
import twell.torch as tt  # noqa: E402
from twell import reference as ref  # noqa: E402
from twell.torch import _runtime as rt  # noqa: E402

pytestmark = pytest.mark.gpu
BF = torch.bfloat16
TOL = 1e-2


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).cuda().to(BF)


def _np(t):
    return t.detach().float().cpu().numpy()


def _poison_allocator(nbytes):
    """Fill freed blocks of PyTorch's caching allocator with NaN bits, so an output the op
    allocates but leaves partly unwritten shows up as NaN."""
    torch.empty(int(nbytes) // 2 + 4096, dtype=torch.int16, device="cuda").fill_(-1)  # 0xFFFF = NaN in bf16


def _problem(rng, m, d, h, pattern):
    from test_gpu_train import _problem as train_problem  # gate values near 0 resampled (see there)

    return train_problem(rng, m, d, h, pattern)


def _check_y(y, prob, gated=True):
    yref, _ = prob.reference(gated=gated)
    got = _np(y)
    assert np.isfinite(got).all(), "unwritten (NaN) outputs"
    assert gs.rel_frobenius(got, yref) < TOL
    zero = np.all(yref == 0, axis=1)
    assert np.all(got[zero] == 0), "rows whose reference is 0 must be 0"


def _weights(prob, layout):
    wd = prob.w_down
    if layout == "hd":
        return _t(prob.w_gate), _t(prob.w_up), _t(wd), "hd"
    if layout == "dh":  # a contiguous [D, H] (nn.Linear's down_proj.weight): transposed copy, cached
        return _t(prob.w_gate), _t(prob.w_up), _t(np.ascontiguousarray(wd.T)), "dh"
    return _t(prob.w_gate), _t(prob.w_up), _t(wd).t(), "dh"  # "dh_view": [D, H] view of [H, D] storage


CASES = [(1, 2048, 5632, "uniform"), (16, 2048, 5632, "skewed"), (64, 2048, 5632, "uniform"),
         (7, 256, 768, "dense_rows"), (300, 256, 768, "overflow"), (129, 256, 768, "zero_rows"),
         (2048, 512, 1536, "hot"), (1000, 512, 1536, "skewed")]


@pytest.mark.parametrize("m,d,h,pattern", CASES)
@pytest.mark.parametrize("layout", ["hd", "dh", "dh_view"])
@pytest.mark.parametrize("path", ["auto", "sparse", "dense"])
def test_ffn_op_matches_oracle(rng, m, d, h, pattern, layout, path):
    prob, _ = _problem(rng, m, d, h, pattern)
    wg, wu, wd, lay = _weights(prob, layout)
    x = _t(prob.x)
    _poison_allocator(m * d * 2)
    y = tt.ffn(x, wg, wu, wd, w_down_layout=lay, path=path, plan=tt.new_plan_key())
    assert y.shape == (m, d) and y.dtype == BF
    _check_y(y, prob)


@pytest.mark.parametrize("m", [1, 64, 300])
def test_ffn_op_non_gated_and_nd_input(rng, m):
    prob, _ = _problem(rng, m, 256, 768, "uniform")
    x = _t(prob.x)
    y = tt.ffn(x, None, _t(prob.w_up), _t(prob.w_down), path="sparse")
    _check_y(y, prob, gated=False)
    if m % 2 == 0:
        y3 = tt.ffn(x.view(2, m // 2, 256), _t(prob.w_gate), _t(prob.w_up), _t(prob.w_down))
        y2 = tt.ffn(x, _t(prob.w_gate), _t(prob.w_up), _t(prob.w_down))
        assert y3.shape == (2, m // 2, 256)
        assert torch.equal(y3.view(m, 256), y2)


def _oracle_grads(prob, dy, c):
    x = prob.x.astype(np.float64)
    y, cache = ref.ffn_forward(x, prob.w_gate.astype(np.float64), prob.w_up.astype(np.float64),
                               prob.w_down.astype(np.float64))
    dx, dw = ref.ffn_backward(dy.astype(np.float64), cache, l1_coeff=c)
    return y, ref.l1_sum(cache["h"]), dx, dw


@pytest.mark.parametrize("m,d,h,pattern", [(7, 256, 768, "uniform"), (300, 256, 768, "skewed"),
                                           (129, 256, 768, "dense_rows"), (64, 2048, 5632, "uniform"),
                                           (1000, 512, 1536, "hot")])
@pytest.mark.parametrize("layout", ["hd", "dh", "dh_view"])
@pytest.mark.parametrize("path", ["auto", "hybrid", "dense"])
def test_autograd_matches_oracle_with_a_visible_l1_term(rng, m, d, h, pattern, layout, path):
    prob, dy = _problem(rng, m, d, h, pattern)
    wg, wu, wd, lay = _weights(prob, layout)
    leaves = [t.detach().requires_grad_() for t in (_t(prob.x), wg, wu, wd)]
    x, wg, wu, wd = leaves
    r = _t(dy)
    # The L1 weight is about half the typical |dy W_d^T| (sqrt(D/H) for these inputs), so its
    # gradient is a visible share of dx, dW_g and dW_u (checked below).
    c = 0.5 * float(np.sqrt(d / h))
    y, l1 = tt.ffn_with_l1(x, wg, wu, wd, w_down_layout=lay, path=path, plan=tt.new_plan_key())
    loss = (y.float() * r.float()).sum() + c * l1.sum()
    loss.backward()
    yref, l1ref, dxr, dwr = _oracle_grads(prob, gs.round_bf16(dy), c)
    _, _, dx0, dw0 = _oracle_grads(prob, gs.round_bf16(dy), 0.0)
    assert gs.rel_frobenius(_np(y), yref) < TOL
    assert abs(float(l1.item()) - l1ref) <= 1e-2 * max(l1ref, 1e-6)
    dwd_hd = _np(wd.grad) if lay == "hd" else _np(wd.grad).T
    for name, got, want, without in (("dx", _np(x.grad), dxr, dx0),
                                     ("dw_gate", _np(wg.grad), dwr["w_gate"], dw0["w_gate"]),
                                     ("dw_up", _np(wu.grad), dwr["w_up"], dw0["w_up"]),
                                     ("dw_down", dwd_hd, dwr["w_down"], dw0["w_down"])):
        assert np.isfinite(got).all(), name
        assert gs.rel_frobenius(got, want) < TOL, name
        if name != "dw_down" and np.linalg.norm(want) > 0:  # dW_d has no L1 term
            share = gs.rel_frobenius(without, want)
            assert share > 10 * TOL, f"{name}: the L1 term is not visible ({share:.3g})"
            # got carries the L1 term: it is far from the gradient without it (both distances in
            # the same units; an L1 term that cancels the rest can make |without| >> |want|)
            gap = np.linalg.norm(np.float64(want) - without)
            assert np.linalg.norm(np.float64(got) - without) > 0.5 * gap, name
    assert wd.grad.shape == wd.shape


def test_l1_term_alone_and_its_coefficient_from_the_graph(rng):
    """dy = 0: only the L1 term drives the gradients; its coefficient comes from autograd as a device
    tensor (scaled here by a factor the backward only sees through dl1)."""
    prob, _ = _problem(rng, 200, 256, 768, "uniform")
    x, wg, wu, wd = (t.detach().requires_grad_() for t in (_t(prob.x), _t(prob.w_gate), _t(prob.w_up),
                                                            _t(prob.w_down)))
    y, l1 = tt.ffn_with_l1(x, wg, wu, wd, path="hybrid")
    scale = torch.tensor(0.37, device="cuda")
    (y.float().sum() * 0 + scale * 3.0 * l1.sum()).backward()
    _, _, dxr, dwr = _oracle_grads(prob, np.zeros((200, 256), np.float32), 0.37 * 3.0)
    assert gs.rel_frobenius(_np(x.grad), dxr) < TOL
    assert gs.rel_frobenius(_np(wg.grad), dwr["w_gate"]) < TOL
    assert gs.rel_frobenius(_np(wu.grad), dwr["w_up"]) < TOL
    assert float(wd.grad.abs().max()) == 0.0


def test_gradient_accumulation_and_unused_l1(rng):
    prob, dy = _problem(rng, 64, 256, 768, "uniform")
    x, wg, wu, wd = (t.detach().requires_grad_() for t in (_t(prob.x), _t(prob.w_gate), _t(prob.w_up),
                                                            _t(prob.w_down)))
    r = _t(dy)
    for _ in range(2):  # l1 not in the loss: dl1 is None in the backward
        (tt.ffn(x, wg, wu, wd).float() * r.float()).sum().backward()
    _, _, dxr, dwr = _oracle_grads(prob, gs.round_bf16(dy), 0.0)
    assert gs.rel_frobenius(_np(x.grad), 2 * dxr) < TOL
    assert gs.rel_frobenius(_np(wg.grad), 2 * dwr["w_gate"]) < TOL


def test_torch_compile_fullgraph_matches_eager(rng):
    prob, dy = _problem(rng, 256, 256, 768, "uniform")
    args = [_t(a) for a in (prob.x, prob.w_gate, prob.w_up, prob.w_down)]
    key = tt.new_plan_key()

    def infer(x, wg, wu, wd):
        return tt.ffn(x, wg, wu, wd, plan=key) * 2

    torch._dynamo.reset()
    ci = torch.compile(infer, fullgraph=True)
    assert torch.equal(ci(*args), infer(*args))

    def train(x, wg, wu, wd, r):
        y, l1 = tt.ffn_with_l1(x, wg, wu, wd, plan=key)
        return (y.float() * r).sum() + 0.01 * l1.sum()

    ct = torch.compile(train, fullgraph=True)
    r = _t(dy).float()
    grads = []
    for f in (ct, train):
        leaves = [a.detach().requires_grad_() for a in args]
        f(*leaves, r).backward()
        grads.append([a.grad for a in leaves])
    for a, b in zip(*grads):
        assert gs.rel_frobenius(_np(a), _np(b)) < 1e-3


@pytest.mark.parametrize("path", ["sparse", "dense", "auto"])
@pytest.mark.parametrize("m,d,h", [(1, 2048, 5632), (64, 2048, 5632), (300, 256, 768), (4096, 512, 1536)])
def test_cuda_graph_replays_stay_exact_and_auto_switches_inside_the_graph(rng, path, m, d, h):
    sparse_p, _ = _problem(rng, m, d, h, "uniform")
    # The same weights with x's last column at -1 instead of 1: every gate pre-activation is then
    # N(+2.58, 1) instead of N(-2.58, 1), ~99.5% active, so AUTO must go dense.
    dense_x = sparse_p.x.copy()
    dense_x[:, -1] = -1.0
    dense_p = gs.Problem(gs.round_bf16(dense_x), sparse_p.w_gate, sparse_p.w_up, sparse_p.w_down, "dense")
    wg, wu, wd = _t(sparse_p.w_gate), _t(sparse_p.w_up), _t(sparse_p.w_down)
    key = tt.new_plan_key()
    static_x = _t(sparse_p.x)
    for _ in range(3):  # warm-up: plans, workspace, cuBLASLt algorithms, eager replay graphs
        tt.ffn(static_x, wg, wu, wd, path=path, plan=key)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = tt.ffn(static_x, wg, wu, wd, path=path, plan=key)
    runner = next(r for r in rt.runners_of(key) if isinstance(r, rt.FFNRunner))
    seq = ["sparse", "dense", "dense", "dense", "sparse", "sparse", "sparse"]
    ran = []
    for which in seq:
        p = sparse_p if which == "sparse" else dense_p
        static_x.copy_(_t(p.x))
        g.replay()
        torch.cuda.synchronize()
        _check_y(static_y, p)
        ran.append(runner.last_stats()["path"])
    if path == "sparse":
        assert ran == [1] * len(seq)
    elif path == "dense":
        assert ran == [2] * len(seq)
    elif _decode_pipeline(m, d, h):
        # Decode sizes: the replay's own gate output decides (dense above 2 H stored pairs).
        want = [2 if _stored_pairs(sparse_p if w == "sparse" else dense_p) > 2 * h else 1 for w in seq]
        assert ran == want, (ran, want)
    else:  # each replay decides from the previous replay's statistics
        assert ran[0] == 1 and ran[1] == 1, ran   # no history yet / previous replay was sparse
        assert ran[2] == 2 and ran[3] == 2, ran   # previous replays were dense input
        assert ran[4] == 2, ran                   # previous replay (dense path) saw dense input
        assert ran[5] == 1 and ran[6] == 1, ran   # dense path saw sparse input -> back to sparse


def _decode_pipeline(m, d, h):
    """Whether twell runs an inference call of this size through its decode-sized pipeline
    (sm_90 devices, M <= 64; D and H as in these tests)."""
    return torch.cuda.get_device_capability()[0] >= 9 and 1 <= m <= 64 and d % 8 == 0 and h % 8 == 0


def _stored_pairs(prob, slots=32):
    """The TwELL entries a call stores: active gate entries per 256-column tile, clamped to
    slots - 1, summed over rows and tiles (from the float64 gate of the bf16 inputs)."""
    g = prob.x.astype(np.float64) @ prob.w_gate.astype(np.float64).T
    m, h = g.shape
    tiles = -(-h // 256)
    active = np.zeros((m, tiles * 256), dtype=bool)
    active[:, :h] = g > 0
    return int(np.minimum(active.reshape(m, tiles, 256).sum(axis=2), slots - 1).sum())


@pytest.mark.parametrize("m", [1, 16, 64])
def test_captured_auto_at_decode_sizes_goes_dense_within_the_replay(rng, m):
    """At decode sizes a captured AUTO call is the decode pipeline and an IF node on the dense
    path, whose condition the decode consumer sets from the replay's own stored pairs (above 2 H:
    dense). Inputs of 0.5%, ~6% and ~99.5% activity in turn, each replay checked."""
    d, h = 2048, 5632
    if not _decode_pipeline(m, d, h):
        pytest.skip("the decode-sized pipeline runs on sm_90 devices only")
    sparse_p, _ = _problem(rng, m, d, h, "uniform")
    probs = {"sparse": sparse_p}
    for name, last in (("mid", 1.555 / 2.58), ("dense", -1.0)):
        # x's last column sets every gate pre-activation's mean: N(-2.58 * last, 1), so ~6% active
        # for "mid" (few tiles over capacity) and ~99.5% for "dense" (every tile over).
        x = sparse_p.x.copy()
        x[:, -1] = last
        probs[name] = gs.Problem(gs.round_bf16(x), sparse_p.w_gate, sparse_p.w_up, sparse_p.w_down, name)
    wg, wu, wd = _t(sparse_p.w_gate), _t(sparse_p.w_up), _t(sparse_p.w_down)
    key = tt.new_plan_key()
    static_x = _t(sparse_p.x)
    for _ in range(3):
        tt.ffn(static_x, wg, wu, wd, plan=key)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = tt.ffn(static_x, wg, wu, wd, plan=key)
    runner = next(r for r in rt.runners_of(key) if isinstance(r, rt.FFNRunner))
    seq = ["sparse", "mid", "sparse", "dense", "mid", "dense", "sparse"]
    ran, want = [], []
    for which in seq:
        p = probs[which]
        static_x.copy_(_t(p.x))
        g.replay()
        torch.cuda.synchronize()
        _check_y(static_y, p)
        ran.append(runner.last_stats()["path"])
        want.append(2 if _stored_pairs(p) > 2 * h else 1)
    assert ran == want, (ran, want)
    if m == 64:
        assert want.count(2) == 4, want  # "mid" and "dense" both hold more than 2 H pairs at M = 64


def _with_dense_rows(prob, fraction, rng):
    """prob with a fraction of its tokens made fully active (x = [0, ..., 0, -1]: every gate
    pre-activation +2.58): those rows overflow any ELL width and go to the dense tail."""
    x = prob.x.copy()
    n = int(round(fraction * x.shape[0]))
    rows = rng.choice(x.shape[0], n, replace=False)
    x[rows, :-1] = 0.0
    x[rows, -1] = -1.0
    return gs.Problem(gs.round_bf16(x), prob.w_gate, prob.w_up, prob.w_down, f"dense rows {fraction}")


@pytest.mark.parametrize("path,m", [("hybrid", 2500), ("dense", 2500), ("auto", 4000), ("hybrid", 9300)])
def test_training_step_captures_in_a_cuda_graph_and_stays_exact_on_every_replay(rng, path, m):
    """A whole step (forward, L1 term, backward) in one CUDA graph, replayed with inputs whose
    dense tail takes none, some or all of the chunks of 1024 rows (and back; at M = 9300 the
    chunks' nodes are grouped, 8 to a group): every replay matches the float64 oracle, and two
    replays of one input are bitwise equal."""
    d, h = 256, 768
    base, dy = _problem(rng, m, d, h, "uniform")
    inputs = [base] + [_with_dense_rows(base, f, rng) for f in (0.2, 0.5, 1.0)]
    c = 0.5 * float(np.sqrt(d / h))  # the L1 term a visible share of the gradients (see above)
    key = tt.new_plan_key()
    xs = _t(base.x).requires_grad_()
    wg, wu, wd = (_t(a).requires_grad_() for a in (base.w_gate, base.w_up, base.w_down))
    r = _t(dy).float()

    def step():
        y, l1 = tt.ffn_with_l1(xs, wg, wu, wd, path=path, plan=key)
        ((y.float() * r).sum() + c * l1.sum()).backward()
        return y, l1

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: plan, workspace, cuBLASLt algorithms
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    for t in (xs, wg, wu, wd):
        t.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y, l1 = step()
    runner = next(rr for rr in rt.runners_of(key) if isinstance(rr, rt.TrainRunner))
    seen = {}
    for i in (0, 1, 2, 3, 2, 0, 3):
        p = inputs[i]
        with torch.no_grad():
            xs.copy_(_t(p.x))
        g.replay()
        torch.cuda.synchronize()
        yref, l1ref, dxr, dwr = _oracle_grads(p, gs.round_bf16(dy), c)
        assert gs.rel_frobenius(_np(y), yref) < TOL, p.pattern
        assert abs(float(l1.item()) - l1ref) <= 1e-2 * max(l1ref, 1e-6), p.pattern
        for name, got, want in (("dx", xs.grad, dxr), ("dw_gate", wg.grad, dwr["w_gate"]),
                                ("dw_up", wu.grad, dwr["w_up"]), ("dw_down", wd.grad, dwr["w_down"])):
            got = _np(got)
            assert np.isfinite(got).all(), (name, p.pattern)
            assert gs.rel_frobenius(got, want) < TOL, (name, p.pattern)
        st = runner.last_stats("forward"), runner.last_stats("backward")
        assert st[0]["host_syncs"] == 0 and st[1]["host_syncs"] == 0, st
        if path != "dense":  # the hybrid route (AUTO was captured on it): its tail is what the input asks for
            want_tail = int(round([0, 0.2, 0.5, 1.0][i] * m))
            assert st[0]["tail_rows"] == want_tail and st[1]["tail_rows"] == want_tail, (st, i)
            assert st[0]["tail_chunks"] == -(-want_tail // 1024), st
        bits = [t.detach().view(torch.int16).clone() for t in (y, xs.grad, wg.grad, wu.grad, wd.grad)]
        if i in seen:
            assert all(torch.equal(a, b) for a, b in zip(bits, seen[i])), f"replays of input {i} differ"
        seen[i] = bits


@pytest.mark.parametrize("path", ["auto", "sparse"])
@pytest.mark.parametrize("layout", ["hd", "dh", "dh_view"])
@pytest.mark.parametrize("warmups", [1, 2, 3, 5])
def test_training_step_captures_after_replayed_eager_steps(rng, path, layout, warmups):
    """Eager steps first (from the second, the plan replays them from its own graphs, and an AUTO
    plan reads each replay's activity back asynchronously), then two captures of the same step:
    both capture (nothing the plan does between calls may invalidate the caller's capture) and
    their replays match the eager step bitwise."""
    m, d, h = 2048, 256, 768
    prob, dy = _problem(rng, m, d, h, "uniform")
    wg0, wu0, wd0, lay = _weights(prob, layout)
    key = tt.new_plan_key()
    leaves = [_t(prob.x).requires_grad_()] + [w.detach().requires_grad_() for w in (wg0, wu0, wd0)]
    r = _t(dy).float()

    def step():
        for a in leaves:
            a.grad = None
        y, l1 = tt.ffn_with_l1(*leaves, w_down_layout=lay, path=path, plan=key)
        ((y.float() * r).sum() + 1e-2 * l1.sum()).backward()
        return (y, *(a.grad for a in leaves))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmups):
            eager = [t.detach().clone() for t in step()]
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graphs = []
    for _ in range(2):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = step()
        graphs.append((g, outs))
    for g, outs in graphs:
        g.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, eager):
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_captured_backward_marks_a_foreign_saved_state_with_nan(rng):
    """A captured backward cannot return an error at replay time: fed a saved state its forward
    did not write, it fills dx and the weight gradients with NaN instead of leaving them wrong."""
    prob, dy = _problem(rng, 64, 256, 768, "uniform")
    x, wg, wu, wd, r = (_t(a) for a in (prob.x, prob.w_gate, prob.w_up, prob.w_down, dy))
    key = tt.new_plan_key()
    _y, _l1, _active, saved = torch.ops.twell.train_forward(x, wg, wu, wd, 0, 64, 1, 0, key)
    torch.ops.twell.train_backward(r, None, x, wg, wu, wd, saved, 0, 64, 1, 0, key)  # warm-up
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = torch.ops.twell.train_backward(r, None, x, wg, wu, wd, saved, 0, 64, 1, 0, key)
    g.replay()
    torch.cuda.synchronize()
    assert all(torch.isfinite(o.float()).all() for o in outs)
    saved[:8].zero_()  # the magic word
    g.replay()
    torch.cuda.synchronize()
    assert all(torch.isnan(o.float()).all() for o in outs)


def test_runs_on_the_callers_stream(rng):
    """x is produced on a side stream after a long sleep; an op that ran anywhere but the current
    stream would read it before it is written."""
    prob, _ = _problem(rng, 512, 256, 768, "uniform")
    x0, wg, wu, wd = (_t(a) for a in (prob.x, prob.w_gate, prob.w_up, prob.w_down))
    s = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        for _ in range(3):
            torch.cuda._sleep(20_000_000)
            x = x0 * 1
            y = tt.ffn(x, wg, wu, wd, path="sparse")
    s.synchronize()
    _check_y(y, prob)


def test_deterministic_and_replay_equals_eager_launches(rng):
    prob, dy = _problem(rng, 300, 256, 768, "skewed")
    args = [_t(a) for a in (prob.x, prob.w_gate, prob.w_up, prob.w_down)]
    key = tt.new_plan_key()
    ys = []
    for _ in range(6):  # y freed before the next call: the allocator hands out the same buffers
        y = tt.ffn(*args, path="sparse", plan=key)
        ys.append(y.view(torch.int16).cpu())
        del y
    runner = next(r for r in rt.runners_of(key) if isinstance(r, rt.FFNRunner))
    replays, captures = runner.replay_counts()
    assert captures >= 1 and replays >= 2, (replays, captures)
    off = tt.new_plan_key()
    r_off = rt.ffn_runner(off, 256, 768, 0, True, 32, 1, 0)
    twell._ffi.check(r_off.lib.twell_ffn_plan_set_replay(r_off.plan, 0))
    y_eager = tt.ffn(*args, path="sparse", plan=off)
    assert r_off.replay_counts() == (0, 0)
    for y in ys:
        assert torch.equal(y, y_eager.view(torch.int16).cpu())
    grads = []
    for _ in range(2):  # a fixed route (AUTO may switch routes between the two steps)
        leaves = [a.detach().requires_grad_() for a in args]
        y, l1 = tt.ffn_with_l1(*leaves, path="hybrid")
        ((y.float() * _t(dy).float()).sum() + 0.01 * l1.sum()).backward()
        grads.append([a.grad.clone() for a in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_dh_copy_follows_in_place_weight_updates(rng):
    prob, _ = _problem(rng, 64, 256, 768, "uniform")
    x, wg, wu = _t(prob.x), _t(prob.w_gate), _t(prob.w_up)
    wd_dh = _t(np.ascontiguousarray(prob.w_down.T))
    key = tt.new_plan_key()
    y1 = tt.ffn(x, wg, wu, wd_dh, w_down_layout="dh", plan=key)
    wd_dh.mul_(2)  # in place: bumps the version, the cached [H, D] copy must be refreshed
    y2 = tt.ffn(x, wg, wu, wd_dh, w_down_layout="dh", plan=key)
    assert gs.rel_frobenius(_np(y2), 2 * _np(y1)) < TOL


def test_eager_fast_path_follows_weights_and_inputs(rng):
    """The memoised call state of eager calls (same weights and options as last time) must follow
    in-place weight writes, other input layouts between fast calls, and new weight tensors."""
    prob, _ = _problem(rng, 64, 256, 768, "uniform")
    x, wg, wu, wd = (_t(a) for a in (prob.x, prob.w_gate, prob.w_up, prob.w_down))
    key = tt.new_plan_key()
    y0 = tt.ffn(x, wg, wu, wd, plan=key)  # makes the call state
    _check_y(y0, prob)
    for _ in range(3):  # the memoised state (and, from the second call, the C library's replay)
        assert torch.equal(tt.ffn(x, wg, wu, wd, plan=key), y0)
    wu.mul_(2)  # in place on an [H, D] weight read as it is
    assert gs.rel_frobenius(_np(tt.ffn(x, wg, wu, wd, plan=key)), 2 * _np(y0)) < TOL
    wu.div_(2)
    wide = torch.cat([x, x], dim=1)[:, :256]  # rows with stride 512, then compact rows again
    assert torch.equal(tt.ffn(wide, wg, wu, wd, plan=key), y0)
    assert torch.equal(tt.ffn(x, wg, wu, wd, plan=key), y0)
    assert torch.equal(tt.ffn(x.view(2, 32, 256), wg, wu, wd, plan=key).view(64, 256), y0)
    assert torch.equal(tt.ffn(x[5], wg, wu, wd, plan=key), tt.ffn(x[5:6], wg, wu, wd, plan=key)[0])
    assert tt.ffn(x[:0], wg, wu, wd, plan=key).shape == (0, 256)
    wu2 = wu.clone()  # another tensor with the same values
    del wu
    assert torch.equal(tt.ffn(x, wg, wu2, wd, plan=key), y0)
    wd2 = torch.zeros_like(wd)  # another weight: y must change with it
    assert torch.count_nonzero(tt.ffn(x, wg, wu2, wd2, plan=key)) == 0


def test_dh_layout_of_a_square_ffn_and_of_inference_mode_weights(rng):
    prob, _ = _problem(rng, 48, 256, 256, "uniform")  # D == H: the layout, not the shape, says [D, H]
    x, wg, wu = (_t(a) for a in (prob.x, prob.w_gate, prob.w_up))
    wd_dh = _t(np.ascontiguousarray(prob.w_down.T))
    for _ in range(2):
        _check_y(tt.ffn(x, wg, wu, wd_dh, w_down_layout="dh", plan=tt.new_plan_key()), prob)
    prob, _ = _problem(rng, 48, 256, 768, "uniform")
    with torch.inference_mode():  # inference tensors keep no version counter
        x, wg, wu = (_t(a) for a in (prob.x, prob.w_gate, prob.w_up))
        wd_dh = _t(np.ascontiguousarray(prob.w_down.T))
        key = tt.new_plan_key()
        for _ in range(2):
            _check_y(tt.ffn(x, wg, wu, wd_dh, w_down_layout="dh", plan=key), prob)


def test_opcheck_ffn(rng):
    prob, _ = _problem(rng, 16, 256, 768, "uniform")
    args = (_t(prob.x), _t(prob.w_gate), _t(prob.w_up), _t(prob.w_down), 0, 32, 1, 0, tt.new_plan_key())
    torch.library.opcheck(torch.ops.twell.ffn.default, args)


def test_layer_stats_before_and_after_the_first_call(rng):
    from twell import ops

    prob, _ = _problem(rng, 64, 256, 768, "uniform")
    layer = ops.TwellFFN(_t(prob.w_gate), _t(prob.w_up), _t(prob.w_down))
    assert all(v == 0 for v in layer.last_stats().values())
    layer(_t(prob.x))
    s = layer.last_stats()
    assert s["rows"] == 64 and s["format"] == 1 and s["path"] in (1, 2)


@pytest.mark.parametrize("bad, match", [
    ("w_up_host", r"^w_up is on cpu"),
    ("x_f32", r"^x has dtype torch.float32, expected torch.bfloat16$"),
    ("x_strided", r"x has inner stride 2|x .*stride"),
    ("wd_shape", r"w_down .*has shape"),
])
def test_errors_name_the_argument_on_the_gpu(rng, bad, match):
    prob, _ = _problem(rng, 16, 256, 768, "uniform")
    x, wg, wu, wd = (_t(a) for a in (prob.x, prob.w_gate, prob.w_up, prob.w_down))
    if bad == "w_up_host":
        wu = wu.cpu()
    elif bad == "x_f32":
        x = x.float()
    elif bad == "x_strided":
        x = torch.cat([x, x], dim=1)[:, ::2]  # inner stride 2
    elif bad == "wd_shape":
        wd = wd[:, :128]
    with pytest.raises(twell.InvalidArgumentError, match=match):
        tt.ffn(x, wg, wu, wd)
