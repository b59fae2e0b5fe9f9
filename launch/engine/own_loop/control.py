"""The own loop's control messages: how the ranks that run no training loop follow those that do.

Under :class:`launch.AgentOptimizer` the worker ranks run the user's loop, and only they know
what comes next: a sync, an evaluation, a gather of the state, the end of the run (a finite
DataLoader, epochs, early stopping: nothing says in advance how many steps there will be).  The
passive-only ranks wait in :meth:`launch.AgentOptimizer.serve`.  Before each such *event* every
rank takes part in one tiny *control* collective that names it, and then in the event's own
collectives:

    SYNC  t, l    the sync of iteration t (a non-identity P_t, or a step the record logs: l = 1):
                  the record's metrics (l = 1), the finiteness check, the plan
    EVAL  t, i    an evaluation of agent i's weights (i = m: the virtual iterate X a)
    STATE t       a gather of every agent's state (``AgentOptimizer.gather_state_dict``)
    SAVE  t       a checkpoint (``AgentOptimizer.save``: every rank writes its part)
    REC   t       an evaluation of the record (``AgentOptimizer.record_evaluation``)
    CLOSE t       the end: every worker called ``close()`` after t steps; ``serve()`` returns
    ABORT t, c    a worker refused a call (reason c): every rank raises the same ``ValueError``

Identity steps announce nothing (they have no collective at all), so a schedule whose syncs are
rare costs one control message per sync, and ``close()`` between two syncs reaches the passive
ranks through the one extra message it sends.  The control always goes first, before any other
collective of its event, on every rank, so every rank issues the same collectives in the same
order, and a passive rank is never inside a collective that the workers will not enter.

Two forms, chosen once from the placement (the same choice on every rank):

- **one worker rank** (Lookahead and LA-n: the worker, perhaps with some slow agents, on one
  rank; the other slow agents elsewhere): the worker's rank *broadcasts* its command and does not
  wait for it (it waits for the previous one, long done, before the next): nothing is added to
  the worker's critical path;
- **several worker ranks** (local SGD, gossip, Lookahead over workers): an all-reduce (MAX) of
  one (kind, t, arg) triple per rank, each rank filling its own slot with values >= 0 and the
  others' with 0, so every rank reads every worker's command and checks that they agree: a
  worker that closes while another is at a sync, two workers evaluating different targets, give
  the same ``RuntimeError`` on every rank instead of a hang.  One latency-bound collective of 3W
  floats per event.

Either way one collective per event, counted in ``comm.stats.flag_reduces`` (with the finiteness
check's: the tiny collectives that are not the plan's).  Workers may close after different
numbers of steps when no sync lies between (they took local steps only); ``serve`` then ends at
the largest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from launch.comm.base import Communicator
from launch.engine.guard.health import collective

SYNC, EVAL, STATE, CLOSE, ABORT, SAVE, REC = 1, 2, 3, 4, 5, 6, 7
KINDS = {SYNC: "the sync", EVAL: "an evaluation", STATE: "a gather of the state", CLOSE: "close()",
         ABORT: "a refused call", SAVE: "a checkpoint", REC: "an evaluation of the record"}

#: Why a worker aborted the run (``Command.arg`` of an ABORT): the message every rank raises.
ABORT_REASONS = {
    1: "add_param_group was called on the AgentOptimizer after construction: every agent's flat "
       "buffer was laid out for the parameters it had then; build the inner optimizer with every "
       "parameter group before wrapping it",
    2: "a parameter group was added to the inner optimizer after the AgentOptimizer was built: "
       "every agent's flat buffer was laid out for the parameters it had then; build the inner "
       "optimizer with every parameter group before wrapping it",
    3: "the model's parameters no longer live in the agent's flat buffer (model.half(), model.to(device "
       "or dtype) or model.to(memory_format=...) after the AgentOptimizer was built replaces param.data, "
       "and the syncs would mix numbers the model no longer uses): convert the model before wrapping the "
       "optimizer",
}


@dataclass(frozen=True)
class Command:
    """One event: ``kind`` (SYNC, EVAL, STATE, CLOSE, ABORT, SAVE, REC), the worker's counter
    ``t``, and ``arg`` (the agent evaluated, the abort reason, 1 for a logged step; else 0)."""

    kind: int
    t: int
    arg: int = 0

    def describe(self) -> str:
        if self.kind == SYNC:
            return f"the sync of iteration t={self.t}"
        if self.kind == CLOSE:
            return f"close() after {self.t} steps"
        if self.kind == EVAL:
            return f"an evaluation of target {self.arg} at t={self.t}"
        return f"{KINDS.get(self.kind, 'nothing')} at t={self.t}"


def abort_error(rank: int, command: Command) -> ValueError:
    """The ``ValueError`` that every rank raises for an ABORT sent by ``rank``."""
    reason = ABORT_REASONS.get(command.arg, f"reason {command.arg}")
    return ValueError(f"worker rank {rank} refused a call at t={command.t}: {reason}")


def decide(commands: dict[int, Command]) -> Command:
    """The event that the worker ranks' ``commands`` (by rank) announce, the same on every rank:
    ``ValueError`` for an ABORT, ``RuntimeError`` when the workers disagree."""
    for rank, command in commands.items():
        if command.kind == ABORT:
            raise abort_error(rank, command)
    kinds = {c.kind for c in commands.values()}
    if kinds == {CLOSE}:
        return Command(CLOSE, max(c.t for c in commands.values()))
    if len(set(commands.values())) == 1:
        return next(iter(commands.values()))
    said = "; ".join(f"rank {r}: {c.describe()}" for r, c in sorted(commands.items()))
    raise RuntimeError(
        f"the worker ranks are out of step ({said}): every worker rank must make the same calls in "
        f"the same order -- the same number of optimizer steps up to each sync (give every worker a "
        f"shard of the same length, e.g. DistributedSampler(..., drop_last=True)), and the same "
        f"evaluations and gathers at the same step")


class ControlChannel:
    """The control collective of one :class:`launch.AgentOptimizer` (see the module docstring).

    Args:
        comm: the communicator (two ranks or more).
        worker_ranks: the ranks that hold a worker, sorted (the same on every rank).
        device: where the control tensors live (the agents' device: NCCL needs CUDA tensors).
    """

    def __init__(self, comm: Communicator, worker_ranks: tuple[int, ...], device: torch.device):
        self.comm, self.worker_ranks, self.device = comm, tuple(worker_ranks), device
        self.world = tuple(range(comm.world_size))
        self.broadcasting = len(self.worker_ranks) == 1
        # The messages' tensors, made once: a command is written into them by three fills
        # (scalar kernel arguments: no tensor made from a Python list, no host-to-device copy,
        # so a worker never waits for its GPU to send one); only the receiving side reads.
        self._slots = torch.zeros(3 if self.broadcasting else 3 * comm.world_size, dtype=torch.float64,
                                  device=device)
        self._sent = None     # the broadcast in flight (its tensor, _slots, is not written until waited)

    def _write(self, own: Command, at: int = 0) -> None:
        """``own`` as (kind, t, arg) into ``_slots[at : at + 3]``."""
        for k, value in enumerate((own.kind, own.t, own.arg)):
            self._slots[at + k].fill_(value)

    def exchange(self, own: Command | None) -> Command:
        """This rank's part of one control collective: ``own`` is this rank's command (a worker
        rank), None on a passive-only rank.  Returns the event, the same on every rank."""
        if self.broadcasting:
            return self._broadcast(own)
        slots = self._slots.zero_()
        if own is not None:
            self._write(own, 3 * self.comm.rank)
        with collective(self.comm, own.t if own is not None else -1, "control message", self.world):
            self.comm.max_flags_(slots)
        values = slots.cpu().view(-1, 3).tolist()       # the decision: every rank reads it
        return decide({r: Command(int(values[r][0]), int(values[r][1]), int(values[r][2]))
                       for r in self.worker_ranks})

    def _broadcast(self, own: Command | None) -> Command:
        source = self.worker_ranks[0]
        self.wait()
        if own is not None:
            self._write(own)
            self._sent = self.comm.broadcast_async_(self._slots, source, self.world, flags=True)
            if own.kind == ABORT:
                self.wait()               # deliver it before this rank raises
                raise abort_error(source, own)
            return own
        with collective(self.comm, -1, "control message", self.world):
            self.comm.broadcast_async_(self._slots, source, self.world, flags=True).wait()
        kind, t, arg = (int(v) for v in self._slots.cpu().tolist())    # the decision of a passive rank
        return decide({source: Command(kind, t, arg)})

    def wait(self) -> None:
        """Wait for this rank's control broadcast in flight, if any (before the next, and at the
        end of the run)."""
        if self._sent is not None:
            pending, self._sent = self._sent, None
            with collective(self.comm, -1, "control message", self.world):
                pending.wait()
