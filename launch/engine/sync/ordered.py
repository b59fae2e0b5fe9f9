"""Exact syncs: every sum a block forms is added in one order fixed by the agents' indices.

``compile_sync(..., exact=True)``.  A block gives its receivers

    s = (((p_1 + p_2) + p_3) + ... ) + p_k,      p_j = w_{i_j} x_{i_j} rounded once,

over its members with a non-zero weight, i_1 < i_2 < ... < i_k: strictly left to right in agent
order (the *canonical sum*).  Floating-point addition is not associative, so this is the only way
the result can be the same bits on one rank and on any layout of ranks: an all-reduce adds in the
order of its ring or tree, so from three terms on its result depends on the layout.  Co-located,
the kernel (:mod:`launch.engine.sync.kernel`) forms the canonical sum as it stands
(:class:`~launch.engine.sync.blocks.AllReduceBlock` with ``ordered=True``).  Across ranks, agents
live in contiguous runs of indices (:class:`launch.engine.placement.Placement`), so the terms of
each rank are one contiguous run of the canonical order, and the ranks holding terms (the
*chain*) come in increasing rank order.  The strategies, chosen per block by
:func:`launch.engine.sync.compile.compile_sync` (:func:`exact_strategy`):

:class:`ChainBlock` (``chain``)
    the first rank of the chain forms its part ``((p_1 + p_2) + ...)``; every later rank receives
    the running sum s, chunk by chunk, and folds its own terms into it, ``((s + p_a) + p_b)``
    (never ``s + (p_a + p_b)``: a rank's partial sum may only be *prefixed* by the running sum,
    never added to it afterwards), and sends it on; the last rank broadcasts the result
    (:meth:`launch.comm.base.Communicator.chain_reduce_`, pipelined in chunks).  A rank forms its
    products before the chain starts (each checked once by the finiteness check), in place in the
    buffers of receivers whose old value nothing else reads, else in scratch buffers.
:class:`GatherBlock` (``gather``, small blocks, by backend: :data:`GATHER_MAX_BYTES`)
    every rank sends its products (:meth:`~launch.comm.base.Communicator.all_gather_`, padded to
    the largest count of terms a rank holds) and sums all of them in canonical order itself: one
    collective instead of a chain of ``len(chain) - 1`` hops and a broadcast.
:class:`ShardedBlock` (``shard``, every rank of the group holding one term, large blocks, by
backend: :data:`SHARD_MIN_BYTES`)
    the buffer is cut into one shard per rank of the group; every rank sends shard s of its
    product to the group's s-th rank and receives its own shard of every other product (one
    message per pair of ranks), adds its shard of every product in canonical order, and the
    shards are all-gathered: the bytes a ring all-reduce moves (a reduce-scatter and an
    all-gather), where a chain moves the whole buffer through ``len(chain) - 1`` hops one after
    the other and then broadcasts it.  Each element is still the canonical sum of the same
    products: the shards cut the buffer, never the order of a sum.
``pair``
    a block whose sum has two terms on two ranks, one each: the plain all-reduce, exact as it is
    (``p_1 + p_2 = p_2 + p_1`` bit for bit).
``local``
    a block on one rank: the canonical sum, local.

:class:`OrderedHubBlock`
    an overlapped block (:mod:`launch.engine.sync.overlap`): the other ranks' products are sent
    to the hub ahead of the sync (one message per term, not a partial sum: the hub's own terms
    come first in the order, e.g. Lookahead's fast agent 0), and the hub forms the canonical sum
    at the sync, then broadcasts it.  Costs, against the plain hub block: the hub receives one
    buffer per remote term (and keeps one scratch buffer per remote term), and adds them one by
    one at the sync.

The finiteness check's markers ride as in the plain blocks: every rank marks what it contributes
and reads what it receives (a chain rank reads the running sum before folding into it and marks
the result, so news travels down the chain and back with the broadcast; a sharded block marks
every shard it sends and its summed shard, and reads every shard it receives): every rank of the block
ends knowing what any of them knew, as after an all-reduce, which is what
:mod:`launch.engine.guard.windows` assumes of a block.
"""

from __future__ import annotations

import torch

from launch.comm.base import CHAIN_TAG, HUB_TAG, TAG_SPAN, Communicator
from launch.engine.sync.blocks import AllReduceBlock, HubBlock, LocalBlock, ProgramContext, Tensors

#: Per backend, a block is gathered (:class:`GatherBlock`) when what each rank receives,
#: ``(ranks - 1) x (most terms on one rank) x bytes of a buffer``, is at most this many bytes;
#: else chained (any other backend: always chained).  Measured (``python -m launch.bench --only
#: B8``, docs/exactness.md): under MPI the all-gather (MPICH's, in C) beats the chain (whose
#: hops are polled from Python) up to several MiB; under gloo the chain is as fast or faster at
#: every size (gloo's all-gather is a ring of ``ranks - 1`` steps, as slow as the chain's hops).
#: NCCL's is not measured: a small all-gather is one kernel where the chain is several.
GATHER_MAX_BYTES = {"mpi": 16 << 20, "nccl": 64 << 10}

#: Per backend, a block whose group's ranks hold one term each is sharded (:class:`ShardedBlock`)
#: when one buffer has at least this many bytes (before the gather rule); another backend never.
#: Measured (``python -m launch.bench --only B8``, docs/exactness.md): under MPI the shards beat
#: the gather and the chain from 1M parameters (4 MB) on 3 and 4 ranks; under gloo the chain beats
#: them at every size (gloo's point-to-point messages and its all-gather are no faster than the
#: chain's pipelined hops on the machine measured), so gloo never shards.  NCCL's is not measured:
#: its all-gather is one kernel, so from the same size, a guess to be measured.
SHARD_MIN_BYTES = {"mpi": 1 << 20, "nccl": 1 << 20}


def gather_max_bytes(backend: str | None) -> int:
    """The gather threshold of ``backend`` (:data:`GATHER_MAX_BYTES`; 0, always chained, for
    another backend or None)."""
    return GATHER_MAX_BYTES.get(backend, 0)


#: The tag of a sharded block's messages: a chain's first chunk's (no chain is in flight while a
#: sharded block runs: every block's messages are waited for before the next block starts).
SHARD_TAG = CHAIN_TAG


def shard_min_bytes(backend: str | None) -> int | None:
    """The sharding threshold of ``backend`` (:data:`SHARD_MIN_BYTES`; None, never sharded, for
    another backend or None)."""
    return SHARD_MIN_BYTES.get(backend)


def exact_strategy(counts: tuple[int, ...], nbytes: int, hub: int | None, gather_max: int,
                   shard_min: int | None = None) -> str:
    """The strategy of an exact block whose group's ranks hold ``counts`` terms each (in rank
    order), buffers of ``nbytes`` bytes, overlapped around ``hub`` (or None), gathered up to
    ``gather_max`` bytes received per rank (:func:`gather_max_bytes`), sharded from ``shard_min``
    bytes when every rank holds one term (:func:`shard_min_bytes`; None: never); see the module
    docstring.  The same on every rank: a function of the plan, the placement and the backend only.

    Example:
        >>> exact_strategy((1, 1, 1), 40_000, None, 65536), exact_strategy((1, 1, 1), 4_000, None, 65536)
        ('chain', 'gather')
        >>> exact_strategy((1, 1, 1), 4_000_000, None, 16 << 20, 1 << 20), exact_strategy((2, 2), 4_000_000, None, 0, 1 << 20)
        ('shard', 'chain')
        >>> exact_strategy((1, 1), 4_000_000, None, 0), exact_strategy((2,), 4_000_000, None, 0)
        ('pair', 'local')
    """
    if hub is not None:
        return "hub"
    if len(counts) == 1:
        return "local"
    if counts == (1, 1):
        return "pair"
    if shard_min is not None and nbytes >= shard_min and set(counts) == {1}:
        return "shard"
    if (len(counts) - 1) * max(counts) * nbytes <= gather_max:
        return "gather"
    return "chain"


class ChainBlock(AllReduceBlock):
    """A block summed along the chain of the ranks holding its terms (module docstring).

    Args:
        block, ctx: as :class:`~launch.engine.sync.blocks.AllReduceBlock`.
        chain: the ranks holding terms, in increasing order; ``rank``: this one.
    """

    def __init__(self, block: LocalBlock, ctx: ProgramContext, chain: tuple[int, ...], rank: int):
        super().__init__(block, ctx, ordered=True)
        self.chain, self.rank = chain, rank

    @property
    def all_reduces(self) -> int:
        return 0

    def products(self, tensors: Tensors, old: Tensors, check) -> list[torch.Tensor]:
        """This rank's products in order, the first in acc (:meth:`accumulator`), the others in
        place where their agent is a spare receiver, else in scratch buffers."""
        terms = self.block.terms
        acc, in_place = self.accumulator(tensors, terms, reach=0)
        spare = self.spare(tensors, acc)
        kernel = self.ctx.kernel
        (first, weights), *rest = terms
        parts = [kernel.product(acc, acc if in_place else old[first], weights, first, check)]
        for i, weights in rest:
            out = old[i] if i in spare else self.ctx.scratch.like(f"part{i}", acc)
            parts.append(kernel.product(out, old[i], weights, i, check))
        return parts

    def run(self, tensors: Tensors, old: Tensors, comm: Communicator, check) -> None:
        block = self.block
        fold = None
        if not block.terms:                 # a receiver only: the broadcast brings the sum
            acc = self.accumulator(tensors, ())[0]
        elif self.rank == self.chain[0]:    # the chain starts with this rank's part
            acc = self.local_sum(tensors, old, check)
            check.mark(acc)
        else:
            parts = self.products(tensors, old, check)
            acc = parts[0]

            def fold(running: torch.Tensor, lo: int, hi: int) -> None:
                # ((s + p_a) + p_b) + ...: s first, then this rank's terms one by one, in order.
                if lo == 0:
                    check.read(running)
                out = acc[lo:hi]
                torch.add(running, parts[0][lo:hi], out=out)
                for part in parts[1:]:
                    out.add_(part[lo:hi])
                if lo == 0:
                    check.mark(out)
        comm.chain_reduce_(acc, self.chain, block.ranks, fold)
        if self.rank != self.chain[-1]:
            check.read(acc)
        self.copy_to_receivers(tensors, acc)


class GatherBlock(AllReduceBlock):
    """A block whose products every rank gathers and sums itself (module docstring).

    Args:
        block, ctx: as :class:`~launch.engine.sync.blocks.AllReduceBlock`.
        holders: per rank of the group, in rank order, the agents of its terms (in order).
        rank: this rank.
    """

    def __init__(self, block: LocalBlock, ctx: ProgramContext, holders: tuple[tuple[int, ...], ...], rank: int):
        super().__init__(block, ctx, ordered=True)
        self.holders, self.rank = holders, rank
        self.rows = max(len(agents) for agents in holders)

    @property
    def all_reduces(self) -> int:
        return 0

    def run(self, tensors: Tensors, old: Tensors, comm: Communicator, check) -> None:
        like = next(iter(tensors.values()))
        n, scratch, kernel = like.numel(), self.ctx.scratch, self.ctx.kernel
        mine = scratch.like("gather-send", like, self.rows * n)
        for row, (i, weights) in enumerate(self.block.terms):
            kernel.product(mine[row * n:(row + 1) * n], old[i], weights, i, check)
            check.mark(mine[row * n:])
        everyone = scratch.like("gather-recv", like, len(self.holders) * self.rows * n)
        comm.all_gather_(everyone, mine, self.block.ranks)
        received = {}
        for position, (rank, agents) in enumerate(zip(self.block.ranks, self.holders)):
            for row, i in enumerate(agents):
                start = (position * self.rows + row) * n
                received[i] = everyone[start:start + n]
                if rank != self.rank:
                    check.read(received[i])
        # Every product as formed on its own rank (this rank's too), summed in agent order.
        acc = self.accumulator(tensors, ())[0]
        kernel(acc, [(i, None) for i in sorted(received)], received)
        self.copy_to_receivers(tensors, acc)


class ShardedBlock(AllReduceBlock):
    """A block whose group's ranks hold one term each, summed shard by shard (module docstring).

    Args:
        block, ctx: as :class:`~launch.engine.sync.blocks.AllReduceBlock`.
        holders: per rank of the group, in rank order, the agent of its one term.
        rank: this rank.
    """

    def __init__(self, block: LocalBlock, ctx: ProgramContext, holders: tuple[int, ...], rank: int):
        super().__init__(block, ctx, ordered=True)
        self.holders, self.rank = holders, rank
        self.position = block.ranks.index(rank)

    @property
    def all_reduces(self) -> int:
        return 0

    def run(self, tensors: Tensors, old: Tensors, comm: Communicator, check) -> None:
        like = next(iter(tensors.values()))
        n, g, scratch, kernel = like.numel(), len(self.block.ranks), self.ctx.scratch, self.ctx.kernel
        m = -(-n // g)                                     # shard s: [s m, min(n, (s + 1) m))
        shard = lambda s: slice(min(n, s * m), min(n, (s + 1) * m))      # noqa: E731
        (i, weights), = self.block.terms
        mine = kernel.product(scratch.like("shard-product", like), old[i], weights, i, check)
        own = shard(self.position)
        width = own.stop - own.start
        sends, received = [], {i: mine[own]}
        for s, (peer, agent) in enumerate(zip(self.block.ranks, self.holders)):
            if peer == self.rank:
                continue
            part = mine[shard(s)]
            if part.numel():
                check.mark(part)
                sends.append((part, peer, SHARD_TAG))
            received[agent] = scratch.like(f"shard-from{agent}", like, m)[:width]
        recvs = [(received[agent], peer, SHARD_TAG) for peer, agent in zip(self.block.ranks, self.holders)
                 if peer != self.rank and width]
        comm.exchange_async_(sends, recvs).wait()
        for agent, part in received.items():
            if agent != i and width:
                check.read(part)
        # This rank's shard of the canonical sum: every product's shard, added in agent order.
        mine_sum = scratch.like("shard-sum", like, m)
        mine_sum[width:].zero_()                          # the last shards' padding
        if width:
            kernel(mine_sum[:width], [(agent, None) for agent in sorted(received)], received)
            check.mark(mine_sum)
        everyone = scratch.like("shard-gather", like, g * m)
        comm.all_gather_(everyone, mine_sum, self.block.ranks)
        for s in range(g):
            if s != self.position and shard(s).stop > shard(s).start:
                check.read(everyone[s * m:])
        acc = self.accumulator(tensors, ())[0]
        acc.copy_(everyone[:n])
        self.copy_to_receivers(tensors, acc)


class OrderedHubBlock(HubBlock):
    """An overlapped block summed in canonical order on its hub (module docstring): at the
    prefetch the other ranks send their products to the hub (tagged by agent), at the sync the
    hub sums every term in agent order and broadcasts the result.

    Args:
        block, ctx, hub, rank, name, scratch: as :class:`~launch.engine.sync.blocks.HubBlock`.
        remote: the agents of the block's terms on other ranks than the hub, with their ranks.
    """

    def __init__(self, block: LocalBlock, ctx: ProgramContext, hub: int, rank: int, name: str,
                 remote: tuple[tuple[int, int], ...], scratch=None):
        super().__init__(block, ctx, hub, rank, name, scratch)
        self.remote = remote
        self.ordered = True

    def _part(self, agent: int, tensors: Tensors) -> torch.Tensor:
        return self.scratch.like(f"{self.name}/{agent}", next(iter(tensors.values())))

    def prefetch(self, tensors: Tensors, comm: Communicator, check) -> None:
        """Start the messages of the other ranks' products to the hub (module docstring)."""
        if self._reduce is not None:        # started for a sync that never ran: stale
            self._reduce.wait()
        sends, recvs = [], []
        if self.rank == self.hub:
            recvs = [(self._part(i, tensors), rank, HUB_TAG + i % TAG_SPAN) for i, rank in self.remote]
        else:
            for i, weights in self.block.terms:
                part = self.ctx.kernel.product(self._part(i, tensors), tensors[i], weights, i, check)
                check.mark(part)
                sends.append((part, self.hub, HUB_TAG + i % TAG_SPAN))
        self._reduce = comm.exchange_async_(sends, recvs)

    def hub_sum(self, tensors: Tensors, old: Tensors, check, reduce) -> torch.Tensor:
        """On the hub, once the products have arrived: the canonical sum of the block."""
        reduce.wait()
        received = {i: self._part(i, tensors) for i, _ in self.remote}
        for part in received.values():
            check.read(part)
        terms = sorted(list(self.block.terms) + [(i, None) for i in received])
        return self.local_sum(tensors, {**old, **received}, check, terms)
