"""Phased schedules and absurd periods on ranks: phased Lookahead and phased LA-n on gloo and MPI
ranks (overlapped or not) follow the co-located run step by step -- bit for bit where every sum
has two terms, to 1e-12 in float64 otherwise -- a NaN planted in a phased run stops every rank
at the sync its phase's windows say (launch.engine.guard.windows), and periods of 10^21 start at
once on 2 ranks and under the command line (co-located, and a phased run under torchrun against
the co-located one).

Each launcher and world size is one spawn of tests/finiteness_worker.py running every case."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from launch.comm.local import LocalCommunicator
from launch.engine.record.metrics import read_metrics
from tests.finiteness_worker import run_case
from tests.spawn import ROOT, run_command, run_torchrun
from tests.test_finiteness_dist import check_raised, run

BIG = 10 ** 21
STEPS = 18


def la(k, alpha):
    return ["multilayer", [k], [alpha]]


# LA-1, k = 3 for 7 steps, then k = 2 from its own counter: syncs at 2, 5 | 8, 10, 12, ...
PHASED_LA1 = ["phases", [[7, la(3, 0.5)], [None, la(2, 0.6)]]]
# Two workers (agents 0, 1) averaged every 2 steps for 5 steps (their slow levels 2, 3 are never
# reached), then LA-2 (2, 3) over them from t = 5: level 1 at 6, 8, level 2 at 10, ...
WARMUP_LA2 = ["phases", [[5, ["multilayer_local_sgd", 2, [50, 2], [0.5, 0.5], {"2": 2}]],
                         [None, ["multilayer_local_sgd", 2, [2, 3], [0.5, 0.6]]]]]
# LA-1 for 7 steps (level 2 never reached), then LA-2 (2, 3).
LA1_LA2 = ["phases", [[7, ["multilayer", [3, 100], [0.5, 0.5]]], [None, ["multilayer", [2, 3], [0.5, 0.6]]]]]
# LA-2 (3, 2) for 10 steps -- its level-1 sync at t = 8 is cut off from its window -- then LA-2
# (2, 3): that sync joins the first window of the second phase, decided at t = 15.
LA2_LA2 = ["phases", [[10, ["multilayer", [3, 2], [0.5, 0.6]]], [None, ["multilayer", [2, 3], [0.5, 0.6]]]]]

HUGE = {     # 2 ranks; (schedule, agents per rank)
    "lookahead": (la(BIG, 0.5), 1),
    "multilayer": (["multilayer", [10 ** 9] * 3, [0.5] * 3], 2),
    "local_sgd": (["local_sgd", 2, BIG], 1),
    "ring": (["ring", 4, "metropolis", BIG], 2),
    "with_slow_agent": (["with_slow_agent", 3, BIG, 0.5], 2),
    "lookahead_local_sgd": (["lookahead_local_sgd", 3, BIG, 0.5], 2),
    "phases": (["phases", [[BIG, la(BIG, 0.5)], [None, la(3, 0.5)]]], 1),
}


def equivalence_cases(name, schedule, agents_per_rank):
    base = dict(schedule=schedule, steps=STEPS, optimizer="sgd_momentum", trajectory=True,
                agents_per_rank=agents_per_rank)
    return {f"{name}-plain": base, f"{name}-overlap": dict(base, overlap=True)}


def plant_cases(name, schedule, agents_per_rank, plants):
    base = dict(schedule=schedule, steps=STEPS, agents_per_rank=agents_per_rank)
    return {f"{name}-{kind}{agent}@{t}{'-overlap' if overlap else ''}":
            dict(base, overlap=overlap, plant=dict(kind=kind, agent=agent, t=t))
            for kind, agent, t in plants for overlap in (False, True)}


# (kind, agent, t) -> (found, stopped), by the windows of each phase.  A worker is poisoned after
# its loss of t, at a sync (else its next losses would be found too).
PLANTS_LA1 = {("param", 1, 6): (8, 8), ("param", 0, 5): (5, 5), ("loss", 0, 9): (10, 10)}
PLANTS_WARMUP = {("param", 1, 3): (3, 10), ("param", 3, 4): (10, 10)}
PLANTS_LA2_LA2 = {("param", 0, 8): (8, 15), ("param", 2, 3): (5, 5), ("loss", 0, 12): (13, 15)}


def two_rank_cases():
    cases = {**equivalence_cases("la1", PHASED_LA1, 1), **equivalence_cases("warmup", WARMUP_LA2, 2)}
    cases.update(plant_cases("la1", PHASED_LA1, 1, PLANTS_LA1))
    cases.update(plant_cases("warmup", WARMUP_LA2, 2, PLANTS_WARMUP))
    for name, (schedule, per_rank) in HUGE.items():
        cases[f"huge-{name}"] = dict(schedule=schedule, steps=4, agents_per_rank=per_rank, trajectory=True,
                                     overlap="auto")
    return cases


def three_rank_cases():
    cases = {**equivalence_cases("la1la2", LA1_LA2, 1), **equivalence_cases("la2la2", LA2_LA2, 1)}
    cases.update(plant_cases("la2la2", LA2_LA2, 1, PLANTS_LA2_LA2))
    return cases


def colocated(case):
    """The co-located run of ``case``: every agent in this process."""
    case = {key: value for key, value in case.items() if key != "agents_per_rank"}
    return run_case(case, LocalCommunicator())


def check_equivalent(ranks, cases, name, exact):
    """Every agent of every rank, after every step, against the co-located run: bit for bit
    (``exact``) or to 1e-12 relative to the largest entry."""
    want = colocated(cases[name])["trajectory"]
    assert len(want) == cases[name]["steps"]
    for rank, results in enumerate(ranks):
        got = results[name]
        assert got["error"] is None and len(got["trajectory"]) == len(want), (name, rank)
        for t, (step, reference) in enumerate(zip(got["trajectory"], want)):
            for i, buffer in step.items():
                if exact:
                    assert torch.equal(buffer, reference[i]), (name, rank, t, i)
                else:
                    scale = float(reference[i].abs().max())
                    assert float((buffer - reference[i]).abs().max()) <= 1e-12 * scale, (name, rank, t, i)


def check_plants(ranks, name, plants):
    for (kind, agent, t), (found, stopped) in plants.items():
        named = dict(losses=[agent]) if kind == "loss" else dict(parameters=[agent])
        for overlap in ("", "-overlap"):
            check_raised(ranks, f"{name}-{kind}{agent}@{t}{overlap}", found, stopped, **named)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """``spawned(backend, nprocs)``: (cases, every rank's results), each launcher and world size
    spawned once for the whole module."""
    cache = {}

    def get(backend, nprocs):
        if (backend, nprocs) not in cache:
            cases = two_rank_cases() if nprocs == 2 else three_rank_cases()
            cache[backend, nprocs] = cases, run(backend, nprocs, cases, tmp_path_factory.mktemp(f"{backend}{nprocs}"), 120)
        return cache[backend, nprocs]

    return get


BACKENDS = pytest.mark.parametrize("backend", ["torch", "mpi"], ids=["gloo", "mpi"])


@BACKENDS
def test_phased_lookahead_on_two_ranks_equals_colocated(spawned, backend):
    cases, ranks = spawned(backend, 2)
    for mode in ("plain", "overlap"):
        check_equivalent(ranks, cases, f"la1-{mode}", exact=True)
        check_equivalent(ranks, cases, f"warmup-{mode}", exact=False)
    # The overlap ran: the passive agent's part travelled as a reduce to the hub.
    assert sum(c[2] for c in ranks[1]["la1-overlap"]["counts"]) > 0


def test_phased_la2_on_three_gloo_ranks_equals_colocated_and_stops_at_a_nan(spawned):
    """LA-1 then LA-2, and LA-2 whose cut-off sync joins the next phase's window (on MPI, the
    two-rank cases cover phased LA-2)."""
    cases, ranks = spawned("torch", 3)
    for name in ("la1la2", "la2la2"):
        for mode in ("plain", "overlap"):
            check_equivalent(ranks, cases, f"{name}-{mode}", exact=False)
    check_plants(ranks, "la2la2", PLANTS_LA2_LA2)


@BACKENDS
def test_a_nan_in_a_phased_run_stops_every_rank_where_its_phase_says(spawned, backend):
    check_plants(spawned(backend, 2)[1], "la1", PLANTS_LA1)
    check_plants(spawned(backend, 2)[1], "warmup", PLANTS_WARMUP)


@BACKENDS
def test_periods_of_1e21_start_at_once_on_two_ranks(spawned, backend):
    """Every family of absurd period starts and runs its steps (bounded by the spawn's timeout)."""
    cases, ranks = spawned(backend, 2)
    for name in HUGE:
        check_equivalent(ranks, cases, f"huge-{name}", exact=False)


# ----------------------------------------------------------------- the command line
PHASED_CLI = ["topology=phases", "topology.phases=[{steps: 7, topology: {name: lookahead, k: 3, alpha: 0.5}}, "
              f"{{steps: {BIG}, topology: {{name: lookahead, k: {BIG}, alpha: 0.6}}}}, "
              "{steps: null, topology: {name: lookahead, k: 2, alpha: 0.5}}]"]
CLI_HUGE = [
    PHASED_CLI,
    ["topology=lookahead", f"topology.k={BIG}"],
    ["topology=multilayer", "topology.ks=[1000000000,1000000000,1000000000]", "topology.alphas=[0.5,0.5,0.5]"],
    ["topology=local_sgd", "topology.num_workers=2", f"topology.tau={BIG}"],
    ["topology=ring", f"topology.every={BIG}"],
    ["topology=nested", f"topology.k={BIG}"],
]
COMMON = ["launch.steps=8", "launch.dtype=float64", "launch.log_every=1"]

RUN_ALL = """
import sys
from hydra import compose, initialize_config_module
from launch.cli import app
for i, overrides in enumerate({configs!r}):
    with initialize_config_module(config_module="launch.cli.conf", version_base="1.3"):
        config = compose(config_name="config", overrides=overrides + {common!r})
    assert app.run(config, sys.argv[1] + f"/{{i}}") == 0, overrides
"""


def test_periods_of_1e21_and_phases_under_the_command_line(tmp_path):
    """Every family co-located (in one process), then the phased Lookahead (a phase of 10^21
    steps between two short ones) under torchrun on 2 processes, overlapped: the same agents
    and metrics bit for bit (every sum has two terms)."""
    code, output = run_command([sys.executable, "-c", RUN_ALL.format(configs=CLI_HUGE, common=COMMON), tmp_path],
                               120, cwd=ROOT)
    assert code == 0, output
    assert output.count("status=ok") == len(CLI_HUGE), output
    out = tmp_path / "torchrun"
    code, output = run_torchrun(2, ["-m", "launch", *PHASED_CLI, *COMMON, "launch=torch", "launch.overlap=true",
                                    f"hydra.run.dir={out}"], cwd=ROOT)
    assert code == 0, output
    assert "launch=torch processes=2" in output and "status=ok" in output
    got, want = torch.load(out / "agents.pt"), torch.load(tmp_path / "0" / "agents.pt")
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    rows, reference = read_metrics(out / "metrics.csv"), read_metrics(tmp_path / "0" / "metrics.csv")
    assert len(rows) == len(reference) == 8 * 2
    for row, want in zip(rows, reference):
        for key in ("step", "agent", "loss", "grad_norm", "distance_to_virtual"):
            assert row[key] == want[key] or math.isnan(row[key]) and math.isnan(want[key]), (key, row, want)
