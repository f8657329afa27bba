"""A small decoder-only language model in NumPy, with a hand-written backward pass.

This is twell's reference model: it shows on a CPU that ReLU-gated FFNs trained with an L1 penalty
on the hidden activations become very sparse, and it produces real activations for the kernels'
tests and benchmarks. The FFN is ``twell.reference`` (the kernels' oracle), used as it is.

Architecture (pre-norm, Llama-like)::

    x = E[ids]                                   token embedding, E: [V, d]
    for each layer:
        x = x + Attn(RMSNorm(x))                 causal multi-head attention with RoPE
        x = x + FFN(RMSNorm(x))                  h = relu(x W_gᵀ) ⊙ (x W_uᵀ), y = h W_d
    logits = RMSNorm(x) Eᵀ                        tied output head

Loss (the L1 recipe)::

    loss = CE + λ · mean_over_layers( mean_over_tokens( Σ_j |h_j| ) )

so each layer's FFN backward gets ``l1_coeff = λ / (tokens · layers)``. λ = 0 is the dense
baseline; ``activation="silu"`` swaps the gate nonlinearity for comparison.

Every layer is a pair of functions ``*_forward(...) -> (y, cache)`` and ``*_backward(dy, cache)
-> (dx, grads)``, gradient-checked against finite differences in float64 in tests/test_model.py.
Parameters live in a flat ``dict[str, ndarray]`` (names below), so optimisers, checkpoints and
exports need no knowledge of the layers.

Parameter names: ``emb`` [V, d]; per layer ``l{i}.attn_norm`` [d], ``l{i}.wqkv`` [d, 3d],
``l{i}.wo`` [d, d], ``l{i}.ffn_norm`` [d], ``l{i}.w_gate`` [H, d], ``l{i}.w_up`` [H, d],
``l{i}.w_down`` [H, d] (layout "hd": row j is neuron j's output vector); ``final_norm`` [d].
Attention weights act as ``x @ W`` (W: [in, out]).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from .. import reference as ref

__all__ = [
    "ModelConfig", "TransformerLM", "init_params",
    "embedding_forward", "embedding_backward",
    "rmsnorm_forward", "rmsnorm_backward",
    "rope_tables", "rope_apply", "rope_apply_backward",
    "attention_forward", "attention_backward",
    "ffn_forward", "ffn_backward",
    "head_forward", "head_backward",
    "cross_entropy",
]


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """Shape and options of the reference LM."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_hidden: int = 512          # H, FFN hidden width
    max_seq_len: int = 128       # RoPE tables are built for this many positions
    activation: str = "relu"     # gate nonlinearity: "relu" (the method) or "silu" (comparison)
    gated: bool = True           # False: h = act(x W_uᵀ), no gate projection
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: str = "float32"       # float32 for training, float64 for gradient checks

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head dimension must be even (RoPE rotates pairs)")
        if self.activation not in ("relu", "silu"):
            raise ValueError(f"activation must be 'relu' or 'silu', got {self.activation!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------------
# Layers: forward returns (output, cache), backward returns (dinput, grads)
# ----------------------------------------------------------------------------------------------

def embedding_forward(ids: np.ndarray, table: np.ndarray):
    """Token embedding: ``table[ids]``; ids of any shape, output ids.shape + (d,)."""
    return table[ids], (ids, table.shape)


def embedding_backward(dy: np.ndarray, cache) -> np.ndarray:
    """Gradient of the embedding table (ids get none)."""
    ids, shape = cache
    dtable = np.zeros(shape, dtype=dy.dtype)
    np.add.at(dtable, ids.reshape(-1), dy.reshape(-1, shape[1]))
    return dtable


def rmsnorm_forward(x: np.ndarray, weight: np.ndarray, eps: float = 1e-5):
    """``y = x / sqrt(mean(x², -1) + eps) * weight`` over the last axis."""
    rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    xhat = x * rstd
    return xhat * weight, (xhat, rstd, weight)


def rmsnorm_backward(dy: np.ndarray, cache):
    """Returns (dx, dweight)."""
    xhat, rstd, weight = cache
    dweight = np.sum((dy * xhat).reshape(-1, xhat.shape[-1]), axis=0)
    dxhat = dy * weight
    dx = rstd * (dxhat - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))
    return dx, dweight


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0, dtype=np.float32):
    """cos, sin tables [seq_len, head_dim/2] for rotary position embeddings."""
    half = head_dim // 2
    inv_freq = base ** (-np.arange(half, dtype=np.float64) / half)
    ang = np.arange(seq_len, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(ang).astype(dtype), np.sin(ang).astype(dtype)


def rope_apply(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate pairs (x[..., i], x[..., i + hd/2]) by position-dependent angles.

    x: [..., T, hd]; cos, sin: [T, hd/2] (the first T rows of the tables).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def rope_apply_backward(dy: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """The rotation is orthogonal: its transpose rotates by the opposite angle."""
    return rope_apply(dy, cos, -sin)


def attention_forward(x: np.ndarray, wqkv: np.ndarray, wo: np.ndarray, n_heads: int,
                      cos: np.ndarray, sin: np.ndarray):
    """Causal multi-head self-attention with RoPE on q and k.

    x: [B, T, d]; wqkv: [d, 3d] (q, k, v stacked along the output axis); wo: [d, d].
    cos, sin: RoPE tables with at least T rows.
    """
    B, T, d = x.shape
    hd = d // n_heads
    cos, sin = cos[:T], sin[:T]
    x2 = x.reshape(B * T, d)
    qkv = (x2 @ wqkv).reshape(B, T, 3, n_heads, hd).transpose(2, 0, 3, 1, 4)  # [3, B, nh, T, hd]
    q = rope_apply(qkv[0], cos, sin)
    k = rope_apply(qkv[1], cos, sin)
    v = qkv[2]
    scale = 1.0 / np.sqrt(hd)
    s = (q @ k.transpose(0, 1, 3, 2)) * np.asarray(scale, dtype=x.dtype)   # [B, nh, T, T]
    s = np.where(np.tri(T, dtype=bool), s, -np.inf)
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    o = (p @ v).transpose(0, 2, 1, 3).reshape(B * T, d)                  # heads merged
    y = (o @ wo).reshape(B, T, d)
    cache = (x2, q, k, v, p, o, wqkv, wo, n_heads, cos, sin, scale, (B, T, d))
    return y, cache


def attention_backward(dy: np.ndarray, cache):
    """Returns (dx, {"wqkv": ..., "wo": ...})."""
    x2, q, k, v, p, o, wqkv, wo, n_heads, cos, sin, scale, (B, T, d) = cache
    hd = d // n_heads
    dy2 = dy.reshape(B * T, d)
    dwo = o.T @ dy2
    do = (dy2 @ wo.T).reshape(B, T, n_heads, hd).transpose(0, 2, 1, 3)  # [B, nh, T, hd]
    dp = do @ v.transpose(0, 1, 3, 2)
    dv = p.transpose(0, 1, 3, 2) @ do
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    ds *= np.asarray(scale, dtype=ds.dtype)
    dq = rope_apply_backward(ds @ k, cos, sin)
    dk = rope_apply_backward(ds.transpose(0, 1, 3, 2) @ q, cos, sin)
    dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B * T, 3 * d)
    dwqkv = x2.T @ dqkv
    dx = (dqkv @ wqkv.T).reshape(B, T, d)
    return dx, {"wqkv": dwqkv, "wo": dwo}


def ffn_forward(x: np.ndarray, w_gate, w_up, w_down, activation: str = "relu", gated: bool = True):
    """The twell.reference FFN on x [..., d] (flattened to tokens); w_down in layout "hd"."""
    shape = x.shape
    y, cache = ref.ffn_forward(x.reshape(-1, shape[-1]), w_gate if gated else None, w_up, w_down,
                               gated=gated, activation=activation, w_down_layout="hd")
    return y.reshape(shape), (cache, shape)


def ffn_backward(dy: np.ndarray, cache, l1_coeff: float = 0.0):
    """Returns (dx, {"w_gate", "w_up", "w_down"}); adds the gradient of l1_coeff · Σ|h|."""
    rcache, shape = cache
    dx, grads = ref.ffn_backward(dy.reshape(-1, shape[-1]), rcache, l1_coeff=l1_coeff)
    return dx.reshape(shape), grads


def head_forward(x: np.ndarray, emb: np.ndarray):
    """Tied output head: logits = x Eᵀ; x [M, d], emb [V, d]."""
    return x @ emb.T, (x, emb)


def head_backward(dlogits: np.ndarray, cache):
    """Returns (dx, demb)."""
    x, emb = cache
    return dlogits @ emb, dlogits.T @ x


def cross_entropy(logits: np.ndarray, targets: np.ndarray):
    """Mean cross-entropy (nats) over rows; returns (loss, dlogits)."""
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    lse = np.log(np.sum(np.exp(z), axis=-1, keepdims=True))
    logp = z - lse
    n = logits.shape[0]
    rows = np.arange(n)
    loss = -float(np.mean(logp[rows, targets], dtype=np.float64))
    dlogits = np.exp(logp)
    dlogits[rows, targets] -= 1.0
    dlogits /= n
    return loss, dlogits


# ----------------------------------------------------------------------------------------------
# The language model
# ----------------------------------------------------------------------------------------------

def init_params(cfg: ModelConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """GPT-2-style init: N(0, init_std), residual output projections scaled by 1/sqrt(2·layers)."""
    d, H, V, L = cfg.d_model, cfg.d_hidden, cfg.vocab_size, cfg.n_layers
    dt = np.dtype(cfg.dtype)
    std, std_out = cfg.init_std, cfg.init_std / np.sqrt(2 * L)

    def normal(shape, s):
        return (rng.standard_normal(shape) * s).astype(dt)

    p = {"emb": normal((V, d), std)}
    for i in range(L):
        p[f"l{i}.attn_norm"] = np.ones(d, dt)
        p[f"l{i}.wqkv"] = normal((d, 3 * d), std)
        p[f"l{i}.wo"] = normal((d, d), std_out)
        p[f"l{i}.ffn_norm"] = np.ones(d, dt)
        if cfg.gated:
            p[f"l{i}.w_gate"] = normal((H, d), std)
        p[f"l{i}.w_up"] = normal((H, d), std)
        p[f"l{i}.w_down"] = normal((H, d), std_out)
    p["final_norm"] = np.ones(d, dt)
    return p


class TransformerLM:
    """The reference LM: ``forward`` keeps a cache, ``backward`` returns gradients for ``params``.

    ``TransformerLM(cfg, seed=0)`` initialises parameters from ``np.random.default_rng(seed)``;
    ``TransformerLM(cfg, params=...)`` wraps existing ones (a checkpoint).
    """

    def __init__(self, cfg: ModelConfig, params: dict | None = None, seed: int = 0):
        self.cfg = cfg
        self.params = params if params is not None else init_params(cfg, np.random.default_rng(seed))
        hd = cfg.d_model // cfg.n_heads
        self.rope_cos, self.rope_sin = rope_tables(cfg.max_seq_len, hd, cfg.rope_base,
                                                   np.dtype(cfg.dtype))

    def num_params(self) -> int:
        return int(sum(v.size for v in self.params.values()))

    def forward(self, ids: np.ndarray, targets: np.ndarray | None = None, l1_lambda: float = 0.0,
                keep_cache: bool = True, keep_ffn_inputs: bool = False):
        """Run the model on ids [B, T] (T <= max_seq_len).

        Returns (out, cache). ``out`` has ``logits`` [B·T, V]; ``h`` (per layer, the FFN hidden
        activations [B·T, H]); ``l1`` = mean over layers of mean over tokens of Σ_j|h_j|; with
        targets: ``ce`` (mean nats per token) and ``loss`` = ce + l1_lambda · l1; with
        keep_ffn_inputs: ``ffn_x`` (per layer, the FFN input after its RMSNorm [B·T, d]).
        ``cache`` is None unless keep_cache.
        """
        cfg, p = self.cfg, self.params
        B, T = ids.shape
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}")
        M, L = B * T, cfg.n_layers
        x, emb_cache = embedding_forward(ids, p["emb"])
        layer_caches, hs, ffn_xs = [], [], []
        l1 = 0.0
        for i in range(L):
            a_in, an_cache = rmsnorm_forward(x, p[f"l{i}.attn_norm"], cfg.norm_eps)
            a_out, at_cache = attention_forward(a_in, p[f"l{i}.wqkv"], p[f"l{i}.wo"], cfg.n_heads,
                                                self.rope_cos, self.rope_sin)
            x = x + a_out
            f_in, fn_cache = rmsnorm_forward(x, p[f"l{i}.ffn_norm"], cfg.norm_eps)
            f_out, ff_cache = ffn_forward(f_in, p.get(f"l{i}.w_gate"), p[f"l{i}.w_up"],
                                          p[f"l{i}.w_down"], cfg.activation, cfg.gated)
            x = x + f_out
            h = ff_cache[0]["h"]
            hs.append(h)
            if keep_ffn_inputs:
                ffn_xs.append(f_in.reshape(M, -1))
            l1 += ref.l1_sum(h) / M / L
            layer_caches.append((an_cache, at_cache, fn_cache, ff_cache))
        xf, fnorm_cache = rmsnorm_forward(x.reshape(M, -1), p["final_norm"], cfg.norm_eps)
        logits, head_cache = head_forward(xf, p["emb"])
        out = {"logits": logits, "h": hs, "l1": float(l1)}
        if keep_ffn_inputs:
            out["ffn_x"] = ffn_xs
        dlogits = None
        if targets is not None:
            ce, dlogits = cross_entropy(logits, targets.reshape(-1))
            out["ce"] = ce
            out["loss"] = ce + l1_lambda * out["l1"]
        cache = None
        if keep_cache:
            cache = dict(emb=emb_cache, layers=layer_caches, fnorm=fnorm_cache, head=head_cache,
                         dlogits=dlogits, l1_lambda=float(l1_lambda), shape=(B, T))
        return out, cache

    def backward(self, cache) -> dict[str, np.ndarray]:
        """Gradients of ``loss`` (the forward's targets and l1_lambda) for every parameter."""
        if cache is None or cache["dlogits"] is None:
            raise ValueError("backward needs the cache of a forward run with targets and keep_cache")
        cfg = self.cfg
        B, T = cache["shape"]
        M, L = B * T, cfg.n_layers
        l1_coeff = cache["l1_lambda"] / (M * L)
        g: dict[str, np.ndarray] = {}
        dxf, demb = head_backward(cache["dlogits"], cache["head"])
        dx, g["final_norm"] = rmsnorm_backward(dxf, cache["fnorm"])
        dx = dx.reshape(B, T, -1)
        for i in reversed(range(L)):
            an_cache, at_cache, fn_cache, ff_cache = cache["layers"][i]
            df_in, fg = ffn_backward(dx, ff_cache, l1_coeff)
            for name, val in fg.items():
                if name == "w_gate" and not cfg.gated:
                    continue
                g[f"l{i}.{name}"] = val
            d, g[f"l{i}.ffn_norm"] = rmsnorm_backward(df_in, fn_cache)
            dx = dx + d
            da_in, ag = attention_backward(dx, at_cache)
            g[f"l{i}.wqkv"], g[f"l{i}.wo"] = ag["wqkv"], ag["wo"]
            d, g[f"l{i}.attn_norm"] = rmsnorm_backward(da_in, an_cache)
            dx = dx + d
        g["emb"] = demb + embedding_backward(dx, cache["emb"])
        return g

    def loss_and_grads(self, ids, targets, l1_lambda: float = 0.0):
        """One forward and backward: returns (out, grads)."""
        out, cache = self.forward(ids, targets, l1_lambda)
        return out, self.backward(cache)
