"""Reliability of the newer surfaces: each case below was silently wrong, or a traceback, before.

Every case runs in this process (the command line through :func:`launch.cli.app.run` or its
entry point :func:`launch.cli.app.main`, the own loop directly); the cases that need several
ranks are in tests/test_own_loop_distributed.py (the start-up agreement).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

import topology
from launch import AgentOptimizer, Checkpointer, Simulation
from launch.cli import app
from launch.cli.resume import config_key
from launch.engine.record.evaluation import read_eval
from tests import problems
from tests.test_app import config

BASE = ("topology=lookahead", "topology.k=3", "launch.check_reference=false", "problem.dim=4", "problem.hidden=4")


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error [rank 0]: ")]
    assert len(lines) == 1, err
    return lines[0]


# -- results kept and verdicts told ------------------------------------------------------------------
def test_eval_csv_keeps_its_history_on_a_resume(tmp_path):
    """Resumed into the same run directory, eval.csv keeps the rows up to the checkpoint's t (it
    was rewritten with the steps after it only) and the rows after it are the uninterrupted run's."""
    ckpt = tmp_path / "ckpt"
    common = (*BASE, "launch.eval_every=2", f"launch.checkpoint_dir={ckpt}")
    assert app.run(config(*common, "launch.steps=12"), tmp_path / "whole") == 0
    assert app.run(config(*common, "launch.steps=6", "launch.checkpoint_every=3"), tmp_path / "run") == 0
    assert app.run(config(*common, "launch.steps=12", "launch.resume=true"), tmp_path / "run") == 0
    resumed = read_eval(tmp_path / "run" / "eval.csv")
    whole = read_eval(tmp_path / "whole" / "eval.csv")
    assert sorted({r["step"] for r in resumed}) == sorted({r["step"] for r in whole}) == [2, 3, 4, 6, 8, 9, 10, 12]
    assert [(r["step"], r["agent"]) for r in resumed] == [(r["step"], r["agent"]) for r in whole]
    for a, b in zip(resumed, whole):
        assert a["heldout_loss"] == pytest.approx(b["heldout_loss"], rel=1e-12, nan_ok=True)


def test_a_non_finite_held_out_loss_fails_the_run(tmp_path):
    """lr 1e30 for 5 steps: the parameters stay finite (about 1e155), the held-out loss is not:
    the run is non_finite, exit 3 (it ended status=ok, exit 0)."""
    run = ("topology=lookahead", "launch.steps=5")   # the problem's default size, as reported
    assert app.run(config(*run, "agents.optimizer.lr=1e30"), tmp_path) == 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "FAILED" and summary["failure"] == "non_finite"
    assert "held-out metrics of agent(s) [0, 1]" in summary["failure_detail"]
    agents = torch.load(tmp_path / "agents.pt")
    assert all(torch.isfinite(v).all() for state in agents for v in state.values())   # the parameters are finite
    assert app.run(config(*run), tmp_path / "ok") == 0


# -- one line and exit 2, before anything is computed -------------------------------------------------
@pytest.mark.parametrize("overrides, words", [
    (("topology=local_sgd", "problem=digits_mlp", "+problem.num_workers=8"),
     "problem.num_workers=8 does not match the topology's 4 workers"),
    (("launch.cluster=nvlink_8", "launch.compute_s=1e308"), "launch.compute_s must be a finite real in [0, 86400]"),
    (("launch.resume_allow=[nonsense]",), "launch.resume_allow names 'nonsense'"),
    (("topology=multilayer", "topology.ks=five"), "ks must be a sequence of numbers, one per level; got the string"),
], ids=["num_workers", "compute_s", "resume_allow", "ks_string"])
def test_refused_in_one_line(tmp_path, capsys, overrides, words):
    assert app.run(config("launch.steps=3", *overrides), tmp_path) == 2
    assert words in one_line(capsys)
    assert not (tmp_path / "metrics.csv").exists()


def test_a_checkpoint_folder_that_cannot_be_written_is_refused_before_the_first_step(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert app.run(config(*BASE, "launch.steps=3", "launch.checkpoint_every=2",
                          f"launch.checkpoint_dir={blocker}"), tmp_path / "run") == 2
    assert f"the checkpoint folder {blocker} cannot be written" in one_line(capsys)
    assert not (tmp_path / "run" / "metrics.csv").exists() or len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) <= 1


def test_an_unwritable_run_directory_is_one_line(tmp_path, capsys, monkeypatch):
    """hydra makes the run directory before the app runs: that failure was a 57-line traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(sys, "argv", ["launch", f"hydra.run.dir={blocker / 'run'}", "launch.steps=3"])
    assert app.main() == 2
    assert "cannot write the run's files" in one_line(capsys)


# -- checkpoints of the Python API, in the command line's words ---------------------------------------
def test_a_python_api_checkpoint_names_configuration_keys(tmp_path):
    """A checkpoint written without a configuration record (the Python API) compared by a resume
    of the command line: the differences and the allowance are named as the command line's keys."""
    def sim(lr):
        return Simulation(problems.make_model(0), problems.loss_fn, problems.batches(1), topology.lookahead(3, 0.5),
                          lambda params: torch.optim.SGD(params, lr=lr))

    first = sim(0.1)
    first.run(3)
    Checkpointer(tmp_path).save(first)
    resumed = Checkpointer(tmp_path, config={"agents": {"optimizer": {"lr": 0.2}}}, key_name=config_key,
                           allow_option="launch.resume_allow")
    with pytest.raises(ValueError) as refused:
        resumed.load(sim(0.2))
    assert "agents.optimizer.lr is 0.2, the checkpoint's 0.1" in str(refused.value)
    assert "launch.resume_allow=[agents.optimizer.lr]" in str(refused.value)


# -- the own loop -----------------------------------------------------------------------------------
def own_loop(schedule, inner=torch.optim.SGD, **options):
    model = problems.make_model(0)
    return AgentOptimizer(inner(model.parameters(), lr=0.1), schedule, model=model, **options), model


def test_one_inner_optimizer_wrapped_twice_is_refused():
    model = problems.make_model(0)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    first = AgentOptimizer(inner, topology.lookahead(2, 0.5), model=model)
    with pytest.raises(ValueError, match="already wrapped by another AgentOptimizer that is not closed"):
        AgentOptimizer(inner, topology.lookahead(2, 0.5), model=model)
    first.close()
    AgentOptimizer(inner, topology.lookahead(2, 0.5), model=model).close()   # released by close()


@pytest.mark.parametrize("schedule, inner, words", [
    (topology.multilayer((5, 2), (0.5, 0.5)), torch.optim.SGD, "num_agents is 3 here, 2 in the state"),
    (topology.lookahead(5, 0.6), torch.optim.SGD, "alphas=(0.6,))' here, 'MultilayerSchedule(ks=(5,), alphas=(0.5,))'"),
    (topology.lookahead(4, 0.5), torch.optim.SGD, "schedule is 'MultilayerSchedule(ks=(4,)"),
    (topology.lookahead(5, 0.5), torch.optim.Adam, "optimizer is 'Adam' here, 'SGD' in the state"),
], ids=["LA-1 into LA-2", "alphas", "ks", "SGD into Adam"])
def test_load_state_dict_of_another_run_is_refused(schedule, inner, words):
    saved, model = own_loop(topology.lookahead(5, 0.5))
    x = torch.randn(8, 4, dtype=torch.float64)
    model(x).sum().backward()
    saved.step()
    state = saved.state_dict()
    saved.close()
    fresh, _ = own_loop(schedule, inner)
    with pytest.raises(ValueError, match="the state was saved by another run") as refused:
        fresh.load_state_dict(state)
    assert words in str(refused.value)
    if inner is torch.optim.Adam:   # the class explains its hyperparameters: they are not listed
        assert "optimizer.betas" not in str(refused.value)
    same, _ = own_loop(topology.lookahead(5, 0.5))
    same.load_state_dict(state)
    assert same.t == 1
