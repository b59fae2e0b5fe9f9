"""Per-level state policies in the simulator: which weights mix the state at each sync.

A multilayer schedule's distinct matrices are its level matrices (index L = level of the sync,
0 = identity).  Under per-level policies (:mod:`agents.level_policy`) a level-L sync mixes the
parameters with the level's weights ``a = (a_0, ..., a_L)`` and the state slots with
``b = state_weights(policies, alphas, L)``.  Both regions are in one flat buffer, so the sync stays
*one* all-reduce: every member scales its parameter region by ``a_i`` and its state region by
``b_i`` before the sum (:class:`RegionProgram`); with ``b == a`` (every level up to L pulls back)
the ordinary :class:`~launch.sync.RankProgram` runs.  ``b = 0`` is a reset: the state slots mix
to zero and :meth:`agents.agent.Agent.after_sync` zeroes the rest of the state (``step``).

b is non-zero only where a is (``b_j`` is ``a_j`` or 0 for j >= 1, and ``a_0 > 0``), so the
members a block sums over (those with ``a_i != 0``) are the right ones for both regions.
"""

from __future__ import annotations

import torch

from agents.level_policy import any_pullback, resolve_policy, state_weights
from launch.placement import Placement
from launch.sync import RankProgram
from topology.plan import Plan
from topology.schedule import MultilayerSchedule, Schedule


class RegionProgram(RankProgram):
    """A :class:`RankProgram` whose blocks scale ``buffer[:numel]`` (parameters) by the plan's
    weights and ``buffer[numel:]`` (state slots) by ``state_weight[agent]``.  Same collectives."""

    def __init__(self, plan: Plan, placement: Placement, rank: int, numel: int, state_weight: dict[int, float],
                 hub_of=None):
        super().__init__(plan, placement, rank, hub_of)
        self.numel = numel
        self.state_weight = state_weight

    def _weighted_sum(self, acc: torch.Tensor, terms, old, *, in_place: bool,
                      spare: frozenset = frozenset()) -> None:
        if not terms:
            acc.zero_()
            return
        n, b = self.numel, self.state_weight
        (i0, w0), rest = terms[0], terms[1:]
        if in_place:
            acc[:n].mul_(w0)
            acc[n:].mul_(b[i0])
        else:
            torch.mul(old[i0][:n], w0, out=acc[:n])
            torch.mul(old[i0][n:], b[i0], out=acc[n:])
        for i, w in rest:
            # As RankProgram: in place in a spare receiver's buffer (same ops, same bits), else tmp.
            product = old[i] if i in spare else self._buffer("tmp", acc)
            torch.mul(old[i][:n], w, out=product[:n])
            torch.mul(old[i][n:], b[i], out=product[n:])
            acc.add_(product)


class SyncPolicy:
    """The state policy of a simulation, resolved per distinct matrix of its schedule.

    Args:
        policy: a single policy, or per-level policies for a :class:`MultilayerSchedule` (see
            :func:`agents.level_policy.resolve_policy`); ``ValueError`` otherwise.
        schedule: the simulation's schedule.

    Attributes:
        levels: the per-level policies (a 1-tuple for schedules without levels).
        agent_policy: the single policy that :class:`agents.agent.Agent` is built with:
            ``pullback`` when any level pulls back (the agents then carry state slots), else
            the policy itself when uniform, else ``maintain`` (resets are passed per sync).
        resets: ``resets[index]`` is True when a sync with matrix ``index`` resets the state.
    """

    def __init__(self, policy, schedule: Schedule):
        multilayer = isinstance(schedule, MultilayerSchedule)
        self.schedule = schedule
        self.levels = resolve_policy(policy, schedule.depth if multilayer else None)
        self.uniform = len(set(self.levels)) == 1
        if any_pullback(self.levels):
            self.agent_policy = "pullback"
        else:
            self.agent_policy = self.levels[0] if self.uniform else "maintain"
        count = len(schedule.distinct_matrices)
        if multilayer:
            # Distinct matrix L is the level-L matrix (MultilayerSchedule builds them in order).
            self.weights = [state_weights(self.levels, schedule.alphas, L) for L in range(count)]
            self.resets = [L > 0 and not any(w) for L, w in enumerate(self.weights)]
        else:
            self.weights = [None] * count
            self.resets = [self.levels[0] == "reset"] * count

    def program(self, index: int, plan: Plan, placement: Placement, rank: int, numel: int,
                hub_of=None) -> RankProgram:
        """The program of distinct matrix ``index`` on ``rank`` (parameters: ``numel`` entries;
        ``hub_of``: see :class:`RankProgram`)."""
        if self.uniform or self.agent_policy != "pullback" or index == 0:
            return RankProgram(plan, placement, rank, hub_of)
        level_weights = self.schedule.level_weights(index).tolist()
        b = self.weights[index]
        if all(x == y for x, y in zip(level_weights, b)):
            return RankProgram(plan, placement, rank, hub_of)
        weight = {j: b[j] for j in range(len(b))}
        return RegionProgram(plan, placement, rank, numel, weight, hub_of)
