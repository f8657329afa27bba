"""NumPy reference FFN (forward and backward with the L1 term): the test oracle.

Every kernel in twell is checked against these functions in float64.

Conventions (see include/twell/twell.h and docs/design.md):

    g = x @ w_gate.T          w_gate: [H, D]  (nn.Linear layout)
    u = x @ w_up.T            w_up:   [H, D]
    h = act(g) * u            (gated)      or   h = act(u)   (non-gated)
    y = h @ W_d               W_d as [H, D] ("hd") or its transpose [D, H] ("dh",
                              nn.Linear's down_proj.weight)

The L1 recipe adds ``c * sum(|h|)`` to the loss; for "lambda times the mean over
tokens of sum_j |h_j|, averaged over layers" use ``c = lambda / (tokens * layers)``.
The gradient of |h| at h == 0 is taken as 0.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "relu",
    "silu",
    "ffn_forward",
    "ffn_backward",
    "l1_sum",
    "active_per_row",
    "down_as_hd",
]

_LAYOUTS = ("hd", "dh")


def relu(v):
    return np.maximum(v, 0)


def silu(v):
    return v / (1 + np.exp(-v))


def _silu_grad(v):
    s = 1 / (1 + np.exp(-v))
    return s * (1 + v * (1 - s))


def down_as_hd(w_down, layout: str, hidden: int, d_model: int):
    """Return W_d as [H, D], checking its shape against the layout."""
    if layout not in _LAYOUTS:
        raise ValueError(f"w_down_layout must be one of {_LAYOUTS}, got {layout!r}")
    expected = (hidden, d_model) if layout == "hd" else (d_model, hidden)
    if tuple(w_down.shape) != expected:
        raise ValueError(
            f"w_down has shape {list(w_down.shape)}, expected {list(expected)} for layout {layout!r}"
        )
    return w_down if layout == "hd" else w_down.T


def ffn_forward(x, w_gate, w_up, w_down, *, gated=True, activation="relu", w_down_layout="hd", dtype=None):
    """FFN forward pass in ``dtype`` (default: x's dtype if floating, else float64).

    Returns ``(y, cache)``; ``cache`` holds the inputs and the intermediates
    ``g`` (gated only), ``u`` and ``h`` for ffn_backward.
    """
    if activation not in ("relu", "silu"):
        raise ValueError(f"activation must be 'relu' or 'silu', got {activation!r}")
    if dtype is None:
        in_dtype = np.asarray(x).dtype
        dtype = in_dtype if np.issubdtype(in_dtype, np.floating) and in_dtype.itemsize >= 4 else np.float64
    x = np.asarray(x, dtype=dtype)
    if x.ndim != 2:
        raise ValueError(f"x must be [M, D], got shape {list(x.shape)}")
    d_model = x.shape[1]
    w_up = np.asarray(w_up, dtype=dtype)
    hidden = w_up.shape[0]
    if tuple(w_up.shape) != (hidden, d_model):
        raise ValueError(f"w_up has shape {list(w_up.shape)}, expected [H, {d_model}]")
    if gated:
        if w_gate is None:
            raise ValueError("w_gate is required for a gated FFN")
        w_gate = np.asarray(w_gate, dtype=dtype)
        if tuple(w_gate.shape) != (hidden, d_model):
            raise ValueError(f"w_gate has shape {list(w_gate.shape)}, expected [{hidden}, {d_model}]")
    w_down = np.asarray(w_down, dtype=dtype)
    w_hd = down_as_hd(w_down, w_down_layout, hidden, d_model)

    act = relu if activation == "relu" else silu
    u = x @ w_up.T
    if gated:
        g = x @ w_gate.T
        h = act(g) * u
    else:
        g = None
        h = act(u)
    y = h @ w_hd
    cache = dict(x=x, g=g, u=u, h=h, w_gate=w_gate, w_up=w_up, w_hd=w_hd,
                 gated=gated, activation=activation, w_down_layout=w_down_layout)
    return y, cache


def ffn_backward(dy, cache, *, l1_coeff=0.0):
    """Backward of ffn_forward plus ``l1_coeff * sum(|h|)``.

    Returns ``(dx, grads)`` with grads ``{"w_gate", "w_up", "w_down"}``; w_down's
    gradient is in the layout the forward was given (w_gate's is None if
    non-gated).
    """
    x, g, u, h = cache["x"], cache["g"], cache["u"], cache["h"]
    dy = np.asarray(dy, dtype=x.dtype)
    w_hd = cache["w_hd"]
    relu_act = cache["activation"] == "relu"

    dh = dy @ w_hd.T
    if l1_coeff:
        dh = dh + l1_coeff * np.sign(h)
    dw_hd = h.T @ dy

    if cache["gated"]:
        if relu_act:
            a = relu(g)
            da_dg = (g > 0).astype(x.dtype)
        else:
            a = silu(g)
            da_dg = _silu_grad(g)
        dg = dh * u * da_dg
        du = dh * a
        dx = dg @ cache["w_gate"] + du @ cache["w_up"]
        dw_gate = dg.T @ x
    else:
        da_du = (u > 0).astype(x.dtype) if relu_act else _silu_grad(u)
        du = dh * da_du
        dx = du @ cache["w_up"]
        dw_gate = None
    dw_up = du.T @ x
    dw_down = dw_hd if cache["w_down_layout"] == "hd" else dw_hd.T
    return dx, {"w_gate": dw_gate, "w_up": dw_up, "w_down": dw_down}


def l1_sum(h) -> float:
    """sum over tokens and neurons of |h| (the raw L1 statistic the kernels report)."""
    return float(np.abs(np.asarray(h, dtype=np.float64)).sum())


def active_per_row(h):
    """Number of non-zero hidden activations in each row (L0 per token)."""
    return np.count_nonzero(np.asarray(h), axis=1)
