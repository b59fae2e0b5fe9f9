"""How far news travels through a schedule's own collectives: the windows of the finiteness check.

The finiteness check on several ranks (:class:`launch.engine.guard.finiteness.MarkerCheck`) sends no
message of its own: a rank that knows of a non-finite value sets the first element of every
buffer it contributes to a sync to NaN (the *marker*), and every rank reads the first element of
each buffer it receives.  So news travels exactly as the sync's data does, and this module works
out, once and identically on every rank, where it arrives.

**The model of one sync.**  ``K[o, q]`` says that rank q knows what rank o knew.  A sync moves
knowledge through its operations, in the order the ranks run them
(:class:`launch.engine.sync.program.RankProgram`):

1. overlapped blocks' reduces (:mod:`launch.engine.sync.overlap`), started before the sync: every
   other member rank -> the hub, carrying what that rank knew *before* the sync;
2. the point-to-point messages, all at once: source rank -> receiving rank;
3. the blocks in the plan's order: an all-reduce over a group G leaves every rank of G knowing
   what any rank of G knew; an overlapped block, the hub's broadcast: hub -> the block's ranks.

The exact syncs (``compile_sync(exact=True)``, :mod:`launch.engine.sync.ordered`) carry markers
the same way, except that only the ranks holding a term of a block's sum (a member with a
non-zero weight) send anything: a chain runs through them and its last one broadcasts to G, a
gather sends their products to G, an exact overlapped block's messages go from them to the hub.
So with ``exact`` a block leaves every rank of G knowing what its term holders knew (the same as
an all-reduce when every rank of G holds a term, as it does unless a member's weight is 0).

A sync has two matrices: ``held`` for what a rank knows when the sync begins (including what it
found when it prefetched its part of an overlapped block), and ``born`` for what it finds during
the sync (its losses, the buffers it contributes at the sync), which the reduces, already under
way, cannot carry.  A block or message whose ranks are all one rank moves nothing.

**Windows.**  Iterations are cut into windows of L periods, ``[j L p, (j + 1) L p)``, L the
smallest number of periods over which what any rank that can find anything (a rank holding a
worker or a buffer that some sync reads: the *origins*) knows at the window's start reaches every
rank by the window's last sync, its *decision sync*.  A finding at sync s is *admissible* for
the rank that made it when it reaches every rank by the decision sync (``born``, or ``held`` for
a prefetch, at s, then ``held`` at every later sync of the window).  Admissible findings are
marked at once; the others wait for the next window (whose start every rank's news reaches by
its end, by the choice of L).  So at every decision sync every rank knows the same thing: that
is the consistency the check relies on.  L is 1 for Lookahead and local SGD on any number of
ranks (the period's last sync is one all-reduce over every rank), about the diameter for a ring.

No L up to the number of ranks (a schedule whose ranks never hear from some origin): None, and
the check falls back to one collective of flags per sync.

Example (LA-2 on 3 ranks, one agent each: the level-1 syncs miss rank 2, the level-2 sync
reaches everyone, so one window is one period and every finding is admissible):

    >>> import topology
    >>> from launch.engine.placement import Placement
    >>> from topology.plan import compile_plan
    >>> schedule = topology.multilayer((2, 2), (0.5, 0.5))
    >>> plans = [compile_plan(p) for p in schedule.distinct_matrices]
    >>> windows = Windows.build(schedule, plans, Placement.make(3, 3), hubs=None)
    >>> windows.periods, [(t, windows.at(t, 2)) for t in range(8) if windows.at(t, 2) is not None]
    (1, [(1, (True, True, False)), (3, (True, True, True)), (5, (True, True, False)), (7, (True, True, True))])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from launch.engine.placement import Placement
from topology.plan import Plan
from topology.schedule import Schedule


@dataclass(frozen=True)
class SyncFlow:
    """Where knowledge goes during one sync (see the module docstring): ``held[o, q]`` and
    ``born[o, q]`` (bool, world x world), and the ranks that find something at it."""

    held: torch.Tensor
    born: torch.Tensor
    origins: frozenset


def _compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """First ``a``, then ``b``: ``(a b)[o, q] = any_k a[o, k] and b[k, q]``."""
    return (a.to(torch.float32) @ b.to(torch.float32)) > 0


def sync_flow(plan: Plan, placement: Placement, hub_of_block=None, workers=(), exact: bool = False) -> SyncFlow:
    """The :class:`SyncFlow` of ``plan`` on ``placement``; ``hub_of_block(block)``: the hub rank
    of an overlapped block, or None (default: no block is overlapped); ``workers``: the schedule's
    workers (their ranks check their losses at every sync); ``exact``: the blocks' senders are
    their term holders only (module docstring)."""
    n = placement.world_size
    hubs = [(block, hub_of_block(block) if hub_of_block is not None else None) for block in plan.blocks]

    def senders(block) -> list[int]:
        """The ranks whose markers a block carries."""
        members = [i for i, w in zip(block.members, block.weights) if w != 0.0] if exact else block.members
        return list(placement.ranks_of(members))

    def run(reduces: bool) -> torch.Tensor:
        k = torch.eye(n, dtype=torch.bool)
        if reduces:
            start = k.clone()
            for block, hub in hubs:
                if hub is not None:
                    for r in senders(block):
                        k[:, hub] |= start[:, r]
        edges = {(placement.rank_of(s), placement.rank_of(m.receiver)) for m in plan.mixes for s in m.sources}
        before = k.clone()
        for src, dst in edges:
            if src != dst:
                k[:, dst] |= before[:, src]
        for block, hub in hubs:
            group = list(placement.ranks_of(block.members))
            if len(group) < 2:
                continue
            if hub is None:
                k[:, group] |= k[:, senders(block)].any(dim=1, keepdim=True)
            else:
                k[:, group] |= k[:, hub:hub + 1]
        return k

    readers = [i for b in plan.blocks for i, w in zip(b.members, b.weights) if w != 0.0]
    readers += [s for m in plan.mixes for s in m.sources] + list(workers)
    return SyncFlow(run(True), run(False), frozenset(placement.rank_of(i) for i in readers))


class Windows:
    """The windows of a schedule on a placement (module docstring): :attr:`periods` (L) and, per
    non-identity sync, each rank's admissibility and whether the sync decides."""

    def __init__(self, period: int, periods: int, table: dict[int, tuple[tuple[bool, ...], tuple[bool, ...], bool]]):
        self.period, self.periods, self._table = period, periods, table

    @property
    def length(self) -> int:
        """Iterations per window: L periods."""
        return self.period * self.periods

    def at(self, t: int, rank: int) -> tuple[bool, bool, bool] | None:
        """For the sync of iteration t on ``rank``: (a finding at its prefetch is admissible, a
        finding at the sync is admissible, the sync is its window's decision sync); None for an
        identity P_t."""
        entry = self._table.get(t % self.length)
        return None if entry is None else (entry[0][rank], entry[1][rank], entry[2])

    def decision(self, t: int) -> int:
        """The decision sync of the window holding iteration t."""
        start = t - t % self.length
        return start + max(self._table)

    @classmethod
    def build(cls, schedule: Schedule, plans: list[Plan], placement: Placement, hubs,
              exact: bool = False) -> "Windows | None":
        """The windows of ``schedule`` (``plans``: its distinct matrices compiled, in order;
        ``hubs``: ``(index, block) -> hub rank | None`` for overlapped blocks, or None;
        ``exact``: the syncs are exact), or None when no number of periods up to the number of
        ranks lets every origin's news reach every rank."""
        n = placement.world_size
        flows = [sync_flow(plan, placement, (lambda b, i=index: hubs(i, b)) if hubs else None, schedule.workers,
                           exact) for index, plan in enumerate(plans)]
        syncs = [(t, flows[schedule.matrix_index(t)]) for t in range(schedule.period)
                 if not plans[schedule.matrix_index(t)].is_identity]
        origins = sorted(set().union(*(f.origins for _, f in syncs))) if syncs else []
        if not syncs:
            return None
        reach = torch.eye(n, dtype=torch.bool)
        for periods in range(1, max(n, 1) + 1):
            for _, flow in syncs:
                reach = _compose(reach, flow.held)
            if bool(reach[origins].all()):
                break
        else:
            return None
        window = [(t + j * schedule.period, flow) for j in range(periods) for t, flow in syncs]
        table = {}
        after = torch.eye(n, dtype=torch.bool)      # C: what the rest of the window carries
        for t, flow in reversed(window):
            held, born = _compose(flow.held, after), _compose(flow.born, after)
            table[t] = (tuple(bool(v) for v in held.all(dim=1)), tuple(bool(v) for v in born.all(dim=1)),
                        t == window[-1][0])
            after = held
        return cls(schedule.period, periods, table)
