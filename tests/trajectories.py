"""Record every agent's parameters at every step: serially, co-located, or on one rank."""

from __future__ import annotations

import torch

from agents.reference import MultilayerLookahead
from launch.engine.simulation import Simulation
from tests import problems


def reference_trajectory(ks, alphas, optimizer: str, policy: str, steps: int, seed: int = 0, wrap=None):
    """Serial MultilayerLookahead: a (steps, n + 1, d) tensor: fast weights, then slow levels.

    ``wrap(inner)`` builds another reference (OuterLookahead, AdaptiveLookahead) with ``len(ks)``
    levels instead."""
    model = problems.make_model(seed)
    inner = problems.OPTIMIZERS[optimizer](list(model.parameters()))
    if wrap is not None:
        la = wrap(inner)
    else:
        la = MultilayerLookahead(inner, ks, alphas, state_policy=policy)
    data = problems.batches(seed + 1)
    rows = []
    for _ in range(steps):
        la.zero_grad()
        problems.loss_fn(model, next(data)).backward()
        la.step()
        columns = [problems.flat_parameters(model)]
        columns += [torch.cat([s.reshape(-1) for s in la.slow_params(l)]) for l in range(1, len(ks) + 1)]
        rows.append(torch.stack(columns))
    return torch.stack(rows)


def simulation_trajectory(schedule, optimizer: str, policy: str, steps: int, seed: int = 0,
                          comm=None, agents_per_rank=None, outer=None):
    """Simulation: a (steps, local agents, d) tensor and the sorted local agent indices."""
    data = problems.batches(seed + 1)
    if len(schedule.workers) > 1:  # worker i reads its own stream, as in tests/dist_worker.py
        data = lambda i: problems.batches(seed + 1 + i)  # noqa: E731
    sim = Simulation(
        problems.make_model(seed), problems.loss_fn, data, schedule,
        problems.OPTIMIZERS[optimizer], state_policy=policy, comm=comm, agents_per_rank=agents_per_rank,
        outer=outer,
    )
    rows = []
    for _ in range(steps):
        sim.step()
        params = sim.local_parameters()
        rows.append(torch.stack([params[i].clone() for i in sorted(params)]))
    return torch.stack(rows), sorted(sim.agents)


def relative_deviation(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|: the deviation relative to the parameters' scale."""
    return float((a - b).abs().max() / b.abs().max())
