"""``python -m launch`` (the hydra app) and ``python -m launch.equivalence``.

The commands run as users run them: in subprocesses (torchrun and mpiexec for the distributed
launches), bounded in time, with hydra's run directory under pytest's tmp_path.  Configuration
checks that need no process of their own call :func:`launch.cli.app.run` on a composed config.
"""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch
from hydra import compose, initialize_config_module

import topology
from launch.cli import app, equivalence
from launch.engine.record.metrics import COLUMNS, read_metrics
from tests import plant
from tests.spawn import ROOT, run_command, run_mpiexec, run_torchrun

TOL = 1e-12
# LA-2 with Adam and pullback, 33 steps: the last step is not a sync, so the agents differ there.
LA2 = ["topology=multilayer", "topology.ks=[3,2]", "topology.alphas=[0.5,0.6]", "agents=adam",
       "agents.optimizer.lr=0.01", "agents.state_policy=pullback", "launch.steps=34", "launch.log_every=1"]
STEPS, AGENTS = 34, 3


def config(*overrides):
    with initialize_config_module(config_module="launch.cli.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def launch(*args, timeout=120):
    return run_command([sys.executable, "-m", "launch", *args], timeout, cwd=ROOT)


def flat(state: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in state.values()])


def assert_agents_equal(path, reference_path):
    got, want = torch.load(path), torch.load(reference_path)
    assert len(got) == len(want) == AGENTS
    for i, (a, b) in enumerate(zip(got, want)):
        assert list(a) == list(b), i
        assert all(v.dtype == torch.float64 for v in a.values())
        deviation = float((flat(a) - flat(b)).abs().max() / flat(b).abs().max())
        assert deviation <= TOL, (i, deviation)


def assert_metrics_equal(path, reference_path):
    """Same rows; loss, grad_norm and distance_to_virtual equal to TOL (relative to max(1, |v|))."""
    got, want = read_metrics(path), read_metrics(reference_path)
    assert [(r["step"], r["agent"]) for r in got] == [(r["step"], r["agent"]) for r in want]
    for a, b in zip(got, want):
        for key in ("loss", "grad_norm", "distance_to_virtual"):
            if math.isnan(b[key]):
                assert math.isnan(a[key]), (a, b)
            else:
                assert abs(a[key] - b[key]) <= TOL * max(1.0, abs(b[key])), (key, a, b)


@pytest.fixture(scope="module")
def colocated(tmp_path_factory):
    """The LA-2 configuration run co-located (checked against the serial reference)."""
    out = tmp_path_factory.mktemp("colocated")
    code, output = launch(*LA2, f"hydra.run.dir={out}")
    assert code == 0, output
    return out, output


def test_colocated_run_writes_outputs_and_passes_its_reference_check(colocated):
    out, output = colocated
    assert (out / ".hydra" / "config.yaml").exists()
    summary = (out / "summary.txt").read_text()
    assert summary.count("\n") == 1 and summary.startswith("summary: ") and "status=ok" in summary
    assert summary.strip() in output
    assert "max rel. deviation" in output


def test_metrics_csv_columns_rows_and_distance_to_virtual(colocated):
    out, _ = colocated
    with open(out / "metrics.csv") as f:
        assert tuple(f.readline().strip().split(",")) == COLUMNS
    rows = read_metrics(out / "metrics.csv")
    assert [(r["step"], r["agent"]) for r in rows] == [(s, i) for s in range(1, STEPS + 1) for i in range(AGENTS)]
    for r in rows:
        if r["agent"] == 0:   # the worker: loss and gradient norm of its inner step
            assert r["loss"] > 0 and r["grad_norm"] > 0
        else:                 # passive agents take no step
            assert math.isnan(r["loss"]) and math.isnan(r["grad_norm"])
    walls = [r["wall_time"] for r in rows]
    assert walls == sorted(walls) and walls[0] >= 0
    # Measured before the sync: at a sync of every level (step 6) the agents still differ (the
    # sync then makes them equal); at the last step (34, no sync) the distance to theta = X a is
    # ||x_i - X a||, recomputed here from agents.pt.
    a = topology.multilayer((3, 2), (0.5, 0.6)).consensus()
    columns = torch.stack([flat(state) for state in torch.load(out / "agents.pt")])
    scale = float(columns.abs().max())
    assert all(r["distance_to_virtual"] > 1e-4 * scale for r in rows if r["step"] == 6)
    theta = (a.unsqueeze(1) * columns).sum(0)
    last = [r for r in rows if r["step"] == STEPS]
    for i, r in enumerate(last):
        expected = float((columns[i] - theta).norm())
        assert expected > 1e-4
        assert abs(r["distance_to_virtual"] - expected) <= 1e-12 * scale, (i, r, expected)


def test_serial_launch_equals_colocated(colocated, tmp_path):
    out, _ = colocated
    assert app.run(config(*LA2, "launch=serial"), tmp_path) == 0
    assert_agents_equal(tmp_path / "agents.pt", out / "agents.pt")
    assert_metrics_equal(tmp_path / "metrics.csv", out / "metrics.csv")


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_torchrun_three_processes_equals_colocated(colocated, tmp_path, overlap):
    out, _ = colocated
    code, output = run_torchrun(3, ["-m", "launch", *LA2, "launch=torch", "launch.dtype=float64",
                                    f"launch.overlap={str(overlap).lower()}",
                                    f"hydra.run.dir={tmp_path}"], cwd=ROOT)
    assert code == 0, output
    assert output.count("summary: ") == 1 and "launch=torch processes=3" in output  # ranks 1, 2 quiet
    assert_agents_equal(tmp_path / "agents.pt", out / "agents.pt")
    assert_metrics_equal(tmp_path / "metrics.csv", out / "metrics.csv")


def test_mpiexec_three_processes_equals_colocated(colocated, tmp_path):
    out, _ = colocated
    code, output = run_mpiexec(3, [sys.executable, "-m", "launch", *LA2, "launch=mpi", f"hydra.run.dir={tmp_path}"],
                               cwd=ROOT)
    assert code == 0, output
    assert output.count("summary: ") == 1 and "launch=mpi processes=3" in output
    assert_agents_equal(tmp_path / "agents.pt", out / "agents.pt")
    assert_metrics_equal(tmp_path / "metrics.csv", out / "metrics.csv")


def test_world_size_mismatch_fails_on_every_rank_under_torchrun(tmp_path):
    code, output = run_torchrun(3, ["-m", "launch", "topology=lookahead", "launch=torch", "launch.steps=5",
                                    f"hydra.run.dir={tmp_path}"], timeout=90, cwd=ROOT)
    assert code != 0
    for rank in range(3):
        assert f"error [rank {rank}]: world size 3 does not fit the schedule's 2 agents" in output, output
    assert "start one of 1, 2 processes" in output
    assert not (tmp_path / "agents.pt").exists()


def test_default_command_checks_the_serial_reference(tmp_path):
    """``python -m launch`` with no override: LA-2 co-located, the deviation table, exit 0."""
    code, output = launch(f"hydra.run.dir={tmp_path}", timeout=180)
    assert code == 0, output
    assert "MultilayerSchedule(ks=(5, 2), alphas=(0.5, 0.5)), 600 steps, float64, co-located vs serial reference" in output
    table = output.split("co-located vs serial reference\n")[1].splitlines()
    assert table[0].split() == ["agent", "role", "held-out", "loss", "max", "rel.", "deviation"]
    for i, line in enumerate(table[1:4]):
        assert line.split()[0] == str(i)
        assert float(line.split()[-1]) <= TOL
    assert "status=ok" in output and "600/600" in output  # the progress bar reached the end


def test_planted_deviation_fails_the_reference_check(tmp_path, monkeypatch):
    plant.install(dict(run="colocated", agent=1, step=2, size=1e-9), monkeypatch.setattr)
    assert app.run(config(*LA2, "launch.steps=8"), tmp_path) == 1
    assert "FAILED" in (tmp_path / "summary.txt").read_text()


def test_multirun_sweep_makes_one_directory_per_value(tmp_path):
    code, output = launch("-m", "launch.steps=4", "launch.check_reference=false", "agents.optimizer.lr=0.01,0.1",
                          f"hydra.sweep.dir={tmp_path}")
    assert code == 0, output
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["0", "1"]
    for job, lr in (("0", "0.01"), ("1", "0.1")):
        assert f"lr: {lr}" in (tmp_path / job / ".hydra" / "config.yaml").read_text()
        assert (tmp_path / job / "summary.txt").exists() and (tmp_path / job / "metrics.csv").exists()
    first, second = (torch.load(tmp_path / job / "agents.pt") for job in ("0", "1"))
    assert not torch.equal(flat(first[0]), flat(second[0]))


# -- the equivalence command -------------------------------------------------------------------


def test_equivalence_passes_in_process_and_fails_when_planted(tmp_path, capsys, monkeypatch):
    assert equivalence.run(config(*LA2, "launch.steps=12"), tmp_path) == 0
    assert "PASS" in capsys.readouterr().out
    # The tolerance is the user's: below the float64 rounding the same runs fail.
    assert equivalence.run(config(*LA2, "launch.steps=12", "tolerance=1e-30"), tmp_path) == 1
    assert "FAIL" in capsys.readouterr().out
    plant.install(dict(run="colocated", agent=2, step=4, size=1e-10), monkeypatch.setattr)
    assert equivalence.run(config(*LA2, "launch.steps=12"), tmp_path) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "colocated vs serial" in out
    assert "FAIL" in (tmp_path / "equivalence.txt").read_text()


def test_equivalence_command_under_torchrun_fails_on_a_planted_deviation(tmp_path):
    """Three ranks: serial, co-located and torch runs side by side; agent 1 of the torch run is
    perturbed after step 4, so only the comparisons with the torch run fail, on every rank."""
    # The plant writes a slow agent between two syncs: overlapped syncs would not see it (their
    # timing contract, launch.engine.sync.overlap), so this run is not overlapped.
    spec = json.dumps(dict(run="torch", agent=1, step=4, size=1e-10))
    code, output = run_torchrun(3, [str(ROOT / "tests" / "plant.py"), spec, "launch.equivalence", *LA2, "launch.steps=12",
                                    "launch=torch", "launch.dtype=float64", "launch.overlap=false",
                                    f"hydra.run.dir={tmp_path}"], cwd=ROOT)
    assert code != 0, output
    assert "exitcode: 1" in output  # every rank: status 1, not a crash
    lines = (tmp_path / "equivalence.txt").read_text().splitlines()
    header = lines[2]
    assert re.split(r"\s{2,}", header.strip())[-3:] == ["colocated vs serial", "torch vs serial", "torch vs colocated"]
    for line in lines[3:6]:
        cells = [float(v) for v in line.split()[-3:]]
        assert cells[0] <= TOL                      # co-located still equals serial
        assert cells[1] > TOL and cells[2] > TOL    # the torch run deviates (1 first, then all)
    assert lines[-1].startswith("FAIL")


def test_equivalence_without_a_reference_and_without_processes_is_a_clear_error(tmp_path, capsys):
    assert equivalence.run(config("topology=matrices", "launch.steps=4"), tmp_path) == 2
    assert "nothing to compare" in capsys.readouterr().err


# -- configuration errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["launch=serial", "topology=matrices"], "has no serial reference"),
        (["agents.optimizer.name=sgdd"], "agents.optimizer.name must be a torch.optim optimizer"),
        (["+agents.optimizer.betas=[0.9,0.99]"], "agents.optimizer has option(s) ['betas']"),
        (["agents.optimizer.lr=-1"], "agents.optimizer: torch.optim.SGD refuses"),
        (["+problem.width=3"], "problem has option(s) ['width'] that problem 'teacher_student' does not take"),
        (["problem.name=nope"], "problem.name must be one of"),
        (["topology.name=nope"], "topology.name must be one of"),
        (["topology.ks=[5,0]"], "ks[1] must be an integer >= 1"),
        (["launch.dtype=float8"], "launch.dtype must be one of"),
        (["launch.steps=0"], "launch.steps must be an integer >= 1"),
        (["launch.device=tpu"], "launch.device must be cpu, cuda, cuda:N or auto"),
        (["agents.state_policy=keep"], "state_policy"),
        (["tolerance=-1"], "tolerance must be null (by dtype) or a number >= 0"),
        (["launch=torch"], "launch=torch must be started by torchrun"),
        (["launch.overlap=sometimes"], "launch.overlap must be true or false; got 'sometimes'"),
        (["launch.overlap=true", "topology=lookahead", "agents.outer={name:sgd,lr:0.5}"], "cannot be combined with agents.outer"),
        (["problem=cifar10_resnet18"], "problem.root must be set"),
    ],
)
def test_bad_configuration_is_one_clear_line_and_status_2(tmp_path, capsys, overrides, words):
    assert app.run(config(*overrides), tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error [rank 0]: ") and words in err, err
    assert not (tmp_path / "agents.pt").exists()


def test_topology_without_serial_reference_runs_colocated(tmp_path, capsys):
    """Local SGD (two workers, matrices): the reference check is skipped with a note, and the
    consensus distance is that of a = (1/2, 1/2)."""
    assert app.run(config("topology=matrices", "launch.steps=5"), tmp_path) == 0
    assert "no serial reference" in capsys.readouterr().err
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["agent"] for r in rows if r["step"] == 5] == [0, 1]
    assert all(r["loss"] > 0 for r in rows)              # both agents are workers
    for step in (4, 5):   # before an averaging sync (4) and after a step without one (5)
        pair = [r["distance_to_virtual"] for r in rows if r["step"] == step]
        assert pair[0] == pytest.approx(pair[1]) and pair[0] > 0


@pytest.mark.parametrize("path", sorted((ROOT / "launch" / "cli" / "conf" / "problem").glob("*.yaml")), ids=lambda p: p.stem)
def test_problem_configs_name_registered_problems_with_their_options(path):
    from experiments.problems import PROBLEMS
    from launch.cli.build import _parameters

    cfg = config(f"problem={path.stem}")
    if cfg.problem.name not in PROBLEMS:
        pytest.skip(f"problem {cfg.problem.name!r} is not registered on this branch yet")
    accepted = _parameters(PROBLEMS[cfg.problem.name])
    options = set(cfg.problem) - {"name"}
    assert accepted is None or options <= accepted, options - accepted


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    assert app.run(config("launch.device=cuda"), tmp_path) == 2
    assert "asks for CUDA, but no CUDA device is available" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_colocated_on_cuda_passes_its_reference_check(tmp_path):
    assert app.run(config(*LA2, "launch.device=cuda", "launch.steps=12"), tmp_path) == 0
    assert all(v.device.type == "cpu" for state in torch.load(tmp_path / "agents.pt") for v in state.values())


def test_problem_group_calls_any_registered_factory_with_its_options(tmp_path, monkeypatch):
    """A problem registered in experiments.problems.PROBLEMS runs from the command line: its
    options from the config, seed and dtype from launch (it takes no device)."""
    from experiments import problems

    calls = []

    def fake(dim, hidden, batch_size, noise, seed=0, dtype=torch.float64):
        calls.append(dict(dim=dim, hidden=hidden, batch_size=batch_size, noise=noise, seed=seed, dtype=dtype))
        return problems.teacher_student(dim=dim, hidden=hidden, batch_size=batch_size, noise=noise, seed=seed,
                                        dtype=dtype)

    monkeypatch.setitem(problems.PROBLEMS, "fake", fake)
    cfg = config("problem.name=fake", "problem.dim=5", "launch.seed=3", "launch.dtype=float32", "launch.steps=3")
    assert app.run(cfg, tmp_path) == 0
    assert calls == [dict(dim=5, hidden=32, batch_size=32, noise=0.1, seed=3, dtype=torch.float32)]
    state = torch.load(tmp_path / "agents.pt")[0]
    assert state["0.weight"].shape == (32, 5) and state["0.weight"].dtype == torch.float32
