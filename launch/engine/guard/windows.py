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
gather sends their products to G, a sharded block's ranks (each holding one term) send each
other their shards and all-gather the sums, an exact overlapped block's messages go from them to
the hub.
So with ``exact`` a block leaves every rank of G knowing what its term holders knew (the same as
an all-reduce when every rank of G holds a term, as it does unless a member's weight is 0).

A sync has two matrices: ``held`` for what a rank knows when the sync begins (including what it
found when it prefetched its part of an overlapped block), and ``born`` for what it finds during
the sync (its losses, the buffers it contributes at the sync), which the reduces, already under
way, cannot carry.  A block or message whose ranks are all one rank moves nothing.

**Windows.**  The iterations are cut into the schedule's *parts*, each periodic from its own start
(:meth:`topology.Schedule.periodic_parts`: one part for a periodic schedule; one per phase, from
the phase's own counter, for :func:`topology.phases`).  A part of period p is cut into windows of
L p iterations from its start, ``[S + j L p, S + (j + 1) L p)``, L the smallest number of periods
over which what any rank that can find anything (a rank holding a worker or a buffer that some
sync of the schedule reads: the *origins*) knows at the window's start reaches every rank by the
window's last sync, its *decision sync*.  A finding at sync s is *admissible* for the rank that
made it when it reaches every rank by the decision sync (``born``, or ``held`` for a prefetch, at
s, then ``held`` at every later sync of the window).  Admissible findings are marked at once; the
others wait for the next window (whose start every rank's news reaches by its end, by the choice
of L).  So at every decision sync every rank knows the same thing: that is the consistency the
check relies on.  L is 1 for Lookahead and local SGD on any number of ranks (the period's last
sync is one all-reduce over every rank), about the diameter for a ring.

A finite part (a phase) that ends inside a window leaves a *tail*; when the tail holds a sync, it
joins the following iterations up to the end of the first whole window of a later part: that
stretch is one window (it holds a whole window, so its start's news reaches every rank by its
end; the later part's windows keep their own alignment).

No L up to the number of ranks for some part (a schedule whose ranks never hear from some
origin), or a tail that no later window closes: None, and the check falls back to one collective
of flags per sync.

**In closed form.**  Nothing here enumerates a period (which may be 10^21 iterations long).  Every
``held`` and ``born`` is reflexive (a rank keeps what it knew), so composing more syncs only adds
knowledge, and M^c = M^min(c, n) for a reflexive n x n boolean M (a path needs at most n - 1
steps; the diagonal pads it): L comes from one period's product (:func:`topology.word.fold`, a
power per run and repeat).  Within a window, with A(u) the composition of ``held`` over the syncs
after position u (A = I after the last), the table is, at a sync u of matrix i,

    admissible at the prefetch: rows of held_i A(u) all true;  at the sync: rows of born_i A(u)

and A(u - 1) = held_{i(u)} A(u) (A(u) itself where P is the identity) contains A(u): A grows as
u goes back, so it takes at most n^2 values.  Going back from the window's end with A known, the
next change is at the last earlier sync whose held_i A differs from A (every sync after it leaves
A as it is): one search in the reversed word (:func:`topology.word.reverse`).  So a window costs
O(n^2) searches and products whatever its length, and a look-up (:meth:`Windows.at`) a bisection
and a cached entry per (matrix, value of A).

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

from bisect import bisect_right
from dataclasses import dataclass
from functools import reduce

import torch

from launch.engine.placement import Placement
from topology.plan import Plan
from topology.schedule import Schedule
from topology.word import Word, concat, fold, order_of_appearance, reverse, segment


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


def _power(a: torch.Tensor, times: int) -> torch.Tensor:
    """``a`` composed ``times`` times, for a reflexive ``a`` (n x n): a^min(times, n), by
    repeated squaring (a path of knowledge needs at most n - 1 steps; the diagonal pads it)."""
    result, times = torch.eye(a.shape[0], dtype=torch.bool), min(times, a.shape[0])
    while times:
        if times & 1:
            result = _compose(result, a)
        times >>= 1
        if times:
            a = _compose(a, a)
    return result


def _product(word: Word, held: list[torch.Tensor]) -> torch.Tensor:
    """``held`` composed over the positions of ``word`` (one power per run and repeat)."""
    return fold(word, lambda index, count: _power(held[index], count), lambda parts: reduce(_compose, parts), _power)


def _rows_full(a: torch.Tensor, after: torch.Tensor) -> tuple[bool, ...]:
    """For each rank o: whether what o knows reaches every rank through ``a`` then ``after``."""
    return tuple(bool(v) for v in _compose(a, after).all(dim=1))


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


class Window:
    """The table of one window in closed form (module docstring): ``word`` gives the matrix index
    at each of its positions, ``flows`` the :class:`SyncFlow` of every distinct matrix, ``syncs``
    the indices of the non-identity ones."""

    def __init__(self, word: Word, flows: list[SyncFlow], syncs: frozenset):
        self.word, self.flows, self.syncs, self.length = word, flows, syncs, word.length
        backward = reverse(word)
        #: The position of the decision sync: the window's last sync.
        self.decides = self.length - 1 - backward.next_marked(0, syncs)
        # Change points, from the end: A = I after the last position; then, going back from the
        # previous change point, the last sync q with held_q A != A (every sync after it leaves A
        # as it is), and A <- held_q A there.
        after = torch.eye(flows[0].held.shape[0], dtype=torch.bool)
        points, self._after, position = [], [after], self.length
        while True:
            changing = frozenset(i for i in syncs if not torch.equal(_compose(flows[i].held, after), after))
            found = backward.next_marked(self.length - position, changing) if changing and position else None
            if found is None:
                break
            position = self.length - 1 - found
            after = _compose(flows[word.at(position)].held, after)
            points.append(position)
            self._after.append(after)
        #: The change points, ascending: A(u) is ``_after[number of points > u]``.
        self._points = points[::-1]
        self._entries: dict[tuple[int, int], tuple[tuple[bool, ...], tuple[bool, ...]]] = {}

    def entry(self, u: int, index: int) -> tuple[tuple[bool, ...], tuple[bool, ...], bool]:
        """At the sync of position u (matrix ``index``): every rank's admissibility at the prefetch
        and at the sync, and whether it decides."""
        later = len(self._points) - bisect_right(self._points, u)
        key = (index, later)
        if key not in self._entries:
            flow, after = self.flows[index], self._after[later]
            self._entries[key] = (_rows_full(flow.held, after), _rows_full(flow.born, after))
        held, born = self._entries[key]
        return held, born, u == self.decides


class Windows:
    """The windows of a schedule on a placement (module docstring): :attr:`periods` (L of the
    last part that syncs) and, per non-identity sync, each rank's admissibility and whether the
    sync decides.

    ``stretches``: ``(origin, stop, window)``, ascending and disjoint: windows of ``window`` one
    after the other from ``origin``, up to ``stop`` (None: forever).  Iterations outside every
    stretch hold no sync."""

    def __init__(self, stretches: list[tuple[int, int | None, Window]], periods: int):
        self.periods, self._stretches = periods, stretches
        self._origins = [origin for origin, _, _ in stretches]

    def _locate(self, t: int) -> tuple[int, Window] | None:
        """(the first iteration of the window holding t, its table), or None outside every stretch."""
        k = bisect_right(self._origins, t) - 1
        if k < 0:
            return None
        origin, stop, window = self._stretches[k]
        if stop is not None and t >= stop:
            return None
        return t - (t - origin) % window.length, window

    def at(self, t: int, rank: int) -> tuple[bool, bool, bool] | None:
        """For the sync of iteration t on ``rank``: (a finding at its prefetch is admissible, a
        finding at the sync is admissible, the sync is its window's decision sync); None for an
        identity P_t."""
        located = self._locate(t)
        if located is None:
            return None
        start, window = located
        index = window.word.at(t - start)
        if index not in window.syncs:
            return None
        held, born, decides = window.entry(t - start, index)
        return held[rank], born[rank], decides

    def decision(self, t: int) -> int | None:
        """The decision sync of the window holding iteration t (None: t is in no window)."""
        located = self._locate(t)
        return None if located is None else located[0] + located[1].decides

    @classmethod
    def build(cls, schedule: Schedule, plans: list[Plan], placement: Placement, hubs,
              exact: bool = False) -> "Windows | None":
        """The windows of ``schedule`` (``plans``: its distinct matrices compiled, in order;
        ``hubs``: ``(index, block) -> hub rank | None`` for overlapped blocks, or None; ``exact``:
        the syncs are exact), or None when they do not exist (module docstring)."""
        flows = [sync_flow(plan, placement, (lambda b, i=index: hubs(i, b)) if hubs else None, schedule.workers,
                           exact) for index, plan in enumerate(plans)]
        syncs = frozenset(i for i, plan in enumerate(plans) if not plan.is_identity)
        occurring = syncs.intersection(order_of_appearance(concat(schedule.prefix, schedule.cycle)))
        if not occurring:
            return None
        origins = sorted(set().union(*(flows[i].origins for i in occurring)))
        return _Layout(schedule, flows, syncs, origins).windows()


class _Layout:
    """Lays the windows on a schedule's parts, joining the tails (module docstring)."""

    def __init__(self, schedule: Schedule, flows: list[SyncFlow], syncs: frozenset, origins: list[int]):
        self.schedule, self.flows, self.syncs, self.origins = schedule, flows, syncs, origins
        self.held = [flow.held for flow in flows]

    def span(self, start: int, stop: int) -> Word:
        """The matrix indices of iterations ``start`` .. ``stop`` - 1."""
        return segment(self.schedule.head(stop), start, stop)

    def syncs_in(self, start: int, stop: int | None) -> bool:
        """Whether some iteration of [start, stop) (stop None: every later one) has a sync (a
        non-identity P, bitwise: exactly the plans that are not the identity)."""
        found = self.schedule.next_sync(start)
        return found is not None and (stop is None or found < stop)

    def periods(self, start: int, period: int) -> int | None:
        """L of the part of ``period`` starting at ``start``: the fewest periods whose product
        carries every origin's news to every rank (at most n), or None."""
        one = _product(self.span(start, start + period), self.held)
        reach = torch.eye(one.shape[0], dtype=torch.bool)
        for periods in range(1, one.shape[0] + 1):
            reach = _compose(reach, one)
            if bool(reach[self.origins].all()):
                return periods
        return None

    def window(self, start: int, stop: int) -> Window:
        """The table of the window of iterations [start, stop)."""
        return Window(self.span(start, stop), self.flows, self.syncs)

    def windows(self) -> Windows | None:
        """Part by part: the whole windows of L periods from the part's start, a pending tail
        joined to the first of them, the part's own tail (when it holds a sync) left pending."""
        stretches, tail, last = [], None, 1
        for start, steps, period in self.schedule.periodic_parts():
            stop = None if steps is None else start + steps
            if not self.syncs_in(start, stop):
                continue
            periods = self.periods(start, period) if steps is None or steps >= period else 0
            if periods is None:
                return None
            length = periods * period
            if periods == 0 or (steps is not None and steps < length):
                tail = start if tail is None else tail           # all tail: joins a later window
                continue
            first, last = start, periods
            if tail is not None:                                 # the pending tail joins this first window
                stretches.append((tail, start + length, self.window(tail, start + length)))
                first, tail = start + length, None
            end = None if steps is None else start + steps // length * length
            if end is None or first < end:
                stretches.append((first, end, self.window(start, start + length)))
            if end is not None and self.syncs_in(end, stop):
                tail = end
        return None if tail is not None else Windows(stretches, last)
