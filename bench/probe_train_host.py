"""Where the host time of a training forward + backward through ``twell.torch`` goes.

``python3 bench/probe_train_host.py`` (a GPU and the built library; D x H = 2048 x 5632, M = 16 and
2048, 50 steps each). Every number is microseconds per step, host wall time:

- ``apply`` / ``backward_call``: ``ffn_with_l1`` and ``torch.autograd.backward((y, l1), (dy, dl1))``;
- ``checks.forward``: the forward's argument checks and plan lookup (``ops._train_prepare``);
- ``op_impl.backward``: the backward's checks + runner (``ops._train_backward_run``);
- ``runner.*``: the runners (descriptors, allocations, the library calls);
- ``lib:*``: inside the C library (launches and the kernels' host waits);
- ``synced_step_us``: one step with a device synchronisation after it (what the GPU needs);
- ``trivial_function_fwd_bwd_us``, ``torch_empty_us``, ``one_torch_op_us``: what an
  ``autograd.Function`` that does nothing, one allocation and one elementwise op cost on this host.

So ``apply - checks.forward - runner.forward`` is autograd.Function's share of the forward,
``backward_call - op_impl.backward`` the engine's share of the backward, ``runner - lib`` the
runners' Python and ``op_impl.backward - runner.backward`` the backward's checks. Prints one JSON line per M.
"""

import json
import time

import torch

import twell.torch as tt
from twell.bench.pytorch import TimedLibrary, inputs, timed
from twell.torch import _runtime as rt
from twell.torch import ops


class _Id(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view(x.shape)

    @staticmethod
    def backward(ctx, g):
        return g


def _per_call_us(fn, n=200):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1e6 / n


def probe(M, D=2048, H=5632, steps=50):
    x, sets = inputs(torch, D, H, M, 0.005, seed=1)
    leaves = [t.detach().clone().requires_grad_() for t in (x, *sets[0])]
    dy = torch.randn_like(x)
    dl1 = torch.full((1,), 1e-3, device="cuda")
    key = tt.new_plan_key()
    acc = {}

    def step():
        for a in leaves:
            a.grad = None
        t0 = time.perf_counter()
        y, l1 = tt.ffn_with_l1(*leaves, w_down_layout="dh", plan=key)
        t1 = time.perf_counter()
        torch.autograd.backward((y, l1), (dy, dl1))
        acc["apply"] = acc.get("apply", 0.0) + t1 - t0
        acc["backward_call"] = acc.get("backward_call", 0.0) + time.perf_counter() - t1

    for _ in range(3):
        step()
    runner = next(r for r in rt.runners_of(key) if isinstance(r, rt.TrainRunner))
    saved = (runner.lib, ops._train_prepare, ops._train_backward_run)
    runner.lib = TimedLibrary(runner.lib, acc, lambda name: "lib:" + name)
    runner.forward = timed(acc, "runner.forward", runner.forward)
    runner.backward = timed(acc, "runner.backward", runner.backward)
    ops._train_prepare = timed(acc, "checks.forward", ops._train_prepare)
    ops._train_backward_run = timed(acc, "op_impl.backward", ops._train_backward_run)
    try:
        acc.clear()
        torch.cuda.synchronize()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    finally:
        runner.lib, ops._train_prepare, ops._train_backward_run = saved
        del runner.forward, runner.backward
    res = {k: v * 1e6 / steps for k, v in acc.items()}

    def synced():
        step()
        torch.cuda.synchronize()

    res["synced_step_us"] = _per_call_us(synced, 20)
    xi = torch.randn(M, D, device="cuda", requires_grad=True)
    g = torch.randn(M, D, device="cuda")

    def trivial():
        xi.grad = None
        torch.autograd.backward(_Id.apply(xi), g)

    trivial()
    res["trivial_function_fwd_bwd_us"] = _per_call_us(trivial)
    res["torch_empty_us"] = _per_call_us(lambda: torch.empty((M, D), dtype=torch.bfloat16, device="cuda"))
    res["one_torch_op_us"] = _per_call_us(lambda: xi.add(1))
    torch.cuda.synchronize()
    return res


def main():
    for M in (16, 2048):
        print(M, json.dumps({k: round(v, 1) for k, v in probe(M).items()}), flush=True)


if __name__ == "__main__":
    main()
