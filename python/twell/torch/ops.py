"""twell's FFN as PyTorch custom ops: ``torch.ops.twell.ffn``, ``torch.ops.twell.train_forward`` and
``torch.ops.twell.train_backward``, with fake (meta) implementations for ``torch.compile`` and
registered autograd.

Functional entry points (what most users call):

>>> y = twell.torch.ffn(x, w_gate, w_up, w_down)                 # inference or training, by autograd
>>> y, l1 = twell.torch.ffn_with_l1(x, w_gate, w_up, w_down)      # training with the L1 recipe
>>> loss = ce + lam * l1 / tokens                                 # l1 = sum over tokens and neurons of |h|

``ffn`` runs the inference op unless autograd needs a backward (grad mode on and an input that
requires grad); then it runs the training op, whose backward gives the gradients of x, w_gate,
w_up and w_down and -- through ``l1`` -- of the L1 term, with the L1 coefficient read by the
kernels from device memory (no host synchronisation). Everything runs on the caller's current
CUDA stream. Every call can be captured in a CUDA graph: inference on every path, AUTO
included (decided on the device at every replay), and a whole training step (forward and
backward: the dense tail and the backward's route are decided on the device at every replay;
a captured AUTO forward keeps the route it was captured with).

W_d is taken as ``w_down_layout="hd"`` ([H, D], neuron-major) or ``"dh"`` (nn.Linear's
``down_proj.weight``, [D, H]). A ``"dh"`` weight that is a transposed view of [H, D] storage costs
nothing; any other is transposed once per weight version (``w._version``) and the copy reused.
"""

from __future__ import annotations

import torch

from .. import _ffi
from .._options import KERNELS, LAYOUTS, PATHS, TRAIN_PATHS, option_code
from . import _runtime as rt

__all__ = ["ffn", "ffn_with_l1", "last_stats"]

_lib = torch.library.Library("twell", "DEF")
_lib.define("ffn(Tensor x, Tensor? w_gate, Tensor w_up, Tensor w_down, int w_down_layout=0, int slots=32, "
            "int path=0, int kernels=0, int plan=0) -> Tensor")
_lib.define("train_forward(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, int w_down_layout=0, "
            "int ell_width=64, int path=0, int kernels=0, int plan=0) -> (Tensor, Tensor, Tensor, Tensor)")
_lib.define("train_backward(Tensor dy, Tensor? dl1, Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, "
            "Tensor saved, int w_down_layout=0, int ell_width=64, int path=0, int kernels=0, int plan=0) "
            "-> (Tensor, Tensor, Tensor, Tensor)")


# ---------------------------------------------------------------------------
# Shapes (shared by the real and the fake implementations)
# ---------------------------------------------------------------------------
def _check_shapes(x, w_gate, w_up, w_down, w_down_layout: int):
    """(D, H) after checking x [..., D], W_g and W_u [H, D] and W_d in its layout."""
    if x.dim() < 1:
        raise _ffi.InvalidArgumentError("x must be [..., D] (at least 1-D), got a 0-D tensor")
    H, D = w_up.shape
    if x.shape[-1] != D:
        raise _ffi.InvalidArgumentError(f"x has shape {tuple(x.shape)}, expected [..., {D}] (w_up is [{H}, {D}])")
    if w_gate is not None and tuple(w_gate.shape) != (H, D):
        raise _ffi.InvalidArgumentError(f"w_gate has shape {tuple(w_gate.shape)}, expected [{H}, {D}]")
    if w_down_layout == 1:
        if tuple(w_down.shape) != (D, H):
            raise _ffi.InvalidArgumentError(
                f"w_down has shape {tuple(w_down.shape)}, expected [{D}, {H}] (w_down_layout='dh')")
    elif tuple(w_down.shape) != (H, D):
        raise _ffi.InvalidArgumentError(
            f"w_down has shape {tuple(w_down.shape)}, expected [{H}, {D}] (w_down_layout='hd'; nn.Linear's "
            f"down_proj.weight [{D}, {H}] needs w_down_layout='dh')")
    return D, H


def _dims(x, w_gate, w_up, w_down, w_down_layout: int, gated_required: bool):
    """(D, H, w_down_is_dh) after checking every argument's type, device, dtype and shape."""
    rt.check_tensor(x, "x")
    rt.check_tensor(w_gate, "w_gate", ndim=(2,), optional=not gated_required)
    rt.check_tensor(w_up, "w_up", ndim=(2,))
    rt.check_tensor(w_down, "w_down", ndim=(2,))
    D, H = _check_shapes(x, w_gate, w_up, w_down, w_down_layout)
    return D, H, w_down_layout == 1


def _dims_fake(x, w_gate, w_up, w_down, w_down_layout):
    """Fake tensors may live on "meta" or carry a CUDA device: check what a trace can know."""
    for name, t in (("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if t is not None and t.dtype is not torch.bfloat16:
            raise _ffi.InvalidArgumentError(f"{name} has dtype {t.dtype}, expected torch.bfloat16")
    return _check_shapes(x, w_gate, w_up, w_down, w_down_layout)


def _check_ints(**kw):
    for name, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise _ffi.InvalidArgumentError(f"{name} must be an int, got {type(v).__name__}")


# ---------------------------------------------------------------------------
# twell::ffn (inference)
# ---------------------------------------------------------------------------
def _bind(x, w_gate, w_up, w_down, w_down_layout, slots, path, kernels, plan) -> rt.BoundFFN:
    """The call state (runner and weight descriptors) for this call, after checking x and W_u (the
    other weights are checked when a state is made; the C ABI checks every shape, stride, device
    and alias on every call and names the argument)."""
    rt.check_tensor(x, "x")
    rt.check_tensor(w_up, "w_up", ndim=(2,))
    H, D = w_up.shape
    if x.shape[-1] != D:
        raise _ffi.InvalidArgumentError(f"x has shape {tuple(x.shape)}, expected [..., {D}] (w_up is [{H}, {D}])")
    r = rt.ffn_runner(plan, D, H, x.get_device(), w_gate is not None, slots, path, kernels)
    return r.bind(w_gate, w_up, w_down, w_down_layout == 1)


def _ffn_cuda(x, w_gate, w_up, w_down, w_down_layout=0, slots=32, path=0, kernels=0, plan=0):
    return _bind(x, w_gate, w_up, w_down, w_down_layout, slots, path, kernels, plan)(x)


def _ffn_fake(x, w_gate, w_up, w_down, w_down_layout=0, slots=32, path=0, kernels=0, plan=0):
    _dims_fake(x, w_gate, w_up, w_down, w_down_layout)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_lib.impl("ffn", _ffn_cuda, "CUDA")
torch.library.register_fake("twell::ffn", _ffn_fake, lib=_lib)


# ---------------------------------------------------------------------------
# twell::train_forward / twell::train_backward (training, with autograd)
# ---------------------------------------------------------------------------
def _train_runner(x, w_down, D, H, dh, ell_width, path, kernels, plan):
    # A [D, H] W_d that is a transposed view of [H, D] storage runs on an [H, D] plan (no copy).
    if dh and w_down.stride(0) == 1 and w_down.stride(1) == D:
        return rt.train_runner(plan, D, H, x.get_device(), False, ell_width, path, kernels), True
    return rt.train_runner(plan, D, H, x.get_device(), dh, ell_width, path, kernels), False


def _train_prepare(x, w_gate, w_up, w_down, w_down_layout, ell_width, path, kernels, plan):
    """(runner, flip, W_d as the runner takes it) after checking every argument."""
    D, H, dh = _dims(x, w_gate, w_up, w_down, w_down_layout, True)
    r, flip = _train_runner(x, w_down, D, H, dh, ell_width, path, kernels, plan)
    return r, flip, (w_down.t() if flip else w_down)


def _train_forward_cuda(x, w_gate, w_up, w_down, w_down_layout=0, ell_width=64, path=0, kernels=0, plan=0):
    r, _flip, wd = _train_prepare(x, w_gate, w_up, w_down, w_down_layout, ell_width, path, kernels, plan)
    return r.forward(x, w_gate, w_up, wd)


def _train_forward_fake(x, w_gate, w_up, w_down, w_down_layout=0, ell_width=64, path=0, kernels=0, plan=0):
    _dims_fake(x, w_gate, w_up, w_down, w_down_layout)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    l1 = x.new_empty((1,), dtype=torch.float32)
    active = x.new_empty(x.shape[:-1], dtype=torch.int32)
    # The saved state's size depends on the route the plan takes at run time (AUTO).
    n = torch.library.get_ctx().new_dynamic_size()
    saved = x.new_empty((n,), dtype=torch.uint8)
    return y, l1, active, saved


def _train_backward_cuda(dy, dl1, x, w_gate, w_up, w_down, saved, w_down_layout=0, ell_width=64, path=0, kernels=0,
                         plan=0):
    r, flip, _wd = _train_prepare(x, w_gate, w_up, w_down, w_down_layout, ell_width, path, kernels, plan)
    return _train_backward_run(r, flip, dy, dl1, x, w_gate, w_up, w_down, saved)


def _train_backward_run(r, flip, dy, dl1, x, w_gate, w_up, w_down, saved):
    """The backward on runner r, after checking dy and dl1 (x and the weights were checked)."""
    rt.check_tensor(dy, "dy")
    if dy.shape != x.shape:
        raise _ffi.InvalidArgumentError(f"dy has shape {tuple(dy.shape)}, expected {tuple(x.shape)} (x's)")
    if dl1 is not None:
        rt.check_tensor(dl1, "dl1", dtype=torch.float32)
        if dl1.dim() != 1 or dl1.stride(0) != 1:
            dl1 = dl1.reshape(1).contiguous()
    dx, dwg, dwu, dwd = r.backward(dy.contiguous() if dy.stride(-1) != 1 else dy, dl1, x, w_gate, w_up,
                                   w_down.t() if flip else w_down, saved)
    return dx, dwg, dwu, dwd.t() if flip else dwd


def _train_backward_fake(dy, dl1, x, w_gate, w_up, w_down, saved, w_down_layout=0, ell_width=64, path=0, kernels=0,
                         plan=0):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(w_gate),
            torch.empty_like(w_up), torch.empty_like(w_down))


_lib.impl("train_forward", _train_forward_cuda, "CUDA")
_lib.impl("train_backward", _train_backward_cuda, "CUDA")


# Host (CPU) tensors: the checks above name the first argument that is not on a CUDA device.
def _host_error(*args, **kwargs):
    names = ("x", "w_gate", "w_up", "w_down") if len(args) < 7 or not isinstance(args[6], torch.Tensor) else \
        ("dy", "dl1", "x", "w_gate", "w_up", "w_down", "saved")
    for name, t in zip(names, args):
        rt.check_tensor(t, name, dtype=t.dtype if isinstance(t, torch.Tensor) else torch.bfloat16,
                        optional=name in ("w_gate", "dl1"))
    raise _ffi.InvalidArgumentError("twell's kernels need CUDA tensors")  # pragma: no cover


for _op in ("ffn", "train_forward", "train_backward"):
    _lib.impl(_op, _host_error, "CPU")
torch.library.register_fake("twell::train_forward", _train_forward_fake, lib=_lib)
torch.library.register_fake("twell::train_backward", _train_backward_fake, lib=_lib)


def _setup_context(ctx, inputs, output):
    x, w_gate, w_up, w_down, layout, ell_width, path, kernels, plan = inputs
    _, _, active, saved = output
    ctx.save_for_backward(x, w_gate, w_up, w_down, saved)
    ctx.options = (layout, ell_width, path, kernels, plan)
    ctx.mark_non_differentiable(active, saved)


def _backward(ctx, dy, dl1, _dactive, _dsaved):
    x, w_gate, w_up, w_down, saved = ctx.saved_tensors
    layout, ell_width, path, kernels, plan = ctx.options
    if dy is None:
        dy = torch.zeros_like(x)
    dx, dwg, dwu, dwd = torch.ops.twell.train_backward(dy, dl1, x, w_gate, w_up, w_down, saved, layout, ell_width,
                                                       path, kernels, plan)
    return dx, dwg, dwu, dwd, None, None, None, None, None


torch.library.register_autograd("twell::train_forward", _backward, setup_context=_setup_context, lib=_lib)


class _TrainFFN(torch.autograd.Function):
    """Eager training calls: the training op's implementations under one autograd.Function, without
    the dispatcher's round trips (traced and compiled code uses torch.ops.twell.train_forward, whose
    registered autograd runs the same two implementations)."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, opts):
        r, flip, wd = _train_prepare(x, w_gate, w_up, w_down, *opts)
        y, l1, _active, saved = r.forward(x, w_gate, w_up, wd, want_active=False)
        ctx.save_for_backward(x, w_gate, w_up, w_down, saved)
        ctx.runner, ctx.flip = r, flip  # the backward runs on the same plan (its inputs are these, checked)
        ctx.set_materialize_grads(False)  # an unused l1 gives dl1 None: no zeros tensor, no L1 term
        return y, l1

    @staticmethod
    def backward(ctx, dy, dl1):
        x, w_gate, w_up, w_down, saved = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        dx, dwg, dwu, dwd = _train_backward_run(ctx.runner, ctx.flip, dy, dl1, x, w_gate, w_up, w_down, saved)
        return dx, dwg, dwu, dwd, None


def _train(x, w_gate, w_up, w_down, layout, ell_width, path, kernels, plan):
    """(y, l1) of the training op, by the eager route when it can be taken."""
    if _eager(x):
        return _TrainFFN.apply(x, w_gate, w_up, w_down, (layout, ell_width, path, kernels, plan))
    y, l1, _active, _saved = torch.ops.twell.train_forward(x, w_gate, w_up, w_down, layout, ell_width, path, kernels,
                                                           plan)
    return y, l1


# ---------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------
def _check_types(x, w_gate, w_up, w_down):
    # The dispatcher's own message for a non-tensor argument names no argument: check first.
    for name, t in (("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if not isinstance(t, torch.Tensor) and not (t is None and name == "w_gate"):
            rt.check_tensor(t, name)


_calls = rt.calls
_dispatch_modes = torch._C._len_torch_dispatch_stack


def _eager(x) -> bool:
    """Whether this call may bypass the dispatcher: a real tensor, not under torch.compile, and no
    dispatch mode (make_fx, FlopCounterMode, ...) that must see the op."""
    return type(x) is torch.Tensor and not torch.compiler.is_compiling() and not _dispatch_modes()


def _needs_grad(*ts) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and getattr(t, "requires_grad", False) for t in ts)


def ffn(x, w_gate, w_up, w_down, *, w_down_layout="hd", slots: int = 32, path="auto", kernels="auto", plan: int = 0,
        ell_width: int = 64):
    """y = (relu(x W_g^T) * (x W_u^T)) W_d for x [..., D] (non-gated with w_gate=None: relu(x W_u^T) W_d).

    Inference unless autograd needs a backward, then the training op (gated only). ``plan``: 0 shares
    the plans (and AUTO's history) of every caller with the same shapes and options; a layer passes a
    key of its own (``twell.torch.new_plan_key()``).
    """
    eager = _eager(x)
    grad = _needs_grad(x, w_gate, w_up, w_down)
    key = (id(w_gate), id(w_up), id(w_down), w_down_layout, slots, path, kernels, plan)
    if eager and not grad:
        # The steady state of an eager caller: the call state made for these weights and options
        # the last time, still fresh (same tensors, same storage, not written since).
        try:
            b = _calls.get(key)
        except TypeError:  # an unhashable option: the checks below name it
            b = None
        if b is not None and b.fresh(w_gate, w_up, w_down):
            return b(x)
    _check_types(x, w_gate, w_up, w_down)
    layout = option_code(LAYOUTS, "w_down_layout", w_down_layout)
    k = option_code(KERNELS, "kernels", kernels)
    if grad:
        if w_gate is None:
            raise _ffi.UnsupportedError("training (inputs that require grad) needs a gated FFN: w_gate is None")
        p = option_code(TRAIN_PATHS, "path", path)
        _check_ints(ell_width=ell_width, plan=plan)
        return _train(x, w_gate, w_up, w_down, layout, ell_width, p, k, plan)[0]
    p = option_code(PATHS, "path", path)
    _check_ints(slots=slots, plan=plan)
    if eager:
        # The op's own implementation, without the dispatcher's round trip (about 5 us per call);
        # traced and compiled code goes through torch.ops.twell.ffn.
        b = _bind(x, w_gate, w_up, w_down, layout, slots, p, k, plan)
        rt.remember_call(key, b)
        return b(x)
    return torch.ops.twell.ffn(x, w_gate, w_up, w_down, layout, slots, p, k, plan)


def ffn_with_l1(x, w_gate, w_up, w_down, *, w_down_layout="hd", path="auto", kernels="auto", plan: int = 0,
                ell_width: int = 64):
    """(y, l1): the training op's output and l1 = sum over tokens and neurons of |h| (a float32 tensor of
    shape [1] in the autograd graph: add ``lam * l1 / tokens`` to the loss for the L1 recipe)."""
    _check_types(x, w_gate, w_up, w_down)
    if w_gate is None:
        raise _ffi.UnsupportedError("the training op needs a gated FFN: w_gate is None")
    layout = option_code(LAYOUTS, "w_down_layout", w_down_layout)
    p = option_code(TRAIN_PATHS, "path", path)
    k = option_code(KERNELS, "kernels", kernels)
    _check_ints(ell_width=ell_width, plan=plan)
    return _train(x, w_gate, w_up, w_down, layout, ell_width, p, k, plan)


def last_stats(plan: int = 0) -> dict:
    """Statistics of the latest call of every plan made for ``plan`` (synchronises): {kind: dict}."""
    out = {}
    for r in rt.runners_of(plan):
        kind = "ffn" if isinstance(r, rt.FFNRunner) else "train"
        out.setdefault(kind, []).append(r.last_stats())
    return out
