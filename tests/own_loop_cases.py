"""The user's own training loop of the AgentOptimizer tests, and one run of each case.

The loop, its data and optimizers are experiments.own_loop_deviation's (the command that
measures the README's deviations): a finite DataLoader over a seeded regression dataset, several
epochs, gradient clipping, a StepLR stepped per epoch, and optionally bfloat16 autocast with a
GradScaler and gradient accumulation.  Everything is a pure function of its arguments, so the
serial reference, the co-located AgentOptimizer and every rank of a multi-process run see the
same model, data and loop.
"""

from __future__ import annotations

import torch
from torch import nn

from experiments import own_loop_deviation as deviation
from tests import problems

INNER = deviation.INNER
dataset, loader, train = deviation.dataset, deviation.loader, deviation.train


def model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    return problems.make_model(seed, dtype)


def stack(params: dict[int, torch.Tensor]) -> torch.Tensor:
    """The local agents' flat parameters as rows, in agent order (copies)."""
    return torch.stack([params[i].detach().clone() for i in sorted(params)])


# -- one run of a case, on any communicator (co-located: comm=None) ----------------------------------
def _stats(comm) -> dict:
    from dataclasses import asdict

    return asdict(comm.stats) if comm is not None else {}


class Recorder:
    """Snapshots of this rank's agents (t, every local agent's flat parameters) and the
    communication counted between snapshots (evaluations excluded: see ``exclude``)."""

    def __init__(self, opt, comm):
        self.opt, self.comm = opt, comm
        self.record = {"agents": sorted(opt.agents), "is_worker": opt.is_worker, "t": [], "rows": [],
                       "deltas": [], "evals": []}
        self._last = _stats(comm)
        self.snapshot()

    def snapshot(self, *_):
        now = _stats(self.comm)
        self.record["t"].append(self.opt.t)
        self.record["rows"].append(stack(self.opt.local_parameters()))
        self.record["deltas"].append({k: now[k] - self._last[k] for k in now})
        self._last = now

    def exclude(self):
        """What was counted since the last snapshot is not a step's (an evaluation's)."""
        self._last = _stats(self.comm)

    def evaluate(self, model, targets):
        for target in targets:
            with self.opt.evaluating(**target):
                self.record["evals"].append((self.opt.t, target, problems.flat_parameters(model).clone()))
        self.exclude()

    def result(self) -> dict:
        return {**self.record, "rows": torch.stack(self.record["rows"])}


def lookahead_case(case: dict, comm=None) -> dict:
    """A multilayer Lookahead case driven by :func:`train` (workers) or ``serve`` (passive ranks).

    ``case``: ks, alphas, inner, policy, epochs, and optionally agents_per_rank, overlap, outer
    ({"sgd": kwargs} for an outer SGD rule).  Ranks other than 0 start from other values (the
    broadcast of rank 0's must override them)."""
    import topology
    from launch import AgentOptimizer

    rank = comm.rank if comm is not None else 0
    schedule = topology.multilayer(case["ks"], case["alphas"])
    net = model(0 if rank == 0 else 100 + rank)
    outer = None
    if case.get("outer"):
        from agents.outer import OuterOptimizer

        outer = OuterOptimizer(lambda params: torch.optim.SGD(params, **case["outer"]["sgd"]))
    opt = AgentOptimizer(INNER[case["inner"]](net.parameters()), schedule, model=net, comm=comm,
                         state_policy=case.get("policy", "maintain"), agents_per_rank=case.get("agents_per_rank"),
                         overlap=case.get("overlap", False), outer=outer)
    rec = Recorder(opt, comm)
    targets = [{"level": l} for l in range(1, len(case["ks"]) + 1)] + [{"virtual": True}]
    if opt.is_worker:
        train(net, opt, loader(), case["epochs"], rec.snapshot, on_epoch=lambda: rec.evaluate(net, targets))
        state = opt.gather_state_dict()        # passive ranks take part through serve()
        rec.record["gathered"] = (state["t"], {i: e["buffer"] for i, e in state["agents"].items()})
        opt.close()
    else:
        opt.serve(rec.snapshot)
    return rec.result()


def workers_case(case: dict, comm=None) -> dict:
    """Every rank a worker (``case["schedule"]``: ``local_sgd`` | ``ring`` | ``push_sum``, 4
    workers), each reading problems.batches(1 + agent) as Simulation's worker does, with the
    plain loop ``zero_grad; loss.backward(); step`` for ``case["steps"]`` steps."""
    import itertools

    from launch import AgentOptimizer

    schedule = worker_schedule(case["schedule"])
    net = problems.make_model(0)
    opt = AgentOptimizer(problems.OPTIMIZERS[case["inner"]](list(net.parameters())), schedule, model=net,
                         comm=comm, state_policy=case.get("policy", "maintain"))
    rec = Recorder(opt, comm)
    agent = schedule.workers[opt.worker_index]
    for batch in itertools.islice(problems.batches(1 + agent), case["steps"]):
        opt.zero_grad()
        problems.loss_fn(net, batch).backward()
        opt.step()
        rec.snapshot()
    rec.evaluate(net, [{"virtual": True}])
    opt.close()
    return rec.result()


def worker_schedule(name: str):
    import topology

    if name == "local_sgd":
        return topology.decentralized.local_sgd(4, 3)
    if name == "ring":
        return topology.decentralized.ring(4)
    if name == "push_sum":
        return topology.decentralized.push_sum_random(4, extra_edges=2, seed=0)
    raise ValueError(name)


def resume_case(case: dict, comm=None) -> dict:
    """Resume from gather_state_dict: LA-2 (Adam, pullback, ``overlap`` as given) for
    ``case["steps"]`` steps, the state gathered before step ``case["at"]`` and saved to
    ``case["path"]``; then on every rank a fresh AgentOptimizer on a model with other initial
    values loads it and takes the remaining steps.  Returns both runs' final local buffers."""
    import itertools
    import os

    import topology
    from launch import AgentOptimizer

    rank = comm.rank if comm is not None else 0
    schedule = topology.multilayer(case["ks"], case["alphas"])

    def run(seed, start, at=None):
        net = problems.make_model(seed)
        opt = AgentOptimizer(problems.OPTIMIZERS["adam"](list(net.parameters())), schedule, model=net, comm=comm,
                             state_policy="pullback", overlap=case.get("overlap", False))
        if start:
            opt.load_state_dict(torch.load(case["path"]))
        if not opt.is_worker:
            opt.serve()
        else:
            for batch in itertools.islice(problems.batches(1), start, case["steps"]):
                if opt.t == at:
                    torch.save(opt.gather_state_dict(), case["path"])
                opt.zero_grad()
                problems.loss_fn(net, batch).backward()
                opt.step()
            opt.close()
        return {i: a.flat.buffer.clone() for i, a in opt.agents.items()}

    first = run(rank, 0, at=case["at"])
    if comm is not None:
        comm.barrier()                       # the file is written
    assert os.path.exists(case["path"])
    return {"first": first, "second": run(100 + rank, case["at"])}
