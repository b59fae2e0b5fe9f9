"""summary.json: what the run was made of (optimizer, state policies, slow rule, final training
loss, versions, device), a status that agrees with the exit status, and no non-finite number
that stops it from being written.

In-process calls of :func:`launch.cli.app.run` (co-located, a few steps) and of the summary's
functions on real records.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from launch.cli import app
from launch.engine.record.metrics import read_metrics
from launch.engine.record.summary import device_record, git_commit, parse_summary_line, write_summary
from tests.spawn import ROOT
from tests.test_app import config

LA2_ADAM = ("topology=multilayer", "topology.ks=[3,2]", "agents=adam", "agents.optimizer.lr=0.01",
            "+agents.optimizer.weight_decay=0.001", "agents.state_policy=pullback_inner", "launch.steps=8")
SLOWMO = ("topology=lookahead", "agents.outer={name: sgd, lr: 0.5, momentum: 0.9}", "launch.steps=7",
          "launch.log_every=3")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("summary")
    for name, overrides in (("la2", LA2_ADAM), ("slowmo", SLOWMO)):
        assert app.run(config(*overrides), out / name) == 0
    return out


def record_of(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_optimizer_with_every_hyperparameter_and_state_policy_per_level(runs):
    record = record_of(runs / "la2")
    expected = torch.optim.Adam([torch.zeros(1)], lr=0.01, weight_decay=0.001).defaults
    assert record["optimizer"]["name"] == "Adam"
    hyper = record["optimizer"]["hyperparameters"]
    assert hyper["lr"] == 0.01 and hyper["weight_decay"] == 0.001 and hyper["betas"] == [0.9, 0.999]
    assert set(hyper) == set(expected)          # defaults the configuration did not give included
    assert record["state_policy"] == ["pullback", "maintain"]       # pullback_inner: level 1 only
    assert record["outer"] is None
    slowmo = record_of(runs / "slowmo")
    assert slowmo["state_policy"] == ["maintain"]                    # a schedule without levels
    assert slowmo["outer"] == {"name": "sgd", "lr": 0.5, "momentum": 0.9, "nesterov": False}
    assert slowmo["optimizer"]["hyperparameters"]["momentum"] == 0.9  # agents=sgd_momentum


def test_final_loss_is_the_last_logged_step_of_metrics_csv(runs):
    for name, last in (("la2", 8), ("slowmo", 7)):
        record = record_of(runs / name)
        rows = [r for r in read_metrics(runs / name / "metrics.csv") if r["step"] == last and r["agent"] == 0]
        assert record["final_loss"] == {"step": last, "mean": rows[0]["loss"], "per_worker": {"0": rows[0]["loss"]}}
        assert parse_summary_line((runs / name / "summary.txt").read_text())["final_loss"] == pytest.approx(
            rows[0]["loss"], rel=1e-5)


def test_versions_and_device(runs):
    record = record_of(runs / "la2")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    assert record["versions"] == {"python": ".".join(map(str, sys.version_info[:3])), "torch": torch.__version__,
                                  "lookahead_agents": "0.1.0",
                                  "git_commit": head.stdout.strip() + ("-dirty" if dirty else "")}
    assert (record["device"], record["device_name"]) == ("cpu", None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_is_named():
    assert device_record("cuda:0") == {"device": "cuda:0", "device_name": torch.cuda.get_device_name(0)}


def test_git_commit_clean_dirty_untracked_and_absent(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("1\n")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    sha = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == sha
    (tmp_path / "new.txt").write_text("untracked\n")
    assert git_commit(tmp_path) == sha                     # untracked files do not count
    (tmp_path / "a.txt").write_text("2\n")
    assert git_commit(tmp_path) == sha + "-dirty"
    (tmp_path / "sub").mkdir()
    assert git_commit(tmp_path / "sub") is None            # not the top of the checkout
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert git_commit(tmp_path) is None                    # no git


def test_non_finite_figures_never_stop_the_summary(runs, tmp_path):
    """A record holding inf / nan at any depth (as a cluster clock overflowing with a huge
    launch.compute_s gives) is written: null in summary.json, inf / nan in summary.txt."""
    record = record_of(runs / "la2")
    record.update(sim_time_s=math.inf, sim_time_per_step_s=-math.inf, compute_s=1e308)
    record["final_loss"]["per_worker"]["0"] = math.nan
    record["heldout"]["loss"][1] = math.inf
    line = write_summary(tmp_path, record)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["sim_time_s"] is None and written["sim_time_per_step_s"] is None and written["compute_s"] == 1e308
    assert written["final_loss"]["per_worker"] == {"0": None} and written["heldout"]["loss"][1] is None
    parsed = parse_summary_line(line)
    assert parsed["sim_time_s"] == math.inf and parsed["sim_time_per_step_s"] == -math.inf
