"""Training forward/backward of the gated ReLU FFN (hybrid ELL + dense tail) on the GPU.

Same conventions as :mod:`twell.ops`: any CUDA array implementing ``__dlpack__``
(CuPy, PyTorch, ...), the caller's current stream, outputs allocated through the
first input's framework unless given.

>>> y, saved = train_ops.forward(x, w_gate, w_up, w_down)          # saved: SavedState
>>> saved.l1, saved.active, saved.stats                              # device arrays
>>> dx, dw_gate, dw_up, dw_down = train_ops.backward(dy, saved, x, w_gate, w_up, w_down, l1_coeff=c)

``l1`` is the raw sum over tokens and neurons of |h| (fp32); the backward adds
the gradient of ``l1_coeff * sum |h|`` (for "lambda times the mean over tokens,
averaged over layers" use ``l1_coeff = lambda / (tokens * layers)``).
See docs/training.md for the design, the saved state's layout and the limits.
"""

from __future__ import annotations

from . import _ffi
from ._arrays import (
    Borrowed,
    check_array,
    check_int,
    current_stream,
    device_of,
    empty,
    framework,
    host_words,
    shape2,
    workspace,
)
from ._options import KERNELS, LAYOUTS, TRAIN_PATHS, TRAIN_STATS_FIELDS, option_code
from ._plans import PlanCache, new_plan_key

__all__ = ["TRAIN_STATS_FIELDS", "TrainPlan", "SavedState", "forward", "backward", "read_train_stats", "TwellTrainFFN",
           "new_plan_key", "release"]


def read_train_stats(stats) -> dict:
    """Training statistics tensor (uint64[16]) -> dict (synchronises with the device)."""
    return {k: int(v) for k, v in zip(TRAIN_STATS_FIELDS, host_words(stats))}


def train_replay_counts(plan) -> tuple[int, int]:
    """(replays, captures) of a twell_train_plan (cffi handle)."""
    r, c = _ffi.ffi.new("int64_t *"), _ffi.ffi.new("int64_t *")
    _ffi.check(_ffi.lib.twell_train_plan_replay_counts(plan, r, c))
    return int(r[0]), int(c[0])


def train_last_route(plan) -> str | None:
    """The route of a twell_train_plan's last forward: "hybrid", "dense" or None."""
    v = _ffi.ffi.new("int32_t *")
    _ffi.check(_ffi.lib.twell_train_plan_last_route(plan, v))
    return {1: "hybrid", 2: "dense"}.get(int(v[0]))


class SavedState:
    """What the backward needs from a forward: one caller-owned device byte buffer, plus the forward's
    ``l1`` (fp32 [1]), ``active`` (int32 [M]) and ``stats`` (uint64 [16]) device arrays."""

    def __init__(self, buffer, ptr: int, nbytes: int, rows: int, plan):
        self.buffer, self.ptr, self.nbytes, self.rows, self.plan = buffer, ptr, nbytes, rows, plan
        self.l1 = None
        self.active = None
        self.stats = None

    def read_stats(self) -> dict:
        return read_train_stats(self.stats)


class TrainPlan:
    """A twell_train_plan: (D, H, options) fixed, tensors per call. Keeps a growing workspace.

    ``path``: "hybrid" (= "sparse": ELL rows + dense tail), "dense" (nine cuBLASLt GEMMs, g and u
    saved in bf16) or "auto" (default: dense below 3072 rows; from there hybrid until a forward
    shows dense pays, then dense until activity drops again; the choice follows this plan's
    previous forward, so hold one plan per layer). ``saved_size`` answers for the route the next
    forward takes.

    From its second sighting on, an eager call (same M, arrays, sizes) is replayed as a CUDA graph of
    its captured form: no host synchronisation, one launch (``set_replay``, ``replay_counts``).
    """

    def __init__(self, d_model: int, hidden: int, *, ell_width: int = 64, slots: int = 32, w_down_layout: str = "hd",
                 path: str = "auto", kernels: str = "auto", tail_chunk_rows: int = 0, device: int = 0):
        lib = _ffi.require()
        d_model, hidden = check_int(d_model, "d_model"), check_int(hidden, "hidden")
        ell_width, slots = check_int(ell_width, "ell_width"), check_int(slots, "slots")
        tail_chunk_rows, device = check_int(tail_chunk_rows, "tail_chunk_rows"), check_int(device, "device")
        layout = option_code(LAYOUTS, "w_down_layout", w_down_layout)
        path_code = option_code(TRAIN_PATHS, "path", path)
        kernels_code = option_code(KERNELS, "kernels", kernels)
        opt = _ffi.ffi.new("twell_train_options *")
        _ffi.check(lib.twell_train_options_default(opt))
        opt.ell_width = ell_width
        opt.slots = slots
        opt.w_down_layout = layout
        opt.path = path_code
        opt.kernels = kernels_code
        opt.tail_chunk_rows = tail_chunk_rows
        handle = _ffi.ffi.new("twell_train_plan **")
        _ffi.check(lib.twell_train_plan_create(handle, d_model, hidden, opt, device))
        self._plan = _ffi.ffi.gc(handle[0], lib.twell_train_plan_destroy)
        self.d_model, self.hidden, self.ell_width, self.w_down_layout = d_model, hidden, ell_width, w_down_layout
        self.device = device
        self._ws = None
        self._ws_ptr = 0
        self._ws_bytes = 0

    def saved_size(self, rows: int) -> int:
        n = _ffi.ffi.new("size_t *")
        _ffi.check(_ffi.lib.twell_train_saved_size(self._plan, int(rows), n))
        return int(n[0])

    def set_replay(self, max_graphs: int) -> None:
        """Graphs of repeated eager calls kept (0 = off, at most 64; default 8)."""
        _ffi.check(_ffi.lib.twell_train_plan_set_replay(self._plan, check_int(max_graphs, "max_graphs")))

    def replay_counts(self) -> tuple[int, int]:
        """(calls replayed from a graph, graphs captured) so far."""
        return train_replay_counts(self._plan)

    def last_route(self) -> str | None:
        """The route of the last forward: "hybrid", "dense", or None before any."""
        return train_last_route(self._plan)

    def workspace_size(self, rows: int) -> int:
        n = _ffi.ffi.new("size_t *")
        _ffi.check(_ffi.lib.twell_train_workspace_size(self._plan, int(rows), n))
        return int(n[0])

    def _workspace_for(self, ref, rows: int):
        need = self.workspace_size(rows)
        if self._ws is None or self._ws_bytes < need or framework(self._ws) != framework(ref):
            self._ws = None
            self._ws, self._ws_ptr = workspace(ref, need)
            self._ws_bytes = need
        return self._ws_ptr, self._ws_bytes

    def release_workspace(self):
        self._ws = None
        self._ws_ptr = self._ws_bytes = 0

    def forward(self, x, w_gate, w_up, w_down, *, out=None, saved: SavedState | None = None, stats=None,
                l1=None, active=None):
        """Returns (y, saved). saved.l1 / saved.active / saved.stats are device arrays of this call."""
        for name, arr in (("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
            check_array(arr, name)
        m, _ = shape2(x, "x")
        if out is None:
            out = empty(x, (m, self.d_model), "bfloat16")
        if saved is None or saved.nbytes < self.saved_size(m):
            nbytes = self.saved_size(m)
            buf, ptr = workspace(x, nbytes)
            saved = SavedState(buf, ptr, nbytes, m, self)
        saved.rows = m
        saved.l1 = l1 if l1 is not None else empty(x, (1,), "float32")
        saved.active = active if active is not None else empty(x, (max(m, 1),), "int32")[:m]
        saved.stats = stats if stats is not None else empty(x, (16,), "uint64")
        ws_ptr, ws_bytes = self._workspace_for(x, m)
        b = Borrowed(current_stream(x))
        _ffi.check(_ffi.lib.twell_train_forward(
            self._plan, b(x, "x"), b(w_gate, "w_gate"), b(w_up, "w_up"), b(w_down, "w_down"), b(out, "out"),
            b(saved.l1, "l1"), b(saved.active, "active") if m > 0 else _ffi.ffi.NULL,
            _ffi.ffi.cast("void *", saved.ptr), saved.nbytes, b(saved.stats, "stats"),
            _ffi.ffi.cast("void *", ws_ptr), ws_bytes, _ffi.ffi.cast("void *", b.stream)))
        return out, saved

    def backward(self, dy, saved: SavedState, x, w_gate, w_up, w_down, *, l1_coeff: float = 0.0, dx=None,
                 dw_gate=None, dw_up=None, dw_down=None, accumulate: bool = False, stats=None):
        """Returns (dx, dw_gate, dw_up, dw_down); dw_* are accumulated into when accumulate=True (then required)."""
        for name, arr in (("dy", dy), ("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
            check_array(arr, name)
        if not isinstance(saved, SavedState):
            raise _ffi.InvalidArgumentError(f"saved must be the SavedState of a forward, got {type(saved).__name__}")
        m, _ = shape2(dy, "dy")
        d, h = self.d_model, self.hidden
        if accumulate and (dw_gate is None or dw_up is None or dw_down is None):
            raise _ffi.InvalidArgumentError("accumulate=True needs dw_gate, dw_up and dw_down")
        if dx is None:
            dx = empty(dy, (m, d), "bfloat16")
        if dw_gate is None:
            dw_gate = empty(dy, (h, d), "bfloat16")
        if dw_up is None:
            dw_up = empty(dy, (h, d), "bfloat16")
        if dw_down is None:
            dw_down = empty(dy, (h, d) if self.w_down_layout == "hd" else (d, h), "bfloat16")
        ws_ptr, ws_bytes = self._workspace_for(dy, m)
        b = Borrowed(current_stream(dy))
        _ffi.check(_ffi.lib.twell_train_backward(
            self._plan, b(dy, "dy"), float(l1_coeff), b(x, "x"), b(w_gate, "w_gate"), b(w_up, "w_up"),
            b(w_down, "w_down"), _ffi.ffi.cast("void *", saved.ptr), saved.nbytes, b(dx, "dx"), b(dw_gate, "dw_gate"),
            b(dw_up, "dw_up"), b(dw_down, "dw_down"), 1 if accumulate else 0, b(stats, "stats"),
            _ffi.ffi.cast("void *", ws_ptr), ws_bytes,
            _ffi.ffi.cast("void *", b.stream)))
        return dx, dw_gate, dw_up, dw_down


_PLANS = PlanCache()


def release(plan: int) -> None:
    """Drop the plans (and workspaces) that ``forward`` made for plan key ``plan``."""
    _PLANS.release(plan)


def forward(x, w_gate, w_up, w_down, *, ell_width: int = 64, w_down_layout: str = "hd", path: str = "auto",
            kernels: str = "auto", slots: int = 32, tail_chunk_rows: int = 0, plan: int = 0, out=None, stats=None):
    """(y, saved) for the gated ReLU FFN; saved carries l1, active, stats and the backward's state.

    Plans are cached by ``plan`` (a key), shape, options and device. ``plan=0`` (default) is one
    anonymous plan per shape and options, shared by every caller that passes no key: with
    ``path="auto"`` their forwards steer one route history, and the plan is one thread's at a
    time. Pass a key of your own (``new_plan_key()``) per layer, or hold a ``TrainPlan`` /
    ``TwellTrainFFN``.
    """
    check_array(x, "x")
    check_array(w_up, "w_up")
    _, d_model = shape2(x, "x")
    hidden, _ = shape2(w_up, "w_up", "[H, D]")
    plan = check_int(plan, "plan", 0)
    device = device_of(x)[1]
    options = dict(ell_width=ell_width, w_down_layout=w_down_layout, path=path, kernels=kernels, slots=slots,
                   tail_chunk_rows=tail_chunk_rows)
    key = (plan, d_model, hidden, device, tuple(sorted(options.items())))
    train_plan = _PLANS.get(key, lambda: TrainPlan(d_model, hidden, device=device, **options))
    return train_plan.forward(x, w_gate, w_up, w_down, out=out, stats=stats)


def backward(dy, saved: SavedState, x, w_gate, w_up, w_down, *, l1_coeff: float = 0.0, accumulate: bool = False,
             dx=None, dw_gate=None, dw_up=None, dw_down=None, stats=None):
    """(dx, dw_gate, dw_up, dw_down) of the forward that produced ``saved`` (same x and weights)."""
    return saved.plan.backward(dy, saved, x, w_gate, w_up, w_down, l1_coeff=l1_coeff, dx=dx, dw_gate=dw_gate,
                               dw_up=dw_up, dw_down=dw_down, accumulate=accumulate, stats=stats)


class TwellTrainFFN:
    """A trainable sparse FFN layer: holds weights and gradient buffers (bf16, one framework).

    >>> layer = TwellTrainFFN(w_gate, w_up, w_down)
    >>> y = layer.forward(x)
    >>> dx = layer.backward(dy, l1_coeff=c)     # accumulates into layer.grads
    >>> layer.zero_grad()
    """

    def __init__(self, w_gate, w_up, w_down, *, w_down_layout: str = "hd", ell_width: int = 64, path: str = "auto",
                 kernels: str = "auto"):
        self.w_gate, self.w_up, self.w_down = w_gate, w_up, w_down
        hidden, d_model = (int(s) for s in w_up.shape)
        self.plan = TrainPlan(d_model, hidden, ell_width=ell_width, w_down_layout=w_down_layout, path=path,
                              kernels=kernels, device=device_of(w_up)[1])
        self.grads = None
        self._x = None
        self._saved = None

    def zero_grad(self):
        self.grads = None

    def forward(self, x):
        y, self._saved = self.plan.forward(x, self.w_gate, self.w_up, self.w_down, saved=self._saved)
        self._x = x
        return y

    def backward(self, dy, *, l1_coeff: float = 0.0):
        if self._saved is None:
            raise RuntimeError("backward before forward")
        if self.grads is None:
            dx, g, u, d = self.plan.backward(dy, self._saved, self._x, self.w_gate, self.w_up, self.w_down,
                                             l1_coeff=l1_coeff)
            self.grads = {"w_gate": g, "w_up": u, "w_down": d}
        else:
            dx, *_ = self.plan.backward(dy, self._saved, self._x, self.w_gate, self.w_up, self.w_down,
                                        l1_coeff=l1_coeff, dw_gate=self.grads["w_gate"], dw_up=self.grads["w_up"],
                                        dw_down=self.grads["w_down"], accumulate=True)
        return dx

    def last_stats(self) -> dict:
        return read_train_stats(self._saved.stats)
