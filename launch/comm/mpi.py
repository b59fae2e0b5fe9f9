"""MPI communicator through mpi4py: one process per rank under ``mpiexec``.

Buffers are CPU tensors handed to MPI without a copy (through their numpy view); MPI supports
float32 and float64 here.

**Bounded operations.**  MPI has no collective timeout: a blocking ``Allreduce`` whose peer is
stopped waits forever.  So every operation here is non-blocking (``Iallreduce``, ``Ibcast``,
``Iallgather`` then ``Iallgatherv`` for pickled objects, ``Isend``/``Irecv``, ``Ibarrier``) and
waited for by :meth:`MPICommunicator._wait`: ``Test`` in a loop, yielding the processor between
two tests (``sched_yield``, as MPICH's own blocking operations do), until the requests complete
or ``timeout_s`` seconds have passed since the wait began, then :class:`CollectiveTimeout`.
With more ranks than cores, spinning without yielding was an order of magnitude slower than a
blocking ``Allreduce`` (a nonblocking algorithm progresses only while every rank calls into MPI);
with the yield it is as fast.

**Roll call** (:meth:`MPICommunicator.responsive_ranks`, after a timeout): through a duplicate of
``COMM_WORLD`` made at start-up (no message of it can match a failed operation's), this rank sends
``ROLL_CALL`` to every other rank and collects for ``wait_s`` seconds the ranks it hears from.  A
rank answers ``PRESENT`` while it waits in any operation here (once it has waited
:data:`ANSWER_AFTER_S`: a rank that waits that long may be waiting on the same lost peer), and a
rank that calls its own roll call is heard too.  A stopped or dead rank cannot answer.

**After a failure** MPI cannot be finalized: ``MPI_Finalize`` waits for every rank, the lost one
included.  The first timeout therefore registers an exit handler that, after Python's other exit
handlers, flushes stdout and stderr and ends the process with ``os._exit(EXIT_AFTER_FAILURE)``
instead of mpi4py's ``MPI_Finalize``; ``mpiexec`` then stops the other ranks and exits non-zero.

A rank that *dies* is another matter: MPICH's ``mpiexec`` stops every rank within about a second
(SIGKILL, before any Python code of theirs runs) and names a process id; the survivors cannot
name the rank (measured with MPICH 5: also with ``-disable-auto-cleanup``, the library aborts them
when they next touch the dead peer).
"""

from __future__ import annotations

import atexit
import os
import pickle
import sys
import time

import numpy as np
import torch

from launch.comm.base import CollectiveTimeout, Communicator, Pending, check_timeout

SUPPORTED_DTYPES = (torch.float32, torch.float64)

#: Seconds of waiting after which a rank answers roll calls while it waits.
ANSWER_AFTER_S = 0.5
#: Tags of the roll call (on the communicator of its own).
ROLL_CALL, PRESENT = 1, 2
#: Exit status of a process whose MPI communicator lost a rank (see the module docstring).
EXIT_AFTER_FAILURE = 1


def _buffer(tensor: torch.Tensor):
    if tensor.device.type != "cpu" or tensor.dtype not in SUPPORTED_DTYPES or not tensor.is_contiguous():
        raise ValueError(
            "the MPI communicator moves contiguous CPU float32/float64 tensors; got "
            f"{tensor.dtype} on {tensor.device} (use launch=torch for CUDA)"
        )
    return tensor.detach().numpy()


def _exit_without_finalize() -> None:
    """The exit handler registered after a failure (module docstring)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream: nothing to flush
            pass
    os._exit(EXIT_AFTER_FAILURE)


class MPICommunicator(Communicator):
    """Operations through mpi4py on ``MPI.COMM_WORLD``, each completed or failed within
    ``timeout_s`` seconds (module docstring); subgroups made with ``Comm.Split``."""

    backend = "mpi"
    device = torch.device("cpu")

    def __init__(self, timeout_s: float = 300.0):
        super().__init__()
        self.timeout_s = check_timeout(timeout_s)
        try:
            from mpi4py import MPI
        except ImportError as err:  # pragma: no cover - depends on the install
            raise ImportError("launch=mpi needs mpi4py: pip install '.[mpi]'") from err
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        #: True once an operation has failed: nothing more is waited for, MPI is not finalized.
        self.failed = False
        self._abandoned: list = []         # requests (and their buffers) of failed operations
        self._heard: set[int] = set()      # ranks whose roll call or answer arrived
        self._answered: set[int] = set()   # ranks this rank has answered
        self._wait([self.comm.Ibarrier()], "start-up barrier")   # every rank is there: Dup cannot hang
        self.health = self.comm.Dup()

    # -- waiting, bounded ----------------------------------------------------------------------
    def _wait(self, requests: list, what: str, keep=None) -> None:
        """Wait until every request completes, or raise :class:`CollectiveTimeout` after
        ``timeout_s`` (``keep``: buffers the requests use, kept alive after a failure).  Each
        request is tested on its own (``Request.Test``: measured several times faster than
        ``Request.Testall`` on a list)."""
        pending = [r for r in requests if not r.Test()]
        if not pending:
            return
        start = time.monotonic()
        deadline = start + self.timeout_s
        while True:
            pending = [r for r in pending if not r.Test()]
            if not pending:
                return
            now = time.monotonic()
            if now > deadline:
                self._fail(requests, keep)
                context = "" if self.context is None else f" ({self.context[1]} of iteration t={self.context[0]})"
                raise CollectiveTimeout(f"MPI {what}{context} did not complete within timeout_s={self.timeout_s:g} s")
            if now - start > ANSWER_AFTER_S:
                self._answer_roll_calls()
            os.sched_yield()

    def _fail(self, requests: list, keep) -> None:
        self._abandoned.append((requests, keep))
        if not self.failed:
            self.failed = True
            atexit.register(_exit_without_finalize)

    def _pending(self, request, what: str, keep=None) -> Pending:
        return self._track(lambda: self._wait([request], what, keep))

    # -- roll call ------------------------------------------------------------------------------
    def _receive_roll_messages(self) -> None:
        """Take every roll-call message that has arrived; answer each new caller once."""
        status = self.MPI.Status()
        while self.health.Iprobe(source=self.MPI.ANY_SOURCE, tag=self.MPI.ANY_TAG, status=status):
            source, tag = status.Get_source(), status.Get_tag()
            self.health.recv(source=source, tag=tag)
            self._heard.add(source)
            if tag == ROLL_CALL and source not in self._answered:
                self._answered.add(source)
                self._abandoned.append(self.health.isend(self.rank, dest=source, tag=PRESENT))

    def _answer_roll_calls(self) -> None:
        if self.world_size > 1:
            self._receive_roll_messages()

    def responsive_ranks(self, wait_s: float) -> list[int] | None:
        """The ranks heard from within ``wait_s`` seconds of this rank's roll call (module
        docstring), this rank included."""
        try:
            for peer in range(self.world_size):
                if peer != self.rank:
                    self._answered.add(peer)
                    self._abandoned.append(self.health.isend(self.rank, dest=peer, tag=ROLL_CALL))
            deadline = time.monotonic() + wait_s
            while True:
                self._receive_roll_messages()
                if len(self._heard | {self.rank}) == self.world_size or time.monotonic() > deadline:
                    return sorted(self._heard | {self.rank})
                time.sleep(0.01)
        except Exception:  # noqa: BLE001 - the library itself failed: cannot tell
            return None

    # -- groups ---------------------------------------------------------------------------------
    def _world_group(self):
        return self.comm

    def _new_group(self, ranks: tuple[int, ...]):
        # Split is collective over COMM_WORLD: every rank calls it, in the same order (after a
        # bounded barrier, so that a missing rank fails here instead of hanging); a non-member
        # gets MPI.COMM_NULL.
        self._wait([self.comm.Ibarrier()], f"creation of the group {list(ranks)}")
        color = 0 if self.rank in ranks else self.MPI.UNDEFINED
        return self.comm.Split(color, key=self.rank)

    def _warm(self, group) -> None:
        buf = np.zeros(1)
        self._wait([group.Iallreduce(self.MPI.IN_PLACE, buf)], "warm-up all-reduce", buf)

    # -- operations -----------------------------------------------------------------------------
    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj`` (pickled): one all-gather of the sizes, one of the bytes."""
        data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
        sizes = np.zeros(self.world_size, dtype=np.int64)
        mine = np.array([data.size], dtype=np.int64)
        self._wait([self.comm.Iallgather(mine, sizes)], "all-gather of object sizes", (mine, sizes))
        received = np.empty(int(sizes.sum()), dtype=np.uint8)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        counts = [int(s) for s in sizes]
        self._wait([self.comm.Iallgatherv(data, [received, counts, [int(o) for o in offsets], self.MPI.BYTE])],
                   "all-gather of objects", (data, received))
        return [pickle.loads(received[o:o + c].tobytes()) for o, c in zip(offsets, counts)]

    def broadcast_object(self, obj, src: int):
        """Rank ``src``'s ``obj`` (pickled): one broadcast of the size, one of the bytes."""
        data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8) \
            if self.rank == src else None
        size = np.array([0 if data is None else data.size], dtype=np.int64)
        self._wait([self.comm.Ibcast(size, root=src)], "broadcast of an object's size", size)
        if data is None:
            data = np.empty(int(size[0]), dtype=np.uint8)
        self._wait([self.comm.Ibcast(data, root=src)], "broadcast of an object", data)
        return obj if self.rank == src else pickle.loads(data.tobytes())

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        self.stats.broadcasts += 1
        buf = _buffer(tensor)
        self._wait([self.comm.Ibcast(buf, root=src)], "broadcast", buf)

    def all_reduce_(self, tensor: torch.Tensor, ranks: tuple[int, ...], *, premul: float | None = None) -> None:
        if premul is not None:
            raise ValueError("premul (ReduceOp.PREMUL_SUM) needs the nccl backend; MPI has none")
        self._count_all_reduce(tensor)
        buf = _buffer(tensor)
        self._wait([self._group(ranks).Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)],
                   f"all-reduce over ranks {list(ranks)}", buf)

    def _p2p_async(self, sends, recvs) -> Pending:
        if not sends and not recvs:
            return Pending(None)
        buffers = [_buffer(t) for t, _, _ in sends] + [_buffer(t) for t, _, _ in recvs]
        requests = [self.comm.Isend(b, dest=peer, tag=tag) for b, (_, peer, tag) in zip(buffers, sends)]
        requests += [self.comm.Irecv(b, source=peer, tag=tag)
                     for b, (_, peer, tag) in zip(buffers[len(sends):], recvs)]
        peers = sorted({peer for _, peer, _ in sends} | {peer for _, peer, _ in recvs})
        return self._track(lambda: self._wait(requests, f"exchange with ranks {peers}", buffers))

    def all_gather_(self, out: torch.Tensor, tensor: torch.Tensor, ranks: tuple[int, ...]) -> None:
        self._count("gather", tensor)
        buf, received = _buffer(tensor.reshape(-1)), _buffer(out)
        self._wait([self._group(ranks).Iallgather(buf, received)], f"all-gather over ranks {list(ranks)}",
                   (buf, received))

    def reduce_async_(self, tensor: torch.Tensor, dst: int, ranks: tuple[int, ...], *,
                      flags: bool = False) -> Pending:
        self._count_reduce(tensor, flags)
        group, root = self._group(ranks), ranks.index(dst)   # Split keeps the order of ranks
        buf = _buffer(tensor)
        if self.rank == dst:
            request = group.Ireduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM, root=root)
        else:
            request = group.Ireduce(buf, None, op=self.MPI.SUM, root=root)
        return self._pending(request, f"reduce to rank {dst} over ranks {list(ranks)}", buf)

    def _broadcast_async(self, tensor: torch.Tensor, src: int, ranks: tuple[int, ...]) -> Pending:
        buf = _buffer(tensor)
        return self._pending(self._group(ranks).Ibcast(buf, root=ranks.index(src)),
                             f"broadcast from rank {src} over ranks {list(ranks)}", buf)

    def max_flags_(self, flags: torch.Tensor) -> None:
        super().max_flags_(flags)
        buf = _buffer(flags)
        self._wait([self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.MAX)], "all-reduce (max)", buf)

    def barrier(self) -> None:
        self._wait([self.comm.Ibarrier()], "barrier")

    def close(self) -> None:
        if self.failed:         # a peer is lost: waiting or freeing could block forever
            self._in_flight.clear()
            self._groups.clear()
            return
        self.wait_in_flight(ignore_errors=True)
        for ranks, sub in self._groups.items():
            if sub is not self.comm:
                sub.Free()
        self._groups.clear()
