"""End-to-end exactness: real training through :class:`launch.Simulation` with ``exact=True``, on
ranks, against the same training co-located, step by step (used by
tests/exact_worker.py, ``training=True``, on every rank).

A case: ``schedule`` (a spec of :func:`tests.exact_cases.make_schedule`), ``dtype``, ``steps``,
optionally ``optimizer`` (``sgd``: SGD with momentum 0.9, the default; ``adam``),
``agents_per_rank``, ``overlap`` (the engine's option; default ``"auto"``), ``outer`` (an outer
SGD's momentum: a slow rule), ``policy`` (a state policy), ``default`` (also run the default
mode, distributed and co-located, to show that they differ and that the difference grows).

The problem is scikit-learn's digits and a 64 -> 32 -> 10 MLP (:func:`experiments.digits.digits_mlp`),
batches of 16 drawn by agent index (the same batches whatever the layout).  Every rank runs the
co-located simulation of every agent beside the distributed one and compares the buffers of its
own agents after every iteration (parameters, and the mixable optimizer state under
``pullback``), bit for bit.
"""

from __future__ import annotations

import torch

from experiments.digits import digits_mlp
from launch.comm.local import LocalCommunicator
from launch.engine.simulation import Simulation
from tests.exact_cases import BITS, DTYPES, make_schedule

HIDDEN, BATCH = 32, 16
#: The default mode's deviation from its co-located run is read at these iterations (the last one
#: is the case's last step).
EARLY = 30


def optimizer_factory(name: str):
    if name == "adam":
        return lambda params: torch.optim.Adam(params, lr=1e-3)
    return lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)


def make_outer(momentum):
    if momentum is None:
        return None
    from agents.outer import OuterOptimizer

    return OuterOptimizer(lambda params: torch.optim.SGD(params, lr=0.7, momentum=momentum, nesterov=True))


def simulation(case: dict, comm, exact: bool) -> Simulation:
    """The case's simulation on ``comm`` (co-located: a ``LocalCommunicator``)."""
    problem = digits_mlp(hidden=HIDDEN, batch_size=BATCH, seed=0)
    torch.manual_seed(0)
    model = problem.model()
    colocated = isinstance(comm, LocalCommunicator)
    return Simulation(model, problem.loss_fn, problem.batches, make_schedule(case["schedule"]),
                      optimizer_factory(case.get("optimizer", "sgd")), comm=comm, dtype=DTYPES[case["dtype"]],
                      state_policy=case.get("policy", "maintain"), outer=make_outer(case.get("outer")),
                      overlap=case.get("overlap", "auto"), exact=exact,
                      agents_per_rank=None if colocated else case.get("agents_per_rank"))


def bits(agent) -> torch.Tensor:
    """The agent's whole flat buffer (parameters and mixable state) as integers: bit for bit."""
    buffer = agent.flat.buffer
    return buffer.view(BITS[buffer.dtype])


def deviation(run: Simulation, reference: Simulation) -> float:
    return max(float((run.agents[i].flat.buffer.double() - reference.agents[i].flat.buffer.double()).abs().max())
               for i in run.agents)


def run_case(case: dict, comm) -> dict:
    """The case on ``comm`` against the co-located run, in lockstep: how many (iteration, agent)
    pairs differ in the exact mode; in the default mode (when asked) the same count and its
    deviation at iteration :data:`EARLY` and at the last; the strategies the exact programs took."""
    runs = {"exact": simulation(case, comm, True), "co-located": simulation(case, LocalCommunicator(), True)}
    if case.get("default"):
        runs["default"] = simulation(case, comm, False)
        runs["co-located default"] = simulation(case, LocalCommunicator(), False)
    mismatches, deviations = {"exact": 0, "default": 0}, []
    for t in range(1, case["steps"] + 1):
        for run in runs.values():
            run.step()
        for name, reference in (("exact", "co-located"), ("default", "co-located default")):
            if name in runs:
                run, ref = runs[name], runs[reference]
                mismatches[name] += sum(not torch.equal(bits(run.agents[i]), bits(ref.agents[i])) for i in run.agents)
        if "default" in runs and t in (EARLY, case["steps"]):
            deviations.append(deviation(runs["default"], runs["co-located default"]))
    exact = runs["exact"]
    return {"mismatches": mismatches, "deviations": deviations, "steps": case["steps"], "agents": sorted(exact.agents),
            "strategies": sorted({type(b).__name__ for p in exact.engine.programs
                                  for b in getattr(p, "workers", p).blocks})}
