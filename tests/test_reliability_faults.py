"""Faults across processes, from the command line: a stopped rank is named within the timeout
(torchrun with metrics at every step, mpiexec), every collective of a run goes through the one
lost-rank handler, and a refused resume fails on every rank.  Each run is bounded in time (short
timeouts) and its processes are killed at the end."""

import json
import re
import sys
from pathlib import Path

import pytest

from launch.bench import processes
from tests.spawn import ROOT, _env, free_port, mpiexec, run_torch

TIMEOUT_S = 10
LONG = ("topology=multilayer", "launch.steps=100000", "launch.log_every=1", f"launch.timeout_s={TIMEOUT_S}")


def stop_a_rank(command: list, out: Path, variable: str, rank: int = 2, survivors=(0, 1)) -> tuple[str, float]:
    """Start ``command`` (3 ranks, writing metrics.csv into ``out``), SIGSTOP ``rank`` once 3
    iterations are logged, wait for the survivors to exit, then kill everything.  Returns the
    output and the seconds from the SIGSTOP to the survivors' exit."""
    return processes.stop_a_rank(command, out / "metrics.csv", 1 + 3 * 3, variable, rank, survivors, 6 * TIMEOUT_S,
                                 env=_env())


def named_lost(output: str) -> list[str]:
    # The command line reports it as one line "error [rank R]: ..." (launch.cli.errors); the Python
    # API raises RankFailureError.
    return re.findall(r"(?:RankFailureError: |error \[rank \d\]: )rank (\d): the (.+?) of iteration t=\d+ failed on the ranks \[0, 1, 2\]: "
                      r"(rank \d seems lost|ranks \[.*?\] seem lost)", output)


def test_torchrun_names_a_stopped_rank_within_the_timeout_with_metrics_at_every_step(tmp_path):
    """torchrun, 3 processes, log_every=1, launch.timeout_s=10: rank 2 stopped (SIGSTOP); the
    two survivors raise RankFailureError naming rank 2, from the metrics' all-reduce or a sync,
    within the timeout and the roll call (before: a bare gloo RuntimeError after 300 s from the
    metrics' all-reduce, the stopped rank never named)."""
    out = tmp_path / "run"
    output, elapsed = stop_a_rank(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 3, "--master_addr", "127.0.0.1",
         "--master_port", free_port(), "-m", "launch", "launch=torch", *LONG, f"hydra.run.dir={out}"], out, "RANK")
    reports = named_lost(output)
    assert sorted(r for r, _, _ in reports) == ["0", "1"], output[-4000:]
    assert all(lost == "rank 2 seems lost" for _, _, lost in reports), reports
    assert elapsed < 6 * TIMEOUT_S


def test_mpiexec_names_a_stopped_rank_within_the_timeout(tmp_path):
    """mpiexec, 3 processes, launch.timeout_s=10: rank 2 stopped; MPI has no collective timeout,
    but every operation of the MPI communicator is polled against one: a survivor raises
    RankFailureError naming rank 2 (before: a silent hang), and mpiexec stops the job."""
    exe = mpiexec()
    pytest.importorskip("mpi4py")
    if exe is None:
        pytest.skip("no mpiexec")
    out = tmp_path / "run"
    output, elapsed = stop_a_rank([exe, "-n", 3, sys.executable, "-m", "launch", "launch=mpi", *LONG,
                                   f"hydra.run.dir={out}"], out, "PMI_RANK")
    reports = named_lost(output)
    assert reports and all(lost == "rank 2 seems lost" for _, _, lost in reports), output[-4000:]
    assert "did not complete within timeout_s=10 s" in output
    assert elapsed < 6 * TIMEOUT_S


def test_every_collective_goes_through_the_lost_rank_handler(tmp_path):
    """2 gloo ranks run command-line jobs (checkpoints every 3 iterations and a resume, metrics at
    every step, overlapped syncs, gossip) and the engine's diagnostics on a communicator that
    records every operation run outside launch.engine.guard.health.collective: there is none.  A resume
    of the first job's checkpoint with another learning rate is refused on both ranks alike:
    status 2 and the same one-line error naming the key."""
    results = run_torch(2, {"out": str(tmp_path)}, timeout=300, worker=ROOT / "tests" / "attribution_worker.py")
    assert all(code == 0 for code, _ in results), results
    for rank, (_, output) in enumerate(results):
        report = json.loads((tmp_path / f"violations-rank{rank}.json").read_text())
        violations = report["violations"]
        assert violations == [], violations[0]["operation"] + "\n" + violations[0]["stack"]
        assert report["refused"] == 2
        lines = [line for line in output.splitlines() if line.startswith(f"error [rank {rank}]: cannot resume")]
        assert len(lines) == 1 and "agents.optimizer.lr is 0.2, the checkpoint's 0.05" in lines[0], output[-3000:]

