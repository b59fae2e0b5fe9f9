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

**What it costs and saves.**  Per hub block and sync: a reduce (started before the inner steps,
waited for at the sync) and a broadcast (started at the sync; the hub waits for it only before
its next optimizer step writes the buffer), d x itemsize bytes each; a scratch buffer of d on
every rank of the block (S on the hub, the rank's weighted sum elsewhere).  The hub's critical
path keeps two passes over its buffer (``mul``, ``add``) and no transfer, as long as the inner
steps between launch and sync last longer than the reduce.

**Eligible blocks** (:func:`hub_of`): spanning two ranks or more, every worker member on one rank
h and a receiver, every receiver a member, in a plan with no point-to-point mixes, of a schedule
without push-sum.  Other blocks (gossip, local SGD with workers everywhere) run as plain
all-reduces.  Not with ``outer`` (a state-dependent slow update).

**The finiteness check** (``check_finite``, :mod:`launch.health`) needs, before the sync mixes,
the flags of every agent on every rank, and every rank must raise the same error.  When every
worker of the schedule lives on the hub and every block that crosses ranks is a hub block (a
distributed Lookahead), the other ranks hold only passive agents, whose flags are known at the
start of the step too: they are summed into the hub (an asynchronous reduce of 2m numbers,
started with the data's), the hub adds its own at the sync and decides alone, without waiting
for anyone, then broadcasts the verdict; the other ranks wait for it (they are idle anyway) and
raise with the hub.  This replaces the all-reduce of the flags that would put a round trip
through every rank on the hub's critical path at every sync.

**Timing contract.**  The reduce of the next sync t' is started at the start of
:meth:`Simulation.step` (and by :meth:`Simulation.sync` when it was not): between then and the
sync nothing may write a passive member's buffer (callbacks run between steps, before the launch).
Between the sync and the hub's next optimizer step the hub's receivers are being broadcast:
code outside the simulation that writes them must call :meth:`Simulation.wait_in_flight` first.
"""

from __future__ import annotations

import torch

from launch import health
from launch.placement import Placement
from topology.plan import Block, Plan


def hub_of(block: Block, plan: Plan, placement: Placement, workers, push_sum: bool) -> int | None:
    """The hub rank of ``block`` when it may run overlapped (see the module docstring), else None."""
    if push_sum or plan.mixes or len(placement.ranks_of(block.members)) < 2:
        return None
    active = [i for i in block.members if i in workers]
    hubs = {placement.rank_of(i) for i in active}
    if len(hubs) != 1 or not set(active) <= set(block.receivers) or not set(block.receivers) <= set(block.members):
        return None
    return hubs.pop()


class Prefetcher:
    """Starts the hub blocks' reduces ahead of their sync and waits for the hub's broadcasts.

    Every rank calls :meth:`ensure` at the same points (the start of every step and of every
    sync), so every rank starts the same collectives in the same order on every group.
    """

    def __init__(self, sim):
        self.sim = sim
        self.active = any(p.has_hub_blocks for p in sim.programs)
        #: The iteration whose hub blocks' reduces are in flight, or None.
        self.launched_for: int | None = None
        #: The rank that decides the finiteness check alone (see the module docstring), or None.
        self.hub = self._single_hub() if self.active else None
        self._flags = self._flag_reduce = None
        if self.active:
            for agent in sim.agents.values():
                if agent.is_worker:
                    # The broadcast reads the hub's buffer: its optimizer must not write it before.
                    agent.optimizer.register_step_pre_hook(lambda *_: self.wait_broadcasts())

    def _single_hub(self) -> int | None:
        """The rank h holding every worker when every block that crosses ranks is a hub block of
        h and no plan has point-to-point mixes (the same answer on every rank), else None."""
        sim = self.sim
        workers = set(sim.schedule.workers)
        hubs = {sim.placement.rank_of(i) for i in workers}
        if len(hubs) != 1:
            return None
        hub = hubs.pop()
        for program in sim.programs:
            plan = program.plan
            if plan.mixes:
                return None
            for block in plan.blocks:
                crosses = len(sim.placement.ranks_of(block.members)) > 1
                if crosses and hub_of(block, plan, sim.placement, workers, sim.schedule.push_sum) != hub:
                    return None
        return hub

    def next_sync(self, t_from: int) -> int | None:
        """The first iteration t >= t_from with a non-identity P_t (None when there is none)."""
        schedule, programs = self.sim.schedule, self.sim.programs
        for t in range(t_from, t_from + schedule.period):
            if not programs[schedule.matrix_index(t)].plan.is_identity:
                return t
        return None

    def ensure(self, t_from: int) -> None:
        """Start the reduces of the next sync at or after ``t_from``, unless already started."""
        if not self.active:
            return
        t = self.next_sync(t_from)
        if t is None or t == self.launched_for:
            return
        if self.hub is not None and self.sim.check_finite:
            self._launch_flags()            # first: a tiny reduce, not queued behind the data's
        program = self.sim.programs[self.sim.schedule.matrix_index(t)]
        if program.has_hub_blocks:
            tensors = {i: agent.sync_tensor() for i, agent in self.sim.agents.items()}
            program.launch_prefetch(tensors, self.sim.comm)
        self.launched_for = t

    def _launch_flags(self) -> None:
        sim, comm = self.sim, self.sim.comm
        if self._flag_reduce is not None:
            self._flag_reduce.wait()
        if comm.rank == self.hub:
            flags = torch.zeros(2 * sim.schedule.num_agents)        # the hub's own: at the sync
        else:
            flags = health.local_flags(sim)                        # passive agents only: final
        self._flags = flags.to(self._device())
        self._flag_reduce = comm.reduce_async_(self._flags, self.hub, self._world(), flags=True)

    def check_finite(self, t: int) -> bool:
        """The finiteness check of sync t decided by the hub (module docstring); False when this
        simulation does not check that way (then :func:`launch.health.check_finite` does)."""
        if self.hub is None or self._flag_reduce is None:
            return False
        sim, comm, world = self.sim, self.sim.comm, self._world()
        with health.collective(comm, t, "finiteness check before the sync", world):
            self._flag_reduce.wait()
            if comm.rank == self.hub:
                flags = health.local_flags(sim).to(self._device()) + self._flags
                verdict = comm.broadcast_async_(flags, self.hub, world, flags=True)
                if flags.any():
                    verdict.wait()      # deliver the verdict before raising
            else:
                flags = torch.zeros_like(self._flags)
                comm.broadcast_async_(flags, self.hub, world, flags=True).wait()
        self._flags = self._flag_reduce = None
        health.raise_if_flagged(sim, flags.cpu(), t, "sync")
        return True

    def _world(self) -> tuple[int, ...]:
        return tuple(range(self.sim.comm.world_size))

    def _device(self):
        return next(iter(self.sim.agents.values())).flat.buffer.device

    def consumed(self, t: int) -> None:
        """Sync t ran: its reduces were used."""
        if self.launched_for == t:
            self.launched_for = None

    def wait_broadcasts(self) -> None:
        """Wait for the hub's broadcasts in flight (their source buffers become writable)."""
        for program in self.sim.programs:
            if program.broadcasts:
                ranks = tuple(range(self.sim.comm.world_size))
                with health.collective(self.sim.comm, self.sim.t, "broadcast of a sync", ranks):
                    for pending in program.broadcasts:
                        pending.wait()
                program.broadcasts.clear()
