"""The cases of the exactness tests and the lockstep run that compares a distributed sync program
with the co-located one, sync after sync (used by tests/exact_worker.py on every rank, and in
process by tests/test_exact.py).

A case: ``schedule`` (a spec of :func:`make_schedule`), ``dtype``, ``syncs`` (how many
non-identity syncs to run), optionally ``world`` (the case runs on ranks 0..world-1 of the job;
the others only take part in creating its groups), ``agents_per_rank``, ``overlap``, ``outer``
(an outer SGD's momentum: a slow rule), ``policy`` (a state policy; per level for a multilayer
schedule), ``state_numel`` (a state region after the parameters, mixed with its own weights
under per-level policies), ``strategy`` (``"chain"``, ``"gather"`` or ``"shard"``: which one the
exact blocks spanning ranks take where it applies, by moving the gather and shard thresholds),
``default`` (also run the default program for that many syncs, to show that it differs).

Between two syncs every worker takes "an inner step" on every iteration: x <- x - lr g, g drawn
from the agent's own generator (the same numbers whatever the layout), parameters and state
alike; passive agents change only at syncs.  Buffers start drawn at random, different for every
agent (all equal under a slow rule: theta_0, as the engine starts them).  An overlapped sync's
hub blocks are prefetched at the start of the sync's iteration, before the workers' step (the
timing contract of launch.engine.sync.overlap).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

import topology
from launch.comm.local import LocalCommunicator
from launch.engine.placement import Placement
from launch.engine.sync import compile as compiler
from launch.engine.sync import ordered
from launch.engine.sync.state_weights import SyncPolicy
from topology import decentralized

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}
NUMEL = 600          # parameters per agent: 2 chain chunks in float32, 4 in float64
CHUNK_BYTES = 1536  # a chain's chunk in the tests (384 float32, 192 float64): several chunks, pipelined
LR = 0.05


def make_schedule(spec):
    name, *args = spec
    if name == "multilayer":
        return topology.multilayer(*args)
    if name == "with_slow_agent":
        return topology.with_slow_agent(*args)
    # {period: group size} maps: JSON keys are strings.
    args = [{int(k): v for k, v in a.items()} if isinstance(a, dict) else a for a in args]
    return getattr(decentralized, name)(*args)


def family_cases(n: int, dtype: str, strategy: str = "chain") -> dict:
    """One case per schedule family on ``n`` ranks (one agent each), in ``dtype``."""
    levels = n - 1
    la = ["multilayer", [2] * levels, [0.5, 0.6, 0.7][:levels]]
    base = dict(dtype=dtype, syncs=300, strategy=strategy)
    cases = {
        f"la{levels}": dict(base, schedule=la),
        f"la{levels}-overlap": dict(base, schedule=la, overlap=True),
        f"la{levels}-state": dict(base, schedule=la, policy=["pullback"] + ["maintain"] * (levels - 1), state_numel=90),
        f"local{n}": dict(base, schedule=["local_sgd", n, 2]),
        f"ring{n}": dict(base, schedule=["ring", n]),
        f"pushsum{n}": dict(base, schedule=["push_sum_random", n, 1]),
        "la-over-local": dict(base, schedule=["lookahead_local_sgd", n - 1, 2, 0.5, {1: n - 1}]),
        "outer": dict(base, schedule=["with_slow_agent", n - 1, 2, 0.5], outer=0.9),
        "la1": dict(base, schedule=["multilayer", [2], [0.5]], world=2),
    }
    if strategy == "gather":       # the gather's arithmetic is the same in every family: a few suffice
        cases = {k: cases[k] for k in (f"la{levels}", f"local{n}", "la-over-local")}
    if strategy == "shard":        # blocks whose ranks hold one term each: where shards apply
        cases = {k: cases[k] for k in (f"la{levels}", f"la{levels}-state", f"local{n}", "la-over-local", "outer")}
    if n == 4:
        cases["hierarchical"] = dict(base, schedule=["hierarchical", 4, {"1": 2, "3": 4}])
    return {f"{name}-{dtype}-{strategy}": case for name, case in cases.items()}


def two_per_rank_cases(n: int, dtype: str) -> dict:
    """Two agents per rank on ``n`` ranks: each rank's terms are a run of two in the order."""
    m = 2 * n
    base = dict(dtype=dtype, syncs=100, agents_per_rank=2, strategy="chain")
    return {f"{name}-x2-{dtype}": case for name, case in {
        f"local{m}": dict(base, schedule=["local_sgd", m, 1]),
        f"la{m - 1}-overlap": dict(base, schedule=["multilayer", [2] * (m - 1), [0.5] * (m - 1)], overlap=True),
        f"ring{m}": dict(base, schedule=["ring", m]),
        "la-over-local": dict(base, schedule=["lookahead_local_sgd", m - 1, 2, 0.5]),
    }.items()}


class Column:
    """What a slow rule's sync reads of an agent (launch.engine.sync.slow_rule): its flat buffer
    and whether it is a worker."""

    def __init__(self, buffer: torch.Tensor, is_worker: bool):
        self.flat = SimpleNamespace(buffer=buffer)
        self.is_worker = is_worker

    def sync_tensor(self) -> torch.Tensor:
        return self.flat.buffer


def compile_case(case: dict, schedule, placement: Placement, rank: int, exact: bool, backend: str | None = None):
    """The case's programs for ``rank`` (``compile_sync`` with the case's options)."""
    from agents.outer import OuterOptimizer

    outer = case.get("outer")
    rule = None if outer is None else OuterOptimizer(
        lambda params: torch.optim.SGD(params, lr=1.0, momentum=outer, nesterov=True))
    return compiler.compile_sync(
        schedule, placement, rank, numel=NUMEL, state_numel=case.get("state_numel", 0),
        policy=SyncPolicy(case.get("policy", "maintain"), schedule), outer=rule,
        overlap=case.get("overlap", False), itemsize=DTYPES[case["dtype"]].itemsize, exact=exact, backend=backend)


class Run:
    """One program set (a case, exact or not) on ``comm`` with ``placement``: the buffers of the
    local agents, stepped and synced in lockstep with the other runs of the case."""

    def __init__(self, case: dict, schedule, comm, placement: Placement, exact: bool):
        rank = comm.rank if placement.world_size > 1 else 0
        self.compiled = compile_case(case, schedule, placement, rank, exact, comm.backend)
        self.width = NUMEL + case.get("state_numel", 0)
        dtype = DTYPES[case["dtype"]]
        self.schedule, self.comm = schedule, comm
        self.local = placement.agents_on(rank)
        # A slow rule's replica of the slow agent starts from a local agent: every agent starts at
        # theta_0 there, as in the engine; elsewhere every agent starts at its own random buffer.
        self.buffers = {i: initial(0 if case.get("outer") else i, self.width, dtype) for i in self.local}
        self.columns = {i: Column(b, i in schedule.workers) for i, b in self.buffers.items()}
        self.noise = {i: torch.Generator().manual_seed(1000 + i) for i in self.local}
        if self.compiled.slow_sync is not None:
            self.compiled.slow_sync.start(self.columns)

    def step(self, t: int) -> bool:
        """Iteration t: prefetch (overlapped), the workers' step, the sync; whether it synced."""
        program = self.compiled.programs[self.schedule.matrix_index(t)]
        if program.hub_blocks:
            program.prefetch(self.buffers, self.comm)
        for i, buffer in self.buffers.items():
            if i in self.schedule.workers:
                g = torch.randn(self.width, generator=self.noise[i], dtype=torch.float64)
                buffer.sub_(g.to(buffer.dtype), alpha=LR)
        if program.is_identity:
            return False
        program.run(self.columns, self.comm)
        if program.hub_blocks:
            for pending in program.broadcasts():
                pending.wait()
            program.clear_broadcasts()
        return True


def initial(agent: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Agent ``agent``'s buffer at the start: drawn at random (the same on every layout)."""
    g = torch.Generator().manual_seed(agent)
    return torch.randn(width, generator=g, dtype=torch.float64).mul_(1 + agent).to(dtype)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (signed zeros and NaN payloads included)."""
    return torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def run_case(case: dict, comm) -> dict | None:
    """The case on ``comm`` against the co-located run, in lockstep; None on ranks outside the
    case's world.  Returns counts of (sync, agent) pairs that differ from the co-located exact
    run, the largest deviation of the default run (when run) at its first and last sync, the
    communicator's counts and the block steps of this rank."""
    schedule = make_schedule(case["schedule"])
    world = case.get("world", comm.world_size)
    placement = Placement.make(schedule.num_agents, world, case.get("agents_per_rank"))
    ordered.GATHER_MAX_BYTES = {comm.backend: 1 << 40 if case["strategy"] == "gather" else 0}
    ordered.SHARD_MIN_BYTES = {comm.backend: 0} if case["strategy"] == "shard" else {}
    # Group creation is collective over the whole job: every rank, the same list.
    groups = {g for exact in (True, False) for g in compile_case(case, schedule, placement, 0, exact).groups}
    comm.init_groups(sorted(groups))
    if comm.rank >= world:
        return None
    co_located = Placement.make(schedule.num_agents, 1, schedule.num_agents)
    runs = {"exact": Run(case, schedule, comm, placement, True),
            "co-located": Run(case, schedule, LocalCommunicator(), co_located, True)}
    default = case.get("default", 0)
    if default:
        runs["default"] = Run(case, schedule, comm, placement, False)
        runs["co-located default"] = Run(case, schedule, LocalCommunicator(), co_located, False)
    before = dict(vars(comm.stats))
    mismatches, deviations, t, syncs = {"exact": 0, "default": 0}, [], 0, 0
    while syncs < case["syncs"]:
        active = [run for name, run in runs.items() if syncs < default or "default" not in name]
        synced = [run.step(t) for run in active]
        t += 1
        if not synced[0]:
            continue
        syncs += 1
        for name, reference in (("exact", "co-located"), ("default", "co-located default")):
            if name in runs and runs[name] in active:
                mismatches[name] += sum(not bits_equal(runs[name].buffers[i], runs[reference].buffers[i])
                                        for i in runs[name].local)
        if default and syncs in (10, default):
            deviations.append(max(float((runs["default"].buffers[i].double() - runs["co-located default"].buffers[i]
                                         .double()).abs().max()) for i in runs["default"].local))
    return {"mismatches": mismatches, "deviations": deviations, "syncs": syncs, "iterations": t,
            "counts": {k: v - before[k] for k, v in vars(comm.stats).items()},
            "steps": sorted({type(b).__name__ for p in runs["exact"].compiled.programs
                             for b in getattr(p, "workers", p).blocks})}
