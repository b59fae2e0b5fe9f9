"""Overlapped syncs (launch.overlap): the passive agents' part of a Lookahead sync is reduced to
the workers' rank during the inner steps.  Same trajectories as co-located (bit for bit on two
ranks), its own collective counts, checkpoints and NaN detection as without it."""

import re

import pytest
import torch

import topology
from topology import decentralized
from launch.engine.store.checkpoint import Checkpointer
from launch.engine.sync.overlap import hub_of
from launch.engine.placement import Placement
from launch.engine.simulation import Simulation
from topology.plan import compile_plan
from tests import problems
from tests.spawn import run_mpi, run_torch
from tests.test_distributed import CASES, POLICIES, STEPS, check_against_colocated, load_ranks, run_gloo_case
from tests.test_reliability_dist import BASE, WORKER, check_ok, load

def participates(schedule, placement, rank, t):
    """Does ``rank`` hold a member of some block of P_t (spanning several ranks)?"""
    plan = compile_plan(schedule.matrix(t))
    return any(rank in placement.ranks_of(b.members) and len(placement.ranks_of(b.members)) > 1
               for b in plan.blocks)


def expected_counts(schedule, placement, rank, steps):
    """Per step t: (reduces started, broadcasts) on ``rank``.  The reduce of sync t' starts at the
    start of the step of the previous sync's successor (step 0 for the first): that is, in step
    s when s - 1 was a sync (or s = 0) and t' (the next sync at or after s) involves the rank."""
    syncs = [t for t in range(steps + schedule.period) if not compile_plan(schedule.matrix(t)).is_identity]
    reduces, broadcasts = [0] * steps, [0] * steps
    for t in range(steps):
        if participates(schedule, placement, rank, t):
            broadcasts[t] = 1
        if t == 0 or t - 1 in syncs:
            nxt = min(s for s in syncs if s >= t)
            if participates(schedule, placement, rank, nxt):
                reduces[t] = 1
    return reduces, broadcasts


@pytest.mark.parametrize("nprocs", [2, 3, 4])
def test_overlapped_gloo_equals_colocated(tmp_path, nprocs):
    ranks, schedule, worst = run_gloo_case(tmp_path, nprocs, overlap=True)
    policy = POLICIES[nprocs]
    if nprocs == 2:
        # acc = w_0 x_0 + (0 + w_1 x_1): the same two-term sum as co-located, bit for bit.
        assert worst == 0.0

    # No all-reduce at all; per sync a reduce and a broadcast of d * itemsize bytes (x3 for
    # Adam's two moments under pullback), on the ranks of the sync's block only.
    d = ranks[0]["trajectory"].shape[-1]
    nbytes = d * (3 if policy == "pullback" else 1) * 8
    placement = Placement.make(schedule.num_agents, nprocs)
    for rank, saved in enumerate(ranks):
        reduces, broadcasts = expected_counts(schedule, placement, rank, STEPS)
        assert sum(saved["all_reduces"]) == 0
        assert [c for c, _ in saved["reduces"]] == reduces, rank
        assert [c for c, _ in saved["broadcasts"]] == broadcasts, rank
        assert all(b == c * nbytes for c, b in saved["reduces"] + saved["broadcasts"])
        assert sum(broadcasts) > 0


@pytest.mark.parametrize("policy", [["reset", "pullback"], "pullback_inner"], ids=["reset-pullback", "pullback_inner"])
def test_overlapped_per_level_policies_equal_colocated(tmp_path, policy):
    """Per-level state policies (the state slots mixed with other weights than the parameters,
    resets of slots a broadcast may still be reading) on 3 gloo ranks."""
    ks, alphas = CASES[3]
    spec = dict(backend="torch", ks=ks, alphas=alphas, optimizer="adam", policy=policy, steps=60,
                out=str(tmp_path), scramble_init=True, overlap=True)
    results = run_torch(3, spec)
    assert all(code == 0 for code, _ in results), results
    check_against_colocated(load_ranks(tmp_path, 3), topology.multilayer(ks, alphas), "adam", policy, 60)


def test_overlapped_mpi_equals_colocated(tmp_path):
    ks, alphas = CASES[3]
    spec = dict(backend="mpi", ks=ks, alphas=alphas, optimizer="sgd_momentum", policy="pullback",
                steps=STEPS, out=str(tmp_path), scramble_init=True, overlap=True)
    code, output = run_mpi(3, spec)
    assert code == 0, output
    ranks = load_ranks(tmp_path, 3)
    check_against_colocated(ranks, topology.multilayer(ks, alphas), "sgd_momentum", "pullback", STEPS)
    assert [sum(c for c, _ in r["broadcasts"]) for r in ranks] == [100, 100, 50]
    assert [sum(r["all_reduces"]) for r in ranks] == [0, 0, 0]


def test_overlapped_resume_mid_round_and_nan(tmp_path):
    """3 gloo ranks with overlap: a run cut at t=7 (mid-round, with the reduce of the sync of t=8
    in flight) and resumed gives the uninterrupted trajectory bit for bit (float32 and float64);
    then a NaN on the hub or in a passive agent stops every rank with the same NonFiniteError at
    the next sync."""
    from tests.test_checkpoint import CUT, STEPS as CKPT_STEPS

    base = dict(BASE, out=str(tmp_path), overlap=True)
    jobs = []
    for dt in ("float64", "float32"):
        jobs += [dict(name=f"full-{dt}", dtype=dt, steps=CKPT_STEPS, noisy=True),
                 dict(name=f"cut-{dt}", dtype=dt, steps=CUT, noisy=True, ckpt=str(tmp_path / f"ckpt-{dt}"), every=5)]
    check_ok(run_torch(3, dict(base, jobs=jobs), timeout=150, worker=WORKER))
    jobs = [dict(name=f"resumed-{dt}", dtype=dt, steps=CKPT_STEPS, noisy=True, resume=str(tmp_path / f"ckpt-{dt}"))
            for dt in ("float64", "float32")]
    check_ok(run_torch(3, dict(base, jobs=jobs), timeout=150, worker=WORKER))
    for dt in ("float64", "float32"):
        full, resumed = load(tmp_path, f"full-{dt}", 3), load(tmp_path, f"resumed-{dt}", 3)
        assert torch.equal(resumed, full[CUT:]), dt
        assert (full[-1] - full[CUT]).abs().max() > 1e-4

    # The hub decides the check alone: a NaN on the hub (agent 0's batch at t=7; checkpoints every
    # 3 iterations, the last at t=6) and one written into a passive agent on another rank between
    # steps (agent 2 before t=3, before the reduces of the sync of t=5 start: the timing contract
    # of launch.overlap; no checkpoint, whose own check would find it first) stop every rank with
    # the same error at the next sync.
    for name, fault, agent, t, every in (("hub", dict(poison=dict(agent=0, at=7)), 0, 8, 3),
                                         ("passive", dict(corrupt=dict(agent=2, t=3)), 2, 5, None)):
        nan = tmp_path / f"nan-{name}"
        nan.mkdir()
        job = dict(name="run", steps=30)
        if every:
            job.update(ckpt=str(nan / "ckpt"), every=every)
        results = run_torch(3, dict(base, out=str(nan), jobs=[job], **fault), timeout=120, worker=WORKER)
        assert [code for code, _ in results] == [4, 4, 4], results
        for rank in range(3):
            message = (nan / f"rank{rank}.err").read_text()
            assert message.startswith("NonFiniteError") and f"parameters of agent(s) [{agent}]" in message, message
            assert re.search(rf"iteration t={t}\b", message), message
        if every:
            assert Checkpointer(nan / "ckpt").latest_step() == 6


def test_two_agents_per_rank_overlapped_equals_colocated(tmp_path):
    """LA-3 (4 agents) on 2 ranks: rank 0 holds the worker and the level-1 slow agent, rank 1 the
    two others; the hub sums its two members locally, the other rank its two."""
    ks, alphas = CASES[4]
    spec = dict(backend="torch", ks=ks, alphas=alphas, optimizer="sgd_momentum", policy="maintain",
                steps=120, out=str(tmp_path), agents_per_rank=2, overlap=True)
    results = run_torch(2, spec)
    assert all(code == 0 for code, _ in results), results
    ranks = load_ranks(tmp_path, 2)
    check_against_colocated(ranks, topology.multilayer(ks, alphas), "sgd_momentum", "maintain", 120)
    assert sum(c for c, _ in ranks[1]["broadcasts"]) == 120 // 4      # levels >= 2: every 4 steps


# --------------------------------------------------------------------------- which blocks
def hubs(schedule, world_size, agents_per_rank=None):
    placement = Placement.make(schedule.num_agents, world_size, agents_per_rank)
    result = []
    for matrix in schedule.distinct_matrices:
        plan = compile_plan(matrix)
        result += [hub_of(b, plan, placement, set(schedule.workers), schedule.push_sum) for b in plan.blocks]
    return result


def test_hub_blocks_are_the_lookahead_blocks_across_ranks():
    la2 = topology.multilayer((3, 2), (0.5, 0.6))
    assert set(hubs(la2, 3)) - {None} == {0} and 0 in hubs(la2, 3)
    # All agents on one rank: nothing crosses ranks, nothing to overlap.
    assert set(hubs(la2, 1)) == {None}
    # Workers on every rank (local SGD, gossip): no hub.
    assert set(hubs(decentralized.local_sgd(4, 3), 4)) == {None}
    assert all(h is None for h in hubs(decentralized.ring(4), 4))   # mixes only
    # Lookahead around local SGD: the workers are spread over ranks 0..3, the slow agent on 4.
    assert set(hubs(decentralized.lookahead_local_sgd(4, 3, 0.5), 5)) == {None}


def test_overlap_validation():
    model, data = problems.make_model(0), problems.batches(1)
    schedule = topology.lookahead(3, 0.5)
    with pytest.raises(ValueError, match="overlap must be True or False"):
        Simulation(model, problems.loss_fn, data, schedule, problems.OPTIMIZERS["sgd"], overlap="yes")
    from agents.outer import OuterOptimizer

    outer = OuterOptimizer(lambda params: torch.optim.SGD(params, lr=1.0))
    with pytest.raises(ValueError, match="cannot be combined with outer"):
        Simulation(model, problems.loss_fn, data, schedule, problems.OPTIMIZERS["sgd"], overlap=True, outer=outer)


def test_overlap_is_a_no_op_co_located():
    """One rank: no block crosses ranks, so overlap=True runs the same plain plan, bit for bit."""
    runs = []
    for overlap in (False, True):
        sim = Simulation(problems.make_model(0), problems.loss_fn, problems.batches(1),
                         topology.multilayer((3, 2), (0.5, 0.6)), problems.OPTIMIZERS["adam"], overlap=overlap)
        sim.run(30)
        runs.append(torch.stack([a.params.clone() for a in sim.agents.values()]))
        assert not sim.engine.overlap.active
    assert torch.equal(*runs)


def test_overlap_auto_is_on_where_it_applies_and_the_scratch_is_small(monkeypatch):
    """overlap="auto" (the default): a distributed Lookahead's blocks run overlapped; not with a
    slow rule, not co-located, not for gossip or local SGD, not when one flat copy exceeds
    AUTO_MAX_BYTES; the same answer on every rank."""
    from agents.outer import OuterOptimizer
    from launch.engine.sync import compile as compiler
    from launch.engine.sync.state_weights import SyncPolicy

    def compiled(schedule, world, rank=0, numel=1000, **options):
        placement = Placement.make(schedule.num_agents, world)
        return compiler.compile_sync(schedule, placement, rank, numel=numel, state_numel=0,
                                     policy=SyncPolicy("maintain", schedule), overlap="auto", **options)

    la2 = topology.multilayer((3, 2), (0.5, 0.6))
    assert all(compiled(la2, 3, rank).hubs for rank in range(3))
    assert not compiled(la2, 1).hubs
    assert not compiled(decentralized.local_sgd(4, 3), 4).hubs
    assert not compiled(decentralized.ring(4), 4).hubs
    outer = OuterOptimizer(lambda params: torch.optim.SGD(params, lr=1.0))
    assert not compiled(topology.lookahead(3, 0.5), 2, outer=outer).hubs
    monkeypatch.setattr(compiler, "AUTO_MAX_BYTES", 4000)
    assert compiled(la2, 3, numel=1000, itemsize=4).hubs            # 4000 bytes: allowed
    assert not compiled(la2, 3, numel=1000, itemsize=8).hubs        # 8000 bytes: not
    sim = Simulation(problems.make_model(0), problems.loss_fn, problems.batches(1), la2, problems.OPTIMIZERS["sgd"])
    assert not sim.engine.overlap.active                                     # co-located: nothing crosses ranks
