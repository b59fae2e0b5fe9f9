"""The Lookahead variants and decentralized schedules through the command line (``python -m
launch``): every registered topology runs, ``launch=serial`` equals ``launch=colocated`` for the
variants with a serial reference, torchrun equals co-located, push-sum metrics are de-biased, and
bad variant configurations are one line with status 2.

In-process calls of :func:`launch.cli.app.run` (as tests/test_app.py does for configuration checks),
except one torchrun run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from launch.cli import app
from launch.cli.build import build_job
from launch.engine.record.metrics import MetricsProbe, read_metrics
from launch.cli.runs import open_simulation_run
from tests import plant
from tests.spawn import ROOT, run_torchrun

TOL = 1e-12
CONF = Path(__file__).resolve().parent.parent / "launch" / "cli" / "conf" / "topology"
NEW_TOPOLOGIES = ["nested", "with_slow_agent", "stagewise", "phases", "ring", "torus", "exponential", "one_peer_exponential",
                  "push_sum_random", "local_sgd", "hierarchical", "lookahead_local_sgd", "multilayer_local_sgd"]
# Small, fast runs: float64 teacher-student (the default problem), 12 steps, every step logged.
FAST = ["problem.dim=4", "problem.hidden=4", "launch.log_every=1"]


def config(*overrides):
    with initialize_config_module(config_module="launch.cli.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_every_topology_config_is_tested():
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == sorted(NEW_TOPOLOGIES + ["lookahead", "multilayer", "matrices"])


@pytest.mark.parametrize("name", NEW_TOPOLOGIES)
def test_topology_runs_colocated_through_the_app(name, tmp_path):
    assert app.run(config(f"topology={name}", "launch.steps=12", *FAST), tmp_path) == 0
    rows = read_metrics(tmp_path / "metrics.csv")
    job = build_job(config(f"topology={name}", "launch.steps=12", *FAST))
    m = job.schedule.num_agents
    assert [r["agent"] for r in rows if r["step"] == 12] == list(range(m))
    assert all(math.isfinite(r["loss"]) for r in rows if r["agent"] in job.schedule.workers)
    summary = (tmp_path / "summary.txt").read_text()
    assert "status=ok" in summary and "spectral_gap=" in summary
    states = torch.load(tmp_path / "agents.pt")
    assert len(states) == m


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in state.values()])


def assert_agents_equal(path, reference_path):
    got, want = torch.load(path), torch.load(reference_path)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert all(v.dtype == torch.float64 for v in a.values())
        deviation = float((_flat(a) - _flat(b)).abs().max() / _flat(b).abs().max())
        assert deviation <= TOL, (i, deviation)


VARIANTS = {
    # nested Lookahead with a per-level momentum policy (pullback at the inner sync only)
    "nested_pullback_inner": ["topology=nested", "topology.k=3", "topology.s=2", "agents=sgd_momentum",
                              "agents.state_policy=pullback_inner"],
    "nested_per_level_list": ["topology=nested", "topology.k=2", "topology.s=3", "agents=adam",
                              "agents.optimizer.lr=0.01", "agents.state_policy=[reset,pullback]"],
    # outer SGD with lr alpha, no momentum: Lookahead
    "outer_sgd": ["topology=lookahead", "topology.k=3", "agents.outer={name:sgd,lr:0.5}"],
    # SlowMo: outer SGD with momentum; DiLoCo: nesterov
    "slowmo": ["topology=lookahead", "topology.k=3", "agents=sgd_momentum",
               "agents.outer={name:sgd,lr:0.7,momentum:0.9}", "agents.state_policy=pullback"],
    "diloco": ["topology=lookahead", "topology.k=3", "agents.outer={name:sgd,lr:0.7,momentum:0.9,nesterov:true}"],
    "adaptive": ["topology=lookahead", "topology.k=3", "agents=adam", "agents.optimizer.lr=0.01",
                 "agents.outer={name:adaptive,alpha_low:0.2}"],
    "slrla": ["topology=stagewise", "agents=sgd_momentum", "agents.state_policy=pullback",
              "topology.stages=[{steps:6,lr:0.05,alpha:0.5,k:3,beta:0.1},{steps:8,lr:0.02,alpha:0.8,k:2,beta:0.5}]"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_serial_launch_equals_colocated(variant, tmp_path):
    overrides = [*VARIANTS[variant], "launch.steps=14", *FAST]
    assert app.run(config(*overrides, "launch=colocated"), tmp_path / "colocated") == 0
    assert app.run(config(*overrides, "launch=serial"), tmp_path / "serial") == 0
    assert_agents_equal(tmp_path / "serial" / "agents.pt", tmp_path / "colocated" / "agents.pt")
    # the variant did something: the agents moved from theta_0 and differ from plain Lookahead
    states = torch.load(tmp_path / "colocated" / "agents.pt")
    assert not torch.equal(_flat(states[0]), _flat(states[-1])) or variant == "slrla"


def test_colocated_check_against_the_serial_reference_covers_variants(tmp_path, capsys, monkeypatch):
    """launch.check_reference (co-located vs serial at every step) passes for SLRLA and fails
    when a deviation is planted."""
    overrides = [*VARIANTS["slrla"], "launch.steps=14", *FAST]
    assert app.run(config(*overrides), tmp_path / "ok") == 0
    assert "max_deviation=" in (tmp_path / "ok" / "summary.txt").read_text()
    plant.install(dict(run="colocated", agent=1, step=7, size=1e-6), monkeypatch.setattr)
    assert app.run(config(*overrides), tmp_path / "bad") == 1


def test_torchrun_three_processes_slowmo_equals_colocated(tmp_path):
    """SlowMo with two workers around a slow agent (no serial reference), 3 processes (gloo)."""
    overrides = ["topology=with_slow_agent", "topology.num_workers=2", "topology.k=3", "agents=sgd_momentum",
                 "agents.outer={name:sgd,lr:0.7,momentum:0.9}", "agents.state_policy=pullback",
                 "launch.steps=10", *FAST]
    assert app.run(config(*overrides), tmp_path / "colocated") == 0
    code, output = run_torchrun(3, ["-m", "launch", *overrides, "launch=torch", "launch.dtype=float64",
                                    f"hydra.run.dir={tmp_path / 'torch'}"], cwd=ROOT)
    assert code == 0, output
    assert_agents_equal(tmp_path / "torch" / "agents.pt", tmp_path / "colocated" / "agents.pt")


def test_push_sum_distance_to_virtual_uses_debiased_models(tmp_path):
    """metrics.csv's distance to the virtual iterate of push-sum agents is ||x_i / w_i - mean_j x_j||, measured
    here from the simulation's agents; the raw ||x_i - mean_j x_j|| differs (w_i != 1)."""
    overrides = ["topology=push_sum_random", "launch.steps=7", *FAST]
    assert app.run(config(*overrides), tmp_path) == 0
    logged = [r["distance_to_virtual"] for r in read_metrics(tmp_path / "metrics.csv") if r["step"] == 7]

    job = build_job(config(*overrides))
    run = open_simulation_run(job, None, job.model(), "colocated")
    agents = run.simulation.agents

    def distances(losses):   # the logged step's row is taken before its sync (launch.engine.record.metrics)
        weights = [float(agents[i].push_weight) for i in sorted(agents)]
        assert max(abs(w - 1.0) for w in weights) > 1e-3          # the weights are not trivial
        theta = torch.stack([agents[i].params for i in sorted(agents)]).mean(0)
        found["debiased"] = [float((agents[i].params / agents[i].push_weight - theta).norm()) for i in sorted(agents)]
        found["raw"] = [float((agents[i].params - theta).norm()) for i in sorted(agents)]
        found["rows"] = MetricsProbe(run, None, job.schedule).measure(losses)   # the probe, from the run

    found = {}
    for t in range(7):
        run.step(distances if t == 6 else None)
    assert logged == pytest.approx(found["debiased"], rel=1e-9, abs=1e-15)
    assert logged != pytest.approx(found["raw"], rel=1e-3)
    assert [r["distance_to_virtual"] for r in found["rows"]] == pytest.approx(found["debiased"], rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("overrides, words", [
    (["topology=nested", "agents.state_policy=pullback_middle"], "agents.state_policy must be"),
    (["topology=lookahead", "agents.state_policy=[reset,pullback]"], "agents.state_policy must hold 1 per-level policies"),
    (["topology=ring", "agents.state_policy=pullback_inner"], "agents.state_policy='pullback_inner' names levels"),
    (["topology=nested", "agents.state_policy={3:reset}"], "agents.state_policy levels must be ints in 1..2"),
    (["agents.outer={name:adam,lr:0.1}"], "agents.outer.name must be one of sgd, adaptive"),
    (["agents.outer={name:sgd}"], "agents.outer.lr must be set"),
    (["agents.outer={name:sgd,lr:0.5,beta:0.9}"], "agents.outer has key(s) ['beta']"),
    (["agents.outer={name:sgd,lr:0.5,nesterov:true}"], "agents.outer: torch.optim.SGD refuses"),
    (["agents.outer={name:adaptive,alpha_low:1.5}"], "agents.outer.alpha_low"),
    (["topology=lookahead", "agents.outer={name:adaptive}"], "exp_avg_sq"),             # SGD has no F
    (["topology=multilayer", "agents.outer={name:sgd,lr:0.5}"], "agents.outer needs a topology with exactly one slow"),
    (["topology=lookahead", "agents.outer={name:adaptive}", "launch=serial"], "agents.outer={name: adaptive}: adaptive alpha needs"),
    (["topology=lookahead_local_sgd", "agents.outer={name:sgd,lr:0.5}", "launch=serial"], "has no serial reference"),
    (["topology=ring", "launch=serial"], "has no serial reference"),
    (["topology=stagewise", "launch.steps=601"], "launch.steps must be at most the stages' total number of steps (600)"),
    (["topology=stagewise", "topology.stages=[{steps:5,lr:0.1,alpha:0.5,k:2,beta:0}]"], "steps must be a multiple of k"),
    (["topology=stagewise", "topology.stages=[{steps:4,lr:0.1,k:2,beta:0}]"], "missing ['alpha']"),
    (["topology=stagewise", "agents.outer={name:sgd,lr:0.5}"], "agents.outer must be null with topology=stagewise"),
    (["topology=nested", "topology.h=2.0"], "h"),
    (["topology=with_slow_agent", "topology.num_workers=0"], "num_workers"),
    (["topology=ring", "+topology.rows=2"], "topology has option(s) ['rows']"),
])
def test_bad_variant_configuration_is_one_line_and_status_2(tmp_path, capsys, overrides, words):
    steps = [] if any(o.startswith("launch.steps=") for o in overrides) else ["launch.steps=4"]
    assert app.run(config(*overrides, *steps, *FAST), tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error [rank 0]: ") and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "agents.pt").exists()
