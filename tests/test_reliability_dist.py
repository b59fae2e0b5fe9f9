"""Checkpoints, lost ranks, NaN and determinism across processes (gloo ranks this test spawns,
torchrun, mpiexec).  Every run is bounded in time and its processes are killed at the end."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from launch.engine.store.checkpoint import Checkpointer
from tests.spawn import ROOT, _env, run_mpiexec, run_torch, run_torchrun
import topology
from launch.engine.simulation import Simulation
from tests import problems
from tests.test_checkpoint import CUT, STEPS, record
from tests.trajectories import relative_deviation

WORKER = ROOT / "tests" / "reliability_worker.py"
KS, ALPHAS = [3, 2], [0.5, 0.6]
BASE = dict(backend="torch", ks=KS, alphas=ALPHAS, optimizer="adam", policy="pullback", timeout_s=30)
TOL = 1e-12


def load(out, name, nprocs):
    """The (steps, m, numel) trajectory of every agent, assembled from the ranks' files."""
    parts = [torch.load(out / f"{name}-rank{r}.pt") for r in range(nprocs)]
    columns = {a: p["trajectory"][:, c] for p in parts for c, a in enumerate(p["agents"])}
    return torch.stack([columns[a] for a in sorted(columns)], 1)


def colocated_sim(dtype=torch.float64):
    return Simulation(problems.make_model(0, dtype), problems.loss_fn, problems.batches(1, dtype),
                      topology.multilayer(KS, ALPHAS), problems.OPTIMIZERS["adam"], state_policy="pullback")


def lost_ranks(message):
    """The ranks a RankFailureError names as (possibly) lost: those in the clause before 'seem'."""
    clause = message.split("seem")[0].rsplit(": ", 1)[-1]
    return {int(r) for r in re.findall(r"\d+", clause)}


def check_ok(results):
    assert all(code == 0 for code, _ in results), results


def test_resume_across_processes_and_layouts(tmp_path):
    """3 gloo ranks: interrupted mid-round (t=7) and resumed on 3 ranks gives the uninterrupted
    trajectory bit for bit (float32, float64, with global-RNG noise in the loss); a 3-rank
    checkpoint resumes co-located and a co-located one on 3 ranks (within the equivalence
    tolerance: the sums run in another order); two runs of one config are identical."""
    out = tmp_path
    jobs_a = []
    for dt in ("float64", "float32"):
        jobs_a += [dict(name=f"full-{dt}", dtype=dt, steps=STEPS, noisy=True),
                   dict(name=f"cut-{dt}", dtype=dt, steps=CUT, noisy=True, ckpt=str(out / f"ckpt-{dt}"), every=5)]
    jobs_a.append(dict(name="plain-cut", steps=CUT, ckpt=str(out / "ckpt-plain"), every=5))
    check_ok(run_torch(3, dict(BASE, out=str(out), jobs=jobs_a), timeout=150, worker=WORKER))

    # A co-located checkpoint at t=7, written here, for the 3 ranks to resume.
    colocated = colocated_sim()
    record(colocated, CUT)
    Checkpointer(out / "ckpt-colocated").save(colocated)

    jobs_b = [dict(name=f"resumed-{dt}", dtype=dt, steps=STEPS, noisy=True, resume=str(out / f"ckpt-{dt}"))
              for dt in ("float64", "float32")]
    jobs_b += [dict(name="again-float64", steps=STEPS, noisy=True),
               dict(name="from-colocated", steps=STEPS, resume=str(out / "ckpt-colocated"))]
    check_ok(run_torch(3, dict(BASE, out=str(out), jobs=jobs_b), timeout=150, worker=WORKER))

    for dt in ("float64", "float32"):
        full, resumed = load(out, f"full-{dt}", 3), load(out, f"resumed-{dt}", 3)
        assert resumed.dtype == getattr(torch, dt)
        assert torch.equal(resumed, full[CUT:]), dt
    # Determinism: the same config and seed in new processes, bit for bit.
    assert torch.equal(load(out, "again-float64", 3), load(out, "full-float64", 3))

    # Layouts: every trajectory equals the uninterrupted co-located one within the tolerance.
    reference = record(colocated_sim(), STEPS)
    assert relative_deviation(load(out, "from-colocated", 3), reference[CUT:]) <= TOL
    from_three = colocated_sim()
    assert Checkpointer(out / "ckpt-plain").load(from_three) == CUT
    assert relative_deviation(record(from_three, STEPS), reference[CUT:]) <= TOL
    assert (reference[-1] - reference[CUT]).abs().max() > 1e-4


def test_killed_rank_makes_the_others_fail_fast_and_checkpoint_resumes(tmp_path):
    """Rank 1 is SIGKILLed at iteration 10 (it pauses there, the test kills it); ranks 0 and 2 hit
    the next collective and exit with RankFailureError naming the iteration, in bounded time.
    The last checkpoint (t=8) is complete and resumes."""
    marker = tmp_path / "paused"
    spec = dict(BASE, out=str(tmp_path), jobs=[dict(name="run", steps=40, ckpt=str(tmp_path / "ckpt"), every=4)],
                pause=dict(rank=1, t=10, marker=str(marker)))
    start = time.monotonic()
    results = run_torch(3, spec, timeout=120, worker=WORKER, kill=(1, marker))
    elapsed = time.monotonic() - start
    assert results[1][0] == -9
    for rank in (0, 2):
        code, output = results[rank]
        assert code == 5, output
        message = (tmp_path / f"rank{rank}.err").read_text()
        assert message.startswith("RankFailureError") and "iteration t=11" in message, message
        assert 1 in lost_ranks(message), message
    assert elapsed < 100  # the test's own bound is 120 s; without the error the ranks would hang

    checkpointer = Checkpointer(tmp_path / "ckpt")
    assert checkpointer.latest_step() == 8
    resumed = colocated_sim()
    checkpointer.load(resumed)
    reference = record(colocated_sim(), 20)
    assert relative_deviation(record(resumed, 20), reference[8:]) <= TOL


def test_stuck_rank_times_out(tmp_path):
    """A rank that is alive but never answers: the others fail after the collective timeout."""
    marker = tmp_path / "paused"
    spec = dict(BASE, out=str(tmp_path), timeout_s=4, jobs=[dict(name="run", steps=40)],
                pause=dict(rank=1, t=3, marker=str(marker)))
    # Two ranks, LA-1: rank 0 waits in the sync of iteration 4 for the paused rank 1.
    proc_results = _run_and_kill_after(tmp_path, dict(spec, ks=[5], alphas=[0.5]), rank=1, after_s=40)
    code, output = proc_results[0]
    assert code == 5, output
    message = (tmp_path / "rank0.err").read_text()
    assert "rank 1 seems lost" in message and "iteration t=4" in message and "4 s" in message


def _run_and_kill_after(tmp_path, spec, rank, after_s):
    """Run 2 gloo ranks; rank 0 must finish by itself, then ``rank`` (paused) is killed."""
    import signal

    from tests.spawn import free_port

    port, procs = free_port(), []
    for r in range(2):
        env = _env({"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    try:
        out0, _ = procs[0].communicate(timeout=after_s)
        return [(procs[0].returncode, out0)]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()


def test_nan_on_one_rank_stops_every_rank(tmp_path):
    """Agent 0 (rank 0) sees a NaN batch at iteration 7: every rank raises NonFiniteError naming
    agent 0 at the sync of iteration 8; the checkpoint of t=6 is the last one."""
    spec = dict(BASE, out=str(tmp_path), poison=dict(agent=0, at=7),
                jobs=[dict(name="run", steps=30, ckpt=str(tmp_path / "ckpt"), every=3)])
    results = run_torch(3, spec, timeout=120, worker=WORKER)
    assert [code for code, _ in results] == [4, 4, 4], results
    for rank in range(3):
        message = (tmp_path / f"rank{rank}.err").read_text()
        assert message.startswith("NonFiniteError") and "parameters of agent(s) [0]" in message
        assert "t=8" in message
    assert Checkpointer(tmp_path / "ckpt").latest_step() == 6


def test_torchrun_reports_a_killed_rank(tmp_path):
    spec = dict(BASE, out=str(tmp_path), ks=[5], alphas=[0.5], die=dict(rank=1, t=6),
                jobs=[dict(name="run", steps=200)])
    code, output = run_torchrun(2, [WORKER, json.dumps(spec)], timeout=120)
    assert code != 0, output
    assert "Signal 9" in output or "SIGKILL" in output, output[-2000:]


def test_mpiexec_reports_a_killed_rank(tmp_path):
    spec = dict(BASE, backend="mpi", out=str(tmp_path), ks=[5], alphas=[0.5], die=dict(rank=1, t=6),
                jobs=[dict(name="run", steps=200)])
    code, output = run_mpiexec(2, [sys.executable, WORKER, json.dumps(spec)], timeout=90)
    assert code != 0, output


def test_mpi_nan_on_one_rank_stops_every_rank(tmp_path):
    """The same through MPI (the flags' all-reduce is an MPI Allreduce(MAX)); LA-1, 2 ranks."""
    spec = dict(BASE, backend="mpi", out=str(tmp_path), poison=dict(agent=0, at=7), ks=[5], alphas=[0.5],
                jobs=[dict(name="run", steps=30, ckpt=str(tmp_path / "ckpt"), every=3)])
    code, output = run_mpiexec(2, [sys.executable, WORKER, json.dumps(spec)], timeout=90)
    assert code != 0, output
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.err").read_text()
        assert message.startswith("NonFiniteError") and "agent(s) [0]" in message and "t=9" in message
    assert Checkpointer(tmp_path / "ckpt").latest_step() == 6
