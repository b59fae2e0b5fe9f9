"""The Communicator interface: the only thing that knows where agents run.

A communicator moves flat tensors between ranks.  Three implementations share this interface:
:class:`launch.comm.local.LocalCommunicator` (co-located: one rank, nothing moves),
:class:`launch.comm.torch_dist.TorchCommunicator` (torch.distributed: NCCL or gloo) and
:class:`launch.comm.mpi.MPICommunicator` (mpi4py).  Every collective is counted in
:attr:`Communicator.stats`, so tests and benchmarks can check that a plan costs what it says.

Groups are identified by the sorted tuple of their ranks.  :meth:`Communicator.init_groups` must be
called by every rank, with the same list, before any collective on a group: it creates the groups
in that order and warms each with one collective.

Every collective of a distributed communicator is bounded: it completes, or raises after
``timeout_s`` seconds (torch.distributed: the process groups' timeout; MPI, which has none: every
operation is non-blocking and polled against a deadline, :mod:`launch.comm.mpi`), with the
backend's error or :class:`CollectiveTimeout`.  The engine runs every collective inside
:func:`launch.engine.guard.health.collective`, which sets :attr:`Communicator.context` (the iteration
and the operation) for the duration and turns such a failure into a ``RankFailureError`` naming
the rank that seems lost (:meth:`Communicator.responsive_ranks`).

**Ordered sums** (the exact syncs of :mod:`launch.engine.sync.ordered`).  An all-reduce adds its
terms in an order of the backend's choosing (a ring's, a tree's), so from three terms on its
result depends on the layout of the ranks.  Two collectives here let the engine fix the order
itself: :meth:`Communicator.chain_reduce_` (a chain in rank order, each rank folding its terms into
the running sum it receives, pipelined in chunks, then a broadcast of the result) and
:meth:`Communicator.all_gather_` (every rank gets every rank's contribution and sums them
itself).  :meth:`Communicator.exchange_async_` is the asynchronous point-to-point exchange that an
overlapped exact sync sends its terms to the hub with.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from topology.network import RankCounts

#: Bytes per chunk of :meth:`Communicator.chain_reduce_`: a chunk travels to the next rank while
#: the following one is folded.  Large enough that a message's latency is small beside its
#: transfer, small enough that the pipeline fills quickly (at most 2 chunks of scratch per rank).
CHAIN_CHUNK_BYTES = 4 << 20
#: Message tags of the chains (``CHAIN_TAG + chunk % TAG_SPAN``) and of the overlapped exact syncs'
#: terms (``HUB_TAG + agent % TAG_SPAN``): apart from each other and from the exchanges' tags (agent
#: indices), below 32768, the least upper bound MPI guarantees.  Messages of one pair of ranks with
#: one tag are matched in the order they were sent, so wrapping around is harmless.
CHAIN_TAG, HUB_TAG, TAG_SPAN = 16384, 24576, 8192


@dataclass
class CommStats(RankCounts):
    """Counts of the communication that went through a communicator: the plans' collectives and
    bytes (the fields of :class:`topology.network.RankCounts`, which the cost model computes for
    a plan: all-reduces, point-to-point sends, and the overlapped syncs' reduces to a hub and the
    hub's broadcasts), plus the start-up broadcasts and the finiteness checks' tiny collectives
    (``flag_reduces``), which are not the plans', and the ordered sums of the exact syncs:
    ``chains`` (:meth:`Communicator.chain_reduce_`, its broadcast included) and ``gathers``
    (:meth:`Communicator.all_gather_`), with their bytes (the buffer's, per rank and call, as for
    an all-reduce; a gather's: the contribution's)."""

    broadcasts: int = 0
    flag_reduces: int = 0
    chains: int = 0
    chain_bytes: int = 0
    gathers: int = 0
    gather_bytes: int = 0

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)


def check_timeout(timeout_s, name: str = "timeout_s") -> float:
    """``timeout_s`` as a float: a finite number of seconds > 0, else ``ValueError`` naming ``name``.

    Example:
        >>> check_timeout(10)
        10.0
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
        raise ValueError(f"{name} must be a number of seconds > 0; got {timeout_s!r}")
    return float(timeout_s)


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the communicator's ``timeout_s`` (a peer is stuck or
    dead).  Raised by communicators that bound their collectives themselves (MPI)."""


class Pending:
    """A started asynchronous collective: ``wait()`` returns once this rank's part is done
    (its buffer may then be read and written again).  Waiting twice is harmless."""

    def __init__(self, wait) -> None:
        self._wait = wait

    @property
    def done(self) -> bool:
        """True once waited for."""
        return self._wait is None

    def wait(self) -> None:
        if self._wait is not None:
            wait, self._wait = self._wait, None
            wait()


class Communicator:
    """Interface of every communicator.  ``rank`` and ``world_size`` are set by subclasses."""

    rank: int = 0
    world_size: int = 1
    backend: str = "local"
    #: The device the tensors of this communicator's collectives must live on (None: any, as
    #: co-located, where nothing moves); see :func:`launch.comm.devices.check_device`.
    device: torch.device | None = None
    #: Seconds after which a collective gives up (None: this communicator never waits on a peer).
    timeout_s: float | None = None
    #: ``(t, what)`` of the collective in progress, set by :func:`launch.engine.guard.health.collective`
    #: for its duration (None outside): the iteration and the operation a failure is reported with.
    context: tuple[int, str] | None = None

    def __init__(self) -> None:
        self.stats = CommStats()
        #: Process groups by their sorted rank tuple (only those this rank belongs to).
        self._groups: dict[tuple[int, ...], object] = {}
        #: Every group created so far, also those this rank is not in (created once, by all).
        self._created: set[tuple[int, ...]] = set()
        #: Asynchronous collectives started and not yet waited for (see :meth:`wait_in_flight`).
        self._in_flight: list[Pending] = []

    # -- set-up ----------------------------------------------------------------------------------
    def init_groups(self, groups: Sequence[tuple[int, ...]]) -> None:
        """Create (collectively, on every rank, in this order) the groups the plans need, then
        warm each group this rank belongs to with one tiny collective.  Groups of fewer than two
        ranks need none; the whole world is the world group."""
        for ranks in groups:
            if ranks in self._created or len(ranks) < 2:
                continue
            # Skipped by every rank alike once created: a non-member keeps no handle, and calling
            # the collective _new_group again on it alone would wait for the members forever.
            self._created.add(ranks)
            group = self._world_group() if len(ranks) == self.world_size else self._new_group(ranks)
            if self.rank in ranks:
                self._groups[ranks] = group
        for ranks in groups:
            if self.rank in ranks and len(ranks) >= 2:
                self._warm(self._groups[ranks])

    # Backends override these three; the defaults suit a communicator with no real groups.
    def _world_group(self):
        """The group of every rank."""
        return None

    def _new_group(self, ranks: tuple[int, ...]):
        """A new group of ``ranks``; called by every rank, members or not, in the same order."""
        return None

    def _warm(self, group) -> None:
        """One tiny collective on ``group`` (this rank is a member)."""

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, indexed by rank (a collective on all ranks)."""
        raise NotImplementedError

    def broadcast_object(self, obj, src: int):
        """Rank ``src``'s ``obj`` (pickled), returned on every rank (a collective on all ranks;
        the other ranks' ``obj`` is ignored)."""
        raise NotImplementedError

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        """Overwrite ``tensor`` on every rank with rank ``src``'s ``tensor``."""
        raise NotImplementedError

    # -- the sync ----------------------------------------------------------------------------
    def all_reduce_(self, tensor: torch.Tensor, ranks: tuple[int, ...], *, premul: float | None = None) -> None:
        """Sum ``tensor`` in place over the ranks of the group ``ranks`` (this rank among them).

        ``premul``: NCCL only (``ReduceOp.PREMUL_SUM``): the sum of ``premul x tensor`` over the
        ranks, each rank's factor its own, the product formed inside the collective (one pass over
        the buffer fewer than ``tensor.mul_(premul)`` first); ``ValueError`` on other backends."""
        raise NotImplementedError

    def exchange(
        self,
        sends: Sequence[tuple[torch.Tensor, int, int]],
        recvs: Sequence[tuple[torch.Tensor, int, int]],
    ) -> None:
        """Point-to-point messages: ``(tensor, peer, tag)``; returns when all have completed.

        Messages between one pair of ranks are matched by tag.
        """
        self.exchange_async_(sends, recvs).wait()

    def exchange_async_(self, sends, recvs) -> Pending:
        """:meth:`exchange` started: returns at once; ``wait()`` returns when every message has
        completed (no tensor of ``sends`` may be written, nor one of ``recvs`` read, before).
        Counted in ``stats.sends`` as :meth:`exchange`."""
        self._count_sends(sends)
        return self._p2p_async(sends, recvs)

    # -- ordered sums (launch.engine.sync.ordered) -----------------------------------------------
    def chain_reduce_(self, tensor: torch.Tensor, chain: tuple[int, ...], ranks: tuple[int, ...], fold) -> None:
        """A sum formed in the rank order ``chain``, then broadcast to the group ``ranks``.

        ``chain``: the ranks that hold terms of the sum, in increasing order, all in ``ranks``.
        The first of them holds its part (its terms summed left to right) in ``tensor``.  Chunk
        by chunk (``[lo, hi)``, :data:`CHAIN_CHUNK_BYTES` each), every later rank of the chain
        receives the running sum ``s`` of the chunk from its predecessor, calls
        ``fold(s, lo, hi)``, which must write ``s`` plus its own terms, added to ``s`` one by one
        in order, into ``tensor[lo:hi]``, and sends that chunk on; a chunk travels while the next
        one is folded.  So every element of the sum is added strictly left to right in rank order,
        whatever the layout.  The chain's last rank then broadcasts ``tensor`` to ``ranks``.
        Returns when this rank's ``tensor`` holds the sum.  One rank: ``tensor`` already holds
        it.  Counted once per call in ``stats.chains`` (and ``chain_bytes``: the buffer's).

        Every rank of ``ranks`` calls it with the same arguments (``fold`` aside)."""
        self._count("chain", tensor)
        if len(chain) > 1 and self.rank in chain:
            self._run_chain(tensor, chain, fold)
        if len(ranks) > 1:
            self._broadcast_async(tensor, chain[-1], ranks).wait()

    def _run_chain(self, tensor: torch.Tensor, chain: tuple[int, ...], fold) -> None:
        """This rank's links of the chain (see :meth:`chain_reduce_`): receive chunk c (two
        receives posted ahead, into two chunk buffers), fold it, send it on (sends left in flight
        until the end, the chunks they read are not written again)."""
        position = chain.index(self.rank)
        before = chain[position - 1] if position > 0 else None
        after = chain[position + 1] if position + 1 < len(chain) else None
        n = tensor.numel()
        step = max(1, CHAIN_CHUNK_BYTES // tensor.element_size())
        bounds = [(lo, min(n, lo + step)) for lo in range(0, n, step)]
        spare = [tensor.new_empty(min(step, n)) for _ in range(2)] if before is not None else []

        def receive(c: int) -> Pending:
            lo, hi = bounds[c]
            return self._p2p_async([], [(spare[c % 2][:hi - lo], before, CHAIN_TAG + c % TAG_SPAN)])

        incoming = [receive(c) for c in range(min(2, len(bounds)))] if before is not None else []
        sends = []
        for c, (lo, hi) in enumerate(bounds):
            if before is not None:
                incoming[c].wait()
                fold(spare[c % 2][:hi - lo], lo, hi)
                if c + 2 < len(bounds):
                    incoming.append(receive(c + 2))
            if after is not None:
                sends.append(self._p2p_async([(tensor[lo:hi], after, CHAIN_TAG + c % TAG_SPAN)], []))
        for pending in sends:
            pending.wait()

    def all_gather_(self, out: torch.Tensor, tensor: torch.Tensor, ranks: tuple[int, ...]) -> None:
        """``out`` (flat, ``len(ranks) x tensor.numel()`` elements) <- the ``tensor`` of every rank
        of the group ``ranks``, in rank order.  Counted in ``stats.gathers`` (and
        ``gather_bytes``: this rank's contribution)."""
        if ranks != (self.rank,):
            raise ValueError(f"ranks must be ({self.rank},) on a single rank; got {ranks}")
        self._count("gather", tensor)
        out.copy_(tensor.reshape(-1))

    # Backends override these two: uncounted, asynchronous building blocks.
    def _p2p_async(self, sends, recvs) -> Pending:
        """Start the point-to-point messages ``(tensor, peer, tag)`` (uncounted); a single rank
        has none."""
        if sends or recvs:
            raise ValueError("a single rank has no peer to exchange with")
        return Pending(None)

    def _broadcast_async(self, tensor: torch.Tensor, src: int, ranks: tuple[int, ...]) -> Pending:
        """Start a broadcast from ``src`` over the group ``ranks`` (uncounted)."""
        raise NotImplementedError(f"the {self.backend} communicator has no asynchronous broadcast")

    # -- overlapped syncs (launch.engine.sync.overlap) -----------------------------------------------
    def reduce_async_(self, tensor: torch.Tensor, dst: int, ranks: tuple[int, ...], *,
                      flags: bool = False) -> Pending:
        """Start summing ``tensor`` over the group ``ranks`` into rank ``dst``'s ``tensor`` (the
        others' tensors are only read; none may be written before ``wait()``).  ``flags``: a
        health check's, counted in ``stats.flag_reduces`` instead of ``stats.reduces``."""
        raise NotImplementedError(f"the {self.backend} communicator has no asynchronous reduce")

    def broadcast_async_(self, tensor: torch.Tensor, src: int, ranks: tuple[int, ...], *,
                         flags: bool = False) -> Pending:
        """Start overwriting ``tensor`` on every rank of the group ``ranks`` with rank ``src``'s
        (which must not be written before ``wait()``); ``flags`` as in :meth:`reduce_async_`."""
        self._count_block_broadcast(tensor, flags)
        return self._broadcast_async(tensor, src, ranks)

    def _group(self, ranks: tuple[int, ...]):
        """The group of ``ranks`` made by :meth:`init_groups`; every rank: the world group."""
        group = self._groups.get(ranks)
        if group is None and ranks == tuple(range(self.world_size)):
            return self._world_group()
        if group is None:
            raise KeyError(f"no process group for ranks {ranks} (init_groups did not create it)")
        return group

    def max_flags_(self, flags: torch.Tensor) -> None:
        """Element-wise maximum of the small float tensor ``flags`` over every rank, in place
        (a collective on all ranks; one rank: nothing to do).  Counted in ``stats.flag_reduces``."""
        self.stats.flag_reduces += 1

    def failure(self) -> str | None:
        """A failure the backend detected on its own (off the main thread) since the last
        collective, or None: what makes the next collective fail (NCCL's watchdog; see
        :mod:`launch.comm.torch_dist`).  Checked before every collective of a run."""
        return None

    def responsive_ranks(self, wait_s: float) -> list[int] | None:
        """After a failed collective: the ranks that answer a roll call within ``wait_s`` seconds
        (through a channel other than the failed one), or None when it cannot be told."""
        return None

    def barrier(self) -> None:
        """Wait for every rank."""

    def close(self) -> None:
        """Release the communicator's resources (process groups, communicators)."""

    # -- counting ------------------------------------------------------------------------------
    def _count_all_reduce(self, tensor: torch.Tensor) -> None:
        self.stats.all_reduces += 1
        self.stats.all_reduce_bytes += tensor.numel() * tensor.element_size()

    def _track(self, wait) -> Pending:
        pending = Pending(wait)
        self._in_flight = [p for p in self._in_flight if not p.done] + [pending]
        return pending

    def wait_in_flight(self, *, ignore_errors: bool = False) -> None:
        """Wait for every asynchronous collective this communicator started.  ``close`` does, with
        ``ignore_errors`` (a failed collective has already raised where its result was needed):
        a process group must not be destroyed under a collective still in flight."""
        in_flight, self._in_flight = self._in_flight, []
        for pending in in_flight:
            try:
                pending.wait()
            except Exception:  # noqa: BLE001 - see the docstring
                if not ignore_errors:
                    raise

    def _count_reduce(self, tensor: torch.Tensor, flags: bool = False) -> None:
        self._count("reduce", tensor, flags)

    def _count_block_broadcast(self, tensor: torch.Tensor, flags: bool = False) -> None:
        self._count("block_broadcast", tensor, flags)

    def _count(self, kind: str, tensor: torch.Tensor, flags: bool = False) -> None:
        """``stats.<kind>s`` and ``stats.<kind>_bytes``; a health check's in ``flag_reduces``."""
        if flags:
            self.stats.flag_reduces += 1
            return
        setattr(self.stats, f"{kind}s", getattr(self.stats, f"{kind}s") + 1)
        setattr(self.stats, f"{kind}_bytes", getattr(self.stats, f"{kind}_bytes") + tensor.numel() * tensor.element_size())

    def _count_sends(self, sends) -> None:
        self.stats.sends += len(sends)
        self.stats.send_bytes += sum(t.numel() * t.element_size() for t, _, _ in sends)
