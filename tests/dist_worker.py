"""One rank of a multi-process test: runs a simulation and saves what it saw.

Usage: python tests/dist_worker.py SPEC_JSON.  SPEC keys: backend (torch | mpi), ks, alphas,
optimizer, policy, steps, out (a folder), and optionally overlap, agents_per_rank, matrices (instead of
ks/alphas), workers, timeout_s, scramble_init, wider_model_on_rank, outer (see make_outer), slrla (a list
of agents.slrla.Stage kwargs: the schedule is their stagewise Lookahead).  Writes
``out/rank{R}.pt`` ({"agents", "trajectory", "all_reduces", "sends", "bytes", "reduces",
"broadcasts": per step, the last two as (count, bytes)}) or, on a
ValueError, ``out/rank{R}.err`` with its message and exit status 3.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import topology  # noqa: E402
from launch.engine.simulation import Simulation  # noqa: E402
from tests import problems  # noqa: E402


def make_comm(spec):
    if spec["backend"] == "mpi":
        from launch.comm.mpi import MPICommunicator

        return MPICommunicator()
    from launch.comm.torch_dist import TorchCommunicator

    return TorchCommunicator(device=spec.get("device", "cpu"), timeout_s=spec.get("timeout_s", 60))


def make_outer(spec):
    """spec["outer"]: {"sgd": {torch.optim.SGD kwargs}} or {"adaptive": alpha_low}, or absent."""
    outer = spec.get("outer")
    if outer is None:
        return None
    if "adaptive" in outer:
        from agents.adaptive import AdaptiveAlpha

        return AdaptiveAlpha(outer["adaptive"])
    from agents.outer import OuterOptimizer

    return OuterOptimizer(lambda params: torch.optim.SGD(params, **outer["sgd"]))


def main() -> int:
    spec = json.loads(sys.argv[1])
    comm = make_comm(spec)
    out = spec["out"]
    try:
        controller, optimizer = None, problems.OPTIMIZERS[spec["optimizer"]]
        if "slrla" in spec:  # stagewise locally-regularized Lookahead: stages as Stage kwargs
            from agents.slrla import SLRLAController, proximal

            controller = SLRLAController(spec["slrla"])
            schedule = topology.stagewise_lookahead(controller.stages)
            optimizer = proximal(optimizer)
        elif "matrices" in spec:
            schedule = topology.from_matrices(spec["matrices"], workers=spec.get("workers"))
        else:
            schedule = topology.multilayer(spec["ks"], spec["alphas"])
        model = problems.make_model(0)
        if spec.get("wider_model_on_rank") == comm.rank:
            model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 2)).double()
        if spec.get("scramble_init") and comm.rank > 0:
            # A different theta_0 on every other rank: the broadcast of rank 0's must override it.
            model = problems.make_model(100 + comm.rank)
        data = problems.batches(1)
        if len(schedule.workers) > 1:
            data = lambda agent: problems.batches(1 + agent)  # noqa: E731
        device = getattr(comm, "device", torch.device("cpu"))
        if device.type == "cuda":  # NCCL: parameters and batches on this rank's GPU
            stream = data
            data = lambda agent: ((x.to(device), y.to(device)) for x, y in  # noqa: E731
                                  (stream(agent) if callable(stream) else stream))
        sim = Simulation(
            model, problems.loss_fn, data, schedule, optimizer,
            state_policy=spec["policy"], comm=comm, agents_per_rank=spec.get("agents_per_rank"),
            device=device, outer=make_outer(spec), overlap=spec.get("overlap", False),
        )
        rows, all_reduces, sends, nbytes, reduces, broadcasts = [], [], [], [], [], []
        if controller is not None:
            controller.start(sim)
        for _ in range(spec["steps"]):
            before = (comm.stats.all_reduces, comm.stats.sends, comm.stats.all_reduce_bytes + comm.stats.send_bytes)
            overlapped = (comm.stats.reduces, comm.stats.block_broadcasts, comm.stats.reduce_bytes,
                          comm.stats.block_broadcast_bytes)
            sim.step()
            if controller is not None:
                controller(sim)
            all_reduces.append(comm.stats.all_reduces - before[0])
            sends.append(comm.stats.sends - before[1])
            nbytes.append(comm.stats.all_reduce_bytes + comm.stats.send_bytes - before[2])
            reduces.append((comm.stats.reduces - overlapped[0], comm.stats.reduce_bytes - overlapped[2]))
            broadcasts.append((comm.stats.block_broadcasts - overlapped[1],
                               comm.stats.block_broadcast_bytes - overlapped[3]))
            params = sim.local_parameters()
            rows.append(torch.stack([params[i].detach().cpu().clone() for i in sorted(params)]))
        torch.save(
            {"agents": sorted(sim.agents), "trajectory": torch.stack(rows), "all_reduces": all_reduces,
             "sends": sends, "bytes": nbytes, "reduces": reduces, "broadcasts": broadcasts,
             "gathered": sim.gather_parameters()},
            os.path.join(out, f"rank{comm.rank}.pt"),
        )
    except ValueError as err:
        with open(os.path.join(out, f"rank{comm.rank}.err"), "w") as f:
            f.write(str(err))
        comm.close()
        return 3
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
