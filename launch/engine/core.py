"""The engine's core: the agents of a schedule on this rank, and everything around their inner steps.

A training loop, whoever writes it, does the same thing at every iteration t:

    1. ``begin_step()``: start what can travel ahead (overlapped syncs' reduces);
    2. every local worker takes one inner step:                       x_i <- x_i - lr * g_i;
    3. ``end_step(losses)``: the finiteness check's record, the sync  X <- X P_t,  t <- t + 1.

:class:`SyncEngine` owns steps 1 and 3; step 2 belongs to the driver: :class:`launch.Simulation`
(its own loop over ``loss_fn`` and the data) or ``launch.AgentOptimizer`` (the user's loop).  All
ranks derive P_t from the same counter t; no matrix is ever sent.

Start-up, identical on every rank and in this order: validate the arguments and the placement
(local, no communication); compile every distinct P_t for this rank
(:func:`launch.engine.sync.compile.compile_sync`: the one place where a sync's strategy is chosen,
local too, so a bad combination raises the same error everywhere before any collective);
exchange the parameter signatures (one all-gather) and raise the same error everywhere if they
differ; create and warm the process groups every program needs; build this rank's agents;
broadcast agent 0's initial parameters so every column of X starts equal (theta_0).

The sync of iteration t (:meth:`SyncEngine.sync`) is the same few calls whatever the options:
``overlap.before_sync`` (overlapped syncs: wait and prefetch; else nothing), the finiteness
check's ``before_sync`` (:mod:`launch.engine.guard.finiteness`), the program of P_t under the lost-rank
handler (:func:`launch.engine.guard.health.collective`; its steps call the check's hooks), the check's
``after_sync`` (at a decision sync, every rank raises or none does), ``overlap.after_sync``, and
the state policy's ``after_sync`` on the agents the program touched.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from agents.agent import Agent, OptimizerFactory, StateLayout, probe_state_layout
from agents.flat import check_uniform_parameters, module_signature, parameter_region
from launch.comm.base import Communicator
from launch.comm.local import LocalCommunicator
from launch.engine.sync.compile import compile_sync
from launch.engine.guard.finiteness import make_finiteness_check
from launch.engine.guard.health import collective, gather_objects
from launch.engine.sync.overlap import NoOverlap, Overlap
from launch.engine.placement import Placement
from launch.engine.sync.state_weights import SyncPolicy
from topology.schedule import Schedule

#: ``make_agent(index, layout, policy) -> Agent``: the driver's agents (see :class:`SyncEngine`).
AgentMaker = Callable[[int, StateLayout, str], Agent]


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
        state_policy, comm, agents_per_rank, outer, check_finite, overlap: as in
            :class:`launch.Simulation`.
    """

    def __init__(self, model: nn.Module, schedule: Schedule, optimizer: OptimizerFactory, make_agent: AgentMaker,
                 *, state_policy="maintain", comm: Communicator | None = None, agents_per_rank: int | None = None,
                 outer=None, check_finite: bool = True, overlap: bool | str = "auto"):
        # -- local validation: the same result on every rank, before any communication ------
        if not isinstance(check_finite, bool):
            raise ValueError(f"check_finite must be True or False; got {check_finite!r}")
        if not isinstance(overlap, bool) and overlap != "auto":
            raise ValueError(f"overlap must be True or False, or 'auto' (the default); got {overlap!r}")
        self.sync_policy = SyncPolicy(state_policy, schedule)
        self.state_policy = self.sync_policy.agent_policy
        self.comm = comm if comm is not None else LocalCommunicator()
        self.schedule = schedule
        self.placement = Placement.make(schedule.num_agents, self.comm.world_size, agents_per_rank)
        self.rank = self.comm.rank
        check_uniform_parameters(model)
        self.parameter_names = [name for name, _ in model.named_parameters()]

        # -- every distinct P_t compiled for this rank (local: the same choices on every rank) ---
        layout = probe_state_layout(model, optimizer) if self.state_policy == "pullback" else StateLayout.empty()
        numel = parameter_region(model)       # the parameters' region of a flat buffer (aligned)
        #: Bytes of one agent's buffer that a sync moves: its parameters, and under ``pullback`` the
        #: mixable inner state after them (what the communicator counts per collective).
        self.sync_nbytes = (numel + layout.numel) * next(model.parameters()).element_size()
        compiled = compile_sync(
            schedule, self.placement, self.rank, numel=numel,
            state_numel=layout.numel, policy=self.sync_policy, outer=outer, overlap=overlap,
            check_rule=lambda rule: rule.check(model, optimizer),
            itemsize=next(model.parameters()).element_size())
        self.programs = compiled.programs

        # -- the one metadata exchange: parameter shapes must agree across ranks ----------------
        world = tuple(range(self.comm.world_size))
        _check_signatures(gather_objects(self.comm, module_signature(model), 0, "start-up exchange of signatures"))
        with collective(self.comm, 0, "creation of the process groups", world):
            self.comm.init_groups(compiled.groups)   # every rank, in the same order

        # -- the agents of this rank, theta_0 everywhere ---------------------------------------
        self.agents: dict[int, Agent] = {
            i: make_agent(i, layout, self.state_policy) for i in self.placement.agents_on(self.rank)
        }
        self._broadcast_initial_parameters()
        self.slow_sync = compiled.slow_sync
        if self.slow_sync is not None:
            self.slow_sync.start(self.agents)
        self.t = 0
        self.finiteness = make_finiteness_check(check_finite, compiled.windows, self.agents, schedule.num_agents,
                                                self.comm)
        uses_hub = any(p.hub_blocks for p in self.programs)
        self.overlap = (Overlap(self.programs, schedule, self.agents, self.comm, self.finiteness, lambda: self.t)
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

    # -- around the inner steps ------------------------------------------------------------------
    def begin_step(self) -> None:
        """Before the inner steps of iteration t (overlapped syncs: start the next sync's reduces)."""
        self.overlap.before_step(self.t)

    def end_step(self, losses: dict[int, torch.Tensor]) -> None:
        """After the inner steps of iteration t: keep ``losses`` (the local workers' losses, by
        agent) for the finiteness check, apply the sync of P_t, advance t."""
        self.finiteness.record(losses)
        self.sync(self.t)
        self.t += 1

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
        """Wait for this rank's asynchronous sync traffic (``overlap=True``): after it, every local
        buffer may be written.  Collective-free; needed only by code that writes parameters
        between steps."""
        self.overlap.wait()

    # -- checkpoints (see launch.engine.store.checkpoint for files, RNG states and layouts) ------------
    def state_dict(self) -> dict:
        """This rank's part of the state: ``{"t": t, "agents": {i: Agent.state_dict()}}``."""
        return {"t": self.t, "agents": {i: a.state_dict() for i, a in self.agents.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counter t and this rank's agents from ``state["agents"]`` (keyed by agent
        index; entries of other agents are ignored, so any layout's state fits).  Only a fresh
        engine (no step taken) can load: data streams are re-positioned from their start."""
        if self.t != 0 or any(a.steps for a in self.agents.values()):
            raise ValueError(f"load_state_dict needs a fresh Simulation; this one is at t={self.t}")
        missing = sorted(set(self.agents) - set(state["agents"]))
        if missing:
            raise ValueError(f"the state holds no entry for agent(s) {missing} of this rank")
        for i, agent in self.agents.items():
            agent.load_state_dict(state["agents"][i])
        self.t = int(state["t"])

    def replicated_state(self) -> dict | None:
        """The state every rank holds a bitwise-equal replica of (a slow rule's anchor and its
        own state, :meth:`launch.engine.sync.slow_rule.SlowRuleSync.state_dict`), or None."""
        return None if self.slow_sync is None else self.slow_sync.state_dict()

    def load_replicated_state(self, state: dict) -> None:
        """Restore :meth:`replicated_state` (``ValueError`` when this engine keeps none)."""
        if self.slow_sync is None:
            raise ValueError("this simulation has no slow rule (outer=None): it keeps no replicated state")
        self.slow_sync.load_state_dict(state)

    # -- reading the agents ----------------------------------------------------------------------
    def local_parameters(self) -> dict[int, torch.Tensor]:
        """Flat parameter vectors of this rank's agents, packed (``module.parameters()`` order, no
        padding: :mod:`agents.flat`): live views when the buffer's layout has no padding, else copies."""
        return {i: agent.flat.pack(agent.params) for i, agent in self.agents.items()}

    def gather_parameters(self) -> list[dict[str, torch.Tensor]]:
        """Every agent's parameters as ``{name: tensor}`` (CPU copies), on every rank (under push-sum
        the de-biased z_i = x_i / w_i)."""
        local = {
            i: [c.view(shape).detach().cpu().clone()
                for c, shape in zip(a.flat.split(a.debiased()), a.flat.shapes)]
            for i, a in self.agents.items()
        }
        merged: dict[int, list[torch.Tensor]] = {}
        for part in gather_objects(self.comm, local, self.t, "gather of the parameters"):
            merged.update(part)
        return [dict(zip(self.parameter_names, merged[i])) for i in range(self.schedule.num_agents)]


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
