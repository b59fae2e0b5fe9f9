"""launch.AgentOptimizer on several processes: the user's own loop on the worker ranks, serve() on
the passive-only ranks, equal to the co-located run of the same loop at every step (<= 1e-12),
with the collectives each sync costs counted; and every refusal raised on every rank, no hang.

Every spawn runs several cases one after the other in the same processes (tests/own_loop_worker.py)
and is bounded in time.  The co-located runs are computed here, in the test's process.
"""

import json
import sys
from pathlib import Path

import torch

import topology
from launch import Simulation
from launch.engine.guard.windows import Windows
from launch.engine.guard.health import NonFiniteError
from launch.engine.placement import Placement
from tests import own_loop_cases as cases
from tests import problems
from tests.spawn import run_mpiexec, run_torch

WORKER = Path(__file__).resolve().parent / "own_loop_worker.py"
TOL = 1e-12
EPOCH_ENDS = (15, 30, 45)        # 120 samples, batches of 8, 3 epochs: evaluations after these steps


def spawn(tmp_path, nprocs: int, runs: list[dict], backend: str = "torch") -> list[list[dict]]:
    """Run ``runs`` on ``nprocs`` processes; records[case][rank]."""
    spec = {"backend": backend, "out": str(tmp_path), "cases": runs}
    if backend == "torch":
        results = run_torch(nprocs, spec, timeout=300, worker=WORKER)
        assert all(code == 0 for code, _ in results), results
    else:
        code, output = run_mpiexec(nprocs, [sys.executable, str(WORKER), json.dumps(spec)], timeout=300)
        assert code == 0, output
    return [[torch.load(tmp_path / f"case{k}-rank{r}.pt") for r in range(nprocs)] for k in range(len(runs))]


def deviation(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def every_step_deviation(record: dict, colocated_rows: torch.Tensor) -> float:
    """A rank's snapshots against the co-located rows at every step: a passive rank's agents hold
    their last snapshot until the next (they change only at syncs)."""
    ts, last = record["t"], colocated_rows.shape[0]
    worst = 0.0
    for k, start in enumerate(ts):
        for t in range(start, ts[k + 1] if k + 1 < len(ts) else last):
            worst = max(worst, deviation(record["rows"][k], colocated_rows[t][record["agents"]]))
    return worst


def finiteness_collectives(schedule, world_size: int, agents_per_rank: int) -> int:
    """Tiny collectives the finiteness check adds per non-identity sync in the finite case: none
    when the syncs' own collectives carry its markers to every rank (the schedule has windows on
    this placement: ``launch.engine.guard.windows``), else its flags all-reduce before every sync."""
    plans = [topology.compile_plan(m) for m in schedule.distinct_matrices]
    placement = Placement.make(schedule.num_agents, world_size, agents_per_rank)
    return 1 if Windows.build(schedule, plans, placement, None) is None else 0


def expected_lookahead_counts(case: dict, schedule, rank: int, apr: int, d: int, t_prev: int, t: int,
                              worker: bool) -> dict:
    """What the snapshot at ``t`` (after the sync of iteration t - 1) should have counted since the
    one at ``t_prev``: the plan's all-reduce of a level-L sync on the ranks of agents 0..L (none
    when they share a rank), the control message per non-identity sync (and the finiteness
    check's flags where its markers cannot travel: :func:`finiteness_collectives`); on passive ranks also the evaluations in between (a control message and
    one all-reduce of d entries each; the worker's snapshots exclude them)."""
    width = 1
    if case.get("policy") == "pullback":
        width += 2 if case["inner"] == "adam" else 1
    level = schedule.level(t - 1)
    ranks = {a // apr for a in range(level + 1)}
    plan = 1 if level > 0 and rank in ranks and len(ranks) > 1 else 0
    flags = 1 + finiteness_collectives(schedule, schedule.num_agents // apr, apr) if level > 0 else 0
    bytes_ = plan * d * width * 8
    if not worker:
        evals = len(case["ks"]) + 1
        between = sum(evals for e in EPOCH_ENDS if t_prev <= e <= t - 1)
        plan, flags, bytes_ = plan + between, flags + between, bytes_ + between * d * 8
    return {"all_reduces": plan, "all_reduce_bytes": bytes_, "flag_reduces": flags, "sends": 0}


def check_lookahead(case: dict, records: list[dict], count: bool = True) -> float:
    """Every rank's agents at every step and every worker's evaluations against co-located; the
    collectives of every step (``count``)."""
    colocated = cases.lookahead_case({k: v for k, v in case.items() if k not in ("agents_per_rank", "overlap")})
    schedule = topology.multilayer(case["ks"], case["alphas"])
    d = colocated["rows"].shape[-1]
    worst = 0.0
    for rank, record in enumerate(records):
        worst = max(worst, every_step_deviation(record, colocated["rows"]))
        if record["is_worker"]:
            assert [(t, target) for t, target, _ in record["evals"]] == [(t, g) for t, g, _ in colocated["evals"]]
            pairs = zip(record["evals"], colocated["evals"])
            worst = max(worst, max(deviation(v, w) for (_, _, v), (_, _, w) in pairs))
            # gather_state_dict: every agent's final buffer as its own rank holds it, bit for bit.
            t, gathered = record["gathered"]
            assert t == len(colocated["rows"]) - 1 and sorted(gathered) == list(range(len(case["ks"]) + 1))
            for other in records:
                for column, i in enumerate(other["agents"]):
                    assert torch.equal(gathered[i][: d], other["rows"][-1][column]), (rank, i)
        if count:
            apr = len(record["agents"])
            for k in range(1, len(record["t"])):
                expected = expected_lookahead_counts(case, schedule, rank, apr, d, record["t"][k - 1],
                                                     record["t"][k], record["is_worker"])
                got = {key: record["deltas"][k][key] for key in expected}
                assert got == expected, (rank, record["t"][k], got, expected)
    assert worst <= TOL, worst
    return worst


LA1 = dict(kind="lookahead", ks=[5], alphas=[0.5], inner="sgd_momentum", epochs=3)
LA2 = dict(kind="lookahead", ks=[3, 2], alphas=[0.5, 0.6], inner="adam", epochs=3)
LA3 = dict(kind="lookahead", ks=[2, 2, 2], alphas=[0.5, 0.6, 0.7], inner="adam", epochs=3)


def test_two_processes(tmp_path):
    """LA-1 on 2 ranks (one agent each: the passive rank serves), and LA-3 on 2 ranks with two
    agents each (rank 0: the worker and level 1; rank 1: levels 2 and 3), pullback."""
    runs = [LA1, dict(LA3, policy="pullback", agents_per_rank=2)]
    records = spawn(tmp_path, 2, runs)
    # A two-term sum is commutative: LA-1 on two ranks is co-located's bits.
    assert check_lookahead(runs[0], records[0]) == 0.0
    check_lookahead(runs[1], records[1])


def test_three_processes(tmp_path):
    """LA-2 on 3 ranks: plain, and with overlapped syncs and the hub-decided finiteness check;
    a resume from gather_state_dict (overlapped, before the first sync: the reduces started for
    it must be those of the loaded values) equal to the uninterrupted run, bit for bit."""
    resume = dict(kind="resume", ks=[3, 2], alphas=[0.5, 0.6], steps=14, at=1, overlap=True,
                  path=str(tmp_path / "state.pt"))
    runs = [dict(LA2, inner="sgd_momentum", policy="reset"), dict(LA2, policy="pullback", overlap=True), resume]
    records = spawn(tmp_path, 3, runs)
    check_lookahead(runs[0], records[0])
    check_lookahead(runs[1], records[1], count=False)
    assert all(r["deltas"][-1]["all_reduces"] == 0 for r in records[1])    # overlapped: no all-reduce
    for record in records[2]:
        assert all(torch.equal(record["first"][i], record["second"][i]) for i in record["first"])


def simulation_rows(schedule, inner: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Co-located Simulation, worker i reading problems.batches(1 + i): every agent's model at
    every step (under push-sum the de-biased z = x / w), as (steps + 1, m, d), and the final
    virtual iterate X a (under push-sum X holds the numerators x)."""
    sim = Simulation(problems.make_model(0), problems.loss_fn, lambda i: problems.batches(1 + i), schedule,
                     problems.OPTIMIZERS[inner])
    rows = [cases.stack({i: a.debiased() for i, a in sim.agents.items()})]
    for _ in range(steps):
        sim.step()
        rows.append(cases.stack({i: a.debiased() for i, a in sim.agents.items()}))
    a = schedule.consensus()
    return torch.stack(rows), sum(float(a[i]) * agent.params for i, agent in sim.agents.items())


def expected_sends(schedule, rank: int, t: int) -> int:
    """Messages rank ``rank`` sends at the sync of iteration t: one per (local source agent,
    other receiving rank) of the plan's mixes (one agent per rank)."""
    plan = topology.compile_plan(schedule.matrix(t))
    return len({(s, m.receiver) for m in plan.mixes for s in m.sources if s == rank and m.receiver != rank})


def test_four_processes(tmp_path):
    """LA-3 on 4 ranks (reset); 4 workers on 4 ranks driven by the user's loop -- local SGD, a
    gossip ring and push-sum gossip -- equal to Simulation on the same data."""
    workers = [dict(kind="workers", schedule=name, inner="sgd_momentum", steps=24)
               for name in ("local_sgd", "ring", "push_sum")]
    runs = [dict(LA3, policy="reset")] + workers
    records = spawn(tmp_path, 4, runs)
    check_lookahead(runs[0], records[0])
    for run, recs in zip(workers, records[1:]):
        schedule = cases.worker_schedule(run["schedule"])
        reference, virtual = simulation_rows(schedule, run["inner"], run["steps"])
        worst = max(every_step_deviation(r, reference) for r in recs)
        assert worst <= TOL, (run["schedule"], worst)
        for rank, record in enumerate(recs):
            for k in range(1, len(record["t"])):
                t, delta = record["t"][k] - 1, record["deltas"][k]
                sync = not torch.equal(schedule.matrix(t), torch.eye(4, dtype=torch.float64))
                extra = finiteness_collectives(schedule, 4, 1)
                assert delta["flag_reduces"] == (1 + extra if sync else 0), (run["schedule"], rank, t)
                assert delta["all_reduces"] == (1 if sync and run["schedule"] == "local_sgd" else 0)
                assert delta["sends"] == (expected_sends(schedule, rank, t) if sync else 0)
        # The virtual iterate (the average of the workers, of their numerators under push-sum),
        # the same on every worker.
        assert all(deviation(r["evals"][0][2], virtual) <= TOL for r in recs), run["schedule"]


def test_mpi_three_processes(tmp_path):
    """LA-2 on 3 MPI ranks, twice in the same processes (the second AgentOptimizer reuses the
    communicator's groups: rank 2, in none of the level-1 syncs, must not create them again)."""
    runs = [dict(LA2, inner="sgd_momentum", policy="pullback"), dict(LA2, overlap=True)]
    records = spawn(tmp_path, 3, runs, backend="mpi")
    check_lookahead(runs[0], records[0])
    check_lookahead(runs[1], records[1], count=False)


REFUSALS = {
    # The start-up agreement (launch.engine.core.agree): what ranks disagree on, with each value.
    "other_alphas": (ValueError, "schedule must be the same on every rank .* rank 0: 'MultilayerSchedule\\(ks=\\(2,\\), "
                                 "alphas=\\(0.5,\\)\\).*rank 1: 'MultilayerSchedule\\(ks=\\(2,\\), alphas=\\(0.6,\\)\\)"),
    "other_overlap": (ValueError, "overlap must be the same on every rank .* rank 0: True; rank 1: False"),
    "other_exact": (ValueError, "exact must be the same on every rank .* rank 0: True; rank 1: False"),
    "bad_option_on_one_rank": (ValueError, "^rank 1: overlap must be True or False, or 'auto'"),
    "simulation_other_k": (ValueError, "schedule must be the same on every rank .*ks=\\(2,\\).*ks=\\(3,\\)"),
    "ddp": (ValueError, "model is a DistributedDataParallel\\): each backward .* \\(on every rank\\)"),
    "ddp_hook": (ValueError, "DistributedDataParallel, with DDP comm hooks"),
    "ddp_simulation": (ValueError, "model is a DistributedDataParallel"),
    "fsdp": (ValueError, "must not be wrapped in FullyShardedDataParallel \\(model is .* pass the plain, unsharded "
                         "module .* \\(on every rank\\)"),
    "fsdp_module": (ValueError, "must not be FSDP flat parameters \\(_flat_param is a "
                                "FlatParameter.* \\(on every rank\\)"),
    "fully_shard": (ValueError, "must not be sharded with fully_shard \\(FSDP2; model is an FSDPModule.* "
                                "\\(on every rank\\)"),
    "tensor_parallel": (ValueError, "must be plain tensors, not DTensors \\(0.weight is a DTensor.* \\(on every "
                                    "rank\\)"),
    "ddp_forward": (ValueError, "run through a DistributedDataParallel wrapper over ranks \\[0, 1\\] before the "
                                "first step\\(\\), but this rank's agent is this rank alone.* \\(on every rank\\)"),
    "zero": (ValueError, "must not be a ZeroRedundancyOptimizer.* \\(on every rank\\)"),
    "mixed_dtypes": (ValueError, "rank 1: the parameters must share one dtype"),
    "add_param_group": (ValueError, "worker rank 0 refused a call at t=1: add_param_group"),
    "group_added": (ValueError, "worker rank 0 refused a call at t=1: a parameter group was added"),
    "nonfinite": (NonFiniteError, "non-finite values .* parameters of agent\\(s\\) \\[0\\].* t=1"),
    "out_of_step": (RuntimeError, "out of step \\(rank 0: the sync of iteration t=3; rank 1: close\\(\\) after 3"),
    "two_workers": (ValueError, "rank 0 holds workers \\[0, 1\\]"),
}


def test_refusals_on_every_rank(tmp_path):
    """Each refusal raises the same error on both ranks (a passive rank in serve() included),
    and the processes go on to the next case: nothing hangs."""
    import re

    names = list(REFUSALS)
    records = spawn(tmp_path, 2, [dict(kind="refusal", name=n) for n in names])
    for name, recs in zip(names, records):
        kind, pattern = REFUSALS[name]
        for rank, record in enumerate(recs):
            assert record["error"] == kind.__name__, (name, rank, record)
            assert re.search(pattern, record["message"]), (name, rank, record["message"])
        assert recs[0]["message"] == recs[1]["message"], name
