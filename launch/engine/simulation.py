"""The simulation: every agent of a schedule, on whichever ranks a communicator spans.

One iteration t of the model X_{t+1} = (X_t - lr G_t) P_t:

    1. every local worker takes one inner step on its own next batch:  x_i <- x_i - lr * g_i;
    2. the plan of P_t mixes the agents' flat buffers:                 X <- X P_t;
    3. t <- t + 1.

All ranks derive P_t from the same counter t; no matrix is ever sent.  Start-up, identical on
every rank and in this order: validate the arguments and the placement (local, no
communication), exchange the parameter signatures (one all-gather) and raise the same error
everywhere if they differ, compile every distinct P_t for this rank (:mod:`launch.engine.compile`:
the one place where a sync's strategy is chosen), create and warm the process groups every
program needs, broadcast agent 0's initial parameters so every column of X starts equal.

The sync of iteration t (:meth:`Simulation.sync`) is the same few calls whatever the options:
``overlap.before_sync`` (overlapped syncs: wait and prefetch; else nothing), the finiteness check
(:mod:`launch.engine.finiteness`), the program of P_t under the lost-rank handler
(:func:`launch.engine.health.collective`), ``overlap.after_sync``, and the state policy's
``after_sync`` on the agents the program touched.

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

from agents.agent import Agent, LossFn, OptimizerFactory, StateLayout, probe_state_layout
from agents.flat import check_dtype_device, check_uniform_parameters, module_signature
from launch.comm.base import Communicator
from launch.comm.local import LocalCommunicator
from launch.engine.checkpoint import run_with_checkpoints
from launch.engine.compile import compile_sync
from launch.engine.finiteness import make_finiteness_check
from launch.engine.health import collective
from launch.engine.overlap import NoOverlap, Overlap
from launch.engine.placement import Placement
from launch.engine.state_weights import SyncPolicy
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
        outer: a state-dependent slow update, an :class:`agents.slow_rule.SlowRule`
            (:class:`agents.outer.OuterOptimizer`: outer SGD, SlowMo, DiLoCo;
            :class:`agents.adaptive.AdaptiveAlpha`), run by
            :mod:`launch.engine.outer_program` in place of the plain mixing; default None.
        check_finite: before every non-identity sync, check collectively that every agent's
            parameters and losses are finite, else raise
            :class:`launch.engine.health.NonFiniteError` on every rank
            (:mod:`launch.engine.finiteness`).
        overlap: run the blocks whose workers all live on one rank (a distributed Lookahead's
            syncs) overlapped with the inner steps: the passive agents' part is reduced to that
            rank while it computes (:mod:`launch.engine.overlap`); default False (one all-reduce
            per block).  Not with ``outer``.
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
        _check_arguments(model, loss_fn, data, schedule, optimizer, check_finite, overlap)
        self.sync_policy = SyncPolicy(state_policy, schedule)
        self.state_policy = self.sync_policy.agent_policy
        self.comm = comm if comm is not None else LocalCommunicator()
        self.schedule = schedule
        self.loss_fn = loss_fn
        self.placement = Placement.make(schedule.num_agents, self.comm.world_size, agents_per_rank)
        self.rank = self.comm.rank
        check_dtype_device(dtype, device)
        if dtype is not None or device is not None:
            model = copy.deepcopy(model).to(device=device, dtype=dtype)
        check_uniform_parameters(model)
        self.parameter_names = [name for name, _ in model.named_parameters()]

        # -- every distinct P_t compiled for this rank (local: the same choices on every rank) ---
        layout = probe_state_layout(model, optimizer) if self.state_policy == "pullback" else StateLayout.empty()
        compiled = compile_sync(
            schedule, self.placement, self.rank, numel=sum(p.numel() for p in model.parameters()),
            state_numel=layout.numel, policy=self.sync_policy, outer=outer, overlap=overlap,
            check_rule=lambda rule: rule.check(model, optimizer))
        self.programs = compiled.programs

        # -- the one metadata exchange: parameter shapes must agree across ranks ----------------
        _check_signatures(self.comm.all_gather_object(module_signature(model)))
        self.comm.init_groups(compiled.groups)   # collective: every rank, in the same order

        # -- the agents of this rank, theta_0 everywhere ---------------------------------------
        self.agents: dict[int, Agent] = {
            i: self._make_agent(i, model, optimizer, data, layout) for i in self.placement.agents_on(self.rank)
        }
        self._broadcast_initial_parameters()
        self.slow_sync = compiled.slow_sync
        if self.slow_sync is not None:
            self.slow_sync.start(self.agents)
        self.t = 0
        self.finiteness = make_finiteness_check(check_finite, compiled.hub, self.agents, schedule.num_agents,
                                                self.comm)
        uses_hub = any(p.hub_blocks for p in self.programs)
        self.overlap = (Overlap(self.programs, schedule, self.agents, self.comm, self.finiteness, lambda: self.t)
                        if uses_hub else NoOverlap())

    def _make_agent(self, i: int, model: nn.Module, optimizer, data, layout: StateLayout) -> Agent:
        worker = i in self.schedule.workers
        stream = iter(data(i) if callable(data) else data) if worker else None
        return Agent(i, model, worker=worker, optimizer=optimizer, data=stream, state_policy=self.state_policy,
                     layout=layout, push_sum=self.schedule.push_sum)

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
        self.overlap.before_step(self.t)    # overlapped syncs: start the next sync's reduces
        losses = {
            i: agent.inner_step(self.loss_fn) for i, agent in self.agents.items() if agent.is_worker
        }
        self.finiteness.record(losses)
        self.sync(self.t)
        self.t += 1
        return losses

    @torch.no_grad()
    def sync(self, t: int) -> None:
        """Apply P_t to the agents (nothing at all when P_t is the identity)."""
        program = self.programs[self.schedule.matrix_index(t)]
        if program.is_identity:
            return
        self.overlap.before_sync(t)
        self.finiteness.before_sync(t)
        with collective(self.comm, t, "sync", program.peers):
            program.run(self.agents, self.comm)
        self.overlap.after_sync(t, program)
        for i in program.touched:
            self.agents[i].after_sync(reset=program.reset)

    def wait_in_flight(self) -> None:
        """Wait for this rank's asynchronous sync traffic (``overlap=True``): after it, every local
        buffer may be written.  Collective-free; needed only by code that writes parameters
        between steps."""
        self.overlap.wait()

    def run(self, steps: int, callback: Callable[["Simulation", dict], None] | None = None) -> None:
        """``steps`` iterations; ``callback(sim, losses)`` after each."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer; got {steps!r}")
        for _ in range(steps):
            losses = self.step()
            if callback is not None:
                callback(self, losses)

    # -- checkpoints (see launch.engine.checkpoint for files, RNG states and layouts) ------------
    def state_dict(self) -> dict:
        """This rank's part of the state: ``{"t": t, "agents": {i: Agent.state_dict()}}``."""
        return {"t": self.t, "agents": {i: a.state_dict() for i, a in self.agents.items()}}

    def replicated_state(self) -> dict | None:
        """The state every rank holds a bitwise-equal replica of (a slow rule's anchor and its
        own state, :meth:`launch.engine.outer_program.SlowRuleSync.state_dict`), or None."""
        return None if self.slow_sync is None else self.slow_sync.state_dict()

    def load_replicated_state(self, state: dict) -> None:
        """Restore :meth:`replicated_state` (``ValueError`` when this simulation keeps none)."""
        if self.slow_sync is None:
            raise ValueError("this simulation has no slow rule (outer=None): it keeps no replicated state")
        self.slow_sync.load_state_dict(state)

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


def _check_arguments(model, loss_fn, data, schedule, optimizer, check_finite, overlap) -> None:
    """The arguments that :class:`Simulation` validates before anything else (no communication)."""
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a topology.Schedule; got {type(schedule).__name__}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not callable(optimizer):
        raise ValueError("optimizer must be a factory: params -> torch.optim.Optimizer")
    if not callable(loss_fn):
        raise ValueError("loss_fn must be callable as loss_fn(module, batch)")
    for name, value in (("check_finite", check_finite), ("overlap", overlap)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False; got {value!r}")
    if len(schedule.workers) > 1 and not callable(data):
        raise ValueError(
            f"data must be a function agent_index -> iterable when the schedule has "
            f"{len(schedule.workers)} workers; got a single {type(data).__name__}"
        )
    if not callable(data) and not (hasattr(data, "__iter__") or hasattr(data, "__getitem__")):
        raise ValueError(f"data must be an iterable of batches (or agent_index -> iterable); "
                         f"got {type(data).__name__}")


def _check_signatures(signatures: list) -> None:
    """Every rank's parameter signature must equal rank 0's (the same error on every rank)."""
    reference = signatures[0]
    for rank, other in enumerate(signatures):
        if other == reference:
            continue
        for a, b in zip(reference, other):
            if a != b:
                raise ValueError(
                    f"model parameters must have the same names, shapes and dtypes on every rank; "
                    f"rank 0 has {a[0]} {a[1]} {a[2]}, rank {rank} has {b[0]} {b[1]} {b[2]}"
                )
        raise ValueError(
            f"model parameters must be the same on every rank; rank 0 has {len(reference)} "
            f"parameter tensors, rank {rank} has {len(other)}"
        )
