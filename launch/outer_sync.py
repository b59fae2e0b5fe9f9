"""The sync of a slow agent whose update is state-dependent: outer optimizers and adaptive alpha.

Plain Lookahead mixes linearly, ``s' = sum_i a_i x_i``, so P_t alone says what happens.  An outer
optimizer (:class:`agents.outer.OuterOptimizer`) or the adaptive alpha*
(:class:`agents.adaptive.AdaptiveAlpha`) makes the slow agent's new value a non-linear function
of X.  How it fits the plan model, with the same number of collectives as plain Lookahead:

1. The workers' weights: P_t's column is ``a`` on the block (every agent, one of them the slow
   agent j).  ``mixed = sum_{i != j} w_i x_i`` with ``w_i = a_i / (1 - a_j)`` is compiled, like
   any matrix, into a plan: with several workers one weighted all-reduce on the block's group, in
   which the slow agent contributes nothing and every member receives ``mixed`` (and the workers'
   mixed inner state under ``pullback``); with one worker (Lookahead) the worker's own column is
   the identity, so the plan is a single message worker -> slow agent (the worker already holds
   everything it needs).  The rule's extra scalars (alpha* for the adaptive rule, computed by the
   worker) ride in the same collective, appended to the buffer: still one collective per sync.
2. Every rank keeps a replica of the slow agent's buffer (its parameters and, under ``pullback``,
   its cached state), the *anchor*.  Why every rank knows it without communication: at the start
   it is theta_0 (broadcast at start-up), and after each sync every member of the block sets its
   value to the new slow value, which every rank computes itself from bitwise-equal inputs (the
   all-reduce's result and its own anchor) with the same ops; so the anchor stays bitwise equal
   on every rank, and equal to the slow agent's value.  (For Lookahead it is theta_{t,0}, the fast
   weights right after the previous sync.)  The outer optimizer's state is replicated the same way,
   as DiLoCo's implementations do.
3. Every rank runs the rule on its anchor: ``s <- rule(s, mixed, extras)``; the state, under
   ``pullback``, ``cache <- cache + alpha (mixed_state - cache)`` with alpha the schedule's
   ``1 - a_j`` (outer optimizers) or alpha* (adaptive).  Then every local member of the block takes a
   copy of the anchor (parameters and state), and the state policy's reset runs as usual.

Supported schedules: exactly one passive agent (the slow agent), every non-identity P_t one
block ``a 1^T`` over all agents with ``a_j < 1`` -- Lookahead (``topology.lookahead``) and
workers around a slow agent (``topology.with_slow_agent``); anything else is a ``ValueError``.
"""

from __future__ import annotations

import torch

from launch.communicator import Communicator
from launch.placement import Placement
from launch.sync import RankProgram
from topology.plan import compile_plan
from topology.schedule import Schedule
from topology.validation import check_mixing_matrix


def _slow_agent(schedule: Schedule, what: str) -> int:
    passive = schedule.passive
    if len(passive) != 1:
        raise ValueError(
            f"{what} needs a schedule with exactly one passive (slow) agent; this one has "
            f"{len(passive)}: {passive} (use topology.lookahead or topology.with_slow_agent)"
        )
    return passive[0]


class OuterSync:
    """The sync of ``rule`` (an :class:`~agents.outer.OuterOptimizer` or
    :class:`~agents.adaptive.AdaptiveAlpha`) on this rank, for every distinct P_t of ``schedule``.

    Args:
        rule: the slow update.
        schedule, placement, rank: as in :class:`launch.simulation.Simulation`.
        numel: parameters per agent; ``state_numel``: their mixable state (``pullback``) or 0.
        model, optimizer: the user's module and inner-optimizer factory, for the rule's checks.
    """

    def __init__(self, rule, schedule: Schedule, placement: Placement, rank: int, numel: int, state_numel: int,
                 *, model=None, optimizer=None):
        what = type(rule).__name__
        if not (hasattr(rule, "step_") and hasattr(rule, "worker_extras")):
            raise ValueError(
                f"outer must be an agents.outer.OuterOptimizer or agents.adaptive.AdaptiveAlpha; got {what}"
            )
        self.rule = rule
        if hasattr(rule, "check") and model is not None:
            rule.check(model, optimizer)  # local and deterministic: the same error on every rank
        self.slow = _slow_agent(schedule, what)
        if getattr(rule, "extra", 0) and len(schedule.workers) != 1:
            raise ValueError(f"{what} needs exactly one worker; the schedule has {len(schedule.workers)}")
        self.numel, self.state_numel = numel, state_numel
        self.width = numel + state_numel
        m = schedule.num_agents
        self.programs: list[RankProgram | None] = []
        self.alphas: list[float] = []
        for index, matrix in enumerate(schedule.distinct_matrices):
            plan = compile_plan(matrix)
            if plan.is_identity:
                self.programs.append(None)
                self.alphas.append(0.0)
                continue
            if plan.mixes or len(plan.blocks) != 1 or plan.blocks[0].receivers != tuple(range(m)):
                raise ValueError(
                    f"{what} needs every sync to mix all agents with one column a (a 1^T); "
                    f"distinct matrix {index} of the schedule does not"
                )
            a = matrix[:, 0]
            alpha = 1.0 - float(a[self.slow])
            if alpha <= 0.0:
                raise ValueError(f"{what} needs the slow agent's own weight below 1; matrix {index} has {float(a[self.slow])}")
            w = a / alpha
            w[self.slow] = 0.0
            w = w / w.sum()  # exact 1.0 for a single worker; renormalizes rounding otherwise
            workers = check_mixing_matrix(w.unsqueeze(1).repeat(1, m), m, name=f"workers' matrix {index}")
            self.programs.append(RankProgram(compile_plan(workers), placement, rank))
            self.alphas.append(alpha)
        self.anchor: torch.Tensor | None = None
        self._scratch: dict[int, torch.Tensor] = {}

    def groups(self) -> set[tuple[int, ...]]:
        return {p.blocks[0].ranks for p in self.programs if p is not None and p.blocks}

    def start(self, agents: dict) -> None:
        """Take the anchor (theta_0, zero state) from a local agent, after the initial broadcast."""
        first = agents[min(agents)]
        buffer = first.flat.buffer
        self.anchor = buffer[: self.width].detach().clone()
        self.anchor[self.numel :].zero_()
        # One view object for the slow weights: the outer optimizer holds it (and its .grad).
        self.slow_view = self.anchor[: self.numel]
        self.rule.start(self.slow_view)
        extra = getattr(self.rule, "extra", 0)
        self._scratch = {
            i: torch.zeros(self.width + extra, dtype=buffer.dtype, device=buffer.device) for i in agents
        }

    @torch.no_grad()
    def sync(self, index: int, agents: dict, comm: Communicator, reset: bool) -> None:
        program = self.programs[index]
        n, width = self.numel, self.width
        slow = self.slow_view
        for i, agent in agents.items():
            scratch = self._scratch[i]
            scratch[:width].copy_(agent.sync_tensor())
            if agent.is_worker and width < scratch.numel():
                scratch[width:].copy_(self.rule.worker_extras(agent, slow))
        program.run(self._scratch, comm)
        # Every local receiver holds the same all-reduced [mixed | mixed state | extras].
        result = self._scratch[min(agents)]
        alpha = self.rule.step_(slow, result[:n], result[width:], self.alphas[index])
        if self.state_numel:
            # cache <- cache + alpha (mixed_state - cache), as the reference's chain.
            cache = self.anchor[n:]
            delta = result[n:width] - cache
            delta.mul_(alpha)
            cache.add_(delta)
        for agent in agents.values():
            agent.flat.buffer[:width].copy_(self.anchor)
            agent.after_sync(reset=reset)
