"""One of 2 gloo ranks of local SGD (2 workers, averaging every 2 steps) in an own loop with a
GradScaler on the CPU; rank 1's loss at iteration 3 is infinite.  ``python
tests/own_loop_amp_worker.py SPEC`` with SPEC ``{"out"}``; writes ``rank<R>.pt``: the counter after
every iteration, the parameters after every iteration, and the final parameters."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from launch import AgentOptimizer  # noqa: E402
from launch.comm.torch_dist import TorchCommunicator  # noqa: E402
from topology import decentralized  # noqa: E402

STEPS, INF_AT, INF_RANK = 7, 3, 1


def main() -> int:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    comm = TorchCommunicator(device="cpu", timeout_s=60)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = AgentOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decentralized.local_sgd(2, tau=2),
                         model=model, comm=comm)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    g = torch.Generator().manual_seed(1 + comm.rank)
    ts, params = [], []
    for it in range(STEPS):
        x = torch.randn(8, 4, generator=g)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        if it == INF_AT and comm.rank == INF_RANK:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        ts.append(opt.t)
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
    opt.close()
    torch.save({"t": ts, "params": params}, os.path.join(spec["out"], f"rank{comm.rank}.pt"))
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
