"""The host side of the PyTorch ops: plans, workspaces and DLTensor descriptors, kept per plan.

Everything that does not change between calls is made once: the plan, its
statistics buffer, its workspace (grown when a larger M needs more), the
descriptors of the weights (re-written only when a weight's storage, shape or
strides change) and the cffi pointers. A call then writes x's and y's
descriptor words, allocates y through PyTorch's caching allocator and makes one
cffi call; the C library replays the call's launch sequence as a CUDA graph
from its second sighting on (``twell_ffn_plan_set_replay``). No DLPack capsule
is made and no device query or stream wait happens per call.

Plans are keyed by ``plan`` (an integer: 0 = one anonymous plan per shape and
options, shared by every caller with that key; layers take a key of their
own, so AUTO's history is never shared by accident), shape, options and device.
Plans are not thread-safe: one thread at a time per key.
"""

from __future__ import annotations

import threading
import weakref

import torch

from .. import _ffi
from .._options import PATHS, STATS_FIELDS, TRAIN_STATS_FIELDS
from .._plans import new_plan_key  # noqa: F401  (one key counter for twell.ops and twell.torch)
from ..train_ops import train_last_route, train_replay_counts

_lock = threading.Lock()


# ---------------------------------------------------------------------------
# Argument checks with the argument's name (the C ABI checks shapes, strides,
# alignment, devices and aliasing and names the argument too).
# ---------------------------------------------------------------------------
def check_tensor(t, name: str, *, dtype=torch.bfloat16, ndim=None, optional=False):
    if t is None:
        if optional:
            return
        raise _ffi.InvalidArgumentError(f"{name} is None, expected a CUDA torch.Tensor")
    if not isinstance(t, torch.Tensor):
        raise _ffi.InvalidArgumentError(f"{name} must be a CUDA torch.Tensor, got {type(t).__name__}")
    if not t.is_cuda:
        raise _ffi.InvalidArgumentError(
            f"{name} is on {t.device}; twell's kernels need CUDA tensors (move it with .cuda())")
    if t.dtype is not dtype:
        raise _ffi.InvalidArgumentError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if ndim is not None and t.dim() not in ndim:
        want = " or ".join(f"{n}-D" for n in ndim)
        raise _ffi.InvalidArgumentError(f"{name} must be {want}, got shape {tuple(t.shape)}")


def as_rows(t, d_model: int, name: str):
    """[..., D] -> [M, D] without a copy (a view), or a named error."""
    if t.dim() == 2:
        return t
    if t.dim() < 1 or t.shape[-1] != d_model:
        raise _ffi.InvalidArgumentError(f"{name} has shape {tuple(t.shape)}, expected [..., {d_model}]")
    try:
        return t.view(-1, d_model)
    except RuntimeError:
        raise _ffi.InvalidArgumentError(
            f"{name} (shape {tuple(t.shape)}, strides {t.stride()}) cannot be viewed as [M, {d_model}] rows; "
            f"pass a tensor whose leading dimensions are contiguous (e.g. {name}.contiguous())") from None


# ---------------------------------------------------------------------------
# DLTensor descriptors written as integer words (no capsule, no cffi struct
# field assignment per call): layout checked against the header at import.
# ---------------------------------------------------------------------------
ffi = _ffi.ffi
_DESC_WORDS = 6  # data, device, ndim|dtype, shape*, strides*, byte_offset
if _ffi.header_path is not None:
    assert ffi.sizeof("DLTensor") == 8 * _DESC_WORDS
    assert ffi.offsetof("DLTensor", "device") == 8 and ffi.offsetof("DLTensor", "ndim") == 16
    assert ffi.offsetof("DLTensor", "dtype") == 20 and ffi.offsetof("DLTensor", "shape") == 24
    assert ffi.offsetof("DLTensor", "strides") == 32 and ffi.offsetof("DLTensor", "byte_offset") == 40

# (DLPack type code, bits) per dtype. Statistics buffers are held as int64 (PyTorch's uint64
# support is thin) and described as the uint64 words the C ABI writes.
_DTYPE_WORDS = {
    torch.bfloat16: (4, 16), torch.float32: (2, 32), torch.uint8: (1, 8), torch.int32: (0, 32),
    torch.int64: (1, 64),
}


_OWN = object()  # Frame.keys marker: the slot holds a runner-allocated output of fixed layout


class Frame:
    """n DLTensor descriptors in one block of uint64 words, with their shape and stride arrays."""

    def __init__(self, n: int):
        self.words = ffi.new("uint64_t[]", n * _DESC_WORDS)
        self.dims = ffi.new("int64_t[]", n * 4)  # shape[2] then strides[2] per descriptor
        base = int(ffi.cast("uintptr_t", self.dims))
        for i in range(n):
            w = i * _DESC_WORDS
            self.words[w + 3] = base + 32 * i
            self.words[w + 4] = base + 32 * i + 16
        self.ptrs = [ffi.cast("DLTensor *", self.words + i * _DESC_WORDS) for i in range(n)]
        self.keys = [None] * n

    def set(self, i: int, t) -> None:
        """Descriptor i = tensor t (1-D or 2-D CUDA tensor)."""
        w = i * _DESC_WORDS
        words, dims = self.words, self.dims
        words[w] = t.data_ptr()
        words[w + 1] = 2 | (t.get_device() << 32)
        code, bits = _DTYPE_WORDS[t.dtype]
        nd = t.dim()
        words[w + 2] = nd | (code << 32) | (bits << 40) | (1 << 48)
        d = 4 * i
        if nd == 2:
            s0, s1 = t.shape
            st0, st1 = t.stride()
            dims[d], dims[d + 1], dims[d + 2], dims[d + 3] = s0, s1, st0, st1
        else:
            dims[d] = t.shape[0]
            dims[d + 2] = t.stride()[0]

    def set_rows(self, i: int, t, rows: int) -> None:
        """As set(), for a compact tensor the runner allocated itself ([rows, C] or [rows]) whose
        slot held one of the same dtype, device and columns before: only the data pointer and the
        row count are written (the first use of the slot writes everything)."""
        if self.keys[i] is not _OWN:
            self.set(i, t)
            self.keys[i] = _OWN
            return
        self.words[i * _DESC_WORDS] = t.data_ptr()
        self.dims[4 * i] = rows

    def set_cached(self, i: int, t) -> None:
        """As set(), skipped when t has the storage, shape and strides it had last time (weights)."""
        key = (t.data_ptr(), t.shape, t.stride(), t.dtype, t.get_device())
        if key != self.keys[i]:
            self.set(i, t)
            self.keys[i] = key


def stats_dict(stats, fields) -> dict:
    """A device statistics buffer (int64 words holding uint64 values) -> dict; synchronises."""
    return {k: int(v) & 0xFFFFFFFFFFFFFFFF for k, v in zip(fields, stats.cpu().tolist())}


def _aligned_buffer(device, nbytes: int):
    """uint8 CUDA tensor of >= nbytes whose data is 256-byte aligned (returns (tensor, pointer))."""
    buf = torch.empty(int(nbytes) + 256, dtype=torch.uint8, device=device)
    ptr = buf.data_ptr()
    return buf, ptr + ((-ptr) % 256)


# Whether the current stream is capturing a CUDA graph; the current raw stream of a device (CUDA
# builds of PyTorch; on others no CUDA tensor reaches the code that calls them).
_is_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


class _Workspace:
    """A growing device workspace of one plan, sized by the plan's query (memoised per M). A
    buffer a CUDA graph captured is never freed while the runner lives (the graph replays with
    its address baked in)."""

    def __init__(self, device, plan, size_query):
        self.device = device
        self._plan, self._query = plan, size_query
        self.need = {}
        self._n = ffi.new("size_t *")
        self.buf = None
        self.ptr = 0
        self.cdata = ffi.NULL
        self.nbytes = 0
        self.captured = False
        self._keep = []

    def for_rows(self, m: int):
        """The workspace (a cffi void*) for a call over m rows; self.nbytes is its size."""
        need = self.need.get(m)
        if need is None:
            _ffi.check(self._query(self._plan, m, self._n))
            need = self.need[m] = int(self._n[0])
        if need > self.nbytes:
            if self.buf is not None and (self.captured or _is_capturing()):
                self._keep.append(self.buf)
            self.buf, self.ptr = _aligned_buffer(self.device, need)
            self.cdata = ffi.cast("void *", self.ptr)
            self.nbytes = need
            self.captured = False
        return self.cdata


class _Stream:
    """The current CUDA stream of a device as a cffi void*, cast only when it changes."""

    __slots__ = ("device", "raw", "cdata")

    def __init__(self, device: int):
        self.device = device
        self.raw = None
        self.cdata = ffi.NULL

    def current(self):
        raw = _raw_stream(self.device)
        if raw != self.raw:
            self.raw = raw
            self.cdata = ffi.cast("void *", raw)
        return self.cdata


# ---------------------------------------------------------------------------
# W_d as [H, D] rows for a [D, H] weight (nn.Linear's down_proj.weight)
# ---------------------------------------------------------------------------
# id(weight) -> (weakref to the weight, (data_ptr, version, strides), [H, D] copy); an entry goes
# when its weight is collected. (Tensors cannot be WeakKeyDictionary keys: their == is elementwise.)
_hd_copies: dict = {}
# id(copy) -> copy: copies a CUDA graph captured a read of, kept for the process once replaced (a
# graph replays with their address baked in).
_hd_keep: dict = {}


def version_of(t) -> int:
    """t._version; -1 for an inference-mode tensor (it keeps no version counter)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def hd_rows(w_down, d_model: int, hidden: int):
    """(rows, graph_owned): W_d [D, H] (nn.Linear's down_proj.weight) as [H, D] rows. Its transpose
    if it is a transposed view of [H, D] storage (no copy); else a transposed copy made once per
    weight version (``w._version``) and kept with the weight (it goes when the weight goes).

    Inside a CUDA graph capture a missing or stale copy is made inside the graph (so every replay
    makes it again: correct if the weight changes, but slower) and ``graph_owned`` is True (its
    memory belongs to the graph's pool: never cache it); an up-to-date copy is read as it is (so a
    weight changed in place after the capture is seen only after the next eager call). An
    inference-mode weight keeps no version counter: a write into it in place is not seen by its
    copy (make a new tensor, or release the plan key).
    """
    D, H = d_model, hidden
    shape = w_down.shape
    if shape[0] != D or shape[1] != H:
        raise _ffi.InvalidArgumentError(
            f"w_down has shape {tuple(shape)}, expected [{D}, {H}] (w_down_layout='dh', nn.Linear's "
            f"down_proj.weight)")
    if w_down.stride(1) == D and w_down.stride(0) == 1:
        return w_down.t(), False  # a transposed view of contiguous [H, D] storage
    key = (w_down.data_ptr(), version_of(w_down), w_down.stride())
    hit = _hd_copies.get(id(w_down))
    if hit is not None and hit[0]() is w_down and hit[1] == key:
        return hit[2], False
    copy = w_down.detach().t().contiguous()
    if _is_capturing():
        return copy, True
    ident = id(w_down)
    ref = weakref.ref(w_down, lambda _r, i=ident: _hd_copies.pop(i, None))
    _hd_copies[ident] = (ref, key, copy)
    return copy, False


def keep_for_graphs(t) -> None:
    """Keep t (a cached copy a CUDA graph being captured reads) for the life of the process."""
    _hd_keep[id(t)] = t


# ---------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------
_BF16 = torch.bfloat16
_PATH_AUTO = PATHS["auto"]


class FFNRunner:
    """One twell_ffn_plan (always W_d as [H, D]: [D, H] weights are turned around here, once per
    weight version) with its workspace, statistics buffer and stream; ``bind`` gives the call state
    of one weight set."""

    def __init__(self, d_model: int, hidden: int, device: int, *, gated: bool, slots: int, path: int,
                 kernels: int, replay: int = 8):
        lib = _ffi.require()
        opt = ffi.new("twell_ffn_options *")
        _ffi.check(lib.twell_ffn_options_default(opt))
        opt.gated = 1 if gated else 0
        opt.slots = slots
        opt.w_down_layout = 0
        opt.path = path
        opt.kernels = kernels
        handle = ffi.new("twell_ffn_plan **")
        _ffi.check(lib.twell_ffn_plan_create(handle, d_model, hidden, opt, device))
        self.plan = ffi.gc(handle[0], lib.twell_ffn_plan_destroy)
        _ffi.check(lib.twell_ffn_plan_set_replay(self.plan, int(replay)))
        self.lib = lib
        self.d_model, self.hidden, self.gated, self.device = d_model, hidden, gated, device
        self.torch_device = torch.device("cuda", device)
        self.stats = torch.zeros(len(STATS_FIELDS), dtype=torch.int64, device=self.torch_device)
        self.ws = _Workspace(self.torch_device, self.plan, lib.twell_ffn_workspace_size)
        self.stream = _Stream(device)
        self._bound = {}  # (id(w_gate), id(w_up), id(w_down), dh) -> BoundFFN (a few weight sets)

    def bind(self, w_gate, w_up, w_down, w_down_dh: bool) -> BoundFFN:
        """The call state for this weight set: re-made only when a weight is another tensor, moved
        to other storage or written in place (``_version``) since it was made."""
        key = (id(w_gate), id(w_up), id(w_down), w_down_dh)
        b = self._bound.get(key)
        if b is None or not b.fresh(w_gate, w_up, w_down):
            b = BoundFFN(self, w_gate, w_up, w_down, w_down_dh)
            if b.graph_owned:
                return b  # reads a copy made inside a graph being captured: never reused
            if len(self._bound) >= 8:  # weight sets that went out of use leave in call order
                del self._bound[next(iter(self._bound))]
            self._bound.pop(key, None)
            self._bound[key] = b
        return b

    def last_stats(self) -> dict:
        return stats_dict(self.stats, STATS_FIELDS)

    def replay_counts(self):
        r = ffi.new("int64_t *")
        c = ffi.new("int64_t *")
        _ffi.check(self.lib.twell_ffn_plan_replay_counts(self.plan, r, c))
        return int(r[0]), int(c[0])


def _dead():
    return None


class BoundFFN:
    """A runner with one weight set: the six DLTensor descriptors of a call, the weights' written
    once; a call writes x's and y's data pointer and row count and makes one cffi call.

    Holds only weak references to the weights, so it never keeps a model's parameters (or the
    [H, D] copy of a [D, H] weight, which lives with its weight: ``hd_rows``) alive; a state whose
    weights are gone is never ``fresh`` again and is dropped when its cache makes room."""

    __slots__ = ("runner", "frame", "refs", "state", "head", "copy_ref", "graph_owned")

    def __init__(self, runner: FFNRunner, w_gate, w_up, w_down, w_down_dh: bool):
        check_tensor(w_gate, "w_gate", ndim=(2,), optional=True)
        check_tensor(w_up, "w_up", ndim=(2,))
        check_tensor(w_down, "w_down", ndim=(2,))
        if (w_gate is not None) != runner.gated:
            raise _ffi.InvalidArgumentError("w_gate must be given for a gated FFN and None for a non-gated one")
        D = runner.d_model
        self.runner = runner
        f = self.frame = Frame(6)
        if w_gate is not None:
            f.set(1, w_gate)
        f.set(2, w_up)
        rows, self.graph_owned = hd_rows(w_down, D, runner.hidden) if w_down_dh else (w_down, False)
        f.set(3, rows)
        self.copy_ref = weakref.ref(rows) if rows is not w_down and rows._base is None else None
        # Slots 0 (x) and 4 (y): compact bf16 [M, D] on the plan's device; a call writes their data
        # pointer and M. Slot 5: the runner's statistics.
        row = torch.empty((1, D), dtype=_BF16, device=runner.torch_device)
        f.set(0, row)
        f.set(4, row)
        f.set(5, runner.stats)
        self.refs = (weakref.ref(w_gate) if w_gate is not None else _dead, weakref.ref(w_up), weakref.ref(w_down))
        self.state = _weight_state(w_gate, w_up, w_down)
        p = f.ptrs
        self.head = (runner.plan, p[0], p[1] if runner.gated else ffi.NULL, p[2], p[3], p[4], p[5])

    def fresh(self, w_gate, w_up, w_down) -> bool:
        """Whether these are the weights this state was made for, unchanged since."""
        rg, ru, rd = self.refs
        return (rg() is w_gate and ru() is w_up and rd() is w_down
                and self.state == _weight_state(w_gate, w_up, w_down))

    def __call__(self, x):
        """y = FFN(x) for a CUDA bf16 x [..., D] (named errors otherwise)."""
        r = self.runner
        D = r.d_model
        if x.is_cuda and x.dtype is _BF16 and x.get_device() == r.device and x.is_contiguous():
            # The common case, without a copy or a view: x is compact rows, y is made like it.
            m = x.numel() // D
            if m == 0 or x.shape[-1] != D:
                return self._general(x)
            y = torch.empty_like(x)
        else:
            return self._general(x)
        return self._launch(x.data_ptr(), D, y, m)

    def _general(self, x):
        r = self.runner
        D = r.d_model
        check_tensor(x, "x")
        if x.get_device() != r.device:
            raise _ffi.InvalidArgumentError(f"x is on {x.device}, the weights on cuda:{r.device}")
        x2 = as_rows(x, D, "x")
        m = x2.shape[0]
        y = torch.empty((m, D), dtype=_BF16, device=r.torch_device)
        if m:
            f = self.frame
            f.set(0, x2)
            try:
                self._launch(x2.data_ptr(), x2.stride(0), y, m)
            finally:
                f.set(0, y)  # back to compact rows for the common case (only M and the pointer change)
        return y.view(x.shape)

    def _launch(self, x_ptr: int, ldx: int, y, m: int):
        r = self.runner
        words, dims = self.frame.words, self.frame.dims
        words[0] = x_ptr
        dims[0] = m
        dims[2] = ldx
        words[24] = y.data_ptr()
        dims[16] = m
        ws = r.ws
        need = ws.need.get(m)
        cdata = ws.cdata if need is not None and need <= ws.nbytes else ws.for_rows(m)
        if _is_capturing():
            ws.captured = True
            copy = self.copy_ref() if self.copy_ref is not None else None
            if copy is not None:
                keep_for_graphs(copy)
        raw = _raw_stream(r.device)
        s = r.stream
        if raw != s.raw:
            s.raw, s.cdata = raw, ffi.cast("void *", raw)
        st = r.lib.twell_ffn_run(*self.head, cdata, ws.nbytes, s.cdata)
        if st:
            _ffi.check(st)
        return y


def _weight_state(w_gate, w_up, w_down):
    """What a call state depends on beyond the weights' identity: their storage and version."""
    try:
        if w_gate is None:
            return (0, 0, w_up._version, w_up.data_ptr(), w_down._version, w_down.data_ptr())
        return (w_gate._version, w_gate.data_ptr(), w_up._version, w_up.data_ptr(), w_down._version,
                w_down.data_ptr())
    except RuntimeError:  # inference-mode tensors keep no version counter
        return tuple(f(t) if t is not None else 0 for t in (w_gate, w_up, w_down)
                     for f in (version_of, lambda t: t.data_ptr()))


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
class TrainRunner:
    """One twell_train_plan with its workspace and descriptors (forward and backward share them)."""

    def __init__(self, d_model: int, hidden: int, device: int, *, w_down_dh: bool, ell_width: int, path: int,
                 kernels: int):
        lib = _ffi.require()
        opt = ffi.new("twell_train_options *")
        _ffi.check(lib.twell_train_options_default(opt))
        opt.ell_width = ell_width
        opt.w_down_layout = 1 if w_down_dh else 0
        opt.path = path
        opt.kernels = kernels
        handle = ffi.new("twell_train_plan **")
        _ffi.check(lib.twell_train_plan_create(handle, d_model, hidden, opt, device))
        self.plan = ffi.gc(handle[0], lib.twell_train_plan_destroy)
        self.lib = lib
        self.d_model, self.hidden, self.device, self.w_down_dh = d_model, hidden, device, w_down_dh
        self.torch_device = torch.device("cuda", device)
        self._need = {}  # (rows, saved bytes) -> workspace bytes (twell_train_workspace_size)
        # rows -> saved-state bytes; AUTO asks the plan before every forward (the route may change)
        self._saved_need = None if path == _PATH_AUTO else {}
        self.fwd = Frame(8)
        self.bwd = Frame(11)  # slot 10: l1_scale
        self.stats = torch.zeros(len(TRAIN_STATS_FIELDS), dtype=torch.int64, device=self.torch_device)
        self.bwd_stats = torch.zeros(len(TRAIN_STATS_FIELDS), dtype=torch.int64, device=self.torch_device)
        self.fwd.set(7, self.stats)
        self.bwd.set(9, self.bwd_stats)
        self.stream = _Stream(device)
        self._n = ffi.new("size_t *")

    def last_stats(self, phase: str = "forward") -> dict:
        return stats_dict(self.stats if phase == "forward" else self.bwd_stats, TRAIN_STATS_FIELDS)

    def replay_counts(self):
        """(calls replayed from a graph, graphs captured): repeated eager calls replay without host syncs."""
        return train_replay_counts(self.plan)

    def last_route(self):
        """"hybrid" or "dense": the route of the last forward (None before any)."""
        return train_last_route(self.plan)

    def _workspace(self, m: int, saved_bytes: int):
        """(buffer, cffi pointer, bytes): this call's workspace, taken from PyTorch's caching
        allocator on the current stream and given back when the caller drops ``buffer`` (after the
        launches). So every layer of a model reuses one block (stream order keeps them apart) and
        the memory is there for other tensors between calls; inside a CUDA graph capture the block
        belongs to the graph's pool. Forward and backward need nothing of each other's workspace.
        The size follows the route (an AUTO plan's dense route asks for more; the saved state's size
        tells the routes apart), asked right after the saved size, as the C ABI wants."""
        key = (m, saved_bytes)
        need = self._need.get(key)
        if need is None:
            _ffi.check(self.lib.twell_train_workspace_size(self.plan, m, self._n))
            need = self._need[key] = int(self._n[0])
        buf, ptr = _aligned_buffer(self.torch_device, need)
        return buf, ffi.cast("void *", ptr), need

    def _saved_bytes(self, m: int) -> int:
        memo = self._saved_need
        if memo is not None:
            n = memo.get(m)
            if n is not None:
                return n
        _ffi.check(self.lib.twell_train_saved_size(self.plan, m, self._n))  # AUTO: the route of this forward
        n = int(self._n[0])
        if memo is not None:
            memo[m] = n
        return n

    def forward(self, x, w_gate, w_up, w_down, want_active: bool = True):
        """(y, l1, active, saved); active is None when not wanted (the kernels then skip it)."""
        x2 = as_rows(x, self.d_model, "x")
        m = x2.shape[0]
        dev = self.torch_device
        y = torch.empty((m, self.d_model), dtype=_BF16, device=dev)
        l1 = torch.empty((1,), dtype=torch.float32, device=dev)
        saved_bytes = self._saved_bytes(m)
        saved = torch.empty((max(saved_bytes, 1),), dtype=torch.uint8, device=dev)
        if saved.data_ptr() % 256:  # the caching allocator hands out 512-byte aligned blocks
            raise _ffi.InternalError("the saved-state buffer is not 256-byte aligned")
        f = self.fwd
        f.set(0, x2)
        f.set_cached(1, w_gate)
        f.set_cached(2, w_up)
        f.set_cached(3, w_down)
        f.set_rows(4, y, m)
        f.set_rows(5, l1, 1)
        p = f.ptrs
        active = None
        p_active = ffi.NULL
        if want_active:
            active = torch.empty((m,), dtype=torch.int32, device=dev)
            if m > 0:
                f.set_rows(6, active, m)
                p_active = p[6]
        buf, ws, ws_bytes = self._workspace(m, saved_bytes)
        st = self.lib.twell_train_forward(self.plan, p[0], p[1], p[2], p[3], p[4], p[5], p_active,
                                          ffi.cast("void *", saved.data_ptr()), saved_bytes, p[7], ws, ws_bytes,
                                          self.stream.current())
        del buf  # back to the caching allocator, stream-ordered after the launches above
        if st:
            _ffi.check(st)
        if x.dim() != 2:
            y = y.view(x.shape)
            if active is not None:
                active = active.view(x.shape[:-1])
        return y, l1, active, saved

    def backward(self, dy, dl1, x, w_gate, w_up, w_down, saved):
        D = self.d_model
        x2 = as_rows(x, D, "x")
        dy2 = as_rows(dy, D, "dy")
        m = x2.shape[0]
        dev = self.torch_device
        dx = torch.empty((m, D), dtype=_BF16, device=dev)
        dwg = torch.empty((self.hidden, D), dtype=_BF16, device=dev)
        dwu = torch.empty((self.hidden, D), dtype=_BF16, device=dev)
        dwd = torch.empty((D, self.hidden) if self.w_down_dh else (self.hidden, D), dtype=_BF16, device=dev)
        f = self.bwd
        f.set(0, dy2)
        f.set(1, x2)
        f.set_cached(2, w_gate)
        f.set_cached(3, w_up)
        f.set_cached(4, w_down)
        f.set_rows(5, dx, m)
        f.set_rows(6, dwg, self.hidden)
        f.set_rows(7, dwu, self.hidden)
        f.set_rows(8, dwd, dwd.shape[0])
        p = f.ptrs
        if dl1 is not None:
            f.set(10, dl1)
            scale, coef = p[10], 1.0
        else:
            scale, coef = ffi.NULL, 0.0
        buf, ws, ws_bytes = self._workspace(m, saved.numel())
        st = self.lib.twell_train_backward_scaled(
            self.plan, p[0], coef, scale, p[1], p[2], p[3], p[4], ffi.cast("void *", saved.data_ptr()),
            saved.numel(), p[5], p[6], p[7], p[8], 0, p[9], ws, ws_bytes, self.stream.current())
        del buf
        if st:
            _ffi.check(st)
        if x.dim() != 2:
            dx = dx.view(x.shape)
        return dx, dwg, dwu, dwd


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------
_runners: dict = {}


def ffn_runner(plan_key: int, d_model: int, hidden: int, device: int, gated: bool, slots: int, path: int,
               kernels: int) -> FFNRunner:
    key = ("ffn", plan_key, d_model, hidden, device, gated, slots, path, kernels)
    r = _runners.get(key)
    if r is None:
        with _lock:
            r = _runners.get(key)
            if r is None:
                r = _runners[key] = FFNRunner(d_model, hidden, device, gated=gated, slots=slots, path=path,
                                              kernels=kernels)
    return r


def train_runner(plan_key: int, d_model: int, hidden: int, device: int, w_down_dh: bool, ell_width: int, path: int,
                 kernels: int) -> TrainRunner:
    key = ("train", plan_key, d_model, hidden, device, w_down_dh, ell_width, path, kernels)
    r = _runners.get(key)
    if r is None:
        with _lock:
            r = _runners.get(key)
            if r is None:
                r = _runners[key] = TrainRunner(d_model, hidden, device, w_down_dh=w_down_dh, ell_width=ell_width,
                                                path=path, kernels=kernels)
    return r


# The eager fast path's memo (twell.torch.ffn): the call's weights and options as given -> BoundFFN.
calls: dict = {}
_MAX_CALLS = 256


def remember_call(key, bound: BoundFFN) -> None:
    """Memoise a call state for the eager fast path (never one that reads a graph's own copy)."""
    if bound.graph_owned:
        return
    if len(calls) >= _MAX_CALLS:
        calls.clear()
    calls[key] = bound


def runners_of(plan_key: int):
    """Every runner made for a plan key (for statistics and for releasing a layer's plans)."""
    return [r for k, r in list(_runners.items()) if k[1] == plan_key]


def release(plan_key: int) -> None:
    """Drop the plans (and workspaces) of a key; graphs that captured them must be gone first."""
    with _lock:
        calls.clear()
        for k in [k for k in _runners if k[1] == plan_key]:
            del _runners[k]
