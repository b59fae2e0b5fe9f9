"""A plan compiled for one rank: the steps that apply one mixing matrix P to this rank's agents.

A :class:`topology.Plan` is rank-agnostic; a :class:`RankProgram` is what one rank of a placement
does to apply it, built once per distinct P_t by :func:`launch.engine.sync.compile.compile_sync`:

    1. snapshot: copy the old value of every local agent that an operation other than the one
       overwriting it reads (the plan's ``snapshot``), so every operation reads X_t;
    2. the point-to-point mixes (exchange, then local weighted sums), if any;
    3. every block, in the plan's order (an all-reduce, or overlapped around a hub).

Every step reads the old values and writes only its own receivers, so their order does not change
the result; it fixes the order of the collectives, the same on every rank (and the order in which
the finiteness check's markers travel: :mod:`launch.engine.guard.windows` models it).  Afterwards the
simulation calls ``after_sync(reset=program.reset)`` on :attr:`RankProgram.touched` (the state
policy's post-sync action).
"""

from __future__ import annotations

import torch

from launch.comm.base import Communicator
from launch.engine.sync.blocks import AllReduceBlock, HubBlock, PointToPointMixes, ProgramContext
from launch.engine.guard.finiteness import NO_CHECK, SyncHooks
from topology.plan import Plan


class RankProgram:
    """What rank ``rank`` does to apply ``plan``.

    Attributes:
        plan: the rank-agnostic plan.
        touched: the local agents whose value the sync changes.
        reset: whether the state policy resets the inner state at this sync.
        blocks: the block steps (:class:`~launch.engine.sync.blocks.AllReduceBlock` or
            :class:`~launch.engine.sync.blocks.HubBlock`); ``mixes``: the point-to-point step or None.
        peers: every rank this program communicates with, this rank included.
    """

    def __init__(self, plan: Plan, rank: int, local: set[int], blocks: list[AllReduceBlock],
                 mixes: PointToPointMixes | None, ctx: ProgramContext, reset: bool = False):
        self.plan = plan
        self.rank = rank
        self.blocks = tuple(blocks)
        self.mixes = mixes
        self.ctx = ctx
        self.reset = reset
        self.touched = tuple(i for i in plan.touched if i in local)
        self.hub_blocks = tuple(b for b in self.blocks if isinstance(b, HubBlock))
        peers = {r for b in self.blocks for g in b.groups for r in g} | {rank}
        self.peers = tuple(sorted(peers | (mixes.peers if mixes is not None else set())))

    @property
    def is_identity(self) -> bool:
        return self.plan.is_identity

    @property
    def groups(self) -> set[tuple[int, ...]]:
        """The process groups this program communicates on."""
        return {g for b in self.blocks for g in b.groups}

    @property
    def num_collectives(self) -> int:
        """All-reduces this rank enters per run (hub blocks: a reduce and a broadcast instead)."""
        return sum(b.all_reduces for b in self.blocks)

    def prefetch(self, tensors: dict[int, torch.Tensor], comm: Communicator, check: SyncHooks = NO_CHECK) -> None:
        """Start what can travel before the sync (the hub blocks' reduces)."""
        for block in self.hub_blocks:
            block.prefetch(tensors, comm, check)

    def broadcasts(self) -> list:
        """The hub blocks' broadcasts still in flight (emptied by the caller once waited for)."""
        return [pending for block in self.hub_blocks for pending in block.broadcasts]

    def clear_broadcasts(self) -> None:
        for block in self.hub_blocks:
            block.broadcasts.clear()

    def run_tensors(self, tensors: dict[int, torch.Tensor], comm: Communicator, check: SyncHooks = NO_CHECK) -> None:
        """Apply the plan to the local agents' flat ``tensors`` (agent index -> tensor), in place;
        ``check``: the finiteness check's hooks (:mod:`launch.engine.guard.finiteness`)."""
        old = dict(tensors)
        for i in self.ctx.snapshot:
            snap = self.ctx.scratch.like(f"snapshot{i}", tensors[i])
            snap.copy_(tensors[i])
            old[i] = snap
        if self.mixes is not None:
            self.mixes.run(tensors, old, comm, check)
        for block in self.blocks:
            block.run(tensors, old, comm, check)

    def run(self, agents: dict, comm: Communicator, check: SyncHooks = NO_CHECK) -> None:
        """Apply the plan to this rank's agents (their :meth:`agents.agent.Agent.sync_tensor`)."""
        self.run_tensors({i: agent.sync_tensor() for i, agent in agents.items()}, comm, check)
