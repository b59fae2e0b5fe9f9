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
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from topology.network import RankCounts


@dataclass
class CommStats(RankCounts):
    """Counts of the communication that went through a communicator: the plans' collectives and
    bytes (the fields of :class:`topology.network.RankCounts`, which the cost model computes for
    a plan: all-reduces, point-to-point sends, and the overlapped syncs' reduces to a hub and the
    hub's broadcasts), plus the start-up broadcasts and the finiteness checks' tiny collectives
    (``flag_reduces``), which are not the plans'."""

    broadcasts: int = 0
    flag_reduces: int = 0

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

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        """Overwrite ``tensor`` on every rank with rank ``src``'s ``tensor``."""
        raise NotImplementedError

    # -- the sync ----------------------------------------------------------------------------
    def all_reduce_(self, tensor: torch.Tensor, ranks: tuple[int, ...]) -> None:
        """Sum ``tensor`` in place over the ranks of the group ``ranks`` (this rank among them)."""
        raise NotImplementedError

    def exchange(
        self,
        sends: Sequence[tuple[torch.Tensor, int, int]],
        recvs: Sequence[tuple[torch.Tensor, int, int]],
    ) -> None:
        """Point-to-point messages: ``(tensor, peer, tag)``; returns when all have completed.

        Messages between one pair of ranks are matched by tag.
        """
        raise NotImplementedError

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
        raise NotImplementedError(f"the {self.backend} communicator has no asynchronous broadcast")

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
        self._count_overlapped("reduce", tensor, flags)

    def _count_block_broadcast(self, tensor: torch.Tensor, flags: bool = False) -> None:
        self._count_overlapped("block_broadcast", tensor, flags)

    def _count_overlapped(self, kind: str, tensor: torch.Tensor, flags: bool) -> None:
        """``stats.<kind>s`` and ``stats.<kind>_bytes``; a health check's in ``flag_reduces``."""
        if flags:
            self.stats.flag_reduces += 1
            return
        setattr(self.stats, f"{kind}s", getattr(self.stats, f"{kind}s") + 1)
        setattr(self.stats, f"{kind}_bytes", getattr(self.stats, f"{kind}_bytes") + tensor.numel() * tensor.element_size())

    def _count_sends(self, sends) -> None:
        self.stats.sends += len(sends)
        self.stats.send_bytes += sum(t.numel() * t.element_size() for t, _, _ in sends)
