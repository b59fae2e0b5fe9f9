"""B1 (co-located overhead) and B5 (co-located gossip at scale): one process, interleaved rounds.

B1: time per iteration of co-located LA-1, LA-2, LA-4 (``launch.Simulation``) over the bare inner
optimizer, ``torch.optim.SGD(foreach=True)`` on the same MLP and the same batches; target
``1 + 1/k_1 + 0.05``.  Also the serial reference ``agents.reference.Lookahead`` over
torch-optimizer's ``Lookahead`` (same inner optimizer, k, alpha); target 1.0.

B5: time per iteration *per agent* of a co-located gossip ring (every agent a worker; agent j
averages itself and its two neighbours with weight 1/3 every iteration), for several numbers of
agents of the same small MLP; target: the largest within 1.2x of the smallest.
"""

from __future__ import annotations

import copy

import torch

import topology
from agents.reference import Lookahead
from launch.bench import workloads
from launch.bench.timing import interleave, median, per_call, ratio
from launch.engine.simulation import Simulation

LEVELS = {"LA-1": 1, "LA-2": 2, "LA-4": 4}


def sgd(lr: float = 0.01):
    return lambda params: torch.optim.SGD(params, lr=lr, foreach=True)


def bare_step(model, optimizer, data):
    def body():
        optimizer.zero_grad(set_to_none=True)
        workloads.loss_fn(model, next(data)).backward()
        optimizer.step()
    return body


def overhead(*, width: int, batch_size: int, k: int, units: int, repeats: int, device: str = "cpu") -> dict:
    """B1.  ``units`` iterations per round (a multiple of LA-4's period keeps rounds alike);
    ``device``: where the model, the agents and the batches live (on CUDA every round, not every
    step, ends with a synchronisation, inside its time).

    Each row's ``ratio`` is on wall-clock time, ``cpu_ratio`` on this process's CPU time."""
    model, fixed, finish = _on_device(workloads.mlp(width), batch_size, device)
    contenders = {}

    def timed(body):
        return per_call(body, finish)

    bare = copy.deepcopy(model)
    contenders["bare SGD"] = timed(bare_step(bare, sgd()(list(bare.parameters())), workloads.stream(fixed)))
    for name, depth in LEVELS.items():
        ks = (k,) + (2,) * (depth - 1)
        sim = Simulation(model, workloads.loss_fn, workloads.stream(fixed),
                         topology.multilayer(ks, (0.5,) * depth), sgd())
        contenders[name] = timed(sim.step)

    ours = copy.deepcopy(model)
    contenders["reference Lookahead"] = timed(bare_step(
        ours, Lookahead(sgd()(list(ours.parameters())), k=k, alpha=0.5), workloads.stream(fixed)))
    try:
        import torch_optimizer
    except ImportError:
        torch_optimizer = None
    if torch_optimizer is not None:
        theirs = copy.deepcopy(model)
        contenders["torch_optimizer.Lookahead"] = timed(bare_step(
            theirs, torch_optimizer.Lookahead(sgd()(list(theirs.parameters())), k=k, alpha=0.5),
            workloads.stream(fixed)))

    times = interleave(contenders, units=units, repeats=repeats)
    rows = []
    for name, depth in LEVELS.items():
        target = 1 + 1 / k + 0.05
        r = ratio(times, name, "bare SGD")
        rows.append({"name": f"{name} / bare SGD", "ratio": r, "target": target, "met": r <= target,
                     "cpu_ratio": ratio(times, name, "bare SGD", "cpu"),
                     "seconds": median(times[name]), "baseline_seconds": median(times["bare SGD"])})
    if torch_optimizer is not None:
        r = ratio(times, "reference Lookahead", "torch_optimizer.Lookahead")
        rows.append({"name": "reference Lookahead / torch_optimizer.Lookahead", "ratio": r,
                     "target": 1.0, "met": r <= 1.0,
                     "cpu_ratio": ratio(times, "reference Lookahead", "torch_optimizer.Lookahead", "cpu"), "seconds": median(times["reference Lookahead"]),
                     "baseline_seconds": median(times["torch_optimizer.Lookahead"])})
    else:
        rows.append({"name": "reference Lookahead / torch_optimizer.Lookahead",
                     "skipped": "torch-optimizer is not installed (pip install '.[dev]')"})
    return {"parameters": workloads.num_parameters(model), "batch_size": batch_size, "k_1": k,
            "device": str(device), "iterations_per_round": units, "repeats": repeats, "rows": rows}


def _on_device(model, batch_size: int, device: str):
    """``model`` and its fixed batches on ``device``, and what ends a timed round there (a CUDA
    synchronisation; nothing on the CPU)."""
    fixed = [(x.to(device), y.to(device)) for x, y in workloads.batches(model, batch_size)]
    return model.to(device), fixed, torch.cuda.synchronize if torch.device(device).type == "cuda" else None


def ring(m: int) -> torch.Tensor:
    """The ring gossip matrix: column j has 1/3 at j - 1, j and j + 1 (doubly stochastic)."""
    p = torch.zeros(m, m, dtype=torch.float64)
    for j in range(m):
        for i in (j - 1, j, j + 1):
            p[i % m, j] += 1.0 / 3.0
    return p


def scale(*, agents: tuple[int, ...], width: int, batch_size: int, units: int, repeats: int,
          device: str = "cpu") -> dict:
    """B5.  ``units`` agent-iterations per round for every size (rounded to whole iterations);
    ``device`` as in :func:`overhead`."""
    model, fixed, finish = _on_device(workloads.mlp(width), batch_size, device)
    contenders = {}
    for m in agents:
        contenders[str(m)] = per_agent(ring_simulation(model, fixed, m), m, finish)
    times = interleave(contenders, units=units, repeats=repeats)
    smallest = str(min(agents))
    rows = []
    for m in agents:
        r = ratio(times, str(m), smallest)
        rows.append({"name": f"{m} agents / {smallest} agents (per agent)", "ratio": r, "target": 1.2,
                     "met": r <= 1.2, "cpu_ratio": ratio(times, str(m), smallest, "cpu"),
                     "seconds_per_agent": median(times[str(m)])})
    return {"parameters": workloads.num_parameters(model), "batch_size": batch_size,
            "agent_iterations_per_round": units, "repeats": repeats, "rows": rows}


def ring_simulation(model, fixed: list, m: int) -> Simulation:
    """A co-located gossip ring of ``m`` workers of ``model``, each cycling over ``fixed``."""
    return Simulation(model, workloads.loss_fn, lambda i: workloads.stream(fixed), topology.from_matrices([ring(m)]),
                      sgd())


def per_agent(sim: Simulation, m: int, finish=None):
    """Contender: about ``n`` agent-iterations (whole iterations), (wall, CPU) s per agent-iteration."""
    def run(n: int) -> tuple[float, float]:
        iterations = max(1, round(n / m))
        wall, cpu = per_call(sim.step, finish)(iterations)
        return wall / m, cpu / m
    return run
