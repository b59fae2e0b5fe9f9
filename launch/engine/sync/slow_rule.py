"""The sync of a slow agent whose update is state-dependent: any :class:`agents.slow_rule.SlowRule`.

Plain Lookahead mixes linearly, ``s' = sum_i a_i x_i``, so P_t alone says what happens.  An outer
optimizer (:class:`agents.outer.OuterOptimizer`) or the adaptive alpha*
(:class:`agents.adaptive.AdaptiveAlpha`) makes the slow agent's new value a non-linear function
of X.  How it fits the plan model, with the same number of collectives as plain Lookahead:

1. The workers' weights (:func:`workers_matrix`): P_t's column is ``a`` on the block (every agent,
   one of them the slow agent j).  ``mixed = sum_{i != j} w_i x_i`` with ``w_i = a_i / (1 - a_j)``
   is compiled, like any matrix, into a plan: with several workers one weighted all-reduce on the
   block's group, in which the slow agent contributes nothing and every member receives ``mixed``
   (and the workers' mixed inner state under ``pullback``); with one worker (Lookahead) the
   worker's own column is the identity, so the plan is a single message worker -> slow agent (the
   worker already holds everything it needs).  The rule's extra scalars (alpha* for the adaptive
   rule, computed by the worker) ride in the same collective, appended to the buffer: still one
   collective per sync.
2. Every rank keeps a replica of the slow agent's buffer (its parameters and, under ``pullback``,
   its cached state), the *anchor*.  Why every rank knows it without communication: at the start
   it is theta_0 (broadcast at start-up), and after each sync every member of the block sets its
   value to the new slow value, which every rank computes itself from bitwise-equal inputs (the
   all-reduce's result and its own anchor) with the same ops; so the anchor stays bitwise equal
   on every rank, and equal to the slow agent's value.  (For Lookahead it is theta_{t,0}, the fast
   weights right after the previous sync.)  The rule's state is replicated the same way, as
   DiLoCo's implementations do.
3. Every rank runs the rule on its anchor: ``s <- rule(s, mixed, extras)``; the state, under
   ``pullback``, ``cache <- cache + alpha (mixed_state - cache)`` with alpha the schedule's
   ``1 - a_j`` (outer optimizers) or alpha* (adaptive).  Then every local agent takes a copy of the
   anchor (parameters and state), and the state policy's reset runs as usual.

Supported schedules (checked by :func:`workers_matrix` and :func:`slow_agent`): exactly one
passive agent (the slow agent), every non-identity P_t one block ``a 1^T`` over all agents with
``a_j < 1`` -- Lookahead (``topology.lookahead``) and workers around a slow agent
(``topology.with_slow_agent``); anything else is a ``ValueError``.
"""

from __future__ import annotations

import torch

from agents.slow_rule import SlowRule
from launch.comm.base import Communicator
from launch.engine.guard.finiteness import NO_CHECK, SyncHooks
from launch.engine.sync.program import RankProgram
from topology.plan import compile_plan
from topology.schedule import Schedule
from topology.validation import check_mixing_matrix


def slow_agent(schedule: Schedule, what: str) -> int:
    """The schedule's one passive agent; ``ValueError`` (naming the rule ``what``) otherwise."""
    passive = schedule.passive
    if len(passive) != 1:
        raise ValueError(
            f"{what} needs a schedule with exactly one passive (slow) agent; this one has "
            f"{len(passive)}: {passive} (use topology.lookahead or topology.with_slow_agent)"
        )
    return passive[0]


def workers_matrix(matrix: torch.Tensor, slow: int, index: int, what: str) -> tuple[float, torch.Tensor]:
    """For a non-identity P = a 1^T: the rule's step size ``alpha = 1 - a_slow`` and the matrix
    ``w 1^T`` with ``w_i = a_i / alpha`` on the workers and 0 on the slow agent (see the module
    docstring).  ``ValueError`` when P is not one block over all agents, or ``a_slow`` is 1."""
    m = matrix.shape[0]
    plan = compile_plan(matrix)
    if plan.mixes or len(plan.blocks) != 1 or plan.blocks[0].receivers != tuple(range(m)):
        raise ValueError(
            f"{what} needs every sync to mix all agents with one column a (a 1^T); "
            f"distinct matrix {index} of the schedule does not"
        )
    a = matrix[:, 0]
    alpha = 1.0 - float(a[slow])
    if alpha <= 0.0:
        raise ValueError(f"{what} needs the slow agent's own weight below 1; matrix {index} has {float(a[slow])}")
    w = a / alpha
    w[slow] = 0.0
    w = w / w.sum()  # exact 1.0 for a single worker; renormalizes rounding otherwise
    return alpha, check_mixing_matrix(w.unsqueeze(1).repeat(1, m), m, name=f"workers' matrix {index}")


class SlowRuleSync:
    """The rank's replica of the slow agent (the anchor) and the rule that updates it.

    Args:
        rule: the slow rule.
        numel: parameters per agent; ``state_numel``: their mixable state (``pullback``) or 0.
    """

    def __init__(self, rule: SlowRule, numel: int, state_numel: int):
        self.rule = rule
        self.numel, self.state_numel = numel, state_numel
        self.width = numel + state_numel
        self.anchor: torch.Tensor | None = None
        self._scratch: dict[int, torch.Tensor] = {}

    def start(self, agents: dict) -> None:
        """Take the anchor (theta_0, zero state) from a local agent, after the initial broadcast."""
        buffer = agents[min(agents)].flat.buffer
        self.anchor = buffer[: self.width].detach().clone()
        self.anchor[self.numel :].zero_()
        # One view object for the slow weights: the outer optimizer holds it (and its .grad).
        self.slow_view = self.anchor[: self.numel]
        self.rule.start(self.slow_view)
        self._scratch = {
            i: torch.zeros(self.width + self.rule.extra, dtype=buffer.dtype, device=buffer.device) for i in agents
        }

    @torch.no_grad()
    def sync(self, workers: RankProgram, alpha: float, agents: dict, comm: Communicator,
             check: SyncHooks = NO_CHECK) -> None:
        """One sync: the workers' average through ``workers`` (with the rule's extras; ``check``:
        the finiteness check's hooks), the rule on the anchor, the state caches, and every local
        agent set to the anchor."""
        n, width = self.numel, self.width
        for i, agent in agents.items():
            scratch = self._scratch[i]
            scratch[:width].copy_(agent.sync_tensor())
            if agent.is_worker and self.rule.extra:
                scratch[width:].copy_(self.rule.worker_extras(agent, self.slow_view))
        workers.run_tensors(self._scratch, comm, check)
        # Every local receiver holds the same all-reduced [mixed | mixed state | extras].
        result = self._scratch[min(agents)]
        alpha = self.rule.step_(self.slow_view, result[:n], result[width:], alpha)
        if self.state_numel:
            # cache <- cache + alpha (mixed_state - cache), as the reference's chain.
            cache = self.anchor[n:]
            delta = result[n:width] - cache
            delta.mul_(alpha)
            cache.add_(delta)
        for agent in agents.values():
            agent.flat.buffer[:width].copy_(self.anchor)

    def state_dict(self) -> dict:
        """The anchor (slow weights and cached state, the same bits on every rank) and the
        rule's own state, as CPU copies."""
        return {"anchor": self.anchor.detach().to("cpu", copy=True), "rule": self.rule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.anchor.copy_(state["anchor"])   # slow_view is a view of it: the optimizer sees it
        self.rule.load_state_dict(state["rule"])


class SlowRuleProgram:
    """The program of one non-identity P_t under a slow rule: the same interface as
    :class:`~launch.engine.sync.program.RankProgram` (``run``, ``touched``, ``reset``, ``peers``),
    every local agent touched."""

    def __init__(self, sync: SlowRuleSync, workers: RankProgram, alpha: float, local, world_size: int,
                 reset: bool):
        self.slow_sync, self.workers, self.alpha, self.reset = sync, workers, alpha, reset
        self.plan = workers.plan
        self.touched = tuple(sorted(local))
        self.peers = tuple(range(world_size))
        self.hub_blocks = ()

    is_identity = False

    @property
    def groups(self) -> set[tuple[int, ...]]:
        return self.workers.groups

    @property
    def num_collectives(self) -> int:
        return self.workers.num_collectives

    def prefetch(self, tensors, comm: Communicator, check: SyncHooks = NO_CHECK) -> None:
        """Nothing travels ahead of a slow rule's sync."""

    def run(self, agents: dict, comm: Communicator, check: SyncHooks = NO_CHECK) -> None:
        self.slow_sync.sync(self.workers, self.alpha, agents, comm, check)
