"""What a recorded run offers the record: one interface, whatever advances the run.

The record (:mod:`launch.engine.record.metrics`, :mod:`launch.engine.record.evaluation`) reads a
run through :class:`Run` alone:

- ``columns()``: ``{agent: flat parameter vector}`` of this process's agents, packed (the
  parameters back to back in ``module.parameters()`` order, as a serial reference flattens them;
  read-only); ``models()``: the same de-biased under push-sum (x_i / w_i);
- ``grad_norms()``: ``{worker: ||g||_2}`` of the gradient of the last inner step (local workers);
- ``learning_rates()``: ``{worker: lr}``, param group 0 of each local worker's inner optimizer;
- ``worker_buffers()``: ``{worker: {name: buffer}}`` of the local workers' modules (live);
- ``wait_in_flight()``: wait for asynchronous sync traffic before the columns are read;
- ``check_finite(where)``: a :class:`launch.engine.guard.health.NonFiniteError`, on every rank
  alike, when a column is not finite;
- ``engine``: the :class:`launch.engine.core.SyncEngine` (placement, counter, checkpoints), or
  None for a run without one (the command line's serial reference).

:class:`EngineRun` implements it over an engine: the runs of :class:`launch.Simulation` and of
:class:`launch.AgentOptimizer` are both one.
"""

from __future__ import annotations

import torch

from launch.engine.readout import models


def grad_norm(params) -> float:
    """||g||_2 over every parameter that has a gradient (NaN when none has)."""
    grads = [p.grad.reshape(-1) for p in params if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else float("nan")


class Run:
    """The interface of a recorded run (module docstring)."""

    agents: tuple[int, ...]
    engine = None

    def columns(self) -> dict[int, torch.Tensor]:
        raise NotImplementedError

    def models(self) -> dict[int, torch.Tensor]:
        return self.columns()

    def grad_norms(self) -> dict[int, float]:
        raise NotImplementedError

    def learning_rates(self) -> dict[int, float]:
        raise NotImplementedError

    def worker_buffers(self) -> dict[int, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def wait_in_flight(self) -> None:
        """Nothing is in flight, except under overlapped syncs."""

    def check_finite(self, where: str) -> None:
        raise NotImplementedError


class EngineRun(Run):
    """:class:`Run` over ``engine`` (a :class:`launch.engine.core.SyncEngine`)."""

    def __init__(self, engine):
        self.engine = engine
        self.agents = tuple(sorted(engine.agents))

    def _workers(self):
        return [(i, a) for i, a in sorted(self.engine.agents.items()) if a.is_worker]

    def columns(self) -> dict[int, torch.Tensor]:
        return self.engine.local_parameters()

    def models(self) -> dict[int, torch.Tensor]:
        agents = self.engine.agents
        return {i: agents[i].flat.pack(z) for i, z in models(self.engine).items()}

    def grad_norms(self) -> dict[int, float]:
        return {i: grad_norm(a.parameters) for i, a in self._workers()}

    def learning_rates(self) -> dict[int, float]:
        return {i: float(a.optimizer.param_groups[0]["lr"]) for i, a in self._workers()}

    def worker_buffers(self) -> dict[int, dict[str, torch.Tensor]]:
        return {i: dict(a.module.named_buffers()) for i, a in self._workers()}

    def wait_in_flight(self) -> None:
        self.engine.wait_in_flight()

    def check_finite(self, where: str) -> None:
        self.engine.check_finite(where)
