"""Per-level state policies in the simulator: which weights mix the state at each sync.

A multilayer schedule's distinct matrices are its level matrices (index L = level of the sync,
0 = identity).  Under per-level policies (:mod:`agents.level_policy`) a level-L sync mixes the
parameters with the level's weights ``a = (a_0, ..., a_L)`` and the state slots with
``b = state_weights(policies, alphas, L)``.  Both regions are in one flat buffer, so the sync stays
*one* all-reduce: every member scales its parameter region by ``a_i`` and its state region by
``b_i`` before the sum (two regions of the kernel, :mod:`launch.engine.sync.kernel`); with ``b == a``
(every level up to L pulls back) the buffer is scaled whole.  ``b = 0`` is a reset: the state slots mix
to zero and :meth:`agents.agent.Agent.after_sync` zeroes the rest of the state (``step``).

b is non-zero only where a is (``b_j`` is ``a_j`` or 0 for j >= 1, and ``a_0 > 0``), so the
members a block sums over (those with ``a_i != 0``) are the right ones for both regions.
"""

from __future__ import annotations

from agents.level_policy import any_pullback, resolve_policy, state_weights
from topology.schedule import MultilayerSchedule, Schedule


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

    def state_weight(self, index: int) -> dict[int, float] | None:
        """The state slots' weight per agent at a sync with distinct matrix ``index``, when it
        differs from the parameters' weight (per-level policies that do not all pull back);
        None when the whole buffer is mixed with the plan's weights."""
        if self.uniform or self.agent_policy != "pullback" or index == 0:
            return None
        b = self.weights[index]
        if all(x == y for x, y in zip(self.schedule.level_weights(index).tolist(), b)):
            return None
        return {j: b[j] for j in range(len(b))}
