"""The PyTorch layer without a GPU: op registration, fake (meta) implementations, tracing of the
forward and the autograd backward (make_fx, torch.compile(fullgraph=True)), and the argument
errors every entry point raises before any kernel or library call.

The GPU tests of the same ops (values against the float64 oracle, gradients, CUDA graphs,
torch.compile on the device) are in test_gpu_torch.py.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import twell  # noqa: E402
import twell.torch as tt  # noqa: E402
from twell import _ffi  # noqa: E402

BF = torch.bfloat16
D, H, M = 64, 128, 8


def _weights(device="cpu", requires_grad=False, dh=False):
    ws = [torch.randn(H, D, dtype=BF, device=device) for _ in range(2)]
    wd = torch.randn((D, H) if dh else (H, D), dtype=BF, device=device)
    out = ws + [wd]
    for w in out:
        w.requires_grad_(requires_grad)
    return out


def test_ops_are_registered_with_their_schemas():
    names = {str(s.name): str(s) for s in torch._C._jit_get_all_schemas() if str(s.name).startswith("twell::")}
    assert set(names) == {"twell::ffn", "twell::train_forward", "twell::train_backward"}
    assert "Tensor? w_gate" in names["twell::ffn"] and names["twell::ffn"].endswith("-> Tensor")
    assert names["twell::train_forward"].endswith("-> (Tensor, Tensor, Tensor, Tensor)")
    assert "Tensor? dl1" in names["twell::train_backward"]


@pytest.mark.parametrize("shape", [(M, D), (2, 3, D), (1, D)])
@pytest.mark.parametrize("layout", [0, 1])
def test_fake_ffn_shapes(shape, layout):
    x = torch.empty(shape, dtype=BF, device="meta")
    wg, wu, wd = (torch.empty(s, dtype=BF, device="meta") for s in [(H, D), (H, D), (D, H) if layout else (H, D)])
    assert torch.ops.twell.ffn(x, wg, wu, wd, layout).shape == shape
    assert torch.ops.twell.ffn(x, None, wu, wd, layout).shape == shape  # non-gated


def test_fake_train_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()):
        x = torch.empty(2, 5, D, dtype=BF)
        wg, wu, wd = (torch.empty(H, D, dtype=BF) for _ in range(3))
        y, l1, active, saved = torch.ops.twell.train_forward(x, wg, wu, wd)
        assert y.shape == x.shape and y.dtype == BF
        assert l1.shape == (1,) and l1.dtype == torch.float32
        assert active.shape == (2, 5) and active.dtype == torch.int32
        assert saved.dtype == torch.uint8 and saved.dim() == 1  # size known only at run time (AUTO route)
        dx, dwg, dwu, dwd = torch.ops.twell.train_backward(y, l1, x, wg, wu, wd, saved)
        assert dx.shape == x.shape and dwg.shape == wg.shape and dwd.shape == wd.shape


@pytest.mark.parametrize("bad, match", [
    (dict(x_dtype=torch.float32), r"x has dtype torch.float32, expected torch.bfloat16"),
    (dict(x_cols=D + 8), rf"x has shape \(8, {D + 8}\), expected \[\.\.\., {D}\]"),
    (dict(wd_shape=(D, H)), rf"w_down has shape \({D}, {H}\), expected \[{H}, {D}\]"),
    (dict(wg_shape=(H, D + 8)), rf"w_gate has shape \({H}, {D + 8}\), expected \[{H}, {D}\]"),
])
def test_fake_ffn_rejects_bad_shapes_and_dtypes_by_name(bad, match):
    x = torch.empty(M, bad.get("x_cols", D), dtype=bad.get("x_dtype", BF), device="meta")
    wg = torch.empty(bad.get("wg_shape", (H, D)), dtype=BF, device="meta")
    wu = torch.empty(H, D, dtype=BF, device="meta")
    wd = torch.empty(bad.get("wd_shape", (H, D)), dtype=BF, device="meta")
    with pytest.raises(twell.InvalidArgumentError, match=match):
        torch.ops.twell.ffn(x, wg, wu, wd)


def test_make_fx_traces_forward_and_autograd_backward():
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(x, wg, wu, wd):
        y, l1 = tt.ffn_with_l1(x, wg, wu, wd)
        loss = y.float().square().sum() + 0.1 * l1.sum()
        return torch.autograd.grad(loss, [x, wg, wu, wd])

    x = torch.randn(M, D, dtype=BF, requires_grad=True)
    g = make_fx(step, tracing_mode="symbolic")(x, *_weights(requires_grad=True))
    ops = [str(n.target) for n in g.graph.nodes if n.op == "call_function" and "twell" in str(n.target)]
    assert ops == ["twell.train_forward.default", "twell.train_backward.default"]
    # The backward receives the L1 output's gradient as a tensor (no host value, no sync).
    bwd = next(n for n in g.graph.nodes if "train_backward" in str(n.target))
    assert bwd.args[1] is not None and bwd.args[1].op != "get_attr"


def test_inference_ffn_picks_the_inference_op_without_grad():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, wg, wu, wd):
        return tt.ffn(x, wg, wu, wd, w_down_layout="dh", path="sparse")

    g = make_fx(f, tracing_mode="fake")(torch.randn(M, D, dtype=BF), *_weights(dh=True))
    calls = [n for n in g.graph.nodes if n.op == "call_function" and "twell" in str(n.target)]
    assert [str(n.target) for n in calls] == ["twell.ffn.default"]
    assert calls[0].args[4:7] == (1, 32, 1)  # layout dh, slots, path sparse


def test_torch_compile_fullgraph_traces_the_ops():
    """dynamo + AOTAutograd see the ops (forward graph and backward graph); running the compiled
    function on CPU tensors then fails with twell's named error, not inside the trace."""
    from torch._functorch.aot_autograd import aot_module_simplified

    seen = {"fw": [], "bw": []}

    def backend(gm, example_inputs):
        def fw(g, _):
            seen["fw"].append(g)
            return g

        def bw(g, _):
            seen["bw"].append(g)
            return g

        return aot_module_simplified(gm, example_inputs, fw_compiler=fw, bw_compiler=bw)

    def f(x, wg, wu, wd):
        y, l1 = tt.ffn_with_l1(x, wg, wu, wd)
        return y.float().sum() + l1.sum()

    torch._dynamo.reset()
    cf = torch.compile(f, backend=backend, fullgraph=True)
    x = torch.randn(M, D, dtype=BF, requires_grad=True)
    with pytest.raises(twell.InvalidArgumentError, match="x is on cpu"):
        cf(x, *_weights(requires_grad=True))
    assert seen["fw"], "no forward graph was compiled"
    fw_ops = [str(n.target) for n in seen["fw"][0].graph.nodes if n.op == "call_function"]
    assert "twell.train_forward.default" in fw_ops


# ---------------------------------------------------------------------------
# Argument errors (no GPU needed): every one a TwellError subclass naming the argument.
# ---------------------------------------------------------------------------
_x = lambda: torch.randn(M, D, dtype=BF)  # noqa: E731

BAD_TORCH = [
    ("x None", lambda w: tt.ffn(None, *w), _ffi.InvalidArgumentError, r"^x is None, expected a CUDA torch.Tensor$"),
    ("x list", lambda w: tt.ffn([[1.0]], *w), _ffi.InvalidArgumentError, r"^x must be a CUDA torch.Tensor, got list$"),
    ("x str", lambda w: tt.ffn("x", *w), _ffi.InvalidArgumentError, r"^x must be a CUDA torch.Tensor, got str$"),
    ("x numpy", lambda w: tt.ffn(np.zeros((M, D), np.float32), *w), _ffi.InvalidArgumentError,
     r"^x must be a CUDA torch.Tensor, got ndarray$"),
    ("x host", lambda w: tt.ffn(_x(), *w), _ffi.InvalidArgumentError,
     r"^x is on cpu; twell's kernels need CUDA tensors \(move it with \.cuda\(\)\)$"),
    ("path", lambda w: tt.ffn(_x(), *w, path="fast"), _ffi.InvalidArgumentError,
     r"^path must be one of \['auto', 'dense', 'sparse'\], got 'fast'$"),
    ("layout", lambda w: tt.ffn(_x(), *w, w_down_layout="DH"), _ffi.InvalidArgumentError,
     r"^w_down_layout must be one of \['dh', 'hd'\], got 'DH'$"),
    ("kernels", lambda w: tt.ffn(_x(), *w, kernels=3), _ffi.InvalidArgumentError,
     r"^kernels must be one of \['auto', 'portable', 'sm90'\], got 3$"),
    ("slots", lambda w: tt.ffn(_x(), *w, slots="32"), _ffi.InvalidArgumentError, r"^slots must be an int, got str$"),
    ("plan", lambda w: tt.ffn(_x(), *w, plan=1.5), _ffi.InvalidArgumentError, r"^plan must be an int, got float$"),
    ("non-gated training", lambda w: tt.ffn(_x().requires_grad_(), None, *w[1:]), _ffi.UnsupportedError,
     r"^training \(inputs that require grad\) needs a gated FFN: w_gate is None$"),
    ("with_l1 non-gated", lambda w: tt.ffn_with_l1(_x(), None, *w[1:]), _ffi.UnsupportedError,
     r"^the training op needs a gated FFN: w_gate is None$"),
    ("train x host", lambda w: tt.ffn_with_l1(_x(), *w), _ffi.InvalidArgumentError, r"^x is on cpu"),
    ("op direct host", lambda w: torch.ops.twell.ffn(_x(), *w), _ffi.InvalidArgumentError, r"^x is on cpu"),
    ("op backward host",
     lambda w: torch.ops.twell.train_backward(_x(), None, _x(), *w, torch.empty(4, dtype=torch.uint8)),
     _ffi.InvalidArgumentError, r"^dy is on cpu"),
]


@pytest.mark.parametrize("case", BAD_TORCH, ids=[c[0] for c in BAD_TORCH])
def test_torch_entry_points_name_the_bad_argument(case):
    _, call, cls, match = case
    with pytest.raises(cls, match=match):
        call(_weights())
    assert issubclass(cls, twell.TwellError)


def test_plan_keys_are_unique():
    a, b = tt.new_plan_key(), tt.new_plan_key()
    assert a != b and a > 0 and b > 0


@pytest.mark.parametrize("training", [False, True])
def test_dispatch_modes_see_the_op(training):
    """Eager calls skip the dispatcher, except under a dispatch mode (make_fx, FlopCounterMode,
    ...), which must see twell's op and not a kernel launched behind its back."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Stop(Exception):
        pass

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            if "twell" in str(func):
                raise Stop
            return func(*args, **(kwargs or {}))

    x = torch.randn(M, D, dtype=BF, requires_grad=training)
    with Record(), pytest.raises(Stop):
        tt.ffn(x, *_weights(requires_grad=training))
    assert seen[-1] == ("twell.train_forward.default" if training else "twell.ffn.default")


@pytest.mark.parametrize("shape", [(5, 64), (0, 64), (7,), (1,)])
def test_descriptor_fast_update_writes_what_a_full_write_would(monkeypatch, shape):
    """Frame.set_rows (the runner's own outputs: only the data pointer and the row count change
    between calls) leaves the DLTensor words exactly as Frame.set would write them."""
    from twell.torch import _runtime as rt

    if _ffi.header_path is None:
        pytest.skip("no twell header for the descriptor layout")
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)  # CPU tensors stand in for CUDA ones
    fast, full = rt.Frame(2), rt.Frame(2)
    first = torch.empty((9,) + shape[1:], dtype=BF)
    fast.set_rows(1, first, first.shape[0])  # the slot's first use writes everything
    for rows in (shape[0], 3, shape[0]):
        t = torch.empty((rows,) + shape[1:], dtype=BF)
        fast.set_rows(1, t, rows)
        full.set(1, t)
        words = [(int(fast.words[6 + k]), int(full.words[6 + k])) for k in (0, 1, 2, 5)]
        assert all(a == b for a, b in words), words
        used = (0, 1, 2, 3) if len(shape) == 2 else (0, 2)  # shape[0..nd) then strides[0..nd)
        assert [int(fast.dims[4 + k]) for k in used] == [int(full.dims[4 + k]) for k in used]


def test_train_runner_workspace_follows_the_saved_size(monkeypatch):
    """The training runner asks the plan for its workspace once per (rows, saved bytes): an AUTO plan's
    answer depends on the route (the saved size tells hybrid from dense), and a backward, asked with
    its forward's saved bytes, gets the forward's size without asking again."""
    from twell.torch import _runtime as rt

    answers = iter([1000, 5000])
    asked = []

    class Lib:
        def twell_train_workspace_size(self, plan, rows, out):
            asked.append(rows)
            out[0] = next(answers)
            return 0

    monkeypatch.setattr(rt, "_aligned_buffer", lambda device, n: (torch.empty(int(n), dtype=torch.uint8), 0))
    r = object.__new__(rt.TrainRunner)  # no plan or device needed for the sizing
    r.lib, r.plan, r.torch_device, r._need, r._n = Lib(), None, "cpu", {}, _ffi.ffi.new("size_t *")
    assert r._workspace(16, 777)[2] == 1000   # a hybrid forward
    assert r._workspace(16, 777)[2] == 1000   # its backward: no second question
    assert r._workspace(16, 4096)[2] == 5000  # a dense forward (a larger saved state)
    assert r._workspace(16, 4096)[2] == 5000 and r._workspace(16, 777)[2] == 1000
    assert asked == [16, 16]
