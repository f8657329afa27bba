"""twell for PyTorch: custom ops with autograd, torch.compile support and CUDA graphs.

* ``twell.torch.ffn(x, w_gate, w_up, w_down)``: the sparse FFN (inference, or training when
  autograd needs it); ``ffn_with_l1`` also returns the L1 term for the loss.
* ``torch.ops.twell.ffn`` / ``train_forward`` / ``train_backward``: the registered ops (fake
  implementations for ``torch.compile(fullgraph=True)``, autograd on ``train_forward``).
* ``new_plan_key()``: a key of one's own for ``plan=`` (separate plans and AUTO history).
* ``SparseMLP``, ``sparsify(model)``, ``l1_loss(model, lam)``: a drop-in Llama/Qwen MLP, the swap
  of a model's ReLU MLPs for it (parameters shared), and the L1 recipe's loss term.

Importing this module needs PyTorch but neither a GPU nor libtwell (the ops are registered either
way; calling them without the library raises ``twell.UnsupportedError`` saying why).
See docs/pytorch.md.
"""

from __future__ import annotations

from ._runtime import TRAIN_STATS_FIELDS, new_plan_key, release  # noqa: F401
from .modules import SparseMLP, l1_loss, sparse_mlps, sparsify  # noqa: F401
from .ops import ffn, ffn_with_l1, last_stats  # noqa: F401

__all__ = ["ffn", "ffn_with_l1", "last_stats", "new_plan_key", "release", "TRAIN_STATS_FIELDS", "SparseMLP",
           "sparsify", "l1_loss", "sparse_mlps"]
