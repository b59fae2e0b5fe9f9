"""The command line keeps its promises: a resume continues the same run or says why not, results
are never lost, non-finite values are reported as such, a kill -9 at any moment resumes bit for
bit (co-located; the distributed faults are in tests/test_reliability_faults.py)."""

import errno
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch.cli import app
from launch.engine.record.metrics import read_metrics
from launch.engine.store import checkpoint as ckpt_module
from launch.engine.store.checkpoint import Checkpointer
from tests.spawn import ROOT, _env
from tests.test_app import config, flat

BASE = ("topology=multilayer", "agents=sgd_momentum", "launch.log_every=1", "launch.check_reference=false")


def agents(path):
    return [flat(state) for state in torch.load(path / "agents.pt")]


def same_agents(a, b):
    return all(torch.equal(x, y) for x, y in zip(agents(a), agents(b)))


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """6 iterations checkpointed at t=3 and t=6 (LA-2 syncs at 5 and 10: the cut is mid-round)."""
    root = tmp_path_factory.mktemp("original")
    assert app.run(config(*BASE, "launch.steps=6", "launch.checkpoint_every=3",
                          f"launch.checkpoint_dir={root / 'ckpt'}"), root / "run") == 0
    return root / "ckpt"


@pytest.fixture
def ckpt(original, tmp_path):
    """A copy of the original checkpoints for this test (a resume writes its own into it)."""
    return Path(shutil.copytree(original, tmp_path / "ckpt"))


def resume(ckpt, out, *overrides, steps=10):
    return app.run(config(*BASE, f"launch.steps={steps}", "launch.resume=true", f"launch.checkpoint_dir={ckpt}",
                          *overrides), out)


# -- a resume proves it is the same run ------------------------------------------------------------
@pytest.mark.parametrize("override, words", [
    ("topology.ks=[3,2]", "topology.ks is [3, 2], the checkpoint's [5, 2]"),
    ("topology.alphas=[0.8,0.5]", "topology.alphas is [0.8, 0.5], the checkpoint's [0.5, 0.5]"),
    ("agents.optimizer.lr=0.2", "agents.optimizer.lr is 0.2, the checkpoint's 0.05"),
    ("agents=sgd", "agents.optimizer.momentum is 0, the checkpoint's 0.9"),
    ("agents.state_policy=reset", "agents.state_policy is ['reset', 'reset'], the checkpoint's ['maintain', 'maintain']"),
    ("launch.seed=1", "launch.seed is 1, the checkpoint's 0"),
    ("problem.noise=0.2", "problem.noise is 0.2, the checkpoint's 0.1"),
])
def test_a_resume_with_another_configuration_is_refused_naming_the_key(ckpt, tmp_path, capsys, override, words):
    assert resume(ckpt, tmp_path / "run", override) == 2
    err = capsys.readouterr().err
    assert words in err, err
    assert err.count("error [rank 0]") == 1 and "Traceback" not in err
    key = override.split("=")[0].replace("agents", "agents.optimizer.momentum") if override == "agents=sgd" \
        else override.split("=")[0]
    assert f"launch.resume_allow=[{key}" in err, err
    assert not (tmp_path / "run" / "agents.pt").exists()


def test_another_optimizer_class_is_one_clear_error(ckpt, tmp_path, capsys):
    """``agents=adam`` on an SGD checkpoint: not a KeyError traceback, even when allowed."""
    for allow, listed in (("[]", "agents.optimizer.name is 'adam', the checkpoint's 'sgd'; "),
                          ("[agents.optimizer]", ": ")):
        assert resume(ckpt, tmp_path / "run", "agents=adam", f"launch.resume_allow={allow}") == 2
        err = capsys.readouterr().err
        # The other options are explained by the name; the class cannot change even when allowed.
        assert listed + "optimizer is 'Adam', the checkpoint's 'SGD' (this cannot change on resume" in err, err
        assert "Traceback" not in err and "KeyError" not in err and "lr" not in err


def test_another_dtype_cannot_be_allowed(ckpt, tmp_path, capsys):
    assert resume(ckpt, tmp_path / "run", "launch.dtype=float32", "launch.resume_allow=[launch.dtype]") == 2
    assert "dtype is 'torch.float32', the checkpoint's 'torch.float64' (this cannot change" in capsys.readouterr().err


def test_an_allowed_change_applies_from_the_checkpoint_on(ckpt, original, tmp_path, capsys):
    assert resume(ckpt, tmp_path / "same") == 0
    fresh = Path(shutil.copytree(original, tmp_path / "ckpt2"))
    assert resume(fresh, tmp_path / "changed", "agents.optimizer.lr=0.2",
                  "launch.resume_allow=[agents.optimizer.lr,launch.steps]") == 0
    assert "note: resumed with the allowed change(s) agents.optimizer.lr: 0.05 -> 0.2\n" in capsys.readouterr().err
    # The new lr is used (before: the checkpoint's optimizer state put 0.05 back, and the results
    # were those of the unchanged command).
    assert not same_agents(tmp_path / "same", tmp_path / "changed")


def test_resume_allow_names_recorded_keys_only(ckpt, tmp_path, capsys):
    assert resume(ckpt, tmp_path / "run", "launch.resume_allow=[agents.optimizer.learning_rate]") == 2
    err = capsys.readouterr().err
    assert "launch.resume_allow names 'agents.optimizer.learning_rate', which is not a recorded key" in err


@pytest.mark.parametrize("value", ["0", "-1", "abc", "true"])
def test_a_bad_timeout_is_a_configuration_error(tmp_path, capsys, value):
    assert app.run(config("launch=torch", f"launch.timeout_s={value}", "launch.steps=2"), tmp_path) == 2
    assert "launch.timeout_s must be a number of seconds > 0; got " in capsys.readouterr().err


def test_free_keys_change_without_allowance(ckpt, tmp_path):
    assert resume(ckpt, tmp_path / "run", "launch.log_every=4", "launch.num_threads=2") == 0


# -- results never lost, metrics history kept --------------------------------------------------------
def read_only(monkeypatch, inside: Path, only: str | None = None):
    """Writes under ``inside`` (or only into its folder ``only``) fail as on a read-only
    filesystem.  Simulated: the tests run as root, whom chmod does not stop."""
    real_mkdir, real_write = Path.mkdir, ckpt_module.atomic_write

    def refused(path: Path) -> bool:
        path = Path(path)
        return (inside in path.parents or path == inside) and (only is None or only in path.parts)

    def mkdir(self, *args, **kwargs):
        if refused(self):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    def atomic_write(path, write):
        if refused(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_write(path, write)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(ckpt_module, "atomic_write", atomic_write)


def losses(path):
    return [(r["step"], r["agent"], r["loss"], r["grad_norm"], r["distance_to_virtual"])
            for r in read_metrics(path / "metrics.csv")]


def test_results_are_written_when_the_final_checkpoint_fails_and_metrics_keep_their_history(
        tmp_path, monkeypatch, capsys):
    """Run 1 (7 steps, checkpoints every 3) cannot write its final checkpoint (t=7): agents.pt,
    summary.txt and metrics.csv are written all the same, exit 5, the error says both, and so
    does the summary (status FAILED, failure checkpoint).  Run 2 resumes from t=6 into the same
    run directory with no checkpoint_every, and the final checkpoint's folder cannot be written (a
    folder read-only from the start is refused before any work: test_reliability_surfaces.py):
    iterations 7..10 computed, the final save fails, the results are written.
    metrics.csv then holds steps 1..10 once each (row 7 of run 1 dropped, recomputed), equal to
    the uninterrupted run's, and agents.pt is the uninterrupted run's, bit for bit."""
    assert app.run(config(*BASE, "launch.steps=10"), tmp_path / "whole") == 0
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"

    read_only(monkeypatch, ckpt, only="step-00000007")
    assert app.run(config(*BASE, "launch.steps=7", "launch.checkpoint_every=3", f"launch.checkpoint_dir={ckpt}"),
                   run) == 5
    err = capsys.readouterr().err
    assert "checkpoint of iteration t=7 not written (the last one is kept: t=6" in err, err
    assert f"the run's results were written all the same: agents.pt, summary.txt and metrics.csv in {run}" in err
    assert (run / "agents.pt").exists() and "status=FAILED failure=checkpoint exit_status=5" in (
        run / "summary.txt").read_text()
    record = json.loads((run / "summary.json").read_text())
    assert (record["status"], record["failure"], record["exit_status"]) == ("FAILED", "checkpoint", 5)
    assert "checkpoint of iteration t=7 not written" in record["failure_detail"]
    assert max(r["step"] for r in read_metrics(run / "metrics.csv")) == 7
    assert not (ckpt / "step-00000007").exists()
    monkeypatch.undo()

    (run / "agents.pt").unlink(), (run / "summary.txt").unlink()
    read_only(monkeypatch, ckpt, only="step-00000010")
    assert resume(ckpt, run, steps=10) == 5
    assert "checkpoint of iteration t=10 not written (the last one is kept: t=6" in capsys.readouterr().err
    assert (run / "summary.txt").exists()
    assert same_agents(run, tmp_path / "whole")
    assert losses(run) == losses(tmp_path / "whole")      # history kept, steps 7..10 recomputed
    steps = [r["step"] for r in read_metrics(run / "metrics.csv")]
    assert steps == sorted(steps) and len(steps) == 10 * 3


def test_non_finite_values_are_written_shown_and_fail_the_run(tmp_path, capsys):
    """LA-1, k=5, lr=1e30: the losses overflow to inf at step 6 and nan after, past the last sync
    (t=5; the next would be at t=10): the run ends non-finite, says so and exits 3."""
    assert app.run(config("topology=lookahead", "launch.steps=8", "launch.log_every=1", "agents.optimizer.lr=1e30"), tmp_path) == 3
    err = capsys.readouterr().err
    summary = (tmp_path / "summary.txt").read_text()
    assert "status=FAILED failure=non_finite" in summary, summary
    assert json.loads((tmp_path / "summary.json").read_text())["failure_detail"] == (
        "non-finite parameters of agent(s) [0] and loss of agent(s) [0] at the end of the run, t=8; no final checkpoint")
    assert "loss=nan" in err                                  # the progress bar
    text = (tmp_path / "metrics.csv").read_text().splitlines()
    assert text[-2].startswith("8,0,nan,nan,nan,") and text[-1].startswith("8,1,,,nan,"), text[-2:]
    rows = read_metrics(tmp_path / "metrics.csv")
    assert any(r["loss"] == math.inf for r in rows) and math.isnan(rows[-2]["loss"])


def test_a_finite_run_still_ends_ok(tmp_path):
    assert app.run(config("topology=lookahead", "launch.steps=8"), tmp_path) == 0
    assert "status=ok" in (tmp_path / "summary.txt").read_text()


# -- kill -9 at random moments ---------------------------------------------------------------------
KILL_BASE = ("topology=multilayer", "agents=adam", "agents.state_policy=pullback", "launch.log_every=1",
             "launch.check_reference=false", "launch.checkpoint_every=2", "launch.steps=400")


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    whole = tmp_path_factory.mktemp("whole")
    assert app.run(config(*KILL_BASE), whole) == 0
    return whole


@pytest.mark.parametrize("seed", [0, 2, 5])   # kills after iterations 104, 20, 165 (checkpoints at even t)
def test_kill_9_at_a_random_moment_resumes_bit_for_bit(tmp_path, whole_run, seed):
    """``python -m launch`` SIGKILLed at a random moment (after a random iteration in 6..199 has
    logged its rows; a checkpoint every 2 iterations, so that many kills land in a checkpoint's
    writes), then resumed into the same run directory: agents.pt and every metrics.csv row equal
    the uninterrupted run's, bit for bit."""
    whole = whole_run
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-m", "launch", *KILL_BASE, f"launch.checkpoint_dir={ckpt}",
                             f"hydra.run.dir={run}"], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Killed once a random iteration's rows are in metrics.csv: wherever the run then is
        # (computing, writing rows, in the middle of a checkpoint's files).
        target = random.Random(seed).randrange(6, 200)
        deadline = time.monotonic() + 120
        metrics = run / "metrics.csv"
        while not metrics.exists() or metrics.read_text().count("\n") < 1 + 3 * target:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill: the trial tests nothing"
    assert 0 < Checkpointer(ckpt).latest_step() < 400
    assert app.run(config(*KILL_BASE, "launch.resume=true", f"launch.checkpoint_dir={ckpt}"), run) == 0
    assert same_agents(run, whole)
    assert losses(run) == losses(whole)
