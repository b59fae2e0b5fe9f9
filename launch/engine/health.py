"""Failures a long run must report instead of hiding or hanging: bad numbers and lost ranks.

**Non-finite values** (:class:`NonFiniteError`): raised on every rank alike by the finiteness
check (:mod:`launch.engine.finiteness`): at the sync that finds NaN or Inf, or (several ranks)
at the last sync of its window, and before a checkpoint could replace the last good one.

**Lost ranks.**  When a peer dies, gloo raises at once (``Connection reset by peer``), NCCL and
gloo raise after the communicator's ``timeout_s`` when a peer is alive but stuck.
:func:`collective` turns that backend error into :class:`RankFailureError` naming this rank, the
iteration, the operation and the rank that seems lost: the one of the collective's ranks that does
not answer a roll call through the rendezvous store within :data:`ROLL_CALL_S` (the candidates
when the store cannot tell, e.g. when it died with rank 0).  A survivor blocked behind another
survivor (a ring all-reduce waits on its neighbour) cannot answer in time and may be named too;
the message says "seems".  Under
MPI, ``mpiexec`` itself kills the other ranks and exits non-zero when one dies.
"""

from __future__ import annotations

from contextlib import contextmanager

#: Seconds the survivors of a failed collective wait for each other's roll call.
ROLL_CALL_S = 3.0


class NonFiniteError(FloatingPointError):
    """NaN or Inf in some agents' parameters (or optimizer state slots) or losses.

    Attributes: ``step`` (the iteration t whose sync or checkpoint found it), ``agents`` (sorted
    agent indices with non-finite values), ``parameters`` and ``losses`` (which of those had
    non-finite parameters / a non-finite loss), ``stopped`` (``(t, where)``: the sync or
    checkpoint at which every rank stopped; after a check carried by the syncs' collectives it
    may come later than ``step``, see :mod:`launch.engine.finiteness`).
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
        stop = ("the run stops here" if self.stopped == (step, where)
                else f"every rank stops at the {self.stopped[1]} of iteration t={self.stopped[0]}")
        super().__init__(
            f"non-finite values (NaN or Inf) in the {what}, detected at the {where} of iteration "
            f"t={step}; {stop} and no checkpoint is written (the last one is kept)"
        )


class RankFailureError(RuntimeError):
    """A collective failed: a peer rank died, or got stuck past the collective timeout."""


@contextmanager
def collective(comm, t: int, what: str, ranks: tuple[int, ...]):
    """Run a collective; turn the backend's failure into :class:`RankFailureError`."""
    if comm.world_size == 1:
        yield
        return
    try:
        yield
    except (ValueError, FloatingPointError):
        raise
    except (RuntimeError, OSError) as err:
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
        timeout = getattr(comm, "timeout", None)
        waited = f" (or stuck past the collective timeout of {timeout.total_seconds():g} s)" if timeout else ""
        raise RankFailureError(
            f"rank {comm.rank}: the {what} of iteration t={t} failed on the ranks {list(ranks)}: "
            f"{lost}: killed or crashed{waited}. Resume from the last checkpoint. "
            f"Backend error: {err}"
        ) from err
