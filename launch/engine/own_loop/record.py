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
- ``agents.pt`` and ``summary.json``, when the run closes (:meth:`launch.AgentOptimizer.close`):
  ``agents.pt`` as the command line's, a list indexed by agent of the user's model's
  ``state_dict`` holding that agent's parameters (the inner optimizer's; frozen parameters and
  buffers the lowest-numbered worker's model's), so ``python -m launch.compare`` compares two
  runs of a script (co-located and under torchrun); ``summary.json`` / ``summary.txt`` with the
  command line's keys where they apply (:func:`loop_summary`: ``launch`` is ``own_loop``,
  ``problem`` and ``seed`` are null -- the loop's own -- ``steps`` is the run's t at close, and
  ``status`` is ``FAILED`` with ``failure: non_finite`` when the last evaluation held a
  non-finite metric).

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

from agents.level_policy import resolve_policy
from agents.settings import jsonable
from launch.engine.guard.health import stream_objects
from launch.engine.readout import StateKeys, gather_parameters
from launch.engine.record.clock import SimulatedTime, simulated_hubs, simulated_placement
from launch.engine.record.evaluation import VIRTUAL
from launch.engine.record.recorder import RunRecord
from launch.engine.record.run import EngineRun
from launch.engine.record.summary import compact, finite_or_none, final_loss, optimizer_record, versions, \
    device_record, write_summary
from topology.diagnostics import spectral_gap
from topology.schedule import MultilayerSchedule


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
        self.opt, self.first = opt, engine.t

    def logged(self, done: int) -> bool:
        """Whether step ``done`` (the iteration that makes t = done) is logged in metrics.csv."""
        return self.record.logged(done)

    def before_sync(self, done: int, losses: dict) -> None:
        """Before the sync of the step that makes t = ``done``: its metrics (when logged)."""
        self.record.before_sync(done, losses)

    def before(self, done: int) -> None:
        """Before the inner step that makes t = ``done`` (a worker rank): its learning rates."""
        self.record.before(done)

    def after(self, done: int) -> None:
        """After its sync: the clock, an automatic evaluation."""
        self.record.after(done)

    def evaluate(self, done: int) -> None:
        """The held-out metrics after step ``done`` (a collective)."""
        self.record.evaluate(done)

    def close(self) -> None:
        """Complete the metrics in flight, gather every agent's final state (collectives), and on
        rank 0 write ``agents.pt`` and the summary (module docstring)."""
        self.record.flush()
        states = final_state_dicts(self.opt.engine, self.opt.model)
        elapsed = self.record.close()
        if self.opt.engine.rank == 0:
            torch.save(states, self.directory / "agents.pt")
            write_summary(self.directory, loop_summary(self.opt, self.record, first=self.first, elapsed=elapsed,
                                                       metrics_csv=self.directory / "metrics.csv"))


def final_state_dicts(engine, model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Every agent's ``state_dict`` of the user's ``model`` (CPU copies), indexed by agent, on every
    rank (collectives): the agent's parameters (:func:`launch.engine.readout.gather_parameters`,
    by the names the inner optimizer's parameters have in the model), and every other entry --
    buffers, frozen parameters -- from its own model for a worker, from the lowest-numbered
    worker's for a passive agent (which has none)."""
    parameters = gather_parameters(engine)
    adopted = set(engine.parameter_names)
    keys = StateKeys.of(model)
    local = {i: {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                 if keys.aliases.get(k, k) not in adopted}
             for i, a in engine.agents.items() if a.is_worker}
    rest: dict[int, dict[str, torch.Tensor]] = {}
    for part in stream_objects(engine.comm, local, engine.t, "gather of the models' other entries"):
        rest.update(part)
    first = min(engine.schedule.workers)
    return [{k: (params[keys.aliases.get(k, k)] if keys.aliases.get(k, k) in params else rest.get(i, rest[first])[k])
             for k in keys.keys} for i, params in enumerate(parameters)]


def loop_summary(opt, record: RunRecord, *, first: int, elapsed: float, metrics_csv: Path) -> dict:
    """The own loop's summary record (module docstring): the command line's keys
    (:mod:`launch.cli.summary`) where they apply."""
    engine, schedule = opt.engine, opt.schedule
    last = [r for r in record.final if r["step"] == max(row["step"] for row in record.final)] if record.final else []
    agents = [r for r in last if r["agent"] != VIRTUAL]
    virtual = next((r for r in last if r["agent"] == VIRTUAL), None)
    metrics = [k.removeprefix("heldout_") for k in (agents[0] if agents else {}) if k.startswith("heldout_")]
    nonfinite = record.nonfinite if record.evaluator is not None else []
    depth = schedule.depth if isinstance(schedule, MultilayerSchedule) else None
    outer = engine.options.outer
    dtype = next(iter(engine.agents.values())).flat.buffer.dtype
    return {
        "problem": None,
        "topology": {"name": type(schedule).__name__, "options": {}, "repr": compact(repr(schedule))},
        "launch": "own_loop",
        "processes": engine.comm.world_size,
        "steps": engine.t,
        "resumed_from": first or None,
        "dtype": str(dtype).replace("torch.", ""),
        "seed": None,
        "heldout": {k: [finite_or_none(r[f"heldout_{k}"]) for r in agents] for k in metrics},
        "virtual_heldout": None if virtual is None else {k: finite_or_none(virtual[f"heldout_{k}"]) for k in metrics},
        "spectral_gap": finite_or_none(spectral_gap(schedule)),
        "time_s": finite_or_none(elapsed),
        "steps_per_s": finite_or_none((engine.t - first) / max(elapsed, 1e-9)),
        "status": "FAILED" if nonfinite else "ok",
        "failure": "non_finite" if nonfinite else None,
        "failure_detail": (f"agents {nonfinite} have non-finite held-out metrics at the last evaluation"
                           if nonfinite else None),
        "optimizer": optimizer_record(opt.optimizer),
        "state_policy": list(resolve_policy(engine.options.state_policy, depth)),
        "outer": None if outer is None else jsonable(outer.describe()),
        "final_loss": final_loss(metrics_csv, schedule.workers) if metrics_csv.is_file() else None,
        "versions": versions(),
        **device_record(str(next(iter(engine.agents.values())).flat.buffer.device)),
    }
