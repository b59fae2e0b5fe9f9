"""The exact mode end to end (``Simulation(exact=True)``, ``launch.exact``): real training of an
MLP on the digits, 300 iterations in float32, on 3 and 4 gloo processes and 3 MPI processes, one
and two agents per rank, equals the same training co-located bit for bit after every iteration,
on every agent, for every schedule family; without the mode the same runs differ, by more at the
end than after 30 iterations.  The command-line check (``python -m launch.equivalence``) uses the
mode by default and requires 0 deviation between the distributed and co-located runs."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.exact_cases import make_schedule
from tests.spawn import ROOT, mpiexec, run_command, run_job, run_torchrun

WORKER = ROOT / "tests" / "exact_worker.py"
STEPS = 300
LA2 = ["multilayer", [5, 2], [0.5, 0.6]]
LA3 = ["multilayer", [3, 2, 2], [0.5, 0.6, 0.7]]


def cases_for(n: int, backend: str) -> dict:
    """Every family on ``n`` ranks; ``default``: also run without the mode, where a sum has three
    terms or more across ranks (there it must differ)."""
    base = dict(dtype="float32", steps=STEPS)
    if n == 3:
        cases = {
            "la2": dict(base, schedule=LA2, default=True),                    # overlapped: the ordered hub
            "la2-no-overlap": dict(base, schedule=LA2, overlap=False, default=True),   # a chain
            "la2-adam-pullback": dict(base, schedule=LA2, optimizer="adam", policy="pullback", overlap=False,
                                      default=True),                          # the mixed optimizer state
            "local3": dict(base, schedule=["local_sgd", 3, 4], default=True),
            "la-over-local": dict(base, schedule=["lookahead_local_sgd", 2, 2, 0.5, {1: 2}], default=True),
            "outer": dict(base, schedule=["with_slow_agent", 2, 4, 0.5], outer=0.9),
            "ring3": dict(base, schedule=["ring", 3]),
            "pushsum3": dict(base, schedule=["push_sum_random", 3, 1]),
            "la2-float64": dict(base, schedule=LA2, dtype="float64", overlap=False, steps=100),
        }
        if backend == "torch":
            cases["local3-bfloat16"] = dict(base, schedule=["local_sgd", 3, 4], dtype="bfloat16", steps=100)
        if backend == "mpi":     # the MPI job is the quickest third: its families' main paths
            cases = {k: cases[k] for k in ("la2", "la2-no-overlap", "local3", "la-over-local", "ring3")}
        return cases
    return {
        "la3": dict(base, schedule=LA3, default=True),
        "la3-no-overlap": dict(base, schedule=LA3, overlap=False, default=True),
        "local4": dict(base, schedule=["local_sgd", 4, 4], default=True),
        "hierarchical": dict(base, schedule=["hierarchical", 4, {"2": 2, "6": 4}], default=True),
        "local8-two-per-rank": dict(base, schedule=["local_sgd", 8, 4], agents_per_rank=2, default=True),
        "outer3": dict(base, schedule=["with_slow_agent", 3, 4, 0.5], outer=0.9, default=True),
    }


def run(backend: str, nprocs: int, tmp_path) -> tuple[dict, list[dict]]:
    cases = cases_for(nprocs, backend)
    run_job(backend, nprocs, dict(backend=backend, out=str(tmp_path), cases=cases, timeout_s=60, training=True), WORKER,
            600)
    return cases, [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nprocs)]


def check(cases: dict, ranks: list[dict], every_default_differs: bool = True) -> None:
    """Exact: no (iteration, agent) pair differs, on any rank, in any case, every agent compared.
    Default: differs and grows, in every case that runs it (``every_default_differs`` False:
    MPICH's all-reduce on 3 ranks happens to add one term per rank in rank order, so there only
    some must)."""
    differed = []
    for name, case in cases.items():
        results = [r[name] for r in ranks]
        agents = sorted(i for r in results for i in r["agents"])
        assert agents == list(range(make_schedule(case["schedule"]).num_agents)), name    # every agent, once
        for result in results:
            assert result["steps"] == case["steps"] and result["mismatches"]["exact"] == 0, (name, result)
        if case.get("default"):
            if sum(r["mismatches"]["default"] for r in results) == 0 and not every_default_differs:
                continue
            assert sum(r["mismatches"]["default"] for r in results) > 0, (name, results[0])
            early, last = max(r["deviations"] for r in results)
            assert last > early > 0, (name, early, last)        # rounding grows in training
            differed.append(name)
    assert differed


def test_three_gloo_processes(tmp_path):
    cases, ranks = run("torch", 3, tmp_path)
    check(cases, ranks)
    strategies = {s for r in ranks for s in r["la2"]["strategies"]}
    assert strategies == {"OrderedHubBlock"}
    assert {s for r in ranks for s in r["la2-no-overlap"]["strategies"]} == {"AllReduceBlock", "ChainBlock"}


def test_four_gloo_processes_and_two_agents_per_rank(tmp_path):
    cases, ranks = run("torch", 4, tmp_path)
    check(cases, ranks)
    assert [len(r["local8-two-per-rank"]["agents"]) for r in ranks] == [2, 2, 2, 2]


@pytest.mark.skipif(mpiexec() is None, reason="mpiexec is not installed")
def test_three_mpi_processes(tmp_path):
    cases, ranks = run("mpi", 3, tmp_path)
    check(cases, ranks, every_default_differs=False)
    assert {s for r in ranks for s in r["la2-no-overlap"]["strategies"]} == {"AllReduceBlock", "GatherBlock"}


def test_the_own_loop_cnn_on_three_torchrun_processes_equals_its_colocated_run():
    """experiments/exact_own_loop.py: a CNN with BatchNorm and dropout, AdamW + OneCycleLR,
    clipping, two micro-batches, bfloat16 autocast, LA-2 through AgentOptimizer, 126 steps in
    float32: under torchrun on 3 processes with exact=True, every agent's parameters and the
    BatchNorm statistics equal the co-located run's bit for bit; without it they differ."""
    code, output = run_command([sys.executable, "-m", "experiments.exact_own_loop", "--json"], 600, cwd=ROOT)
    assert code == 0, output
    rows = json.loads(output.strip().splitlines()[-1])["rows"]
    assert rows["exact"] == {"parameters": 0.0, "identical": True, "batchnorm": 0.0, "predictions": 0}, rows
    assert rows["default"]["parameters"] > 0 and not rows["default"]["identical"], rows


def test_the_equivalence_command_requires_zero_deviation_under_torchrun(tmp_path):
    """``python -m launch.equivalence`` on 3 torchrun processes, float32, 300 steps: exact by
    default, and the distributed run then equals the co-located one (every deviation 0, its
    tolerance 0); with ``launch.exact=false`` the same runs differ by rounding (within float32's
    tolerance)."""
    columns = {}
    for exact in ("null", "false"):
        out = tmp_path / exact
        code, output = run_torchrun(3, ["-m", "launch.equivalence", "launch=torch", "launch.steps=300",
                                        f"launch.exact={exact}", f"hydra.run.dir={out}"], 300, cwd=ROOT)
        assert code == 0, output
        lines = (out / "equivalence.txt").read_text().splitlines()
        assert lines[2].split()[-3:] == ["torch", "vs", "colocated"], lines      # the last column
        columns[exact] = [float(line.split()[-1]) for line in lines[3:6]]
        if exact == "null":
            assert ", exact" in lines[0] and "tolerance 0 (bit for bit, launch.exact)" in lines[-1], lines
    assert columns["null"] == [0.0, 0.0, 0.0]
    assert all(v > 0 for v in columns["false"]), columns


def test_the_equivalence_command_asks_for_deterministic_kernels_on_cuda_in_the_exact_mode(monkeypatch):
    """On CUDA the model's kernels must be deterministic too: the exact check sets PyTorch's
    deterministic algorithms, cuDNN without benchmarking, cuBLAS's workspace; never on the CPU or
    without the mode (a CUDA machine faked: the calls are recorded, not made)."""
    from types import SimpleNamespace

    import torch

    from launch.cli import equivalence

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on: calls.append(on))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    job = lambda exact, device: SimpleNamespace(launch=SimpleNamespace(exact=exact, device=device))  # noqa: E731
    assert not equivalence.deterministic_kernels(job(True, "cpu"))
    assert not equivalence.deterministic_kernels(job(False, "cuda:0"))
    assert calls == [] and torch.backends.cudnn.benchmark
    assert equivalence.deterministic_kernels(job(True, "cuda:1"))
    assert calls == [True] and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
