"""One rank of tests/test_averagers.py: the same training loop with our schedules and with
PyTorch's model averagers, on the same gloo world; writes ``out/rank{R}.pt`` with both
trajectories of this rank's agent (float64, every step).

Usage: python tests/averagers_worker.py SPEC_JSON, SPEC = {"out": folder, "steps": T}.
"""

import json
import os
import sys
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager  # noqa: E402
from torch.distributed.algorithms.model_averaging.hierarchical_model_averager import (  # noqa: E402
    HierarchicalModelAverager,
)

import topology  # noqa: E402
from launch.comm.torch_dist import TorchCommunicator  # noqa: E402
from launch.engine.simulation import Simulation  # noqa: E402
from tests import problems  # noqa: E402
from topology import decentralized as dec  # noqa: E402

WARMUP, TAU = 3, 2


def ours(comm, schedule, steps):
    """This rank's agent after every iteration of a Simulation of ``schedule``."""
    sim = Simulation(problems.make_model(0), problems.loss_fn, lambda i: problems.batches(1 + i), schedule,
                     problems.OPTIMIZERS["sgd_momentum"], comm=comm)
    rows = []
    for _ in range(steps):
        sim.step()
        rows.append(sim.agents[comm.rank].params.clone())
    return torch.stack(rows)


def theirs(rank, averagers, steps, optimizer="sgd_momentum", forward=None):
    """The same loop written the PyTorch way: the rank's own model and optimizer, and after every
    ``optimizer.step()`` each averager's ``average_parameters`` (``averagers``: list of
    (averager, last step s it is called on, or None for every step)).  ``rank``: the worker whose
    data stream is read; ``forward(model)``: the module the loop calls (a DDP wrapper; default
    the model itself)."""
    model = problems.make_model(0)
    net = model if forward is None else forward(model)
    inner = problems.OPTIMIZERS[optimizer](list(model.parameters()))
    data = problems.batches(1 + rank)
    rows = []
    for s in range(steps):
        inner.zero_grad(set_to_none=True)
        problems.loss_fn(net, next(data)).backward()
        inner.step()
        for averager, until in averagers:
            if until is None or s < until:
                averager.average_parameters(model.parameters())
        rows.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def main() -> int:
    spec = json.loads(sys.argv[1])
    steps = spec["steps"]
    comm = TorchCommunicator(device="cpu", timeout_s=60)
    world = comm.world_size
    results = {}
    try:
        # local_sgd(W, tau) averages after iterations t with (t + 1) % tau == 0:
        # PeriodicModelAverager(tau, warmup_steps=tau - 1), its counter s = t.
        results["local_sgd"] = (ours(comm, dec.local_sgd(world, TAU), steps),
                                theirs(comm.rank, [(PeriodicModelAverager(TAU, warmup_steps=TAU - 1), None)], steps))
        # Post-local SGD as one schedule: every step for WARMUP iterations, then every TAU from the
        # phase's start: an every-step averager for s < WARMUP, then
        # PeriodicModelAverager(TAU, warmup_steps=WARMUP + TAU - 1).
        phased = topology.phases([(WARMUP, dec.local_sgd(world, 1)), (None, dec.local_sgd(world, TAU))])
        results["phases"] = (ours(comm, phased, steps),
                             theirs(comm.rank, [(PeriodicModelAverager(1), WARMUP),
                                                (PeriodicModelAverager(TAU, warmup_steps=WARMUP + TAU - 1), None)],
                                    steps))
        # hierarchical(W, {p: g}): HierarchicalModelAverager with its counter started at 1.
        sizes = OrderedDict([(2, 2), (4, world)])
        averager = HierarchicalModelAverager(sizes)
        averager.step = 1
        results["hierarchical"] = (ours(comm, dec.hierarchical(world, dict(sizes)), steps),
                                   theirs(comm.rank, [(averager, None)], steps))
        # With the default counters PyTorch averages after s = 0, tau, 2 tau, ...: one step off.
        results["default_counters"] = (results["local_sgd"][0],
                                       theirs(comm.rank, [(PeriodicModelAverager(TAU), None)], steps))
        torch.save(results, os.path.join(spec["out"], f"rank{comm.rank}.pt"))
    finally:
        comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
