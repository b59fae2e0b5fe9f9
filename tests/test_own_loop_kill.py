"""The own loop killed with SIGKILL at a random moment and started again: ``experiments/own_loop.py``
with ``--run-dir`` (a checkpoint after every epoch), LA-2 under torchrun on 3 processes and
co-located.  Once the checkpoint of a random early epoch is complete, one process (a random rank
under torchrun) is killed after a random delay shorter than an epoch -- in an inner step, a sync,
a control message or a checkpoint's write -- and the same command, run again, resumes from the last complete checkpoint and ends with
the same bits as a run never killed: every agent's weights (agents.pt) and every recorded row of
metrics.csv (wall-clock times aside)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from launch.engine.record.metrics import read_metrics
from tests.spawn import ROOT, start_command, torchrun_args, wait_commands

EPOCHS, STEPS_PER_EPOCH = 7, 44          # the digits' 1,437 training images in batches of 32
SCRIPT = ["-m", "experiments.own_loop", "--ks", "5", "2", "--alphas", "0.5", "0.5", "--epochs", str(EPOCHS)]


def command(run_dir: Path, processes: int) -> list:
    args = [*SCRIPT, "--run-dir", str(run_dir)]
    return torchrun_args(processes, args) if processes > 1 else [sys.executable, *args]


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def checkpoint_of_epoch(run_dir: Path, epoch: int, proc, timeout: float = 120) -> None:
    """Wait until the run's checkpoint of ``epoch`` (or a later one) is complete: ``latest.json``
    names it."""
    latest = run_dir / "checkpoints" / "latest.json"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if json.loads(latest.read_text())["t"] >= epoch * STEPS_PER_EPOCH:
                return
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, "the run ended before the checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)


def killed_and_resumed(run_dir: Path, processes: int, rng: random.Random) -> None:
    proc = start_command(command(run_dir, processes), cwd=ROOT)
    try:
        checkpoint_of_epoch(run_dir, rng.randint(1, 3), proc)
        time.sleep(rng.uniform(0.0, 0.25))
        victim = proc.pid if processes == 1 else rng.choice(children(proc.pid))
        os.kill(victim, signal.SIGKILL)
        code, output = wait_commands([proc], timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code != 0 and not (run_dir / "agents.pt").exists(), f"the run was not stopped by the kill:\n{output}"
    code, output = wait_commands([start_command(command(run_dir, processes), cwd=ROOT)], timeout=300)[0]
    assert code == 0, output


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in read_metrics(run_dir / "metrics.csv")]


def same_rows(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k] == y[k] or (isinstance(x[k], float) and math.isnan(x[k]) and math.isnan(y[k]))
                                     for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize("processes", [3, 1], ids=["torchrun-3", "colocated"])
def test_killed_at_a_random_moment_and_resumed_bit_for_bit(tmp_path, processes):
    rng = random.Random(2026 + processes)
    whole = tmp_path / "whole"
    code, output = wait_commands([start_command(command(whole, processes), cwd=ROOT)], timeout=300)[0]
    assert code == 0, output
    resumed = tmp_path / "resumed"
    killed_and_resumed(resumed, processes, rng)
    expected, got = torch.load(whole / "agents.pt"), torch.load(resumed / "agents.pt")
    assert len(expected) == len(got) == 3
    for a, b in zip(expected, got):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rows(whole) and same_rows(rows(whole), rows(resumed))
