"""Where the host time of a training forward + backward through twell.torch goes (probe)."""
import time, json, statistics, torch
import twell.torch as tt
from twell.torch import _runtime as rt, ops
from twell.bench_torch import _inputs

acc = {}
def wrap(obj, name, slot):
    fn = getattr(obj, name)
    def call(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[slot] = acc.get(slot, 0.0) + time.perf_counter() - t0
    setattr(obj, name, call)
    return fn

class Id(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view(x.shape)
    @staticmethod
    def backward(ctx, g):
        return g

out = {}
for M in (16, 2048):
    D, H = 2048, 5632
    x, sets = _inputs(torch, D, H, M, 0.005, seed=1)
    leaves = [t.detach().clone().requires_grad_() for t in (x, *sets[0])]
    dy = torch.randn_like(x); dl1 = torch.full((1,), 1e-3, device="cuda")
    key = tt.new_plan_key()
    def step():
        for a in leaves: a.grad = None
        t0 = time.perf_counter()
        y, l1 = tt.ffn_with_l1(*leaves, w_down_layout="dh", plan=key)
        t1 = time.perf_counter()
        torch.autograd.backward((y, l1), (dy, dl1))
        t2 = time.perf_counter()
        acc["apply"] = acc.get("apply", 0) + t1 - t0
        acc["backward_call"] = acc.get("backward_call", 0) + t2 - t1
    for _ in range(3): step()
    r = next(rr for rr in rt.runners_of(key) if isinstance(rr, rt.TrainRunner))
    class Timed:
        def __init__(s, lib): s._lib = lib
        def __getattr__(s, name):
            fn = getattr(s._lib, name)
            if not name.startswith("twell_train_"): return fn
            def call(*a):
                t0 = time.perf_counter()
                try: return fn(*a)
                finally: acc["lib:" + name] = acc.get("lib:" + name, 0) + time.perf_counter() - t0
            return call
    r.lib = Timed(r.lib)
    f0 = wrap(r, "forward", "runner.forward"); b0 = wrap(r, "backward", "runner.backward")
    of = wrap(ops, "_train_forward_cuda", "op_impl.forward"); ob = wrap(ops, "_train_backward_cuda", "op_impl.backward")
    acc.clear(); torch.cuda.synchronize(); n = 50
    for _ in range(n): step()
    torch.cuda.synchronize()
    res = {k: v * 1e6 / n for k, v in acc.items()}
    ops._train_forward_cuda, ops._train_backward_cuda = of, ob
    # per-step synchronised: how long the GPU needs (wall with a sync after each step)
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(20):
        step(); torch.cuda.synchronize()
    res["synced_step_us"] = (time.perf_counter() - t0) * 1e6 / 20
    # a trivial autograd.Function forward + backward, and one torch op, on this host
    xi = torch.randn(M, D, device="cuda", requires_grad=True); g = torch.randn(M, D, device="cuda")
    for _ in range(10): torch.autograd.backward(Id.apply(xi), g)
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(200):
        xi.grad = None; torch.autograd.backward(Id.apply(xi), g)
    res["trivial_function_fwd_bwd_us"] = (time.perf_counter() - t0) * 1e6 / 200
    t0 = time.perf_counter()
    for _ in range(200): torch.empty((M, D), dtype=torch.bfloat16, device="cuda")
    res["torch_empty_us"] = (time.perf_counter() - t0) * 1e6 / 200
    t0 = time.perf_counter()
    for _ in range(200): xi.add(1)
    res["one_torch_op_us"] = (time.perf_counter() - t0) * 1e6 / 200
    torch.cuda.synchronize()
    out[M] = res
    print(M, json.dumps({k: round(v, 1) for k, v in res.items()}), flush=True)
