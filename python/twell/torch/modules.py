"""A drop-in sparse MLP for Llama/Qwen-style models, ``sparsify`` to put it into a model, and the L1
recipe's loss term.

>>> model = sparsify(model)                       # every ReLU MLP becomes a SparseMLP (same parameters)
>>> out = model(input_ids, labels=labels)
>>> loss = out.loss + l1_loss(model, lam=1e-3)    # lam * mean over layers of mean over tokens of sum |h|
>>> loss.backward()

``SparseMLP`` keeps ``gate_proj``, ``up_proj`` and ``down_proj`` as ordinary ``nn.Linear`` modules
(no bias), so its ``state_dict`` keys and shapes are a Llama/Qwen MLP's and checkpoints load
unchanged. On CUDA tensors it runs twell's ops (``twell.torch.ffn`` / ``ffn_with_l1``): inference
when no gradient is needed, the training op otherwise, each layer with plans and an AUTO history of
its own. On host (CPU) tensors it computes the same function with dense PyTorch ops (for tests and
debugging; nothing is sparse there).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import _ffi
from .._options import STATS_FIELDS
from . import _runtime as rt
from .ops import ffn, ffn_with_l1

__all__ = ["SparseMLP", "sparsify", "l1_loss", "sparse_mlps"]


def _is_relu(act) -> bool:
    return isinstance(act, nn.ReLU) or act in (F.relu, torch.relu)


class SparseMLP(nn.Module):
    """y = down_proj(relu(gate_proj(x)) * up_proj(x)) (gated) or down_proj(relu(up_proj(x))).

    Args:
        hidden_size: D (the model width).
        intermediate_size: H (the MLP width).
        gated: with a ReLU gate (Llama/Qwen's structure) or a plain ReLU MLP.
        path: ``"auto"`` (default: sparse or dense per call, from the layer's own statistics),
            ``"sparse"`` or ``"dense"``; training also accepts ``"hybrid"`` (= sparse).
        ell_width: the training format's ELL width (rows with more active neurons go to the dense tail).
        device, dtype: of the parameters (bf16 is what the kernels run; fp32 parameters run under
            ``torch.autocast(dtype=torch.bfloat16)``, which casts them per call).

    After a training forward, ``self.l1`` is the layer's L1 term (sum over tokens and neurons of
    |h|, a float32 tensor of shape [1] in the autograd graph) and ``self.tokens`` the tokens it
    covered; ``l1_loss`` averages them over layers. ``self.l1`` is None after an inference call.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, *, gated: bool = True, path="auto",
                 ell_width: int = 64, kernels="auto", device=None, dtype=torch.bfloat16):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise _ffi.InvalidArgumentError(f"{name} must be a positive int, got {v!r}")
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.hidden_size, self.intermediate_size, self.gated = hidden_size, intermediate_size, gated
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw) if gated else None
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)
        self.path, self.ell_width, self.kernels = path, ell_width, kernels
        self.plan_key = rt.new_plan_key()  # this layer's own plans and AUTO history
        self.l1 = None
        self.tokens = 0
        self._last = None  # "ffn" or "train": the plan kind of the latest CUDA call

    @classmethod
    def from_mlp(cls, mlp: nn.Module, **options) -> SparseMLP:
        """A SparseMLP sharing the ``gate_proj``/``up_proj``/``down_proj`` modules (and so the
        parameters) of a Llama/Qwen-style MLP; refuses biases (twell's kernels have none)."""
        names = ("gate_proj", "up_proj", "down_proj")
        for name in names:
            lin = getattr(mlp, name, None)
            if not isinstance(lin, nn.Linear):
                raise _ffi.InvalidArgumentError(f"{type(mlp).__name__}.{name} must be an nn.Linear, got "
                                                f"{type(lin).__name__}")
            if lin.bias is not None:
                raise _ffi.UnsupportedError(f"{type(mlp).__name__}.{name} has a bias; twell's FFN has none")
        D, H = mlp.up_proj.in_features, mlp.up_proj.out_features
        if (mlp.gate_proj.in_features, mlp.gate_proj.out_features) != (D, H) or \
                (mlp.down_proj.in_features, mlp.down_proj.out_features) != (H, D):
            raise _ffi.InvalidArgumentError(f"{type(mlp).__name__}: gate_proj/up_proj must be D -> H and "
                                            f"down_proj H -> D (up_proj is {D} -> {H})")
        w = mlp.up_proj.weight
        new = cls(D, H, gated=True, device="meta", dtype=w.dtype, **options)
        new.gate_proj, new.up_proj, new.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        return new

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, gated={self.gated}, "
                f"path={self.path!r}")

    def forward(self, x):
        wg = self.gate_proj.weight if self.gated else None
        wu, wd = self.up_proj.weight, self.down_proj.weight
        self.l1 = None
        if not x.is_cuda:
            return self._dense(x, wg, wu, wd)
        if torch.is_autocast_enabled("cuda"):
            dt = torch.get_autocast_dtype("cuda")
            if dt is not torch.bfloat16:
                raise _ffi.UnsupportedError(f"autocast to {dt}: twell's kernels run bf16 only "
                                            "(use torch.autocast('cuda', dtype=torch.bfloat16))")
            x, wu, wd = x.to(dt), wu.to(dt), wd.to(dt)
            wg = wg.to(dt) if wg is not None else None
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, wg, wu, wd))
        opts = {"w_down_layout": "dh", "path": self.path, "kernels": self.kernels, "plan": self.plan_key,
                "ell_width": self.ell_width}
        if needs_grad and not self.gated:
            _warn_once("SparseMLP(gated=False) trains through dense PyTorch ops: twell has no non-gated "
                       "training kernels")
            return self._dense(x, wg, wu, wd)
        if needs_grad:
            y, l1 = ffn_with_l1(x, wg, wu, wd, **opts)
            self.l1, self.tokens, self._last = l1, x.numel() // self.hidden_size, "train"
            return y
        self._last = "ffn"
        return ffn(x, wg, wu, wd, **{k: v for k, v in opts.items() if k != "ell_width"})

    def _dense(self, x, wg, wu, wd):
        """The same function in dense PyTorch ops (host tensors; non-gated training)."""
        if wg is not None:
            h = F.relu(F.linear(x, wg)) * F.linear(x, wu)
        else:
            h = F.relu(F.linear(x, wu))
        if torch.is_grad_enabled() and h.requires_grad:
            self.l1 = h.float().abs().sum().reshape(1)
            self.tokens = x.numel() // self.hidden_size
        return F.linear(h, wd)

    def stats_tensor(self):
        """The statistics words of the latest CUDA call as a device int64 tensor (no host sync; the
        next call overwrites it): ``STATS_FIELDS`` after an inference call, ``TRAIN_STATS_FIELDS``
        after a training forward. All zeros before the first call."""
        r = self._runner()
        if r is None:
            return torch.zeros(len(STATS_FIELDS), dtype=torch.int64)
        return r.stats

    def last_stats(self) -> dict:
        """The statistics of the latest CUDA call as {field: int} (synchronises); zeros before it."""
        r = self._runner()
        if r is None:
            return dict.fromkeys(STATS_FIELDS, 0)
        return r.last_stats()

    def _runner(self):
        if self._last is None:
            return None
        want = rt.FFNRunner if self._last == "ffn" else rt.TrainRunner
        return next((r for r in rt.runners_of(self.plan_key) if isinstance(r, want)), None)


_warned = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


def _activation_of(mlp: nn.Module):
    for name in ("act_fn", "activation_fn", "act"):
        if hasattr(mlp, name):
            return name, getattr(mlp, name)
    return None, None


def _is_gated_mlp(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))


def sparsify(model: nn.Module, *, replace_activation: bool = False, **options) -> nn.Module:
    """Swap every Llama/Qwen-style MLP of ``model`` (a module with ``gate_proj``, ``up_proj`` and
    ``down_proj`` ``nn.Linear`` children and an ``act_fn``) for a ``SparseMLP`` sharing its
    parameters, in place; returns ``model``. Options go to ``SparseMLP`` (``path``, ``ell_width``,
    ``kernels``).

    The activation must be ReLU (``hidden_act="relu"``); another raises ``UnsupportedError``
    naming the module, unless ``replace_activation=True`` (relufication: the model then computes
    a different function and needs fine-tuning). Models with a ``config.hidden_act`` get it set to
    ``"relu"`` then too, so a saved config says what runs.
    """
    if not isinstance(model, nn.Module):
        raise _ffi.InvalidArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
    found = []
    for name, m in model.named_modules():
        if isinstance(m, SparseMLP) or not _is_gated_mlp(m):
            continue
        act_name, act = _activation_of(m)
        if act_name is None:
            continue  # three projections but no activation attribute: not an MLP we know
        if not _is_relu(act) and not replace_activation:
            raise _ffi.UnsupportedError(
                f"{name or type(model).__name__} ({type(m).__name__}) uses {act!r}, not ReLU; twell's sparsity "
                f"needs ReLU. Pass replace_activation=True to swap it (relufication: fine-tune afterwards)")
        found.append(name)
    if not found:
        raise _ffi.InvalidArgumentError(
            f"{type(model).__name__} has no MLP with gate_proj, up_proj, down_proj (nn.Linear) and act_fn")
    for name in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SparseMLP.from_mlp(getattr(parent, child), **options))
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "hidden_act", "relu") != "relu" and replace_activation:
        cfg.hidden_act = "relu"
    return model


def sparse_mlps(model: nn.Module):
    """The model's SparseMLP layers, in module order."""
    return [m for m in model.modules() if isinstance(m, SparseMLP)]


def l1_loss(model: nn.Module, lam: float):
    """The L1 recipe's loss term: lam * mean over the SparseMLP layers of (the layer's L1 term / its
    tokens), from the latest training forward. 0 (a float) when no layer recorded one."""
    terms = [m.l1 / max(m.tokens, 1) for m in sparse_mlps(model) if m.l1 is not None]
    if not terms:
        return 0.0
    return lam * torch.stack([t.reshape(()) for t in terms]).mean()

