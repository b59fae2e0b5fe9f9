"""The finiteness check carried by the syncs' own collectives (launch.engine.guard.finiteness.MarkerCheck)
on gloo and MPI ranks: a NaN or Inf planted in any agent on any rank, or a non-finite loss, makes
every rank raise the same NonFiniteError at the sync the windows say (launch.engine.guard.windows),
plain, overlapped and gossip; a finite run costs no collective more than the check off
(counted through the communicator) and gives the same bits."""

from __future__ import annotations

import pytest
import torch

import topology
from launch.engine.sync.compile import compile_sync
from launch.engine.guard.finiteness import BeforeSyncCheck
from launch.engine.guard.windows import Windows
from launch.engine.placement import Placement
from launch.engine.simulation import Simulation
from launch.engine.sync.state_weights import SyncPolicy
from tests import problems
from tests.spawn import ROOT, run_mpiexec, run_torch
from topology import decentralized
from topology.plan import compile_plan

WORKER = ROOT / "tests" / "finiteness_worker.py"
LA2 = ["multilayer", [3, 2], [0.5, 0.6]]          # syncs at t = 2 (level 1), 5 (level 2), 8, 11, ...


# ----------------------------------------------------------------- expected, by hand
def lookahead_expected(ks, agent, t):
    """LA-n, one agent per rank: agent a (a >= 1) is read by the syncs of level >= a, agent 0 by
    every sync; the window is one period, decided by its outermost sync."""
    schedule = topology.multilayer(ks, [0.5] * len(ks))
    s = next(s for s in range(t, t + schedule.period + 1)
             if schedule.level(s) and (agent == 0 or schedule.level(s) >= agent))
    return s, s - s % schedule.period + schedule.period - 1


def ring_expected(t):
    """ring(4): every step a sync; a rank's news reaches everyone in 2 syncs, so windows are
    [2j, 2j + 1]: found at an even sync -> stop at the next; at an odd one -> the next window's."""
    return t, t + 1 if t % 2 == 0 else t + 2


def cases_with(name, base, plants):
    cases = {f"{name}-on": dict(base), f"{name}-off": dict(base, check_finite=False)}
    for kind, agent, t in plants:
        cases[f"{name}-{kind}{agent}@{t}"] = dict(base, plant=dict(kind=kind, agent=agent, t=t))
    return cases


def run(backend, nprocs, cases, tmp_path, timeout=240):
    spec = dict(backend=backend, out=str(tmp_path), cases=cases, timeout_s=60)
    if backend == "mpi":
        import json
        import sys

        code, output = run_mpiexec(nprocs, [sys.executable, WORKER, json.dumps(spec)], timeout)
        assert code == 0, output
    else:
        results = run_torch(nprocs, spec, timeout=timeout, worker=WORKER)
        assert all(code == 0 for code, _ in results), results
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(nprocs)]


def check_free_and_unchanged(ranks, name):
    """Check on vs off: the same collectives at every step, no flag all-reduce, the same bits."""
    for rank, results in enumerate(ranks):
        on, off = results[f"{name}-on"], results[f"{name}-off"]
        assert on["error"] is None and off["error"] is None
        assert on["counts"] == off["counts"], rank
        assert all(c[-1] == 0 for c in on["counts"]), rank           # flag_reduces
        assert sum(sum(c[:-1]) for c in on["counts"]) > 0, rank        # the syncs did communicate
        for i in on["buffers"]:
            assert torch.equal(on["buffers"][i], off["buffers"][i]), (rank, i)


def check_raised(ranks, case, found, stopped, parameters=(), losses=()):
    """Every rank raised the same error, naming ``parameters`` / ``losses`` found at ``found``,
    and stopped at the sync of ``stopped``."""
    errors = [results[case]["error"] for results in ranks]
    assert all(e is not None for e in errors), (case, errors)
    assert all(e == errors[0] for e in errors), (case, errors)
    error = errors[0]
    assert (error["step"], error["stopped"]) == (found, [stopped, "sync"]), (case, error)
    assert (error["parameters"], error["losses"]) == (list(parameters), list(losses)), (case, error)
    assert f"detected at the sync of iteration t={found};" in error["message"]
    assert all(results[case]["t"] == stopped for results in ranks)       # sim.t is not advanced


# ----------------------------------------------------------------- gloo and MPI, Lookahead
LA_PLANTS = [("param", 0, 8), ("param", 1, 6), ("param", 2, 7), ("param", 2, 6), ("inf", 1, 3), ("loss", 0, 6)]


@pytest.mark.parametrize("backend", ["torch", "mpi"], ids=["gloo", "mpi"])
def test_lookahead_plain_and_overlapped(tmp_path, backend):
    base = dict(schedule=LA2, steps=18)
    cases = cases_with("plain", base, LA_PLANTS)
    cases.update(cases_with("overlap", dict(base, overlap=True), LA_PLANTS))
    # The knowledge in tensors (as on CUDA: no host read but at decision syncs), here on CPU.
    cases.update(cases_with("device", dict(base, overlap=True, state="device"), LA_PLANTS))
    ranks = run(backend, 3, cases, tmp_path)
    for mode in ("plain", "overlap", "device"):
        check_free_and_unchanged(ranks, mode)
        for kind, agent, t in LA_PLANTS:
            found, stopped = lookahead_expected([3, 2], agent, t)
            named = dict(losses=[agent]) if kind == "loss" else dict(parameters=[agent])
            check_raised(ranks, f"{mode}-{kind}{agent}@{t}", found, stopped, **named)
    # Overlapped: a reduce and a broadcast per sync instead of all-reduces, in both runs alike.
    assert sum(c[2] for c in ranks[0]["overlap-on"]["counts"]) > 0
    assert sum(c[0] for r in ranks for c in r["overlap-on"]["counts"]) == 0


# ----------------------------------------------------------------- gossip, local SGD, several agents
GOSSIP_PLANTS = [("param", 2, 4), ("param", 2, 5), ("param", 0, 6), ("loss", 3, 4), ("inf", 1, 7)]


def test_gossip_and_local_sgd(tmp_path):
    """ring(4) on 4 ranks, ring(8) on 4 ranks (two agents each: local and remote terms), local
    SGD (one all-reduce over every rank per sync)."""
    cases = cases_with("ring", dict(schedule=["ring", 4], steps=12), GOSSIP_PLANTS)
    cases.update(cases_with("ringdev", dict(schedule=["ring", 4], steps=12, state="device"), GOSSIP_PLANTS[:2]))
    cases.update(cases_with("ring8", dict(schedule=["ring", 8], steps=10), [("param", 5, 4), ("loss", 6, 7)]))
    cases.update(cases_with("local", dict(schedule=["local_sgd", 4, 3], steps=12), [("param", 1, 5), ("loss", 2, 3)]))
    ranks = run("torch", 4, cases, tmp_path)
    for name in ("ring", "ringdev", "ring8", "local"):
        check_free_and_unchanged(ranks, name)
    for kind, agent, t in GOSSIP_PLANTS[:2]:
        check_raised(ranks, f"ringdev-{kind}{agent}@{t}", *ring_expected(t), parameters=[agent])
    for kind, agent, t in GOSSIP_PLANTS:
        found, stopped = ring_expected(t)
        named = dict(losses=[agent]) if kind == "loss" else dict(parameters=[agent])
        check_raised(ranks, f"ring-{kind}{agent}@{t}", found, stopped, **named)
    check_raised(ranks, "ring8-param5@4", 4, 5, parameters=[5])
    check_raised(ranks, "ring8-loss6@7", 7, 9, losses=[6])
    check_raised(ranks, "local-param1@5", 5, 5, parameters=[1])
    check_raised(ranks, "local-loss2@3", 5, 5, losses=[2])


def test_mpi_gossip_and_two_agents_per_rank(tmp_path):
    """MPI, 2 ranks of two agents each: ring(4) (each rank sends to the other at every sync: one
    sync reaches everyone) and LA-3 overlapped (rank 1 holds the level-2 and level-3 slow
    agents; the level-1 block is local to rank 0)."""
    cases = cases_with("ring", dict(schedule=["ring", 4], steps=8, agents_per_rank=2), [("param", 3, 4), ("param", 1, 5)])
    la3 = dict(schedule=["multilayer", [2, 2, 2], [0.5, 0.5, 0.5]], steps=16, agents_per_rank=2, overlap=True)
    cases.update(cases_with("la3", la3, [("param", 3, 8), ("param", 1, 2), ("param", 2, 4)]))
    ranks = run("mpi", 2, cases, tmp_path)
    for name in ("ring", "la3"):
        check_free_and_unchanged(ranks, name)
    check_raised(ranks, "ring-param3@4", 4, 4, parameters=[3])
    check_raised(ranks, "ring-param1@5", 5, 5, parameters=[1])
    check_raised(ranks, "la3-param3@8", 15, 15, parameters=[3])     # read by the level-3 sync only
    check_raised(ranks, "la3-param1@2", 3, 7, parameters=[1])
    check_raised(ranks, "la3-param2@4", 7, 7, parameters=[2])


# ----------------------------------------------------------------- which check, which windows
def checker(schedule, world_size, rank=0, **options):
    placement = Placement.make(schedule.num_agents, world_size, options.pop("agents_per_rank", None))
    options.setdefault("overlap", False)
    return compile_sync(schedule, placement, rank, numel=10, state_numel=0, policy=SyncPolicy("maintain", schedule),
                        **options)


def test_windows_of_the_schedules():
    la2 = topology.multilayer((3, 2), (0.5, 0.6))
    windows = checker(la2, 3).windows
    assert windows.periods == 1 and windows.decision(7) == 11
    assert [windows.at(t, 2) for t in (2, 5)] == [(True, True, False), (True, True, True)]
    # Overlapped: what ranks 1 and 2 find at the decision sync itself (no worker there, so only
    # their prefetched parts, which the reduces carry) is admissible, a sync-time finding is not.
    overlapped = checker(la2, 3, overlap=True).windows
    assert overlapped.at(5, 2) == (True, False, True) and overlapped.at(5, 0) == (True, True, True)
    ring = checker(decentralized.ring(8), 8).windows
    assert ring.periods == 4 and [ring.at(t, 5)[1] for t in range(4)] == [True, False, False, False]
    # Ranks that never hear from each other: no windows, the collective check before every sync.
    blocks = torch.zeros(4, 4, dtype=torch.float64)
    blocks[:2, :2] = blocks[2:, 2:] = 0.5
    assert checker(topology.from_matrices([blocks]), 2, agents_per_rank=2).windows is None


def test_the_check_a_simulation_gets():
    schedule = topology.multilayer((3, 2), (0.5, 0.6))
    sim = Simulation(problems.make_model(0), problems.loss_fn, problems.batches(1), schedule,
                     problems.OPTIMIZERS["sgd"])
    assert type(sim.engine.finiteness) is BeforeSyncCheck and not sim.engine.overlap.active    # one rank


def test_flooding_model_by_hand():
    """The flow of one sync: an all-reduce block shares everything among its ranks; messages go
    one way; an overlapped block's reduce carries only what was known before the sync."""
    from launch.engine.guard.windows import sync_flow

    placement = Placement.make(3, 3)
    level1 = compile_plan(topology.multilayer((3, 2), (0.5, 0.6)).matrix(2))
    flow = sync_flow(level1, placement)
    assert flow.held.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    overlapped = sync_flow(level1, placement, lambda block: 0)
    assert overlapped.held[1].tolist() == [True, True, False] and overlapped.born[1].tolist() == [False, True, False]
    ring = compile_plan(decentralized.ring(3).matrix(0))
    assert sync_flow(ring, placement).held.all()
    assert isinstance(Windows.build(decentralized.ring(3), [ring], placement, None), Windows)
