"""The record of an own-loop run: the command line's files, written from the user's loop.

:meth:`launch.AgentOptimizer.record` starts it, on every rank; the loop then passes each step's
loss to ``opt.step(loss=loss)``.  It is the command line's record
(:class:`launch.engine.record.recorder.RunRecord`, the same files in the same format, so
``python -m launch.plot`` and ``python -m launch.compare`` read them unchanged):

- ``metrics.csv``: every ``log_every``-th step (default: the schedule's period), every agent's
  training loss (the value given to ``step(loss=...)``; empty when none was) and gradient norm,
  and its distance to the virtual iterate X a, measured after the inner step and before the sync;
  the simulated time with a cluster;
- ``eval.csv``: at each :meth:`LoopRecord.evaluate` (and every ``eval_every`` steps when given),
  the held-out metrics of every agent and of X a (``evaluate(model) -> {metric: value}``, called on
  a copy of the user's model holding those weights and the worker's buffers), and the learning
  rates;
- ``summary.json``: when the run closes (:meth:`launch.AgentOptimizer.close`).

Every call of the record is a collective when the run spans several ranks: the passive ranks take
part through :meth:`launch.AgentOptimizer.serve`, told by the control messages (a logged step rides
on the sync's, or sends one of its own; an evaluation sends one).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from launch.engine.record.clock import SimulatedTime, simulated_hubs, simulated_placement
from launch.engine.record.recorder import RunRecord
from launch.engine.record.run import EngineRun


class LoopRun(EngineRun):
    """The own loop's run: an engine run whose worker's buffers are the user's model's."""

    def __init__(self, engine, model: nn.Module):
        super().__init__(engine)
        self.model = model

    def worker_buffers(self) -> dict[int, dict[str, torch.Tensor]]:
        return {i: dict(self.model.named_buffers()) for i, a in self.engine.agents.items() if a.is_worker}


def _loader(names: list[str]) -> Callable[[nn.Module, torch.Tensor], None]:
    """``load(template, flat)``: the adopted parameters (by their names in the user's model) of the
    flat vector into a copy of that model (frozen parameters keep the copy's values)."""
    def load(template: nn.Module, flat: torch.Tensor) -> None:
        params = dict(template.named_parameters())
        targets = [params[name] for name in names]
        with torch.no_grad():
            for p, chunk in zip(targets, flat.split([p.numel() for p in targets])):
                p.copy_(chunk.view_as(p))
    return load


class LoopRecord:
    """The record of an :class:`launch.AgentOptimizer`'s run in ``directory`` (module docstring).

    Args:
        opt: the AgentOptimizer (its engine, model and communicator).
        directory: where rank 0 writes (created).
        evaluate: ``evaluate(model) -> {metric: value}``, the held-out metrics; None: no eval.csv.
        log_every: metrics.csv logs every ``log_every``-th step (default: the schedule's period).
        eval_every: evaluate every ``eval_every`` steps too (default: only when asked).
        progress: a progress bar on rank 0.
        tensorboard: TensorBoard's event files too.
        cluster, compute_s: simulated time on a preset cluster (:mod:`launch.engine.record.clock`).
    """

    def __init__(self, opt, directory, *, evaluate=None, log_every: int | None = None,
                 eval_every: int | None = None, progress: bool = False, tensorboard: bool = False,
                 cluster: str | None = None, compute_s: float | None = None):
        engine = opt.engine
        comm = engine.comm if engine.comm.world_size > 1 else None
        self.directory = Path(directory)
        out = self.directory if engine.rank == 0 else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        clock = None
        if cluster is not None:
            placement = simulated_placement(cluster, engine.schedule.num_agents, engine.comm.world_size,
                                            engine.placement.agents_per_rank)
            clock = SimulatedTime(engine.schedule, cluster, placement, engine.sync_nbytes, compute_s,
                                  simulated_hubs(engine, placement), max(1, len(engine.worker_optimizers())),
                                  start=engine.t, device=str(engine.agents[min(engine.agents)].params.device))
        self.record = RunRecord(
            LoopRun(engine, opt.model), comm, engine.schedule, out, log_every=log_every or engine.schedule.period,
            evaluate=evaluate, template=copy.deepcopy(opt.model), eval_every=eval_every, first=engine.t,
            clock=clock, tensorboard=tensorboard, progress="own loop" if progress else None,
            load=_loader(engine.parameter_names))
        self.record.before(engine.t + 1)

    def logged(self, done: int) -> bool:
        """Whether step ``done`` (the iteration that makes t = done) is logged in metrics.csv."""
        return self.record.logged(done)

    def before_sync(self, done: int, losses: dict) -> None:
        """Before the sync of the step that makes t = ``done``: its metrics (when logged)."""
        self.record.before_sync(done, losses)

    def after(self, done: int) -> None:
        """After it: the clock, an automatic evaluation; the next step's learning rates."""
        self.record.after(done)
        self.record.before(done + 1)

    def evaluate(self, done: int) -> None:
        """The held-out metrics after step ``done`` (a collective)."""
        self.record.evaluate(done)

    def close(self) -> float:
        """Complete the metrics in flight and close the files (a collective); returns the wall
        time since the record began."""
        self.record.flush()
        return self.record.close()
