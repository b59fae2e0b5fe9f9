"""Compiling a schedule's syncs for one rank: the one place where a sync's strategy is chosen.

:func:`compile_sync` runs once, at start-up, identically on every rank (a pure function of its
arguments: every rank makes the same choices and raises the same errors, before any collective).
For each distinct matrix P of the schedule it compiles the plan (:func:`topology.compile_plan`)
and builds this rank's program:

- identity: a program with nothing to do;
- with a slow rule (``outer``): a :class:`~launch.engine.outer_program.SlowRuleProgram` around
  the plain program of the workers' matrix;
- otherwise a :class:`~launch.engine.program.RankProgram` whose blocks are
  :class:`~launch.engine.blocks.HubBlock` (overlapped) when ``overlap`` is asked for and the block
  qualifies (:func:`launch.engine.overlap.hub_of`), else
  :class:`~launch.engine.blocks.AllReduceBlock`, and whose mixes run point to point; the state
  region is weighted apart where per-level state policies say so
  (:meth:`launch.engine.state_weights.SyncPolicy.state_weight`).

It also owns every compatibility check between these options (``overlap`` with ``outer``, the
schedules a slow rule accepts) and returns the process groups every program needs, and the hub
rank that may decide the finiteness check (:func:`launch.engine.overlap.single_hub`).
"""

from __future__ import annotations

from dataclasses import dataclass

from agents.slow_rule import SlowRule
from launch.engine.blocks import AllReduceBlock, HubBlock, LocalBlock, LocalMix, PointToPointMixes, ProgramContext
from launch.engine.kernel import Scratch, WeightedSum
from launch.engine.outer_program import SlowRuleProgram, SlowRuleSync, slow_agent, workers_matrix
from launch.engine.overlap import hub_of, single_hub
from launch.engine.placement import Placement
from launch.engine.program import RankProgram
from launch.engine.state_weights import SyncPolicy
from topology.plan import Plan, compile_plan
from topology.schedule import Schedule


@dataclass
class CompiledSync:
    """What :func:`compile_sync` returns.

    Attributes:
        programs: this rank's program per distinct matrix (``schedule.matrix_index(t)``).
        groups: every process group (sorted rank tuples) any program of any rank needs, to be
            created by every rank in this order.
        hub: the rank that decides the finiteness check of overlapped syncs, or None.
        slow_sync: the replicated slow agent of a slow rule, or None.
    """

    programs: list
    groups: list[tuple[int, ...]]
    hub: int | None
    slow_sync: SlowRuleSync | None


def rank_program(plan: Plan, placement: Placement, rank: int, *, state: tuple[int, dict] | None = None,
                 hub_of_block=None, reset: bool = False) -> RankProgram:
    """``plan`` compiled for ``rank``.

    Args:
        state: ``(numel, weight)``: the buffer's state region starts at ``numel`` and agent i's
            state is weighted by ``weight[i]`` (else the whole buffer takes the plan's weights).
        hub_of_block: ``block -> hub rank | None``: which blocks run overlapped (default none).
        reset: the program's ``reset`` (the state policy's, for this matrix).
    """
    local = set(placement.agents_on(rank))
    split, state_weight = state if state is not None else (None, None)

    def terms(agents, weights, keep=lambda i, w: True):
        """(agent, region weights) for the pairs ``keep`` accepts, in the plan's (agent) order."""
        return tuple((i, (w,) if split is None else (w, state_weight[i]))
                     for i, w in zip(agents, weights) if keep(i, w))

    scratch = Scratch()
    ctx = ProgramContext(frozenset(i for i in plan.snapshot if i in local), scratch, WeightedSum(split, scratch))
    blocks = []
    for position, block in enumerate(plan.blocks):
        if not local.intersection(block.members):
            continue
        view = LocalBlock(terms(block.members, block.weights, lambda i, w: i in local and w != 0.0),
                          tuple(r for r in block.receivers if r in local), placement.ranks_of(block.members))
        hub = hub_of_block(block) if hub_of_block is not None else None
        blocks.append(AllReduceBlock(view, ctx) if hub is None else HubBlock(view, ctx, hub, rank, f"hub{position}"))

    sends, recvs, mixes = set(), set(), []
    for mix in plan.mixes:
        dst = placement.rank_of(mix.receiver)
        for source in mix.sources:
            src = placement.rank_of(source)
            if src == rank and dst != rank:
                sends.add((source, dst))
            if dst == rank and src != rank:
                recvs.add((source, src))
        if dst == rank:
            mixes.append(LocalMix(mix.receiver, terms(mix.sources, mix.weights)))
    p2p = PointToPointMixes(sorted(sends), sorted(recvs), tuple(mixes), ctx) if (sends or recvs or mixes) else None
    return RankProgram(plan, rank, local, blocks, p2p, ctx, reset)


def compile_sync(schedule: Schedule, placement: Placement, rank: int, *, numel: int, state_numel: int,
                 policy: SyncPolicy, outer: SlowRule | None = None, overlap: bool = False,
                 check_rule=None) -> CompiledSync:
    """Every distinct matrix of ``schedule`` compiled for ``rank`` (see the module docstring).

    Args:
        numel: parameters per agent; ``state_numel``: the mixable inner state after them
            (``pullback``), or 0.
        policy: the resolved state policy (resets and state weights per matrix).
        outer: a slow rule, or None for plain mixing.
        overlap: run the blocks that qualify overlapped around their hub rank.
        check_rule: ``rule -> None``, called on ``outer`` once it is known to be a slow rule
            (``rule.check(model, optimizer)``: the rule's own checks).
    """
    if overlap and outer is not None:
        raise ValueError("overlap=True applies to plain mixing syncs; it cannot be combined with outer=...")
    plans = [compile_plan(p) for p in schedule.distinct_matrices]
    if outer is not None:
        return _compile_slow_rule(schedule, plans, placement, rank, numel, state_numel, policy, outer, check_rule)
    workers = set(schedule.workers)
    programs = []
    for index, plan in enumerate(plans):
        weight = policy.state_weight(index)
        qualify = (lambda block, plan=plan: hub_of(block, plan, placement, workers, schedule.push_sum)) if overlap else None
        programs.append(rank_program(plan, placement, rank, state=None if weight is None else (numel, weight),
                                     hub_of_block=qualify, reset=policy.resets[index]))
    groups = {placement.ranks_of(b.members) for plan in plans for b in plan.blocks}
    hub = single_hub(plans, schedule, placement) if any(p.hub_blocks for p in programs) else None
    return CompiledSync(programs, sorted(g for g in groups if len(g) > 1), hub, None)


def _compile_slow_rule(schedule: Schedule, plans: list[Plan], placement: Placement, rank: int, numel: int,
                       state_numel: int, policy: SyncPolicy, rule: SlowRule, check_rule) -> CompiledSync:
    """The programs of a slow rule: the workers' average of every non-identity matrix."""
    what = type(rule).__name__
    if not isinstance(rule, SlowRule):
        raise ValueError(f"outer must be an agents.slow_rule.SlowRule (agents.outer.OuterOptimizer, "
                         f"agents.adaptive.AdaptiveAlpha); got {what}")
    if check_rule is not None:
        check_rule(rule)
    slow = slow_agent(schedule, what)
    if rule.extra and len(schedule.workers) != 1:
        raise ValueError(f"{what} needs exactly one worker; the schedule has {len(schedule.workers)}")
    sync = SlowRuleSync(rule, numel, state_numel)
    local = placement.agents_on(rank)
    programs, groups = [], set()
    for index, (matrix, plan) in enumerate(zip(schedule.distinct_matrices, plans)):
        if plan.is_identity:
            programs.append(rank_program(plan, placement, rank))
            continue
        alpha, workers = workers_matrix(matrix, slow, index, what)
        program = rank_program(compile_plan(workers), placement, rank)
        groups |= {placement.ranks_of(b.members) for b in program.plan.blocks}
        programs.append(SlowRuleProgram(sync, program, alpha, local, placement.world_size, policy.resets[index]))
    return CompiledSync(programs, sorted(g for g in groups if len(g) > 1), None, sync)
