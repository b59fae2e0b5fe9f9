"""The simulation: every agent of a schedule, on whichever ranks a communicator spans.

One iteration t of the model X_{t+1} = (X_t - lr G_t) P_t:

    1. every local worker takes one inner step on its own next batch:  x_i <- x_i - lr * g_i;
    2. the plan of P_t mixes the agents' flat buffers:                 X <- X P_t;
    3. t <- t + 1.

The agents, their syncs, checkpoints' state and the start-up are the engine's core
(:class:`launch.engine.core.SyncEngine`, which :class:`Simulation` extends); a Simulation adds its
own loop: deep copies of the user's module for the workers, their data streams, and
``loss_fn(module, batch)``.

Example (co-located, LA-1 on a least-squares problem):

    >>> import torch, topology
    >>> from launch import simulate
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = torch.nn.Linear(3, 1)
    >>> def batches():
    ...     while True:
    ...         x = torch.randn(8, 3)
    ...         yield x, x.sum(1, keepdim=True)
    >>> loss = lambda module, batch: ((module(batch[0]) - batch[1]) ** 2).mean()
    >>> result = simulate(model, loss, batches(), topology.lookahead(5, 0.5),
    ...                   lambda p: torch.optim.SGD(p, lr=0.1), steps=50)
    >>> len(result.parameters), sorted(result.parameters[1])
    (2, ['bias', 'weight'])
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from agents.agent import Agent, LossFn, OptimizerFactory, StateLayout
from agents.flat import check_dtype_device
from launch.comm.base import Communicator
from launch.engine.checkpoint import run_with_checkpoints
from launch.engine.core import SyncEngine
from topology.schedule import Schedule

Data = Iterable | Callable[[int], Iterable]


class Simulation(SyncEngine):
    """The agents of ``schedule`` that live on this rank, and the loop that drives them.

    Args:
        model: the user's module (never modified: agents work on deep copies).  Every rank passes
            one of the same architecture; rank 0's values become every agent's theta_0.
        loss_fn: ``loss_fn(module, batch) -> scalar tensor``.
        data: the batches of the single worker (an iterable), or ``agent_index -> iterable`` for
            schedules with several workers.
        schedule: t -> P_t and the workers (see :mod:`topology`).
        optimizer: factory ``params -> torch.optim.Optimizer``, the inner optimizer A.
        state_policy: ``maintain`` | ``reset`` | ``pullback`` (see :mod:`agents.state_policy`), or
            for a multilayer schedule one policy per level (``reset_inner``, ``pullback_outer``,
            ..., see :mod:`agents.level_policy`).
        comm: where the agents run; default co-located (:class:`launch.comm.LocalCommunicator`).
        agents_per_rank: default: num_agents / world_size (all agents on one rank co-located).
        dtype, device: convert the agents' copies of the model (default: as the model is).
        outer: a state-dependent slow update, an :class:`agents.slow_rule.SlowRule`
            (:class:`agents.outer.OuterOptimizer`: outer SGD, SlowMo, DiLoCo;
            :class:`agents.adaptive.AdaptiveAlpha`), run by
            :mod:`launch.engine.outer_program` in place of the plain mixing; default None.
        check_finite: at every non-identity sync, check that every buffer the sync reads and
            every loss are finite, else raise :class:`launch.engine.health.NonFiniteError` on
            every rank: before the sync on one rank; on several, carried by the sync's own
            collectives, at the last sync of its window (:mod:`launch.engine.finiteness`).
        overlap: run the blocks whose workers all live on one rank (a distributed Lookahead's
            syncs) overlapped with the inner steps: the passive agents' part is reduced to that
            rank while it computes (:mod:`launch.engine.overlap`).  True, False (one all-reduce
            per block), or ``"auto"`` (the default): wherever it applies and its scratch, one
            flat copy, is at most 1 GiB (:func:`launch.engine.compile.compile_sync`).  Not with
            ``outer`` (``"auto"`` then means False).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Data,
        schedule: Schedule,
        optimizer: OptimizerFactory,
        *,
        state_policy="maintain",
        comm: Communicator | None = None,
        agents_per_rank: int | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        outer=None,
        check_finite: bool = True,
        overlap: bool | str = "auto",
    ):
        _check_arguments(model, loss_fn, data, schedule, optimizer)
        check_dtype_device(dtype, device)
        if dtype is not None or device is not None:
            model = copy.deepcopy(model).to(device=device, dtype=dtype)
        self.loss_fn = loss_fn

        def make_agent(i: int, layout: StateLayout, policy: str) -> Agent:
            worker = i in schedule.workers
            stream = iter(data(i) if callable(data) else data) if worker else None
            return Agent(i, model, worker=worker, optimizer=optimizer, data=stream, state_policy=policy,
                         layout=layout, push_sum=schedule.push_sum)

        super().__init__(model, schedule, optimizer, make_agent, state_policy=state_policy, comm=comm,
                         agents_per_rank=agents_per_rank, outer=outer, check_finite=check_finite, overlap=overlap)

    def step(self) -> dict[int, torch.Tensor]:
        """Iteration t: inner steps of the local workers, then the sync of P_t.

        Returns the losses of the local workers (evaluated before their update), by agent.
        """
        self.begin_step()
        losses = {
            i: agent.inner_step(self.loss_fn) for i, agent in self.agents.items() if agent.is_worker
        }
        self.end_step(losses)
        return losses

    def run(self, steps: int, callback: Callable[["Simulation", dict], None] | None = None) -> None:
        """``steps`` iterations; ``callback(sim, losses)`` after each."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer; got {steps!r}")
        for _ in range(steps):
            losses = self.step()
            if callback is not None:
                callback(self, losses)


@dataclass
class SimulationResult:
    """What :func:`simulate` returns: every agent's final parameters (``{name: tensor}``, indexed
    by agent), the final losses of this rank's workers, and the simulation itself."""

    parameters: list[dict[str, torch.Tensor]]
    losses: dict[int, float]
    simulation: Simulation


def simulate(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    schedule: Schedule,
    optimizer: OptimizerFactory,
    steps: int,
    **options,
) -> SimulationResult:
    """Run ``steps`` iterations of ``schedule`` and return every agent's parameters.

    The same call runs co-located (the default), under torchrun (``comm=TorchCommunicator()``)
    or under mpiexec (``comm=MPICommunicator()``); see :class:`Simulation` for the arguments.
    ``checkpoint=launch.engine.checkpoint.Checkpointer(...)``: resume from its latest checkpoint if any,
    run until t == ``steps`` (a total), saving every ``every`` iterations and at the end.
    """
    callback = options.pop("callback", None)
    checkpoint = options.pop("checkpoint", None)
    sim = Simulation(model, loss_fn, data, schedule, optimizer, **options)
    last: dict[int, float] = {}

    def record(s, losses):
        last.update(losses)
        if callback is not None:
            callback(s, losses)

    if checkpoint is None:
        sim.run(steps, record)
    else:
        checkpoint.load(sim)
        run_with_checkpoints(sim, steps, checkpoint, record)
    return SimulationResult(sim.gather_parameters(), {i: float(v) for i, v in last.items()}, sim)


def _check_arguments(model, loss_fn, data, schedule, optimizer) -> None:
    """The arguments that :class:`Simulation` validates before anything else (no communication)."""
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a topology.Schedule; got {type(schedule).__name__}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not callable(optimizer):
        raise ValueError("optimizer must be a factory: params -> torch.optim.Optimizer")
    if not callable(loss_fn):
        raise ValueError("loss_fn must be callable as loss_fn(module, batch)")
    if len(schedule.workers) > 1 and not callable(data):
        raise ValueError(
            f"data must be a function agent_index -> iterable when the schedule has "
            f"{len(schedule.workers)} workers; got a single {type(data).__name__}"
        )
    if not callable(data) and not (hasattr(data, "__iter__") or hasattr(data, "__getitem__")):
        raise ValueError(f"data must be an iterable of batches (or agent_index -> iterable); "
                         f"got {type(data).__name__}")
