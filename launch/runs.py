"""One interface over the two ways to run a job: the serial reference and the simulation.

A *run* holds the columns x_i of X that live in this process and advances them one iteration at a
time.  :class:`SerialRun` is :class:`agents.reference.MultilayerLookahead` on one module (its
columns: the fast weights, then slow levels 1..n); :class:`SimulationRun` is a
:class:`launch.Simulation` on any communicator.  Both offer:

- ``step()``: iteration t (inner step, then the sync of P_t); returns the losses of the local
  workers, evaluated at their parameters before the update, by agent;
- ``columns()``: ``{agent: flat parameter vector}`` of the local agents (live views; treat as
  read-only, except :func:`plant_deviation_`);
- ``grad_norms()``: ``{worker: ||g||_2}`` of the gradient of the last inner step (local workers);
- ``state_dicts(template)``: every agent's final ``state_dict`` (a collective on every rank).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from agents.flat import load_flat_
from agents.reference import MultilayerLookahead
from launch.communicator import Communicator
from launch.simulation import Simulation
from topology.registry import has_serial_reference
from topology.schedule import Schedule


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _grad_norm(params) -> float:
    grads = [p.grad.reshape(-1) for p in params if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else float("nan")


def role(schedule: Schedule, agent: int) -> str:
    """What agent ``agent`` is: ``fast (worker)`` / ``slow level l`` for (multilayer) Lookahead,
    else ``worker`` / ``passive``."""
    if has_serial_reference(schedule):
        return "fast (worker)" if agent == 0 else f"slow level {agent}"
    return "worker" if agent in schedule.workers else "passive"


class SerialRun:
    """The serial reference of a (multilayer) Lookahead schedule: one module, its inner optimizer
    wrapped in :class:`~agents.reference.MultilayerLookahead`, fed ``data`` (worker 0's stream).

    ``ValueError`` when ``schedule`` has no serial reference.
    """

    name = "serial"

    def __init__(self, model: nn.Module, loss_fn, data, schedule: Schedule, optimizer, state_policy: str):
        if not has_serial_reference(schedule):
            raise ValueError(
                f"topology {schedule!r} has no serial reference (only lookahead and multilayer do); "
                f"use launch=colocated, torch or mpi"
            )
        self.schedule = schedule
        self.module = copy.deepcopy(model)
        self.params = list(self.module.parameters())
        self.optimizer = MultilayerLookahead(optimizer(self.params), schedule.ks, schedule.alphas,
                                             state_policy=state_policy)
        self.loss_fn = loss_fn
        self.data = iter(data)
        self.agents = tuple(range(schedule.num_agents))
        self.rank, self.world_size = 0, 1

    def step(self) -> dict[int, torch.Tensor]:
        self.optimizer.zero_grad()
        loss = self.loss_fn(self.module, next(self.data))
        loss.backward()
        self.optimizer.step()
        return {0: loss.detach()}

    def columns(self) -> dict[int, torch.Tensor]:
        columns = {0: _flat(self.params)}
        for level in range(1, self.schedule.depth + 1):
            columns[level] = _flat(self.optimizer.slow_params(level))
        return columns

    def grad_norms(self) -> dict[int, float]:
        return {0: _grad_norm(self.params)}

    def state_dicts(self, template: nn.Module) -> list[dict]:
        """Every column loaded into ``template``; buffers (if any) are the module's."""
        buffers = dict(self.module.named_buffers())
        return [_state_dict(template, column, buffers) for column in self.columns().values()]


class SimulationRun:
    """A :class:`launch.Simulation` seen as a run (its agents are those of this rank)."""

    def __init__(self, simulation: Simulation, name: str):
        self.simulation = simulation
        self.name = name
        self.agents = tuple(sorted(simulation.agents))
        self.rank = simulation.comm.rank
        self.world_size = simulation.comm.world_size

    @property
    def comm(self) -> Communicator:
        return self.simulation.comm

    def step(self) -> dict[int, torch.Tensor]:
        return self.simulation.step()

    def columns(self) -> dict[int, torch.Tensor]:
        return self.simulation.local_parameters()

    def grad_norms(self) -> dict[int, float]:
        return {i: _grad_norm(a.parameters) for i, a in self.simulation.agents.items() if a.is_worker}

    def state_dicts(self, template: nn.Module) -> list[dict]:
        """Every agent's parameters (gathered from every rank), in ``template``'s state_dict
        layout.  Buffers (BatchNorm statistics...) are not mixed by P_t: a worker keeps its own,
        a passive agent gets those of the lowest-numbered worker.  Collective: every rank calls."""
        sim = self.simulation
        parameters = sim.gather_parameters()
        buffers: dict[int, dict] = {}
        if any(True for _ in template.buffers()):
            local = {i: {n: b.detach().cpu().clone() for n, b in a.module.named_buffers()}
                     for i, a in sim.agents.items() if a.is_worker}
            for part in sim.comm.all_gather_object(local):
                buffers.update(part)
        first = min(sim.schedule.workers)
        out = []
        for i, params in enumerate(parameters):
            column = _flat(params[n] for n in sim.parameter_names)
            out.append(_state_dict(template, column, buffers.get(i, buffers.get(first, {}))))
        return out


def _state_dict(template: nn.Module, column: torch.Tensor, buffers: dict) -> dict:
    """``template``'s state_dict with the parameters of the flat ``column`` and ``buffers``."""
    module = load_flat_(copy.deepcopy(template), column.detach().to(next(template.parameters()).device))
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in buffers:
                buf.copy_(buffers[name])
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


@torch.no_grad()
def plant_deviation_(run, plant, t: int) -> None:
    """TEST ONLY: add ``plant.size`` to every parameter of agent ``plant.agent`` after iteration
    ``plant.step`` of the run named ``plant.run`` (serial | colocated | torch | mpi), if that
    agent lives here.  ``plant`` is the configuration's ``plant`` (None: nothing)."""
    if plant is None or plant.get("run", "colocated") != run.name or t != plant.get("step", 0):
        return
    columns = run.columns()
    agent = plant.get("agent", 0)
    if agent in columns:
        if isinstance(run, SerialRun):
            # The serial columns are copies: perturb the tensors they are made of.
            target = run.params if agent == 0 else run.optimizer.slow_params(agent)
            for p in target:
                p.add_(plant.get("size", 1e-6))
        else:
            columns[agent].add_(plant.get("size", 1e-6))
