"""Where one training step's GPU time goes: run `M pattern [path]` (bench-train's synthetic inputs,
D=2048, H=5632) twice to warm up, then once between cudaProfilerStart/Stop, for
`ncu --profile-from-start off` (bench/run_gpu.sh's "profile" step prints the kernel list). Replay of
repeated calls is off here, so the step is the eager launch sequence (with its host waits)."""
import sys

import torch

from twell import train_ops
from twell.bench.train import make_inputs

m, pattern = int(sys.argv[1]), sys.argv[2]
path = sys.argv[3] if len(sys.argv) > 3 else "sparse"
x, wg, wu, wd, dy = make_inputs(torch, 2048, 5632, m, pattern, 0.005, 0)
plan = train_ops.TrainPlan(2048, 5632, ell_width=64, path=path)
plan.set_replay(0)  # every kernel launched on its own (ncu does not see inside conditional graph nodes)
bufs = {}


def step():
    y, saved = plan.forward(x, wg, wu, wd, out=bufs.get("y"), saved=bufs.get("saved"))
    bufs.update(y=y, saved=saved)
    out = plan.backward(dy, saved, x, wg, wu, wd, l1_coeff=1e-4, dx=bufs.get("dx"), dw_gate=bufs.get("dwg"),
                        dw_up=bufs.get("dwu"), dw_down=bufs.get("dwd"))
    bufs.update(dx=out[0], dwg=out[1], dwu=out[2], dwd=out[3])


for _ in range(3):
    step()
torch.cuda.synchronize()
torch.cuda.profiler.start()
step()
torch.cuda.synchronize()
torch.cuda.profiler.stop()
print(bufs["saved"].read_stats())
