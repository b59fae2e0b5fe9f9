"""Failures a long run must report instead of hiding or hanging: bad numbers and lost ranks.

**Non-finite values** (:class:`NonFiniteError`): raised on every rank alike by the finiteness
check (:mod:`launch.engine.guard.finiteness`): at the sync that finds NaN or Inf, or (several ranks)
at the last sync of its window; before a checkpoint could replace the last good one; at the end
of a run.

**Lost ranks.**  Every collective of a run goes through :func:`collective`, the one lost-rank
handler: the syncs and the finiteness checks (:mod:`launch.engine.core`,
:mod:`launch.engine.guard.finiteness`), the start-up exchanges, checkpoints
(:mod:`launch.engine.store.checkpoint`), the diagnostics (:mod:`launch.engine.readout`) and, on
the command line, the metrics and the final gather.  Each is bounded by the communicator's
``timeout_s`` (:mod:`launch.comm.base`): when a peer dies, gloo raises at once (``Connection reset
by peer``); when a peer is alive but stuck (SIGSTOP, a deadlock), gloo and NCCL raise after
``timeout_s``, and the MPI communicator, whose operations are polled against a deadline, raises
:class:`launch.comm.CollectiveTimeout`.  :func:`collective` turns that error into
:class:`RankFailureError` naming this rank, the iteration, the operation and the rank that seems
lost: the one of the collective's ranks that does not answer a roll call
(:meth:`launch.comm.Communicator.responsive_ranks`: through the rendezvous store under
torch.distributed, through messages on a communicator of its own under MPI) within
:data:`ROLL_CALL_S` (the candidates when it cannot be told, e.g. when the store died with rank
0).  A survivor blocked behind another survivor cannot answer in time and may be named too; the
message says "seems".  Under MPI, ``mpiexec`` stops every rank when one dies.

**NCCL** reports a lost peer off the main thread: its watchdog finds the timeout (or the
communication error), aborts the communicators and keeps the process
(:mod:`launch.comm.torch_dist`); :func:`collective` reads that report
(:meth:`launch.comm.Communicator.failure`) before every collective, and raises the same
:class:`RankFailureError` then, at the latest at the collective after the one that failed.

**Local errors are not lost ranks** (:func:`is_local_error`): CUDA out of memory (also NCCL's
"unhandled cuda error" for it), an illegal memory access or a device-side assert, NCCL's invalid
usage or argument, a CPU tensor on an NCCL-only group: they pass through :func:`collective` as
themselves, on the rank where they happened (its peers then see a lost rank, which it is).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

#: Seconds the survivors of a failed collective wait for each other's roll call.
ROLL_CALL_S = 3.0

#: The ``where`` of the finiteness check after the last iteration (a run that ends non-finite
#: fails like one that does at a sync).
END_OF_RUN = "end of the run"


class NonFiniteError(FloatingPointError):
    """NaN or Inf in some agents' parameters (or optimizer state slots) or losses.

    Attributes: ``step`` (the iteration t whose sync or checkpoint found it), ``agents`` (sorted
    agent indices with non-finite values), ``parameters`` and ``losses`` (which of those had
    non-finite parameters / a non-finite loss), ``stopped`` (``(t, where)``: the sync or
    checkpoint at which every rank stopped; after a check carried by the syncs' collectives it
    may come later than ``step``, see :mod:`launch.engine.guard.finiteness`).
    """

    def __init__(self, step: int, parameters: list[int], losses: list[int], where: str,
                 stopped: tuple[int, str] | None = None):
        self.step = step
        self.parameters = parameters
        self.losses = losses
        self.agents = sorted(set(parameters) | set(losses))
        self.stopped = stopped if stopped is not None else (step, where)
        parts = []
        if parameters:
            parts.append(f"parameters of agent(s) {parameters}")
        if losses:
            parts.append(f"loss of agent(s) {losses}")
        what = " and the ".join(parts) if parts else "result of a sync"
        place = f"{where} (t={step})" if where == END_OF_RUN else f"{where} of iteration t={step}"
        stop = ("the run stops here" if self.stopped == (step, where)
                else f"every rank stops at the {self.stopped[1]} of iteration t={self.stopped[0]}")
        super().__init__(
            f"non-finite values (NaN or Inf) in the {what}, detected at the {place}; {stop} and no "
            f"checkpoint is written (the last one is kept)"
        )


class RankFailureError(RuntimeError):
    """A collective failed: a peer rank died, or got stuck past the collective timeout."""


#: What the message of an error raised by this rank's own device or its own use of the backend
#: contains (:func:`is_local_error`), as PyTorch and NCCL word it.
LOCAL_ERROR_MESSAGES = (
    "out of memory",                        # torch.OutOfMemoryError; NCCL's "Cuda failure 'out of memory'"
    "CUDA error",                           # torch.AcceleratorError: an illegal memory access, an assert, ...
    "CUBLAS_STATUS_", "CUDNN_STATUS_",
    "ncclUnhandledCudaError", "ncclInvalidUsage", "ncclInvalidArgument", "ncclInternalError",
    "No backend type associated with device type",          # a CPU tensor on an NCCL-only group
    "Tensors must be CUDA and dense",
    "Expected all tensors to be on the same device",
)


def is_local_error(err: BaseException) -> bool:
    """Whether ``err``, raised inside a collective, is this rank's own failure (module docstring)
    rather than a sign of a lost peer.

    Example:
        >>> is_local_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
        True
        >>> is_local_error(RuntimeError("Connection closed by peer [127.0.0.1]:29500"))
        False
    """
    if isinstance(err, (torch.OutOfMemoryError, torch.AcceleratorError)):
        return True
    text = str(err)
    return any(message in text for message in LOCAL_ERROR_MESSAGES)


@contextmanager
def collective(comm, t: int, what: str, ranks: tuple[int, ...]):
    """Run a collective of the ``ranks`` (this rank among them) for iteration ``t``; turn the
    backend's failure into :class:`RankFailureError` (module docstring).

    ``comm.context`` is ``(t, what)`` for the duration (the communicator's own timeout messages
    name it); a failure the backend found since the last collective
    (:meth:`launch.comm.Communicator.failure`) raises before the collective starts;
    ``ValueError``, ``FloatingPointError``, a nested collective's :class:`RankFailureError` and
    local errors (:func:`is_local_error`) pass through unchanged.
    """
    outer = comm.context
    comm.context = (t, what)
    try:
        if comm.world_size == 1:
            yield
            return
        found = comm.failure()
        if found is not None:
            raise RankFailureError(_lost_rank_message(comm, t, what, ranks, found))
        try:
            yield
        except (ValueError, FloatingPointError, RankFailureError):   # the latter: a nested collective's
            raise
        except (RuntimeError, OSError) as err:
            if is_local_error(err):
                raise
            raise RankFailureError(_lost_rank_message(comm, t, what, ranks, err)) from err
    finally:
        comm.context = outer


def _lost_rank_message(comm, t: int, what: str, ranks: tuple[int, ...], err) -> str:
    """The message of :class:`RankFailureError`, after the roll call."""
    others = [r for r in ranks if r != comm.rank]
    present = comm.responsive_ranks(ROLL_CALL_S)
    silent = others if present is None else [r for r in others if r not in present]
    if present is None:
        lost = f"one of ranks {others} seems lost (no roll call: the rendezvous store is unreachable too)"
    elif len(silent) == 1:
        lost = f"rank {silent[0]} seems lost"
    elif silent:
        lost = f"ranks {silent} seem lost"
    else:
        lost = f"a rank among {others} seems lost"
    timeout = getattr(comm, "timeout_s", None)
    waited = f" (or stuck past the collective timeout of {timeout:g} s)" if timeout else ""
    detail = " ".join(str(err).split())      # one line: NCCL's messages span several
    return (f"rank {comm.rank}: the {what} of iteration t={t} failed on the ranks {list(ranks)}: "
            f"{lost}: killed or crashed{waited}. Resume from the last checkpoint. Backend error: {detail}")


def stream_objects(comm, obj, t: int, what: str) -> list:
    """Every rank's ``obj``, indexed by rank, as :func:`gather_objects` gives it, but one rank at a
    time (a broadcast from each rank in turn, under :func:`collective`): NCCL's object
    collectives stage the pickled bytes on the GPU, so an all-gather of every rank's share of the
    model holds world x share there at once, this one share at a time.  For large objects (every
    agent's weights or state at the end of a run)."""
    with collective(comm, t, what, tuple(range(comm.world_size))):
        return [comm.broadcast_object(obj if src == comm.rank else None, src) for src in range(comm.world_size)]


def gather_objects(comm, obj, t: int, what: str) -> list:
    """``comm.all_gather_object(obj)`` (every rank's ``obj``, indexed by rank) under
    :func:`collective`, over every rank: ``what`` of iteration ``t`` names it in a failure."""
    with collective(comm, t, what, tuple(range(comm.world_size))):
        return comm.all_gather_object(obj)
