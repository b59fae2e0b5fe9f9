"""Diagnostics of a running simulation, for the metrics log: consensus distance, per-agent losses,
the schedule's spectral gap.

Every function here that reads other ranks' agents is a collective (it goes through
``comm.all_gather_object``, which is not counted in ``comm.stats``, under the lost-rank handler
:func:`launch.engine.guard.health.gather_objects`): call it on every rank, at the same step.  Values are identical on every rank.

* :func:`consensus_distance` -- sqrt( (1/|S|) sum_{i in S} ||z_i - zbar||^2 ), zbar = (1/|S|) sum_{i
  in S} z_i, over a set S of agents (default: the schedule's workers), with z_i the agent's model
  (the de-biased x_i / w_i under push-sum).  0 when the agents agree.
* :func:`agent_losses` -- every worker's training loss of the step (evaluated before its update,
  at z_i), gathered from all ranks.
* :class:`MetricsHook` -- a ``Simulation.run`` callback that turns both, plus
  :func:`topology.diagnostics.spectral_gap`, into one flat row per logged step and hands it to
  ``log(row)`` (e.g. a CSV writer on rank 0).

Example:
    >>> import torch
    >>> from topology import decentralized
    >>> from launch import Simulation
    >>> from experiments.problems import teacher_student
    >>> p = teacher_student(dim=4, hidden=4)
    >>> sim = Simulation(p.model(), p.loss_fn, p.batches, decentralized.ring(4),
    ...                  lambda params: torch.optim.SGD(params, lr=0.05))
    >>> rows = []
    >>> sim.run(3, MetricsHook(rows.append))
    >>> sorted(rows[-1])[:4], rows[-1]["step"]
    (['consensus_distance', 'loss/agent0', 'loss/agent1', 'loss/agent2'], 3)
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from launch.engine.guard.health import gather_objects
from topology.diagnostics import spectral_gap


def local_models(sim) -> dict[int, torch.Tensor]:
    """``{agent: z_i}`` of this rank's agents: the model of each, de-biased under push-sum
    (:meth:`agents.agent.Agent.debiased`: x_i / w_i, a new tensor; else x_i, a live view), packed
    as :meth:`launch.Simulation.local_parameters` (no padding: :mod:`agents.flat`).  Every
    consensus distance of the project (:func:`consensus_distance`, the per-agent column of
    ``metrics.csv``, :class:`launch.cli.metrics.MetricsProbe`) is measured on these."""
    return {i: agent.flat.pack(agent.debiased()) for i, agent in sim.agents.items()}


def _gathered(sim, local: dict) -> dict:
    merged: dict = {}
    for part in gather_objects(sim.comm, local, sim.t, "diagnostics' gather"):
        merged.update(part)
    return merged


@torch.no_grad()
def consensus_distance(sim, agents: Iterable[int] | None = None) -> float:
    """The consensus distance of ``agents`` (default: the workers); a collective on every rank.

    Two gathers of d-vectors per call (the local sum, then the local squared distances), whatever
    the number of agents per rank; co-located nothing moves.
    """
    members = sorted(set(sim.schedule.workers if agents is None else agents))
    if not members or not all(0 <= i < sim.schedule.num_agents for i in members):
        raise ValueError(f"agents must be agent indices in [0, {sim.schedule.num_agents}); got {members}")
    models = local_models(sim)
    local = {i: models[i] for i in members if i in models}
    # Pass 1: zbar from the per-rank sums (summed in rank order: the same bits on every rank).
    total = None
    for part in gather_objects(sim.comm, {sim.rank: torch.stack(list(local.values())).sum(0).cpu() if local else None},
                               sim.t, "consensus distance's gather"):
        for value in part.values():
            if value is not None:
                total = value.clone() if total is None else total + value
    mean = total / len(members)
    # Pass 2: the sum of squared distances (no cancellation, unlike E||z||^2 - ||zbar||^2).
    squares = sum(float(((z.cpu() - mean) ** 2).sum()) for z in local.values())
    return (sum(gather_objects(sim.comm, squares, sim.t, "consensus distance's gather")) / len(members)) ** 0.5


def agent_losses(sim, losses: dict) -> dict[int, float]:
    """Every worker's loss of the step, ``{agent: loss}`` from the per-rank ``losses`` that
    ``Simulation.step`` returns; a collective on every rank."""
    return dict(sorted(_gathered(sim, {i: float(v) for i, v in losses.items()}).items()))


class MetricsHook:
    """A ``Simulation.run(steps, callback)`` callback: every ``every`` steps, builds

        {"step": t, "consensus_distance": ..., "loss_mean": ..., "loss/agent{i}": ...,
         "spectral_gap": ..., "spectral_gap_per_step": ...}

    (``step``: iterations done, i.e. ``sim.t`` after the step) and calls ``log(row)`` on every
    rank.  The spectral gaps are the schedule's (:func:`topology.diagnostics.spectral_gap`),
    computed once.  ``extra(sim) -> dict`` adds columns (e.g. held-out losses).
    """

    def __init__(self, log: Callable[[dict], None], every: int = 1, agents: Iterable[int] | None = None,
                 extra: Callable[[object], dict] | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1; got {every!r}")
        self.log, self.every, self.extra = log, every, extra
        self.agents = None if agents is None else tuple(agents)
        self._gaps: dict[int, tuple[float, float]] = {}

    def gaps(self, schedule) -> tuple[float, float]:
        key = id(schedule)
        if key not in self._gaps:
            self._gaps[key] = (spectral_gap(schedule), spectral_gap(schedule, per_step=True))
        return self._gaps[key]

    def __call__(self, sim, losses: dict) -> None:
        if sim.t % self.every:
            return
        per_agent = agent_losses(sim, losses)
        gap, gap_per_step = self.gaps(sim.schedule)
        row = {
            "step": sim.t,
            "consensus_distance": consensus_distance(sim, self.agents),
            "loss_mean": sum(per_agent.values()) / len(per_agent) if per_agent else float("nan"),
            "spectral_gap": gap,
            "spectral_gap_per_step": gap_per_step,
        }
        row.update({f"loss/agent{i}": v for i, v in per_agent.items()})
        if self.extra is not None:
            row.update(self.extra(sim))
        self.log(row)
