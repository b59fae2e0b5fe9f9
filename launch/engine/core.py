"""The engine's core: the agents of a schedule on this rank, and everything around their inner steps.

A training loop, whoever writes it, does the same thing at every iteration t:

    1. ``begin_step()``: start what can travel ahead (overlapped syncs' reduces);
    2. every local worker takes one inner step:                       x_i <- x_i - lr * g_i;
    3. ``end_step(losses)``: the finiteness check's record, the sync  X <- X P_t,  t <- t + 1.

:class:`SyncEngine` owns steps 1 and 3; step 2 belongs to a *door* that holds the engine:
:class:`launch.Simulation` (its own loop over ``loss_fn`` and the data) or
:class:`launch.AgentOptimizer` (the user's loop).  Both hold it the same way (as ``.engine``) and
reach it only through the methods below.  All ranks derive P_t from the same counter t; no matrix
is ever sent.

Start-up, identical on every rank and in this order:

1. *local* (no communication): the options (:class:`EngineOptions`), the placement, the door's own
   refusals (``admit``), the state policy, every distinct P_t compiled for this rank
   (:func:`launch.engine.sync.compile.compile_sync`: the one place where a sync's strategy is
   chosen);
2. *the agreement* (:func:`agree`), the first collective: every rank contributes its local verdict
   (the ``ValueError`` it met in 1, or none) and a description of everything that must agree
   across ranks (the schedule, placement, options, policies, slow rule, dtype, the parameters'
   names and shapes); any verdict or difference is the same ``ValueError`` on every rank, naming
   the option and each rank's value -- so a rank that was given other options is refused at once,
   instead of hanging in a collective the others never enter;
3. the process groups every program needs, created and warmed; this rank's agents; agent 0's
   initial parameters broadcast so every column of X starts equal (theta_0).

The sync of iteration t (:meth:`SyncEngine.sync`) is the same few calls whatever the options:
``overlap.before_sync`` (overlapped syncs: wait and prefetch; else nothing), the finiteness
check's ``before_sync`` (:mod:`launch.engine.guard.finiteness`), the program of P_t under the
lost-rank handler (:func:`launch.engine.guard.health.collective`; its steps call the check's
hooks), the check's ``after_sync`` (at a decision sync, every rank raises or none does),
``overlap.after_sync``, and the state policy's ``after_sync`` on the agents the program touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from agents.agent import Agent, OptimizerFactory, StateLayout, probe_state_layout
from agents.flat import check_uniform_parameters, module_signature, parameter_region
from agents.settings import normalize
from launch.comm.base import Communicator
from launch.comm.local import LocalCommunicator
from launch.engine.guard.health import collective, gather_objects
from launch.engine.placement import Placement
from launch.engine.sync.compile import CompiledSync, compile_sync
from launch.engine.sync.overlap import NoOverlap, Overlap
from launch.engine.sync.state_weights import SyncPolicy
from launch.engine.guard.finiteness import make_finiteness_check
from topology.schedule import Schedule

#: ``make_agent(index, layout, policy) -> Agent``: the door's agents (see :class:`SyncEngine`).
AgentMaker = Callable[[int, StateLayout, str], Agent]


@dataclass(frozen=True)
class EngineOptions:
    """The options of the engine, with their one default each (both doors and the command line
    take them as they are here).

    Attributes:
        state_policy: ``maintain`` | ``reset`` | ``pullback`` (:mod:`agents.state_policy`), or for
            a multilayer schedule one policy per level (:mod:`agents.level_policy`).
        agents_per_rank: agents per rank; None: num_agents / world_size (every agent on one rank
            co-located).
        outer: a state-dependent slow update (:class:`agents.slow_rule.SlowRule`), or None.
        check_finite: check every non-identity sync for NaN or Inf (:mod:`launch.engine.guard`).
        overlap: run the blocks that qualify overlapped with the inner steps: True, False, or
            ``"auto"``, wherever it applies (:func:`launch.engine.sync.compile.compile_sync`).
        exact: add every sum a sync forms in one order fixed by the agents' indices, so that the
            run's syncs give the same bits co-located and on any layout of ranks
            (:mod:`launch.engine.sync.ordered`); default False (the backend's all-reduce).
    """

    state_policy: object = "maintain"
    agents_per_rank: int | None = None
    outer: object = None
    check_finite: bool = True
    overlap: bool | str = "auto"
    exact: bool = False

    def validate(self) -> None:
        """``ValueError`` for an option that is not one of its allowed values (the others are
        validated where they are used: the state policy, the slow rule, agents_per_rank)."""
        if not isinstance(self.check_finite, bool):
            raise ValueError(f"check_finite must be True or False; got {self.check_finite!r}")
        if not isinstance(self.overlap, bool) and self.overlap != "auto":
            raise ValueError(f"overlap must be True or False, or 'auto' (the default); got {self.overlap!r}")
        if not isinstance(self.exact, bool):
            raise ValueError(f"exact must be True or False; got {self.exact!r}")


class SyncEngine:
    """The agents of ``schedule`` on this rank and their syncs (see the module docstring).

    Args:
        model: a module of the agents' architecture, dtype and device (every rank passes one of
            the same architecture); its parameters give the flat buffers' layout.
        schedule: t -> P_t and the workers (see :mod:`topology`).
        optimizer: the inner-optimizer factory (probed once for the mixable state under
            ``pullback``; given to slow rules' checks).
        make_agent: ``make_agent(index, layout, policy) -> Agent`` builds the local agent
            ``index`` with the mixable-state ``layout`` and the resolved single ``policy``.
        comm: where the agents run; default co-located (:class:`launch.comm.LocalCommunicator`).
        options: :class:`EngineOptions`.
        parameter_names: the names of the parameters (default: ``model``'s).
        admit: ``admit(placement)``, the door's own local refusals (a ``ValueError``), run before
            the agreement so that they too are raised on every rank alike.
    """

    def __init__(self, model: nn.Module, schedule: Schedule, optimizer: OptimizerFactory, make_agent: AgentMaker,
                 *, comm: Communicator | None = None, options: EngineOptions = EngineOptions(),
                 parameter_names: list[str] | None = None, admit: Callable[[Placement], None] | None = None):
        self.comm = comm if comm is not None else LocalCommunicator()
        self.rank = self.comm.rank
        self.schedule, self.options = schedule, options
        self._t = 0
        verdict = None
        try:
            self._prepare(model, optimizer, admit)
        except ValueError as err:
            verdict = str(err)
        agree(self.comm, verdict, None if verdict else self._terms(model))
        self.parameter_names = parameter_names or [name for name, _ in model.named_parameters()]
        self._start(make_agent)

    # -- start-up (module docstring) --------------------------------------------------------------
    def _prepare(self, model: nn.Module, optimizer: OptimizerFactory, admit) -> None:
        """Step 1: every local check and choice, no communication."""
        self.options.validate()
        self.placement = Placement.make(self.schedule.num_agents, self.comm.world_size,
                                        self.options.agents_per_rank)
        if admit is not None:
            admit(self.placement)
        self.sync_policy = SyncPolicy(self.options.state_policy, self.schedule)
        check_uniform_parameters(model)
        pullback = self.sync_policy.agent_policy == "pullback"
        self._layout = probe_state_layout(model, optimizer) if pullback else StateLayout.empty()
        numel = parameter_region(model)       # the parameters' region of a flat buffer (aligned)
        first = next(model.parameters())
        itemsize = first.element_size()
        #: Bytes of one agent's buffer that a sync moves: its parameters, and under ``pullback`` the
        #: mixable inner state after them (what the communicator counts per collective).
        self.sync_nbytes = (numel + self._layout.numel) * itemsize
        self.compiled: CompiledSync = compile_sync(
            self.schedule, self.placement, self.rank, numel=numel, state_numel=self._layout.numel,
            policy=self.sync_policy, outer=self.options.outer, overlap=self.options.overlap,
            check_rule=lambda rule: rule.check(model, optimizer), itemsize=itemsize, exact=self.options.exact,
            backend=self.comm.backend, dtype=first.dtype)
        self.programs = self.compiled.programs

    def _terms(self, model: nn.Module) -> dict:
        """What must agree across ranks, by the name the user gave it (:func:`agree`)."""
        return {
            "schedule": f"{self.schedule!r} [{self.schedule.fingerprint()[:12]}]",   # as the run record
            "agents_per_rank": self.placement.agents_per_rank,
            "state_policy": list(self.sync_policy.levels),
            "outer": None if self.options.outer is None else normalize(self.options.outer.describe()),
            "check_finite": self.options.check_finite,
            "overlap": self.options.overlap,
            "exact": self.options.exact,
            "parameters": module_signature(model),
        }

    def _start(self, make_agent: AgentMaker) -> None:
        """Step 3: the process groups, this rank's agents, theta_0 everywhere."""
        with collective(self.comm, 0, "creation of the process groups", tuple(range(self.comm.world_size))):
            self.comm.init_groups(self.compiled.groups)   # every rank, in the same order
        policy = self.sync_policy.agent_policy
        self.agents: dict[int, Agent] = {i: make_agent(i, self._layout, policy)
                                         for i in self.placement.agents_on(self.rank)}
        self._broadcast_initial_parameters()
        self.slow_sync = self.compiled.slow_sync
        if self.slow_sync is not None:
            self.slow_sync.start(self.agents)
        self.finiteness = make_finiteness_check(self.options.check_finite, self.compiled.windows, self.agents,
                                                self.schedule.num_agents, self.comm)
        uses_hub = any(p.hub_blocks for p in self.programs)
        self.overlap = (Overlap(self.programs, self.schedule, self.agents, self.comm, self.finiteness, lambda: self.t)
                        if uses_hub else NoOverlap())

    def _broadcast_initial_parameters(self) -> None:
        """theta_0 = agent 0's parameters on rank 0, copied into every column of X."""
        first = self.agents[min(self.agents)]
        source = first.params
        if self.comm.world_size > 1:
            with collective(self.comm, 0, "broadcast of theta_0", tuple(range(self.comm.world_size))):
                self.comm.broadcast_(source, src=0)
        for agent in self.agents.values():
            if agent is not first:
                agent.params.copy_(source)

    # -- the counter -------------------------------------------------------------------------------
    @property
    def t(self) -> int:
        """Iterations done: the sync of iteration t is the next one (read-only: the engine's
        methods advance it)."""
        return self._t

    @property
    def slow_rule(self):
        """The slow rule (``options.outer``), or None."""
        return None if self.slow_sync is None else self.slow_sync.rule

    # -- around the inner steps ------------------------------------------------------------------
    def begin_step(self) -> None:
        """Before the inner steps of iteration t (overlapped syncs: start the next sync's reduces)."""
        self.overlap.before_step(self._t)

    def end_step(self, losses: dict[int, torch.Tensor], before_sync: Callable[[], None] | None = None) -> None:
        """After the inner steps of iteration t: keep ``losses`` (the local workers' losses, by
        agent) for the finiteness check, call ``before_sync()`` (a reader of the agents between
        their inner steps and the sync: the record's metrics), apply the sync of P_t, advance t."""
        self.finiteness.record(losses)
        if before_sync is not None:
            before_sync()
        self.sync(self._t)
        self._t += 1

    def follow(self, t: int, before_sync: Callable[[], None] | None = None) -> None:
        """A rank without a worker following the workers (:meth:`launch.AgentOptimizer.serve`):
        the sync of iteration ``t`` (announced by the workers; ``before_sync`` as in
        :meth:`end_step`), then t + 1.  No identity step between the last sync and t has anything
        to do on such a rank."""
        self._t = t
        self.end_step({}, before_sync)

    def catch_up(self, t: int) -> None:
        """The counter set to ``t`` when it is behind (the workers took ``t`` steps, the last ones
        between syncs): no sync runs."""
        self._t = max(self._t, t)

    def is_sync(self, t: int) -> bool:
        """Whether the sync of iteration t does anything (P_t is not the identity): only such
        syncs have collectives."""
        return not self.programs[self.schedule.matrix_index(t)].is_identity

    @torch.no_grad()
    def sync(self, t: int) -> None:
        """Apply P_t to the agents (nothing at all when P_t is the identity)."""
        program = self.programs[self.schedule.matrix_index(t)]
        if program.is_identity:
            return
        self.overlap.before_sync(t)
        self.finiteness.before_sync(t)
        with collective(self.comm, t, "sync", program.peers):
            program.run(self.agents, self.comm, self.finiteness)
        self.finiteness.after_sync(t)
        self.overlap.after_sync(t, program)
        for i in program.touched:
            self.agents[i].after_sync(reset=program.reset)

    def wait_in_flight(self) -> None:
        """Wait for this rank's asynchronous sync traffic (``overlap``): after it, every local
        buffer may be written.  Collective-free; needed only by code that writes parameters
        between steps."""
        self.overlap.wait()

    def check_finite(self, where: str) -> None:
        """The collective finiteness check of every agent now (before a checkpoint, at the end of
        a run): :class:`launch.engine.guard.health.NonFiniteError` on every rank alike."""
        self.finiteness.check(self._t, where)

    # -- state (the store, launch.engine.store, saves and restores it) -----------------------------
    def state_dict(self) -> dict:
        """This rank's part of the state: ``{"t": t, "agents": {i: Agent.state_dict()}}``."""
        return {"t": self._t, "agents": {i: a.state_dict() for i, a in self.agents.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counter t and this rank's agents from ``state["agents"]`` (keyed by agent
        index; entries of other agents are ignored, so any layout's state fits).  Only a fresh
        engine (no step taken) can load: data streams are re-positioned from their start."""
        if self._t != 0 or any(a.steps for a in self.agents.values()):
            raise ValueError(f"load_state_dict needs a fresh Simulation; this one is at t={self._t}")
        missing = sorted(set(self.agents) - set(state["agents"]))
        if missing:
            raise ValueError(f"the state holds no entry for agent(s) {missing} of this rank")
        for i, agent in self.agents.items():
            agent.load_state_dict(state["agents"][i])
        self._t = int(state["t"])

    def replicated_state(self) -> dict | None:
        """The state every rank holds a bitwise-equal replica of (a slow rule's anchor and its
        own state, :meth:`launch.engine.sync.slow_rule.SlowRuleSync.state_dict`), or None."""
        return None if self.slow_sync is None else self.slow_sync.state_dict()

    def load_replicated_state(self, state: dict) -> None:
        """Restore :meth:`replicated_state` (``ValueError`` when this engine keeps none)."""
        if self.slow_sync is None:
            raise ValueError("this simulation has no slow rule (outer=None): it keeps no replicated state")
        self.slow_sync.load_state_dict(state)

    def local_parameters(self) -> dict[int, torch.Tensor]:
        """Flat parameter vectors of this rank's agents, packed (``module.parameters()`` order, no
        padding: :mod:`agents.flat`): live views when the buffer's layout has no padding, else copies."""
        return {i: agent.flat.pack(agent.params) for i, agent in self.agents.items()}

    def worker_optimizers(self) -> list[torch.optim.Optimizer]:
        """The inner optimizers of this rank's workers, in agent order."""
        return [a.optimizer for _, a in sorted(self.agents.items()) if a.is_worker]


def agree(comm: Communicator, verdict: str | None, terms: dict | None) -> None:
    """The start-up agreement (module docstring): one all-gather of every rank's ``verdict`` (a
    local refusal's message, or None) and ``terms`` (``{name: value}``, what must agree; None
    with a verdict).  Raises the same ``ValueError`` on every rank: the verdicts (every rank's
    that has one), else the first term on which a rank differs from rank 0, naming each rank's
    value."""
    reports = gather_objects(comm, (verdict, terms), 0, "start-up agreement of the ranks")
    refused = [(rank, v) for rank, (v, _) in enumerate(reports) if v is not None]
    if refused:
        if len(reports) == 1:
            raise ValueError(refused[0][1])
        if len(refused) == len(reports) and len({v for _, v in refused}) == 1:
            raise ValueError(f"{refused[0][1]} (on every rank)")
        raise ValueError("; ".join(f"rank {rank}: {v}" for rank, v in refused))
    reference = reports[0][1]
    for name, value in reference.items():
        values = [terms[name] for _, terms in reports]
        if any(v != value for v in values):
            raise ValueError(_disagreement(name, values))


def _disagreement(name: str, values: list) -> str:
    """The message of a term on which the ranks differ (``values`` by rank)."""
    if name == "parameters":
        reference = values[0]
        rank, other = next((r, v) for r, v in enumerate(values) if v != reference)
        for a, b in zip(reference, other):
            if a != b:
                return (f"model parameters must have the same names, shapes and dtypes on every rank; "
                        f"rank 0 has {a[0]} {a[1]} {a[2]}, rank {rank} has {b[0]} {b[1]} {b[2]}")
        return (f"model parameters must be the same on every rank; rank 0 has {len(reference)} "
                f"parameter tensors, rank {rank} has {len(other)}")
    shown = "; ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
    return (f"{name} must be the same on every rank (every rank builds the engine with the same "
            f"schedule and options); got {shown}")
