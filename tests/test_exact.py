"""Exact syncs (compile_sync(exact=True), launch.engine.sync.ordered): a distributed program equals
the co-located one bit for bit, sync after sync, for every schedule family, on gloo (3 and 4
processes, one and two agents per rank) and MPI (3 processes), in float32 and float64 (bfloat16
for one); without the mode the same runs differ, and the difference grows.  Also: the strategy
each block gets, the ordered local sum, PREMUL_SUM's choice logic, the communicator's new
collectives, and the finiteness check's markers riding in the exact collectives."""

from __future__ import annotations

import json

import pytest
import torch

import topology
from launch.comm.local import LocalCommunicator
from launch.engine.guard.finiteness import NO_CHECK
from launch.engine.placement import Placement
from launch.engine.sync import ordered
from launch.engine.sync.blocks import AllReduceBlock, LocalBlock, PremulBlock, ProgramContext
from launch.engine.sync.compile import compile_sync, premul_applies
from launch.engine.sync.state_weights import SyncPolicy
from launch.engine.sync.kernel import Scratch, WeightedSum
from launch.engine.sync.ordered import ChainBlock, GatherBlock, OrderedHubBlock, exact_strategy
from tests import exact_cases
from tests.exact_cases import bits_equal, compile_case, family_cases, two_per_rank_cases
from tests.spawn import ROOT, run_job
from tests.test_finiteness_dist import check_raised, lookahead_expected, ring_expected

WORKER = ROOT / "tests" / "exact_worker.py"
FINITENESS_WORKER = ROOT / "tests" / "finiteness_worker.py"
#: Syncs per case: the long runs in float32 with chains (the main path; rounding is largest in
#: float32), fewer elsewhere (float64, gathers, bfloat16, two agents per rank).
SYNCS = {"float32": 300, "float64": 60, "bfloat16": 100}
#: Syncs of the default program, beside the exact one, where it must differ.
DEFAULT_SYNCS = 60
#: Families whose sums have three terms or more across ranks: the default program differs there.
#: (Gossip and push-sum mix point to point, each receiver summing in agent order: exact in both
#: modes; LA-1 and an outer rule over two workers sum two terms: exact either way.)
DIFFERS = ("la2-", "la3-", "la5-", "la7-", "local3", "local4", "local6", "local8", "la-over-local", "hierarchical")


def cases_for(n: int, backend: str) -> dict:
    cases = {**family_cases(n, "float32"), **family_cases(n, "float64"), **two_per_rank_cases(n, "float32")}
    for name, case in cases.items():
        case["syncs"] = min(case["syncs"], SYNCS[case["dtype"]])
        # The default program too, in float32, where it may differ (so the test could fail).
        case["default"] = DEFAULT_SYNCS if case["dtype"] == "float32" and name.startswith(DIFFERS) else 0
    cases.update({k: dict(v, syncs=60) for k, v in family_cases(n, "float32", "gather").items()})
    cases.update({k: dict(v, syncs=100) for k, v in family_cases(n, "float32", "shard").items()})
    cases.update({k: dict(v, syncs=60) for k, v in family_cases(n, "float64", "shard").items()})
    if backend == "torch":
        cases.update({k: dict(v, syncs=SYNCS["bfloat16"]) for k, v in family_cases(n, "bfloat16").items()
                      if k.startswith(f"local{n}-")})
    return cases


def run(backend: str, nprocs: int, cases: dict, tmp_path, timeout: float = 400) -> list[dict]:
    run_job(backend, nprocs, dict(backend=backend, out=str(tmp_path), cases=cases, timeout_s=60), WORKER, timeout)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nprocs)]


def check_exact(ranks: list[dict], cases: dict, every_case_differs: bool = True) -> None:
    """Exact: no (sync, agent) pair differs from the co-located run, on any rank, in any case.
    Default: differs, by more at its last sync than at sync 10 -- in every case where a sum has
    three terms across ranks (gloo's ring adds in its own order), or (``every_case_differs``
    False: MPICH's all-reduce on 3 ranks happens to add one term per rank in rank order) in the
    cases with two agents per rank (a rank's partial sum added to the others')."""
    differed = []
    for name, case in cases.items():
        results = [r[name] for r in ranks if r[name] is not None]
        assert len(results) == case.get("world", len(ranks)), name
        for rank, result in enumerate(results):
            assert result["syncs"] == case["syncs"], (name, rank)
            assert result["mismatches"]["exact"] == 0, (name, rank, result)
        if case.get("default") and (every_case_differs or "-x2-" in name):
            assert sum(r["mismatches"]["default"] for r in results) > 0, (name, results[0])
            first, last = max(r["deviations"] for r in results)
            assert last > first > 0, (name, first, last)
            differed.append(name)
    assert differed


def strategies(ranks: list[dict], name: str) -> set[str]:
    return {step for r in ranks if r[name] is not None for step in r[name]["steps"]}


def test_gloo_three_processes_one_and_two_agents_per_rank(tmp_path):
    cases = cases_for(3, "torch")
    ranks = run("torch", 3, cases, tmp_path)
    check_exact(ranks, cases)
    assert strategies(ranks, "la2-float64-chain") == {"AllReduceBlock", "ChainBlock"}   # level 1: a pair
    assert strategies(ranks, "la2-float32-gather") == {"AllReduceBlock", "GatherBlock"}
    assert strategies(ranks, "la2-float32-shard") == {"AllReduceBlock", "ShardedBlock"}
    assert strategies(ranks, "local3-float64-shard") == {"ShardedBlock"}
    assert strategies(ranks, "la2-overlap-float64-chain") == {"OrderedHubBlock"}
    assert strategies(ranks, "local6-x2-float32") == {"ChainBlock"}
    assert strategies(ranks, "ring3-float64-chain") == set()                             # mixes only
    counts = ranks[1]["local3-float64-chain"]["counts"]
    assert counts["chains"] == 60 and counts["chain_bytes"] == 60 * 600 * 8 and counts["all_reduces"] == 0


def test_gloo_four_processes_one_and_two_agents_per_rank(tmp_path):
    cases = cases_for(4, "torch")
    ranks = run("torch", 4, cases, tmp_path)
    check_exact(ranks, cases)
    assert strategies(ranks, "outer-float64-chain") == {"ChainBlock"}                  # 3 workers
    assert "ChainBlock" in strategies(ranks, "hierarchical-float64-chain")
    counts = ranks[0]["la3-overlap-float32-chain"]["counts"]
    assert counts["sends"] == 0 and counts["block_broadcasts"] > 0      # the hub receives, sends none
    assert ranks[3]["la3-overlap-float32-chain"]["counts"]["sends"] > 0
    assert strategies(ranks, "la3-state-float32-shard") == {"AllReduceBlock", "ShardedBlock"}   # 690 / 4: uneven


def test_mpi_three_processes(tmp_path):
    cases = cases_for(3, "mpi")
    ranks = run("mpi", 3, cases, tmp_path)
    check_exact(ranks, cases, every_case_differs=False)
    assert strategies(ranks, "local3-float64-chain") == {"ChainBlock"}
    assert strategies(ranks, "local3-float64-shard") == {"ShardedBlock"}


# ----------------------------------------------------------------- the finiteness check's markers
def test_markers_ride_in_the_exact_collectives(tmp_path):
    """A NaN planted anywhere stops every rank with the same error at the sync the windows say,
    the sync's exact collectives carrying the markers (chained, gathered, sharded and overlapped; a finite
    run sends no collective more with the check on, and gives the same bits).  Through the
    Simulation with exact=True (tests/finiteness_worker.py)."""
    la2 = ["multilayer", [3, 2], [0.5, 0.6]]
    plants = [("param", 0, 8), ("param", 2, 7), ("param", 1, 6), ("loss", 0, 6)]
    cases = {}
    for mode, options in (("chain", {"exact": "chain"}), ("gather", {"exact": "gather"}),
                          ("shard", {"exact": "shard"}), ("overlap", {"exact": "chain", "overlap": True})):
        base = dict(schedule=la2, steps=18, **options)
        cases[f"{mode}-on"], cases[f"{mode}-off"] = base, dict(base, check_finite=False)
        cases.update({f"{mode}-{kind}{agent}@{t}": dict(base, plant=dict(kind=kind, agent=agent, t=t))
                      for kind, agent, t in plants})
    cases["ring-param2@4"] = dict(schedule=["ring", 3], steps=8, exact="chain", plant=dict(kind="param", agent=2, t=4))
    run_job("torch", 3, dict(backend="torch", out=str(tmp_path), cases=cases, timeout_s=60), FINITENESS_WORKER, 300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    for mode in ("chain", "gather", "shard", "overlap"):
        for rank, r in enumerate(ranks):
            on, off = r[f"{mode}-on"], r[f"{mode}-off"]
            assert on["error"] is None and on["counts"] == off["counts"], (mode, rank)
            assert all(c[-1] == 0 for c in on["counts"])                      # no flag collective
            assert all(torch.equal(on["buffers"][i], off["buffers"][i]) for i in on["buffers"])
        for kind, agent, t in plants:
            found, stopped = lookahead_expected([3, 2], agent, t)
            named = dict(losses=[agent]) if kind == "loss" else dict(parameters=[agent])
            check_raised(ranks, f"{mode}-{kind}{agent}@{t}", found, stopped, **named)
    check_raised(ranks, "ring-param2@4", 4, 4, parameters=[2])
    # What carried them (COUNTS of the worker: ..., chains, gathers, flag_reduces).
    totals = {mode: [sum(c[k] for c in ranks[1][f"{mode}-on"]["counts"]) for k in (1, 4, 5)]
              for mode in ("chain", "gather", "shard")}
    assert totals["chain"][1] > 0 == totals["chain"][2] and totals["gather"][2] > 0 == totals["gather"][1]
    assert totals["shard"][0] > 0 and totals["shard"][2] > 0 == totals["shard"][1]     # sends, then a gather


def test_ring_windows_hold_for_exact_syncs():
    """Gossip is exact in both modes (mixes): the windows of ring(4) stay those of the default."""
    assert ring_expected(4) == (4, 5)
    schedule = exact_cases.make_schedule(["ring", 4])
    placement = Placement.make(4, 4)
    case = dict(dtype="float32")
    for rank in range(4):
        exact, default = (compile_case(case, schedule, placement, rank, on) for on in (True, False))
        assert exact.windows.periods == default.windows.periods
        assert [exact.windows.at(t, rank) for t in range(4)] == [default.windows.at(t, rank) for t in range(4)]


def test_an_exact_block_carries_the_markers_of_its_term_holders_only():
    """LA-2 with alpha_2 = 1: the slow agent of level 2 (rank 2) has weight 0 in the level-2 sum.
    An all-reduce carries rank 2's marker anyway; an exact block's chain does not pass through
    rank 2 (it holds no term) and its broadcast only brings rank 2 the result: the windows' model
    says so."""
    from launch.engine.guard.windows import sync_flow
    from topology.plan import compile_plan

    plan = compile_plan(topology.multilayer((2, 2), (0.5, 1.0)).matrix(3))
    assert plan.blocks[0].weights[2] == 0.0
    placement = Placement.make(3, 3)
    default, exact = sync_flow(plan, placement), sync_flow(plan, placement, exact=True)
    assert default.held.all() and default.born.all()
    assert exact.held[2].tolist() == [False, False, True] and exact.held[:2].all()
    case = dict(dtype="float64")
    steps = compile_case(case, topology.multilayer((2, 2), (0.5, 1.0)), placement, 2, True, "mpi").programs[2].blocks
    assert type(steps[0]) is GatherBlock and steps[0].holders == ((0,), (1,), ())


# ----------------------------------------------------------------- choices, local sums, collectives
def test_the_strategy_of_each_block():
    """The rule of exact_strategy, and what compile_sync builds from it on every rank."""
    assert exact_strategy((1, 1, 1), 501, None, 1000) == "chain"
    assert exact_strategy((1, 1, 1), 500, None, 1000) == "gather"
    assert exact_strategy((2, 1, 1), 500, None, 1000) == "chain"                  # 2 rows each
    assert exact_strategy((1, 1), 1 << 30, None, 0) == "pair" and exact_strategy((3,), 1, None, 0) == "local"
    assert exact_strategy((1, 0, 1), 1, 0, 0) == "hub" and exact_strategy((2, 0), 1 << 30, None, 0) == "chain"
    # By backend: MPI gathers up to 16 MiB received, NCCL 64 KiB, gloo (and any other) never.
    assert (ordered.gather_max_bytes("mpi"), ordered.gather_max_bytes("nccl")) == (16 << 20, 64 << 10)
    assert ordered.gather_max_bytes("gloo") == ordered.gather_max_bytes(None) == 0
    # Shards: every rank one term, from the backend's size on, before the gather (MPI, NCCL: 1 MiB).
    assert exact_strategy((1, 1, 1), 1 << 20, None, 16 << 20, 1 << 20) == "shard"
    assert exact_strategy((1, 1, 1), (1 << 20) - 1, None, 16 << 20, 1 << 20) == "gather"
    assert exact_strategy((1, 1, 1, 1), 1 << 30, None, 0, 1 << 20) == "shard"
    assert exact_strategy((2, 1, 1), 1 << 30, None, 0, 1 << 20) == "chain"              # a rank holds 2
    assert exact_strategy((1, 0, 1), 1 << 30, None, 0, 1 << 20) == "chain"              # a rank holds none
    assert exact_strategy((1, 1, 1), 1 << 30, None, 0, None) == "chain"                 # never sharded
    assert (ordered.shard_min_bytes("mpi"), ordered.shard_min_bytes("nccl")) == (1 << 20, 1 << 20)
    assert ordered.shard_min_bytes("gloo") is None and ordered.shard_min_bytes(None) is None
    la2 = topology.multilayer((2, 2), (0.5, 0.6))
    for backend, numel, expected in (("mpi", 1 << 18, "ShardedBlock"), ("mpi", 1 << 16, "GatherBlock"),
                                     ("gloo", 1 << 18, "ChainBlock")):
        compiled = compile_sync(la2, Placement.make(3, 3), 1, numel=numel, state_numel=0, overlap=False,
                                policy=SyncPolicy("maintain", la2), exact=True, backend=backend)
        assert [type(b).__name__ for b in compiled.programs[2].blocks] == [expected], (backend, numel)
    schedule = topology.multilayer((2, 2), (0.5, 0.6))
    placement = Placement.make(3, 3)
    case = dict(dtype="float64")
    for rank in range(3):
        level1, level2 = compile_case(case, schedule, placement, rank, True).programs[1:]
        assert [type(b) for b in level2.blocks] == [ChainBlock]
        assert all(type(b) is AllReduceBlock for b in level1.blocks)              # a pair (ranks 0, 1)
    assert type(compile_case(dict(case, overlap=True), schedule, placement, 2, True).programs[2].blocks[0]) \
        is OrderedHubBlock
    co_located = compile_case(case, schedule, Placement.make(3, 1, 3), 0, True)
    assert [type(b) for p in co_located.programs for b in p.blocks] == [AllReduceBlock, AllReduceBlock]
    assert all(b.ordered for p in co_located.programs for b in p.blocks)
    with pytest.raises(ValueError, match="exact must be true or false; got 1"):
        compile_case(case, schedule, placement, 0, 1)


def test_the_gather_threshold_counts_the_bytes_each_rank_receives(monkeypatch):
    monkeypatch.setattr(ordered, "GATHER_MAX_BYTES", {"mpi": 2 * 600 * 4})
    schedule = topology.multilayer((2, 2), (0.5, 0.6))

    def steps(dtype, backend="mpi"):
        compiled = compile_case(dict(dtype=dtype), schedule, Placement.make(3, 3), 0, True, backend)
        return [type(b) for b in compiled.programs[2].blocks]
    assert steps("float32") == [GatherBlock] and steps("float64") == [ChainBlock]
    assert steps("float32", "gloo") == [ChainBlock]


def ctx_for(snapshot=()):
    scratch = Scratch()
    return ProgramContext(frozenset(snapshot), scratch, WeightedSum(None, scratch))


def test_the_ordered_local_sum_adds_left_to_right_in_agent_order():
    """A block whose first receiver is the third term: the default sum scales it in place and
    adds it first; the ordered sum keeps agent order (a scratch accumulator), which is the
    canonical sum ((p0 + p1) + p2) + p3 bit for bit, and differs here."""
    torch.manual_seed(0)
    x = {i: torch.randn(5000, dtype=torch.float32) * 10 ** i for i in range(4)}
    w = (0.1, 0.2, 0.3, 0.4)
    view = LocalBlock(tuple((i, (w[i],)) for i in range(4)), (2, 3), (0,))
    canonical = ((x[0] * w[0] + x[1] * w[1]) + x[2] * w[2]) + x[3] * w[3]
    results = {}
    for ordered_sum in (True, False):
        tensors = {i: t.clone() for i, t in x.items()}
        AllReduceBlock(view, ctx_for(), ordered=ordered_sum).run(tensors, dict(tensors), LocalCommunicator(), NO_CHECK)
        assert bits_equal(tensors[2], tensors[3])
        results[ordered_sum] = tensors[2]
    assert bits_equal(results[True], canonical)
    assert not bits_equal(results[False], canonical)


def test_products_formed_elsewhere_are_added_as_they_are():
    kernel = WeightedSum(None, Scratch())
    a, b, c = (torch.randn(100, dtype=torch.float64) for _ in range(3))
    acc = torch.empty(100, dtype=torch.float64)
    kernel(acc, [(0, None), (1, (0.3,)), (2, None)], {0: a, 1: b, 2: c})
    assert bits_equal(acc, (a + b * 0.3) + c)


def test_premul_is_chosen_only_where_it_gives_the_same_bits():
    """PREMUL_SUM (NCCL): one local term, the first receiver's own buffer, one weight; any weight
    in float32 / float64, weights exact in the dtype in float16 / bfloat16; only on NCCL and not
    under exact (compile_sync)."""
    third, half = LocalBlock(((0, (1 / 3,)),), (0,), (0, 1, 2)), LocalBlock(((0, (0.5,)),), (0,), (0, 1, 2))
    assert premul_applies(third, (), torch.float32) and premul_applies(third, (), torch.float64)
    assert not premul_applies(third, (), torch.bfloat16) and premul_applies(half, (), torch.bfloat16)
    assert not premul_applies(third, (), None)                                  # not NCCL
    assert not premul_applies(third, (0,), torch.float32)                       # snapshotted
    assert not premul_applies(LocalBlock(((0, (0.5, 0.25)),), (0,), (0, 1)), (), torch.float32)   # two regions
    assert not premul_applies(LocalBlock(((1, (0.5,)),), (), (0, 1)), (), torch.float32)  # not a receiver
    assert not premul_applies(LocalBlock(((0, (0.5,)), (1, (0.2,))), (0, 1), (0, 1)), (), torch.float32)
    assert not premul_applies(LocalBlock(((0, (0.5,)),), (0,), (0,)), (), torch.float32)  # one rank
    from launch.engine.sync.compile import compile_sync
    from launch.engine.sync.state_weights import SyncPolicy

    schedule = exact_cases.make_schedule(["local_sgd", 3, 2])
    policy = SyncPolicy("maintain", schedule)

    def steps(**options):
        compiled = compile_sync(schedule, Placement.make(3, 3), 0, numel=10, state_numel=0, policy=policy,
                                overlap=False, **options)
        return [type(b) for p in compiled.programs for b in p.blocks]
    assert steps(backend="nccl", dtype=torch.float32) == [PremulBlock]
    assert steps(backend="gloo", dtype=torch.float32) == [AllReduceBlock]
    assert steps(backend="nccl") == [AllReduceBlock]
    assert steps(backend="nccl", dtype=torch.float32, exact=True) == [GatherBlock]      # 80 bytes: small
    assert steps(backend="gloo", dtype=torch.float32, exact=True) == [ChainBlock]


def test_premul_block_on_one_rank_runs_the_two_passes_semantics():
    """PremulBlock's arithmetic through the co-located communicator (premul: mul_ in place)."""
    x = {0: torch.randn(50, dtype=torch.float64)}
    expected = x[0] * 0.3
    PremulBlock(LocalBlock(((0, (0.3,)),), (0,), (0,)), ctx_for()).run(x, dict(x), _OneRank(), NO_CHECK)
    assert bits_equal(x[0], expected)


class _OneRank(LocalCommunicator):
    """The co-located communicator, answering a one-rank block's all-reduce (PremulBlock always
    calls it)."""

    def all_reduce_(self, tensor, ranks, *, premul=None):
        super().all_reduce_(tensor, (0,), premul=premul)


def test_the_gpu_runs_premul_comparison_runs_here_on_one_rank():
    """launch.bench.distributed.premul_bits, the GPU run's PREMUL_SUM part, through the co-located
    communicator (premul: mul_, the two passes' product itself): every row the same bits, and the
    rule's choice reported (bfloat16 and float16 only where the weight is exact)."""
    from launch.bench.distributed import PREMUL_WEIGHTS, premul_bits

    comm = LocalCommunicator()
    comm.device = torch.device("cpu")
    result = premul_bits(comm, numel=1001)
    assert len(result["rows"]) == 4 * len(PREMUL_WEIGHTS)
    assert all(row["same_bits"] and row["met"] for row in result["rows"])
    chosen = {(row["dtype"], row["weight"]) for row in result["rows"] if row["premul_chosen"]}
    assert ("torch.float32", 1 / 3) in chosen and ("torch.bfloat16", 1 / 3) not in chosen
    assert ("torch.bfloat16", 0.25) in chosen and ("torch.float16", 0.5) in chosen


def test_local_collectives_of_one_rank():
    comm = LocalCommunicator()
    x = torch.arange(6.0)
    out = torch.empty(6)
    comm.all_gather_(out, x, (0,))
    comm.chain_reduce_(x, (0,), (0,), None)
    assert torch.equal(out, x) and (comm.stats.gathers, comm.stats.gather_bytes, comm.stats.chains) == (1, 24, 1)
    with pytest.raises(ValueError, match="no peer"):
        comm.exchange_async_([(x, 1, 0)], [])
