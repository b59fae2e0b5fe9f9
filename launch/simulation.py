"""The simulation: every agent of a schedule, on whichever ranks a communicator spans.

One iteration t (DESIGN section 1):

    1. every local worker takes one inner step on its own next batch:  x_i <- x_i - lr * g_i;
    2. the plan of P_t mixes the agents' flat buffers:                 X <- X P_t;
    3. t <- t + 1.

All ranks derive P_t from the same counter t; no matrix is ever sent.  Start-up, identical on
every rank and in this order: validate the placement (local, no communication), exchange the
parameter signatures (one all-gather) and raise the same error everywhere if they differ, create
and warm the process groups every plan needs, broadcast agent 0's initial parameters so every
column of X starts equal.

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

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from agents.agent import Agent, LossFn, OptimizerFactory, StateLayout, probe_state_layout
from agents.flat import check_dtype_device, check_uniform_parameters, module_signature
from launch import health
from launch.overlap import Prefetcher, hub_of as overlap_hub_of
from launch.communicator import Communicator, LocalCommunicator
from launch.level_sync import SyncPolicy
from launch.outer_sync import OuterSync
from launch.placement import Placement
from topology.plan import compile_plan
from topology.schedule import Schedule

Data = Iterable | Callable[[int], Iterable]


class Simulation:
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
        comm: where the agents run; default co-located (:class:`LocalCommunicator`).
        agents_per_rank: default: num_agents / world_size (all agents on one rank co-located).
        dtype, device: convert the agents' copies of the model (default: as the model is).
        outer: a state-dependent slow update (:class:`agents.outer.OuterOptimizer`: outer SGD,
            SlowMo, DiLoCo; :class:`agents.adaptive.AdaptiveAlpha`), run by
            :class:`launch.outer_sync.OuterSync` in place of the plain mixing; default None.
        check_finite: before every non-identity sync, check collectively that every agent's
            parameters and losses are finite, else raise :class:`launch.health.NonFiniteError`
            on every rank (one all-reduce of 2m flags per sync; see :mod:`launch.health`).
        overlap: run the blocks whose workers all live on one rank (a distributed Lookahead's
            syncs) overlapped with the inner steps: the passive agents' part is reduced to that
            rank while it computes (:mod:`launch.overlap`); default False (one all-reduce per
            block).  Not with ``outer``.
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
        overlap: bool = False,
    ):
        # -- local validation: the same result on every rank, before any communication ------
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a topology.Schedule; got {type(schedule).__name__}")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if not callable(optimizer):
            raise ValueError("optimizer must be a factory: params -> torch.optim.Optimizer")
        if not callable(loss_fn):
            raise ValueError("loss_fn must be callable as loss_fn(module, batch)")
        self.sync_policy = SyncPolicy(state_policy, schedule)
        self.state_policy = self.sync_policy.agent_policy
        if not isinstance(check_finite, bool):
            raise ValueError(f"check_finite must be True or False; got {check_finite!r}")
        self.check_finite = check_finite
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be True or False; got {overlap!r}")
        if overlap and outer is not None:
            raise ValueError("overlap=True applies to plain mixing syncs; it cannot be combined with outer=...")
        self.comm = comm if comm is not None else LocalCommunicator()
        self.schedule = schedule
        self.loss_fn = loss_fn
        self.placement = Placement.make(schedule.num_agents, self.comm.world_size, agents_per_rank)
        self.rank = self.comm.rank
        if len(schedule.workers) > 1 and not callable(data):
            raise ValueError(
                f"data must be a function agent_index -> iterable when the schedule has "
                f"{len(schedule.workers)} workers; got a single {type(data).__name__}"
            )
        if not callable(data) and not (hasattr(data, "__iter__") or hasattr(data, "__getitem__")):
            raise ValueError(f"data must be an iterable of batches (or agent_index -> iterable); "
                             f"got {type(data).__name__}")
        check_dtype_device(dtype, device)
        if dtype is not None or device is not None:
            model = _converted_copy(model, dtype, device)
        check_uniform_parameters(model)
        self.parameter_names = [name for name, _ in model.named_parameters()]

        # -- the one metadata exchange: parameter shapes must agree across ranks ----------------
        signatures = self.comm.all_gather_object(module_signature(model))
        for rank, signature in enumerate(signatures):
            if signature != signatures[0]:
                raise ValueError(_signature_mismatch(signatures[0], signature, rank))

        # -- process groups, created by every rank in the same order ---------------------------
        plans = [compile_plan(p) for p in schedule.distinct_matrices]
        numel = sum(p.numel() for p in model.parameters())
        def hubs(plan):
            """``block -> hub rank | None`` for the blocks of ``plan`` (overlap), else None."""
            if not overlap:
                return None
            return lambda block: overlap_hub_of(block, plan, self.placement, set(schedule.workers), schedule.push_sum)

        self.programs = [
            self.sync_policy.program(index, plan, self.placement, self.rank, numel, hub_of=hubs(plan))
            for index, plan in enumerate(plans)
        ]
        groups = {self.placement.ranks_of(b.members) for plan in plans for b in plan.blocks}
        layout = probe_state_layout(model, optimizer) if self.state_policy == "pullback" else StateLayout.empty()
        self.outer = None
        if outer is not None:
            self.outer = OuterSync(outer, schedule, self.placement, self.rank, numel, layout.numel,
                                   model=model, optimizer=optimizer)
            groups |= self.outer.groups()
        self.comm.init_groups(sorted(g for g in groups if len(g) > 1))

        # -- the agents of this rank -----------------------------------------------------------
        self.agents: dict[int, Agent] = {}
        for i in self.placement.agents_on(self.rank):
            worker = i in schedule.workers
            stream = iter(data(i) if callable(data) else data) if worker else None
            self.agents[i] = Agent(
                i, model, worker=worker, optimizer=optimizer, data=stream,
                state_policy=self.state_policy, layout=layout, push_sum=schedule.push_sum,
            )
        self._broadcast_initial_parameters()
        if self.outer is not None:
            self.outer.start(self.agents)
        self.t = 0
        self.prefetcher = Prefetcher(self)

    def _broadcast_initial_parameters(self) -> None:
        """theta_0 = agent 0's parameters on rank 0, copied into every column of X."""
        first = self.agents[min(self.agents)]
        source = first.params
        if self.comm.world_size > 1:
            self.comm.broadcast_(source, src=0)
        for agent in self.agents.values():
            if agent is not first:
                agent.params.copy_(source)

    # -- the loop --------------------------------------------------------------------------------
    def step(self) -> dict[int, torch.Tensor]:
        """Iteration t: inner steps of the local workers, then the sync of P_t.

        Returns the losses of the local workers (evaluated before their update), by agent.
        """
        self.prefetcher.ensure(self.t)      # overlap: start the next sync's reduces
        losses = {
            i: agent.inner_step(self.loss_fn) for i, agent in self.agents.items() if agent.is_worker
        }
        if self.check_finite:
            health.record_losses(self, losses)
        self.sync(self.t)
        self.t += 1
        return losses

    @torch.no_grad()
    def sync(self, t: int) -> None:
        """Apply P_t to the agents (nothing at all when P_t is the identity)."""
        index = self.schedule.matrix_index(t)
        program = self.programs[index]
        if program.plan.is_identity:
            return
        self.prefetcher.wait_broadcasts()
        self.prefetcher.ensure(t)           # overlap: the reduces of sync t, when not started yet
        if self.check_finite and not self.prefetcher.check_finite(t):
            health.check_finite(self, t)
        if self.outer is not None:
            with health.collective(self.comm, t, "sync", tuple(range(self.comm.world_size))):
                self.outer.sync(index, self.agents, self.comm, self.sync_policy.resets[index])
            return
        touched = [i for i in program.plan.touched if i in self.agents]
        tensors = {i: agent.sync_tensor() for i, agent in self.agents.items()}
        peers = {r for g in program.group_ranks for r in g} | {r for _, r in program.sends + program.recvs}
        with health.collective(self.comm, t, "sync", tuple(sorted(peers | {self.rank}))):
            program.run(tensors, self.comm)
        self.prefetcher.consumed(t)
        if self.sync_policy.resets[index] and any(self.agents[i].layout.numel for i in touched):
            self.prefetcher.wait_broadcasts()   # a reset writes state slots that may be in flight
        for i in touched:
            self.agents[i].after_sync(reset=self.sync_policy.resets[index])

    def wait_in_flight(self) -> None:
        """Wait for this rank's asynchronous sync traffic (``overlap=True``): after it, every local
        buffer may be written.  Collective-free; needed only by code that writes parameters
        between steps."""
        self.prefetcher.wait_broadcasts()

    def run(self, steps: int, callback: Callable[["Simulation", dict], None] | None = None) -> None:
        """``steps`` iterations; ``callback(sim, losses)`` after each."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer; got {steps!r}")
        for _ in range(steps):
            losses = self.step()
            if callback is not None:
                callback(self, losses)

    # -- checkpoints (see launch.checkpoint for files, RNG states and layouts) -------------------
    def state_dict(self) -> dict:
        """This rank's part of the state: ``{"t": t, "agents": {i: Agent.state_dict()}}``."""
        return {"t": self.t, "agents": {i: a.state_dict() for i, a in self.agents.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counter t and this rank's agents from ``state["agents"]`` (keyed by agent
        index; entries of other agents are ignored, so any layout's state fits).  Only a fresh
        simulation (no step taken) can load: data streams are re-positioned from their start."""
        if self.t != 0 or any(a.steps for a in self.agents.values()):
            raise ValueError(f"load_state_dict needs a fresh Simulation; this one is at t={self.t}")
        missing = sorted(set(self.agents) - set(state["agents"]))
        if missing:
            raise ValueError(f"the state holds no entry for agent(s) {missing} of this rank")
        for i, agent in self.agents.items():
            agent.load_state_dict(state["agents"][i])
        self.t = int(state["t"])

    # -- reading the result ----------------------------------------------------------------------
    def local_parameters(self) -> dict[int, torch.Tensor]:
        """Flat parameter vectors of this rank's agents (live views)."""
        return {i: agent.params for i, agent in self.agents.items()}

    def gather_parameters(self) -> list[dict[str, torch.Tensor]]:
        """Every agent's parameters as ``{name: tensor}`` (CPU copies), on every rank (under push-sum
        the de-biased z_i = x_i / w_i)."""
        local = {
            i: [c.view(shape).detach().cpu().clone()
                for c, shape in zip(a.debiased().split(a.flat.numels), a.flat.shapes)]
            for i, a in self.agents.items()
        }
        merged: dict[int, list[torch.Tensor]] = {}
        for part in self.comm.all_gather_object(local):
            merged.update(part)
        return [dict(zip(self.parameter_names, merged[i])) for i in range(self.schedule.num_agents)]


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
    ``checkpoint=launch.checkpoint.Checkpointer(...)``: resume from its latest checkpoint if any,
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
        from launch.checkpoint import run_with_checkpoints

        checkpoint.load(sim)
        run_with_checkpoints(sim, steps, checkpoint, record)
    return SimulationResult(sim.gather_parameters(), {i: float(v) for i, v in last.items()}, sim)


def _converted_copy(model: nn.Module, dtype, device) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(device=device, dtype=dtype)


def _signature_mismatch(reference, other, rank: int) -> str:
    for a, b in zip(reference, other):
        if a != b:
            return (
                f"model parameters must have the same names, shapes and dtypes on every rank; "
                f"rank 0 has {a[0]} {a[1]} {a[2]}, rank {rank} has {b[0]} {b[1]} {b[2]}"
            )
    return (
        f"model parameters must be the same on every rank; rank 0 has {len(reference)} "
        f"parameter tensors, rank {rank} has {len(other)}"
    )
