"""Compiling a schedule's syncs for one rank: the one place where a sync's strategy is chosen.

:func:`compile_sync` runs once, at start-up, identically on every rank (a pure function of its
arguments: every rank makes the same choices and raises the same errors, before any collective).
For each distinct matrix P of the schedule it compiles the plan (:func:`topology.compile_plan`)
and builds this rank's program:

- identity: a program with nothing to do;
- with a slow rule (``outer``): a :class:`~launch.engine.sync.slow_rule.SlowRuleProgram` around
  the plain program of the workers' matrix;
- otherwise a :class:`~launch.engine.sync.program.RankProgram` whose blocks are
  :class:`~launch.engine.sync.blocks.HubBlock` (overlapped) when ``overlap`` is on and the block
  qualifies (:func:`launch.engine.sync.overlap.hub_of`), else
  :class:`~launch.engine.sync.blocks.AllReduceBlock`, and whose mixes run point to point; the state
  region is weighted apart where per-level state policies say so
  (:meth:`launch.engine.sync.state_weights.SyncPolicy.state_weight`).

``overlap`` is True, False or ``"auto"`` (the default, :class:`launch.engine.core.EngineOptions`): on where it
applies, that is when some block qualifies, there is no slow rule, and the scratch it costs (one
flat copy, numel x itemsize bytes, on every rank of a hub block) is at most
:data:`launch.engine.sync.overlap.AUTO_MAX_BYTES`; a rule of the model's size alone, so every rank
decides the same.

``exact=True`` (default False): every sum a sync forms is added in one order fixed by the agents'
indices, the same co-located and on any layout of ranks (:mod:`launch.engine.sync.ordered`); each
block spanning ranks then takes the strategy :func:`launch.engine.sync.ordered.exact_strategy`
names (a chain in rank order, a gather for small blocks, shards for large ones whose ranks hold
one term each, the plain all-reduce for a sum of two terms on two ranks, an ordered hub when
overlapped).  Point-to-point mixes (gossip, push-sum) are
exact in both modes: each receiver sums its sources in agent order.

On NCCL (``backend="nccl"`` and the buffers' ``dtype`` given), a plain block whose one local term
is its first receiver's own buffer runs as :class:`~launch.engine.sync.blocks.PremulBlock`
(``ReduceOp.PREMUL_SUM``: the weighting folded into the all-reduce) where
:func:`premul_applies` says it gives the same bits as the two passes; never under ``exact``.

It also owns every compatibility check between these options (``overlap`` with ``outer``, the
schedules a slow rule accepts) and returns the process groups every program needs, and the
windows of the finiteness check (:class:`launch.engine.guard.windows.Windows`: how far the markers
the sync's collectives carry travel; an exact block carries them as far as an all-reduce does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from agents.slow_rule import SlowRule
from launch.engine.sync.blocks import (AllReduceBlock, HubBlock, LocalBlock, LocalMix, PointToPointMixes, PremulBlock,
                                       ProgramContext)
from launch.engine.sync.ordered import (ChainBlock, GatherBlock, OrderedHubBlock, ShardedBlock, exact_strategy,
                                        gather_max_bytes, shard_min_bytes)
from launch.engine.guard.windows import Windows
from launch.engine.sync.kernel import Scratch, WeightedSum
from launch.engine.sync.slow_rule import SlowRuleProgram, SlowRuleSync, slow_agent, workers_matrix
from launch.engine.sync.overlap import AUTO_MAX_BYTES, hub_of
from launch.engine.placement import Placement
from launch.engine.sync.program import RankProgram
from launch.engine.sync.state_weights import SyncPolicy
from topology.checks import check_bool
from topology.plan import Block, Plan, compile_plan
from topology.schedule import Schedule

#: Dtypes whose ``torch.mul(x, w)`` and NCCL's PREMUL_SUM form the same product for any weight: both
#: round w to the dtype (its compute type), then multiply once.  In float16 and bfloat16, torch
#: multiplies in float32 by w as a float32 and rounds once, NCCL by w rounded to the dtype: the same
#: bits only where w is exact in the dtype.
PREMUL_ANY_WEIGHT = (torch.float32, torch.float64)


#: The hub rank of every block that runs overlapped, keyed by (plan, block): the plans are the
#: schedule's distinct matrices compiled (:func:`topology.plan.compile_plan`), value objects.
Hubs = dict[tuple[Plan, Block], int]


@dataclass
class CompiledSync:
    """What :func:`compile_sync` returns.

    Attributes:
        programs: this rank's program per distinct matrix (``schedule.matrix_index(t)``).
        groups: every process group (sorted rank tuples) any program of any rank needs, to be
            created by every rank in this order.
        windows: the windows of the finiteness check on this placement, or None when the
            schedule's collectives cannot carry its markers to every rank.
        slow_sync: the replicated slow agent of a slow rule, or None.
        hubs: the blocks that run overlapped and their hub ranks (:func:`overlap_hubs`).
    """

    programs: list
    groups: list[tuple[int, ...]]
    windows: Windows | None
    slow_sync: SlowRuleSync | None
    hubs: Hubs = field(default_factory=dict)

    def hub_of(self, block: Block, plan: Plan) -> int | None:
        """The hub rank chosen for ``block`` of ``plan`` (overlapped), or None (a plain
        collective): what the simulated clock costs (:class:`topology.network.SimClock`)."""
        return self.hubs.get((plan, block))


@dataclass(frozen=True)
class BlockRules:
    """What decides a block's strategy besides the plan and the placement.

    Attributes:
        exact: the canonical order (:mod:`launch.engine.sync.ordered`).
        nbytes: bytes of one agent's synchronized buffer (the gather-or-chain rule).
        premul_dtype: the buffers' dtype where ``ReduceOp.PREMUL_SUM`` is available (NCCL), else
            None.
        gather_max: an exact block is gathered up to this many bytes received per rank
            (:func:`launch.engine.sync.ordered.gather_max_bytes` of the backend), else sharded
            or chained.
        shard_min: an exact block whose ranks hold one term each is sharded from this many bytes
            per buffer (:func:`launch.engine.sync.ordered.shard_min_bytes` of the backend; None:
            never), else chained.
    """

    exact: bool = False
    nbytes: int = 0
    premul_dtype: torch.dtype | None = None
    gather_max: int = 0
    shard_min: int | None = None


def premul_applies(view: LocalBlock, snapshot, dtype: torch.dtype | None) -> bool:
    """Whether a plain block runs as :class:`~launch.engine.sync.blocks.PremulBlock`: PREMUL_SUM is
    available (``dtype`` not None), the block spans ranks, this rank's one term is its first
    receiver's own buffer, not in the ``snapshot``, with one weight for the whole buffer, and the
    product is the same bits as ``torch.mul``'s (:data:`PREMUL_ANY_WEIGHT`, or the weight exact in
    ``dtype``).

    Example:
        >>> view = LocalBlock(((0, (1 / 3,)),), (0,), (0, 1, 2))
        >>> premul_applies(view, (), torch.float32), premul_applies(view, (), torch.bfloat16)
        (True, False)
    """
    if dtype is None or len(view.ranks) < 2 or len(view.terms) != 1:
        return False
    (agent, weights), = view.terms
    if len(weights) != 1 or view.receivers[:1] != (agent,) or agent in snapshot:
        return False
    return dtype in PREMUL_ANY_WEIGHT or float(torch.tensor(weights[0], dtype=dtype)) == weights[0]


def block_step(block: Block, view: LocalBlock, ctx: ProgramContext, placement: Placement, rank: int,
               hub: int | None, name: str, hub_scratch: Scratch | None, rules: BlockRules):
    """The step that runs ``block`` (``view``: as ``rank`` sees it) on ``rank``, by ``rules``
    (module docstring); ``hub``: its hub rank when overlapped; ``name`` keys a hub block's
    scratch."""
    if not rules.exact:
        if hub is not None:
            return HubBlock(view, ctx, hub, rank, name, hub_scratch)
        if premul_applies(view, ctx.snapshot, rules.premul_dtype):
            return PremulBlock(view, ctx)
        return AllReduceBlock(view, ctx)
    # Per rank of the group, in rank order, its terms' agents (a contiguous run of the order).
    holders = tuple(tuple(i for i, w in zip(block.members, block.weights) if w != 0.0 and placement.rank_of(i) == r)
                    for r in view.ranks)
    strategy = exact_strategy(tuple(len(agents) for agents in holders), rules.nbytes, hub, rules.gather_max,
                              rules.shard_min)
    if strategy == "hub":
        remote = tuple((i, r) for r, agents in zip(view.ranks, holders) if r != hub for i in agents)
        return OrderedHubBlock(view, ctx, hub, rank, name, remote, hub_scratch)
    if strategy == "gather":
        return GatherBlock(view, ctx, holders, rank)
    if strategy == "shard":
        return ShardedBlock(view, ctx, tuple(agents[0] for agents in holders), rank)
    if strategy == "chain":
        return ChainBlock(view, ctx, tuple(r for r, agents in zip(view.ranks, holders) if agents), rank)
    return AllReduceBlock(view, ctx, ordered=True)      # local, or a pair: exact as it is


def rank_program(plan: Plan, placement: Placement, rank: int, *, state: tuple[int, dict] | None = None,
                 hub_of_block=None, reset: bool = False, hub_scratch: Scratch | None = None,
                 rules: BlockRules = BlockRules(), scratch: Scratch | None = None) -> RankProgram:
    """``plan`` compiled for ``rank``.

    Args:
        state: ``(numel, weight)``: the buffer's state region starts at ``numel`` and agent i's
            state is weighted by ``weight[i]`` (else the whole buffer takes the plan's weights).
        hub_of_block: ``block -> hub rank | None``: which blocks run overlapped (default none).
        reset: the program's ``reset`` (the state policy's, for this matrix).
        hub_scratch: where the hub blocks keep their parts (shared between programs), or the
            program's own scratch.
        rules: what chooses each block's step (:func:`block_step`).
        scratch: the program's scratch buffers (:class:`~launch.engine.sync.kernel.Scratch`),
            shared by every program of a rank -- programs run one at a time, and nothing in this
            scratch outlives a sync (the hub blocks' parts, which do, are in ``hub_scratch``) --
            so a schedule of many distinct matrices keeps one set, not one per matrix; default a
            fresh one.
    """
    local = set(placement.agents_on(rank))
    split, state_weight = state if state is not None else (None, None)

    def terms(agents, weights, keep=lambda i, w: True):
        """(agent, region weights) for the pairs ``keep`` accepts, in the plan's (agent) order."""
        return tuple((i, (w,) if split is None else (w, state_weight[i]))
                     for i, w in zip(agents, weights) if keep(i, w))

    scratch = scratch if scratch is not None else Scratch()
    ctx = ProgramContext(frozenset(i for i in plan.snapshot if i in local), scratch, WeightedSum(split, scratch))
    blocks = []
    for position, block in enumerate(plan.blocks):
        if not local.intersection(block.members):
            continue
        view = LocalBlock(terms(block.members, block.weights, lambda i, w: i in local and w != 0.0),
                          tuple(r for r in block.receivers if r in local), placement.ranks_of(block.members))
        hub = hub_of_block(block) if hub_of_block is not None else None
        blocks.append(block_step(block, view, ctx, placement, rank, hub, f"hub{position}", hub_scratch, rules))

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


def overlap_hubs(schedule: Schedule, plans: list[Plan], placement: Placement, overlap: bool | str,
                 nbytes: int, exact: bool = False) -> Hubs:
    """Which blocks of a plain-mixing schedule's ``plans`` run overlapped on ``placement``, and
    around which hub rank: those that qualify (:func:`launch.engine.sync.overlap.hub_of`) when
    ``overlap`` is True; none when it is False; with ``"auto"``, those that qualify when the
    scratch of a hub block is at most :data:`~launch.engine.sync.overlap.AUTO_MAX_BYTES`: ``nbytes``
    (one agent's synchronized buffer), and under ``exact`` that many times the block's terms on
    other ranks than the hub (:class:`~launch.engine.sync.ordered.OrderedHubBlock` keeps each
    one's product).  A pure function: every rank, and the simulated clock of another layout, get
    the same answer."""
    if overlap is False:
        return {}
    workers = set(schedule.workers)
    hubs, copies = {}, 1
    for plan in plans:
        for block in plan.blocks:
            hub = hub_of(block, plan, placement, workers, schedule.push_sum)
            if hub is not None:
                hubs[plan, block] = hub
                remote = sum(1 for i, w in zip(block.members, block.weights) if w != 0.0 and placement.rank_of(i) != hub)
                copies = max(copies, remote if exact else 1)
    return {} if overlap == "auto" and copies * nbytes > AUTO_MAX_BYTES else hubs


def compile_sync(schedule: Schedule, placement: Placement, rank: int, *, numel: int, state_numel: int,
                 policy: SyncPolicy, overlap: bool | str, outer: SlowRule | None = None,
                 check_rule=None, itemsize: int = 4, exact: bool = False, backend: str | None = None,
                 dtype: torch.dtype | None = None) -> CompiledSync:
    """Every distinct matrix of ``schedule`` compiled for ``rank`` (see the module docstring).

    Args:
        numel: parameters per agent; ``state_numel``: the mixable inner state after them
            (``pullback``), or 0.
        policy: the resolved state policy (resets and state weights per matrix).
        outer: a slow rule, or None for plain mixing.
        overlap: run the blocks that qualify overlapped around their hub rank: True, False or
            ``"auto"`` (module docstring).
        check_rule: ``rule -> None``, called on ``outer`` once it is known to be a slow rule
            (``rule.check(model, optimizer)``: the rule's own checks).
        itemsize: bytes per element of the agents' buffers (``"auto"``'s memory rule, the
            gather-or-chain rule of ``exact``).
        exact: every sum in the canonical order, bit for bit the same on any layout (module
            docstring; :mod:`launch.engine.sync.ordered`).
        backend: the communicator's (``Communicator.backend``): it decides the exact blocks'
            gather-or-chain rule (:func:`launch.engine.sync.ordered.gather_max_bytes`) and, with
            ``dtype``, the buffers' dtype, where PREMUL_SUM applies (NCCL only; :func:`premul_applies`).
    """
    exact = check_bool(exact, "exact")
    if schedule.mixes_gradients:
        raise ValueError(f"schedule {schedule!r} mixes the workers' gradients (a Q_t other than the identity, "
                         f"e.g. topology.data_parallel): the engine does not run gradient mixing yet; "
                         f"agents.matrix_reference.run_model computes such a schedule serially")
    if overlap is True and outer is not None:
        raise ValueError("overlap=True applies to plain mixing syncs; it cannot be combined with outer=...")
    plans = [compile_plan(p) for p in schedule.distinct_matrices]
    nbytes = (numel + state_numel) * itemsize
    rules = BlockRules(exact, nbytes, dtype if backend == "nccl" and not exact else None, gather_max_bytes(backend),
                       shard_min_bytes(backend))
    if outer is not None:
        return _compile_slow_rule(schedule, plans, placement, rank, numel, state_numel, policy, outer, check_rule,
                                  rules)
    hubs = overlap_hubs(schedule, plans, placement, overlap, nbytes, exact)
    programs, hub_scratch, scratch = [], Scratch(), Scratch()
    for index, plan in enumerate(plans):
        weight = policy.state_weight(index)
        programs.append(rank_program(plan, placement, rank, state=None if weight is None else (numel, weight),
                                     hub_of_block=lambda block, p=plan: hubs.get((p, block)),
                                     reset=policy.resets[index], hub_scratch=hub_scratch, rules=rules,
                                     scratch=scratch))
    groups = {placement.ranks_of(b.members) for plan in plans for b in plan.blocks}
    windows = Windows.build(schedule, plans, placement, (lambda i, b: hubs.get((plans[i], b))) if hubs else None,
                            exact)
    return CompiledSync(programs, sorted(g for g in groups if len(g) > 1), windows, None, hubs)


def _compile_slow_rule(schedule: Schedule, plans: list[Plan], placement: Placement, rank: int, numel: int,
                       state_numel: int, policy: SyncPolicy, rule: SlowRule, check_rule,
                       rules: BlockRules) -> CompiledSync:
    """The programs of a slow rule: the workers' average of every non-identity matrix (its
    buffers: the agents' and the rule's extra scalars, ``rules.nbytes`` counting the former)."""
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
    programs, groups, worker_plans, scratch = [], set(), [], Scratch()
    for index, (matrix, plan) in enumerate(zip(schedule.distinct_matrices, plans)):
        if plan.is_identity:
            programs.append(rank_program(plan, placement, rank))
            worker_plans.append(plan)
            continue
        alpha, workers = workers_matrix(matrix, slow, index, what)
        program = rank_program(compile_plan(workers), placement, rank, rules=rules, scratch=scratch)
        groups |= {placement.ranks_of(b.members) for b in program.plan.blocks}
        programs.append(SlowRuleProgram(sync, program, alpha, local, placement.world_size, policy.resets[index]))
        worker_plans.append(program.plan)
    windows = Windows.build(schedule, worker_plans, placement, None, rules.exact)
    return CompiledSync(programs, sorted(g for g in groups if len(g) > 1), windows, sync)
