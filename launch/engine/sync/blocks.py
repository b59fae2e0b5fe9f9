"""How one rank runs the operations of a plan: the sync strategies.

A :class:`topology.Plan` has *blocks* (receivers that all get the same weighted sum) and *mixes*
(one receiver, a weighted sum of a few sources).  On one rank each becomes one of these steps,
chosen once when the plan is compiled for the rank (:mod:`launch.engine.sync.compile`; the exact
syncs' steps, which add every sum in agent order, are in :mod:`launch.engine.sync.ordered`):

:class:`AllReduceBlock`
    ``acc = sum of w_i x_i`` over the block's local members (the kernel of
    :mod:`launch.engine.sync.kernel`), then one all-reduce (SUM) of ``acc`` over the ranks of the
    block when it spans more than one, then every other local receiver copies ``acc``.  With one
    agent per rank that is ``x.mul_(w); all_reduce(x)``: one collective, in place.
:class:`HubBlock`
    the overlapped form of a block whose workers all live on one rank, the hub
    (:mod:`launch.engine.sync.overlap` says why it is exact and when it applies): the other ranks'
    part ``S = sum of w_i x_i`` is reduced to the hub before the sync (:meth:`HubBlock.prefetch`),
    the hub adds its own members' part at the sync and broadcasts the result.
:class:`PremulBlock`
    on NCCL, an all-reduce block whose one local term is its first receiver's own buffer:
    ``ReduceOp.PREMUL_SUM`` forms the product inside the collective (where it gives the same bits,
    :func:`launch.engine.sync.compile.premul_applies`).
:class:`PointToPointMixes`
    every mix of the plan that has a receiver or a source here: one batched exchange of the
    messages between ranks (one per (source agent, destination rank) pair), then the local
    weighted sums.

The finiteness check (:mod:`launch.engine.guard.finiteness`) rides along: every step forms its products
through ``check.scale`` (checked in the same pass), sends buffers after ``check.inspect``, and
calls ``check.mark`` on what it contributes to a collective and ``check.read`` on what it gets
back (the first element of each: the marker).  With the check off these do nothing.

Memory: ``acc`` is the first local receiver's own buffer whenever it is a receiver whose old value
nothing else reads (not in the plan's snapshot) -- it is overwritten by ``acc`` anyway -- and the
other receivers' products are formed in place for the same reason; so a co-located Lookahead
block needs no scratch buffer.  Products of passive members, snapshots, received values and
gossip accumulators use the program's :class:`~launch.engine.sync.kernel.Scratch`, allocated once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from launch.comm.base import Communicator
from launch.engine.sync.kernel import Scratch, Term, WeightedSum

Tensors = dict[int, torch.Tensor]


@dataclass(frozen=True)
class LocalBlock:
    """A block of a plan as one rank sees it."""

    terms: tuple[Term, ...]         # local members with a non-zero weight, in agent order
    receivers: tuple[int, ...]      # local receivers, in agent order
    ranks: tuple[int, ...]          # the ranks of all members: the block's process group


@dataclass(frozen=True)
class ProgramContext:
    """What the steps of one compiled program share: the agents snapshotted before the sync
    (their old values are read by an operation other than the one that overwrites them), the
    scratch buffers and the kernel."""

    snapshot: frozenset
    scratch: Scratch
    kernel: WeightedSum


class AllReduceBlock:
    """A block: local weighted sum, all-reduce over the block's ranks, copies to local receivers.

    ``ordered``: the local sum is added in the terms' (agent) order, left to right (the exact
    syncs, :mod:`launch.engine.sync.ordered`); otherwise the first receiver's own term may be moved
    first, to be scaled in place."""

    def __init__(self, block: LocalBlock, ctx: ProgramContext, *, ordered: bool = False):
        self.block = block
        self.ctx = ctx
        self.ordered = ordered

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """The process groups this step communicates on."""
        return (self.block.ranks,) if len(self.block.ranks) > 1 else ()

    @property
    def all_reduces(self) -> int:
        """All-reduces this rank enters per run."""
        return 1 if len(self.block.ranks) > 1 else 0

    def prefetch(self, tensors: Tensors, comm: Communicator, check) -> None:
        """Nothing to start ahead of the sync."""

    def accumulator(self, tensors: Tensors, terms, reach: int = 1) -> tuple[torch.Tensor, bool]:
        """``(acc, in_place)``: where this rank's sum of ``terms`` goes, and whether the first
        receiver's term is scaled in place there (moved first among the terms).

        acc is the first local receiver's buffer, its own term scaled in place, when no other
        operation reads its old value (not in the snapshot).  In an ordered sum only where moving
        that term first changes no bit: at position 0, or up to ``reach`` (1 for a sum that starts
        with its first term: a + b = b + a exactly; 0 for a sum prefixed by a running sum); further
        back, acc is a scratch buffer (the receiver's old value is still to be read).  No receiver
        here: a scratch buffer."""
        block, ctx = self.block, self.ctx
        first = block.receivers[0] if block.receivers else None
        position = next((k for k, (i, _) in enumerate(terms) if i == first), None)
        free = first is not None and first not in ctx.snapshot and position is not None
        if free and (not self.ordered or position <= reach):
            return tensors[first], True
        if first is None or free:
            return ctx.scratch.like("acc", next(iter(tensors.values()))), False
        return tensors[first], False

    def spare(self, tensors: Tensors, acc: torch.Tensor) -> frozenset:
        """The local receivers other than acc's owner whose old value nothing else reads: overwritten
        by acc at the end, their products may be formed in place."""
        return frozenset(r for r in self.block.receivers if r not in self.ctx.snapshot and tensors[r] is not acc)

    def local_sum(self, tensors: Tensors, old: Tensors, check, terms=None) -> torch.Tensor:
        """acc = this rank's part of the block (``terms``, default the block's local terms),
        held where :meth:`accumulator` says."""
        terms = list(self.block.terms if terms is None else terms)
        acc, in_place = self.accumulator(tensors, terms)
        if in_place:  # acc's own term first: it is scaled in place
            first = self.block.receivers[0]
            terms = [t for t in terms if t[0] == first] + [t for t in terms if t[0] != first]
        return self.ctx.kernel(acc, terms, old, in_place=in_place, spare=self.spare(tensors, acc), check=check)

    def copy_to_receivers(self, tensors: Tensors, acc: torch.Tensor) -> None:
        for r in self.block.receivers:
            if tensors[r] is not acc:
                tensors[r].copy_(acc)

    def run(self, tensors: Tensors, old: Tensors, comm: Communicator, check) -> None:
        acc = self.local_sum(tensors, old, check)
        if len(self.block.ranks) > 1:
            check.mark(acc)
            comm.all_reduce_(acc, self.block.ranks)
            check.read(acc)
        self.copy_to_receivers(tensors, acc)


class PremulBlock(AllReduceBlock):
    """A block on NCCL whose one local term is its first receiver's own buffer, not in the snapshot:
    ``all_reduce(x, PREMUL_SUM(w))`` instead of ``x.mul_(w); all_reduce(x)``, the product formed
    inside the collective (one pass over the buffer fewer).  Chosen by
    :func:`launch.engine.sync.compile.premul_applies`, where it gives the same bits as the two
    passes.  The finiteness check inspects the buffer as it is sent."""

    def run(self, tensors: Tensors, old: Tensors, comm: Communicator, check) -> None:
        (agent, (weight,)), = self.block.terms
        acc = tensors[agent]
        check.inspect(acc, agent)
        check.mark(acc)
        comm.all_reduce_(acc, self.block.ranks, premul=weight)
        check.read(acc)
        self.copy_to_receivers(tensors, acc)


class HubBlock(AllReduceBlock):
    """A block run overlapped around its hub rank (see :mod:`launch.engine.sync.overlap`):

        hub:          acc = sum of w_i x_i over its members;  acc += S;  broadcast(acc)
        other ranks:  s_q = sum of w_i x_i over theirs (at the prefetch);  S = reduce(s_q) to hub

    ``name`` keys this block's scratch buffer (S on the hub, s_q elsewhere) in ``scratch``.
    """

    def __init__(self, block: LocalBlock, ctx: ProgramContext, hub: int, rank: int, name: str,
                 scratch: Scratch | None = None):
        super().__init__(block, ctx)
        self.hub, self.rank, self.name = hub, rank, name
        #: Where S (hub) or this rank's part lives: shared by the hub blocks of every matrix at
        #: this position (their syncs run one after the other), else the program's.
        self.scratch = scratch if scratch is not None else ctx.scratch
        self._reduce = None
        #: The hub's broadcasts in flight: their source (the receivers' acc) stays read-only
        #: until they are waited for (:meth:`launch.engine.sync.overlap.Overlap.wait`).
        self.broadcasts: list = []

    @property
    def all_reduces(self) -> int:
        return 0

    def _scratch(self, tensors: Tensors) -> torch.Tensor:
        return self.scratch.like(self.name, next(iter(tensors.values())))

    def prefetch(self, tensors: Tensors, comm: Communicator, check) -> None:
        """Start the reduce of the other ranks' part into the hub's scratch S.  The members'
        values must not change until the sync: they are the values the sync mixes."""
        scratch = self._scratch(tensors)
        if self._reduce is not None:        # started for a sync that never ran: stale
            self._reduce.wait()
        if self.rank == self.hub:
            scratch.zero_()
        else:
            self.ctx.kernel(scratch, self.block.terms, tensors, check=check)
            check.mark(scratch)
        self._reduce = comm.reduce_async_(scratch, self.hub, self.block.ranks)

    def run(self, tensors: Tensors, old: Tensors, comm: Communicator, check) -> None:
        reduce, self._reduce = self._reduce, None
        if reduce is None:
            raise RuntimeError("a hub block ran without its prefetch (launch.engine.sync.overlap.Overlap.before_sync)")
        if self.rank == self.hub:
            # The hub holds every worker of the block, and they are receivers: acc is one of them.
            acc = self.hub_sum(tensors, old, check, reduce)
            check.mark(acc)
            self.broadcasts.append(comm.broadcast_async_(acc, self.hub, self.block.ranks))
        else:
            reduce.wait()
            acc = tensors[self.block.receivers[0]] if self.block.receivers else self._scratch(tensors)
            comm.broadcast_async_(acc, self.hub, self.block.ranks).wait()
            check.read(acc)
        self.copy_to_receivers(tensors, acc)

    def hub_sum(self, tensors: Tensors, old: Tensors, check, reduce) -> torch.Tensor:
        """On the hub: its members' part, then + S (the other ranks' part, once reduced)."""
        acc = self.local_sum(tensors, old, check)
        reduce.wait()
        scratch = self._scratch(tensors)
        check.read(scratch)
        return acc.add_(scratch)             # + S, the other ranks' part, rounded once


@dataclass(frozen=True)
class LocalMix:
    """A mix whose receiver lives here: ``receiver <- sum of w x_source`` (sources local or
    received)."""

    receiver: int
    terms: tuple[Term, ...]


class PointToPointMixes:
    """The mixes of a plan on one rank: the messages, then the local weighted sums.

    ``sends``: (local source agent, destination rank); ``recvs``: (remote source agent, its rank).
    Messages between one pair of ranks are matched by the source agent's index (the tag).
    """

    def __init__(self, sends, recvs, mixes: tuple[LocalMix, ...], ctx: ProgramContext):
        self.sends, self.recvs, self.mixes, self.ctx = tuple(sends), tuple(recvs), tuple(mixes), ctx

    @property
    def peers(self) -> set[int]:
        return {r for _, r in self.sends + self.recvs}

    def run(self, tensors: Tensors, old: Tensors, comm: Communicator, check) -> None:
        """Exchange, then mix.  Reads only ``old`` (snapshots where a value is also overwritten),
        so it may run before or after the blocks."""
        if self.sends or self.recvs:
            like = next(iter(tensors.values()))
            received = {i: self.ctx.scratch.like(f"recv{i}", like) for i, _ in self.recvs}
            sent = sorted({i for i, _ in self.sends})
            for i in sent:
                check.inspect(old[i], i)
            for i in sent:
                check.mark(old[i])
            comm.exchange(
                [(old[i], dst, i) for i, dst in self.sends],
                [(received[i], src, i) for i, src in self.recvs],
            )
            for buffer in received.values():
                check.read(buffer)
            old = {**old, **received}
        for mix in self.mixes:
            acc = self.ctx.scratch.like("acc", tensors[mix.receiver])
            self.ctx.kernel(acc, mix.terms, old, check=check)
            tensors[mix.receiver].copy_(acc)
