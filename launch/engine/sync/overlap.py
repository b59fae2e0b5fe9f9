"""Overlapped syncs: the passive agents' part of a sync travels while the workers compute.

``Simulation(overlap=True)`` (command line: ``launch.overlap=true``).

**Why it is exact.**  A passive agent (one that takes no inner steps: Lookahead's slow weights)
changes only at syncs.  So at the start of iteration t, the value it will contribute to the next
sync t' >= t is already known, and so is its weight in P_{t'}.  For a block of P_{t'} whose
workers all live on one rank h (the *hub*: rank 0 of a distributed Lookahead), the sync

    x_r <- sum_i w_i x_i      for every receiver r of the block

splits into the hub's members H and the others' O = members - H:

    S   = sum_{i in O} w_i x_i       known at the start of iteration t: reduced to h meanwhile
    acc = sum_{i in H} w_i x_i + S   at the sync, on h alone; then broadcast to the receivers

Every product w_i x_i is rounded once, as in the plain all-reduce; for a two-rank block (LA-1)
``acc = w_0 x_0 + w_1 x_1`` is the same two-term sum, bit for bit.  With more ranks S is summed
in the reduce's order and added last (the plain all-reduce sums in the ring's order): the
result agrees to rounding.

Under ``exact`` (:mod:`launch.engine.sync.ordered`) S is not formed: the other ranks send the hub
their products one by one (:class:`launch.engine.sync.ordered.OrderedHubBlock`) and the hub adds
every term in agent order, the same bits as co-located.

**What it costs and saves.**  Per hub block and sync: a reduce (started before the inner steps,
waited for at the sync) and a broadcast (started at the sync; the hub waits for it only before
its next optimizer step writes the buffer), d x itemsize bytes each; a scratch buffer of d on
every rank of the block (S on the hub, the rank's weighted sum elsewhere).  The hub's critical
path keeps two passes over its buffer (``mul``, ``add``) and no transfer, as long as the inner
steps between launch and sync last longer than the reduce.

**Eligible blocks** (:func:`hub_of`, decided once by :func:`launch.engine.sync.compile.compile_sync`): spanning two ranks or more, every worker member on one rank
h and a receiver, every receiver a member, in a plan with no point-to-point mixes, of a schedule
without push-sum.  Other blocks (gossip, local SGD with workers everywhere) run as plain
all-reduces.  Not with ``outer`` (a state-dependent slow update).

**The finiteness check** rides with the data, as in a plain block
(:class:`launch.engine.guard.finiteness.MarkerCheck`): each rank checks its part as it computes it (the
other ranks at the prefetch, the hub at the sync) and marks it; the hub reads the reduce's marker
and marks what it broadcasts; the others read the broadcast's.  No message of its own.

**When it is on by default** (``overlap="auto"``, :func:`launch.engine.sync.compile.compile_sync`):
whenever some block qualifies (below) and the scratch it costs, one flat copy (d x itemsize bytes)
on every rank of a hub block, is at most :data:`AUTO_MAX_BYTES`; one scratch per hub block
position is shared by every matrix of the schedule (their syncs never overlap each other).

**Timing contract.**  The reduce of the next sync t' is started at the start of
:meth:`Simulation.step` (and before the sync when it was not): between then and the sync nothing
may write a passive member's buffer (callbacks run between steps, before the launch).  Between
the sync and the hub's next optimizer step the hub's receivers are being broadcast: code outside
the simulation that writes them must call :meth:`Simulation.wait_in_flight` first.
"""

from __future__ import annotations

from launch.comm.base import Communicator
from launch.engine.guard.health import collective
from launch.engine.placement import Placement
from topology.plan import Block, Plan
from topology.schedule import Schedule


#: ``overlap="auto"`` overlaps the blocks that qualify when their scratch, one flat copy of
#: d x itemsize bytes on every rank of a hub block, is at most this (the same rule on every rank:
#: it depends on the model's size only, not on the memory a rank happens to have free).
AUTO_MAX_BYTES = 1 << 30


def hub_of(block: Block, plan: Plan, placement: Placement, workers, push_sum: bool) -> int | None:
    """The hub rank of ``block`` when it may run overlapped (see the module docstring), else None."""
    if push_sum or plan.mixes or len(placement.ranks_of(block.members)) < 2:
        return None
    active = [i for i in block.members if i in workers]
    hubs = {placement.rank_of(i) for i in active}
    if len(hubs) != 1 or not set(active) <= set(block.receivers) or not set(block.receivers) <= set(block.members):
        return None
    return hubs.pop()


class NoOverlap:
    """Syncs that are not overlapped: every hook does nothing."""

    active = False

    def before_step(self, t: int) -> None:
        pass

    def before_sync(self, t: int) -> None:
        pass

    def after_sync(self, t: int, program) -> None:
        pass

    def wait(self) -> None:
        pass


class Overlap(NoOverlap):
    """Starts the hub blocks' reduces ahead of their sync and waits for the hub's broadcasts.

    Every rank calls the hooks at the same points (the start of every step and of every sync), so
    every rank starts the same collectives in the same order on every group.

    Args:
        programs: the simulation's programs, one per distinct matrix (some with hub blocks).
        schedule: the simulation's schedule.
        agents: this rank's agents.
        comm: the communicator.
        check: the finiteness check (its hooks check and mark the prefetched parts).
        clock: ``() -> t``, the simulation's counter (to name the iteration of a failure).
    """

    active = True

    def __init__(self, programs, schedule: Schedule, agents: dict, comm: Communicator, check, clock):
        self.programs, self.schedule, self.agents, self.comm = programs, schedule, agents, comm
        self.check, self.clock = check, clock
        self.world = tuple(range(comm.world_size))
        #: The iteration whose hub blocks' reduces are in flight, or None.
        self.launched_for: int | None = None
        for agent in agents.values():
            if agent.is_worker:
                # The broadcast reads the hub's buffer: its optimizer must not write it before.
                agent.optimizer.register_step_pre_hook(lambda *_: self.wait())

    def ensure(self, t_from: int) -> None:
        """Start the reduces of the next sync at or after ``t_from`` (the schedule's next
        non-identity P_t, found in its words whatever the period: a program is the identity
        exactly when its matrix is), unless already started."""
        t = self.schedule.next_sync(t_from)
        if t is None or t == self.launched_for:
            return
        program = self.programs[self.schedule.matrix_index(t)]
        if program.hub_blocks:
            self.check.prefetch(t)
            program.prefetch({i: agent.sync_tensor() for i, agent in self.agents.items()}, self.comm, self.check)
        self.launched_for = t

    def before_step(self, t: int) -> None:
        self.ensure(t)

    def before_sync(self, t: int) -> None:
        self.wait()
        self.ensure(t)      # the reduces of sync t, when not started yet

    def after_sync(self, t: int, program) -> None:
        if self.launched_for == t:
            self.launched_for = None
        if program.reset and any(self.agents[i].layout.numel for i in program.touched):
            self.wait()     # a reset writes state slots that may be in flight

    def wait(self) -> None:
        """Wait for the hub's broadcasts in flight (their source buffers become writable)."""
        for program in self.programs:
            pending = program.broadcasts()
            if pending:
                with collective(self.comm, self.clock(), "broadcast of a sync", self.world):
                    for p in pending:
                        p.wait()
                program.clear_broadcasts()
