"""One interface over the two ways to run a job: the serial reference and the simulation.

A *run* holds the columns x_i of X that live in this process and advances them one iteration at a
time.  :class:`SerialRun` is :class:`agents.reference.MultilayerLookahead` on one module (its
columns: the fast weights, then slow levels 1..n); :class:`SimulationRun` is a
:class:`launch.Simulation` on any communicator.  Both offer:

- ``step()``: iteration t (inner step, then the sync of P_t); returns the losses of the local
  workers, evaluated at their parameters before the update, by agent;
- ``columns()``: ``{agent: flat parameter vector}`` of the local agents (live views; read-only);
- ``grad_norms()``: ``{worker: ||g||_2}`` of the gradient of the last inner step (local workers);
- ``state_dicts(template)``: every agent's final ``state_dict`` (a collective on every rank).

Both are a :class:`launch.engine.record.run.Run` (``models()``, ``learning_rates()``,
``worker_buffers()``, ``wait_in_flight()``, ``check_finite(where)``, ``engine``: the simulation's
:class:`launch.engine.core.SyncEngine`, None for the serial reference), which is all the command
line reads of a run.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from agents.flat import load_flat_
from agents.slrla import SLRLAController, proximal, stage_lookahead
from launch.cli.registry import has_serial_reference, serial_optimizer, serial_reference_missing
from launch.comm import LocalCommunicator
from launch.engine.guard.health import NonFiniteError
from launch.engine.record.run import EngineRun, Run, grad_norm
from launch.engine.simulation import Simulation
from topology.schedule import Schedule


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def role(schedule: Schedule, agent: int) -> str:
    """What agent ``agent`` is: ``fast (worker)`` / ``slow level l`` for (multilayer) Lookahead and
    any one-worker, one-slow-agent schedule (stagewise SLRLA), else ``worker`` / ``passive``."""
    if has_serial_reference(schedule) or (schedule.num_agents == 2 and schedule.workers == (0,)):
        return "fast (worker)" if agent == 0 else f"slow level {agent}"
    return "worker" if agent in schedule.workers else "passive"


class SerialRun(Run):
    """The serial reference of a (multilayer / nested) Lookahead schedule: one module, its inner
    optimizer wrapped in :class:`~agents.reference.MultilayerLookahead` (or, with ``outer``, the
    options of ``agents.outer``, in :class:`~agents.outer.OuterLookahead` /
    :class:`~agents.adaptive.AdaptiveLookahead`: :func:`launch.cli.registry.serial_optimizer`), fed
    ``data`` (worker 0's stream).  With
    ``stages`` (SLRLA) each stage is a fresh :func:`agents.slrla.stage_lookahead`, begun after
    the last step of the previous stage, as :func:`agents.slrla.slrla_reference` does.

    ``ValueError`` when the job has no serial reference
    (:func:`launch.cli.registry.serial_reference_missing`).
    """

    name = "serial"

    def __init__(self, model: nn.Module, loss_fn, data, schedule: Schedule, optimizer, state_policy,
                 outer: dict | None = None, stages=None):
        why = serial_reference_missing(schedule, outer, stages)
        if why is not None:
            raise ValueError(f"{why}; use launch=colocated, torch or mpi")
        self.schedule = schedule
        self.module = copy.deepcopy(model)
        self.params = list(self.module.parameters())
        self.stages, self.state_policy, self.inner = stages, state_policy, optimizer
        if stages is None:
            self.optimizer = serial_optimizer(self.params, schedule, optimizer, state_policy, outer)
            self.depth = schedule.depth
        else:
            self.optimizer = stage_lookahead(self.params, optimizer, stages[0], state_policy)
            self.ends = SLRLAController(stages).ends
            self.depth = 1
        self.t = 0
        self.loss_fn = loss_fn
        self.data = iter(data)
        self.agents = tuple(range(schedule.num_agents))
        self.rank, self.world_size = 0, 1

    def step(self, before_sync=None) -> dict[int, torch.Tensor]:
        """One iteration; ``before_sync(losses)`` after the inner step, before the reference's
        sync (a post-hook of the inner optimizer, which the reference steps first)."""
        self.optimizer.zero_grad()
        loss = self.loss_fn(self.module, next(self.data))
        loss.backward()
        hook = (None if before_sync is None else
                self.optimizer.optimizer.register_step_post_hook(lambda *_: before_sync({0: loss.detach()})))
        try:
            self.optimizer.step()
        finally:
            if hook is not None:
                hook.remove()
        self.t += 1
        if self.stages is not None and self.t in self.ends[1:-1]:
            self.optimizer = stage_lookahead(self.params, self.inner, self.stages[self.ends.index(self.t)],
                                             self.state_policy)
        return {0: loss.detach()}

    def columns(self) -> dict[int, torch.Tensor]:
        columns = {0: _flat(self.params)}
        for level in range(1, self.depth + 1):
            columns[level] = _flat(self.optimizer.slow_params(level))
        return columns

    def grad_norms(self) -> dict[int, float]:
        return {0: grad_norm(self.params)}

    def learning_rates(self) -> dict[int, float]:
        return {0: float(self.optimizer.param_groups[0]["lr"])}   # agent 0 is the worker

    def worker_buffers(self) -> dict[int, dict[str, torch.Tensor]]:
        return {0: dict(self.module.named_buffers())}

    def check_finite(self, where: str) -> None:
        bad = [i for i, column in self.columns().items() if not torch.isfinite(column).all()]
        if bad:
            raise NonFiniteError(self.t, bad, [], where)

    def state_dicts(self, template: nn.Module) -> list[dict]:
        """Every column loaded into ``template``; buffers (if any) are the module's."""
        buffers = dict(self.module.named_buffers())
        return [_state_dict(template, column, buffers) for column in self.columns().values()]


class SimulationRun(EngineRun):
    """A :class:`launch.Simulation` seen as a run (its agents are those of this rank).
    ``controller``: called as ``controller(simulation)`` after every step (SLRLA's
    :class:`agents.slrla.SLRLAController`, already started)."""

    def __init__(self, simulation: Simulation, name: str, controller=None):
        super().__init__(simulation.engine)
        self.simulation = simulation
        self.name = name
        self.controller = controller

    def step(self, before_sync=None) -> dict[int, torch.Tensor]:
        """One iteration (:meth:`launch.Simulation.step`, ``before_sync`` as there)."""
        losses = self.simulation.step(before_sync)
        if self.controller is not None:
            self.controller(self.simulation)
        return losses

    def state_dicts(self, template: nn.Module) -> list[dict]:
        """Every agent's full state_dict, gathered from every rank
        (:meth:`launch.Simulation.gather_state_dicts`: buffers are not mixed by P_t; a passive
        agent carries the lowest-numbered worker's).  Collective: every rank calls."""
        return self.simulation.gather_state_dicts()


def _state_dict(template: nn.Module, column: torch.Tensor, buffers: dict) -> dict:
    """``template``'s state_dict with the parameters of the flat ``column`` and ``buffers``."""
    module = load_flat_(copy.deepcopy(template), column.detach().to(next(template.parameters()).device))
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in buffers:
                buf.copy_(buffers[name])
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def open_simulation_run(job, comm, model, mode: str) -> SimulationRun:
    """The :class:`SimulationRun` of ``job`` on ``comm`` (a ``LocalCommunicator`` co-located):
    its outer rule (``agents.outer``) and, for SLRLA, the optimizer factory wrapped in
    :func:`agents.slrla.proximal` and a started :class:`agents.slrla.SLRLAController`."""
    optimizer = proximal(job.optimizer) if job.stages is not None else job.optimizer
    launch = job.launch
    sim = Simulation(model, job.problem.loss_fn, job.batches, job.schedule, optimizer,
                     comm=comm if comm is not None else LocalCommunicator(), device=launch.device,
                     state_policy=job.state_policy, outer=job.make_outer(), overlap=launch.overlap,
                     exact=bool(launch.exact),
                     agents_per_rank=launch.agents_per_rank if comm is not None else None)
    controller = None
    if job.stages is not None:
        controller = SLRLAController(job.stages)
        controller.start(sim)
    return SimulationRun(sim, mode, controller)
