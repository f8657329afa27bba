"""Why an eager training step through ``twell.torch`` takes longer than its captured form.

``python3 bench/probe_train_eager.py [M ...]`` (a GPU and the built library; D x H = 2048 x 5632,
uniform 0.5%; M = 16 and 2048 by default). For each M, five eager steps back to back under
``torch.profiler`` (CPU and CUDA activity), after warm-up steps that make every call replay. Prints,
per M, one JSON line: the wall time per step, the GPU time per step that the kernels take (sum of
kernel durations) and their span (first start to last end), the host-side CUDA API calls that took
the most time (a wait shows up as a long cudaStreamSynchronize, cudaEventSynchronize, cudaMemcpy or
a long cudaGraphLaunch) and the kernels that took the most GPU time.
"""

import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import twell.torch as tt
from twell.bench.pytorch import inputs


def probe(M, D=2048, H=5632, steps=5):
    x, sets = inputs(torch, D, H, M, 0.005, seed=1)
    leaves = [t.detach().clone().requires_grad_() for t in (x, *sets[0])]
    dy = torch.randn_like(x).float()
    key = tt.new_plan_key()

    def step():
        for a in leaves:
            a.grad = None
        y, l1 = tt.ffn_with_l1(*leaves, w_down_layout="dh", plan=key)
        ((y.float() * dy).sum() + 1e-4 * l1.sum()).backward()

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6 / steps
    events = prof.events()
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    start = min((e.time_range.start for e in gpu), default=0)
    end = max((e.time_range.end for e in gpu), default=0)
    busy = sum(e.time_range.elapsed_us() for e in gpu)
    api = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("cuda"):
            n, t, mx = api.get(e.name, (0, 0.0, 0.0))
            d = e.time_range.elapsed_us()
            api[e.name] = (n + 1, t + d, max(mx, d))
    kern = {}
    for e in gpu:
        n, t = kern.get(e.name, (0, 0.0))
        kern[e.name] = (n + 1, t + e.time_range.elapsed_us())
    top_api = sorted(api.items(), key=lambda kv: -kv[1][1])[:12]
    top_k = sorted(kern.items(), key=lambda kv: -kv[1][1])[:15]
    print(
        json.dumps(
            {
                "M": M,
                "wall_us_per_step": round(wall_us, 1),
                "gpu_busy_us_per_step": round(busy / steps, 1),
                "gpu_span_us_per_step": round((end - start) / steps, 1),
                "gpu_events": len(gpu),
                "api_us_per_step (calls, total, max)": {
                    k: (n // steps, round(t / steps, 1), round(mx, 1)) for k, (n, t, mx) in top_api
                },
                "kernels_us_per_step (calls, total)": {
                    k[:60]: (round(n / steps, 1), round(t / steps, 1)) for k, (n, t) in top_k
                },
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    for m in [int(a) for a in sys.argv[1:]] or [16, 2048]:
        probe(m)
