"""Start the processes of a multi-process test, bound their time, and clean up after them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.bench.processes import descendants as _descendants, kill_process_groups

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "dist_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def _kill_when(procs, kill: tuple[int, Path], timeout: float) -> None:
    """``kill = (rank, marker)``: SIGKILL that rank's process as soon as ``marker`` exists."""
    rank, marker = kill
    deadline = time.monotonic() + timeout
    while not Path(marker).exists():
        if time.monotonic() > deadline or procs[rank].poll() is not None:
            return
        time.sleep(0.05)
    procs[rank].send_signal(signal.SIGKILL)


def _wait_all(procs, timeout: float, kill_on: tuple[int, Path] | None = None) -> list[tuple[int, str]]:
    """Wait for every process; on timeout kill them all (their groups and every descendant) and
    fail the test."""
    results = []
    if kill_on is not None:
        _kill_when(procs, kill_on, timeout)
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        for p in procs:
            for pid in _descendants(p.pid):
                for kill in (os.killpg, os.kill):
                    try:
                        kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
        kill_process_groups(procs)
        pytest.fail(f"processes did not finish within {timeout} s (a hang)")
    return results


def run_torch(nprocs: int, spec: dict, timeout: float = 120, worker: Path = WORKER,
              kill: tuple[int, Path] | None = None) -> list[tuple[int, str]]:
    """Run ``worker`` as ``nprocs`` torch.distributed (gloo) ranks; (returncode, output) each.
    ``kill=(rank, marker)``: SIGKILL that rank once the file ``marker`` exists."""
    port = free_port()
    procs = []
    for rank in range(nprocs):
        env = _env({
            "RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        })
        procs.append(subprocess.Popen(
            [sys.executable, str(worker), json.dumps(spec)], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        ))
    return _wait_all(procs, timeout, kill)


def mpiexec() -> str | None:
    """The mpiexec beside this Python (the ``mpich`` wheel installs it there), else on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def run_mpi(nprocs: int, spec: dict, timeout: float = 120) -> tuple[int, str]:
    return run_mpiexec(nprocs, [sys.executable, str(WORKER), json.dumps(spec)], timeout)


def run_job(backend: str, nprocs: int, spec: dict, worker: Path, timeout: float = 240) -> None:
    """Run ``worker SPEC_JSON`` as ``nprocs`` ranks, gloo (``backend="torch"``) or under mpiexec
    (``"mpi"``), and fail the test with their output unless every rank exits 0."""
    if backend == "mpi":
        code, output = run_mpiexec(nprocs, [sys.executable, str(worker), json.dumps(spec)], timeout)
        assert code == 0, output
    else:
        results = run_torch(nprocs, spec, timeout=timeout, worker=worker)
        assert all(code == 0 for code, _ in results), results


def start_command(args: list, cwd=None) -> subprocess.Popen:
    """Start ``args`` in a session of its own, stdout and stderr together in one pipe
    (:func:`wait_commands` waits for it)."""
    return subprocess.Popen(
        [str(a) for a in args], env=_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )


def wait_commands(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str]]:
    """(returncode, output) of each started command; on timeout they are all killed and the test
    fails."""
    return _wait_all(procs, timeout)


def run_command(args: list[str], timeout: float = 120, cwd=None) -> tuple[int, str]:
    """Run ``args`` in a session of its own; (returncode, stdout and stderr together)."""
    return wait_commands([start_command(args, cwd)], timeout)[0]


def torchrun_args(nprocs: int, args: list[str]) -> list:
    """``torchrun --nproc_per_node nprocs ARGS`` as ``python -m torch.distributed.run``, on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", nprocs, "--master_addr",
            "127.0.0.1", "--master_port", free_port(), *args]


def mpiexec_args(nprocs: int, args: list[str]) -> list:
    """``mpiexec -n nprocs ARGS``; skips the test when MPI is not installed."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install '.[mpi]')")
    exe = mpiexec()
    if exe is None:
        pytest.skip("mpi4py is installed but no mpiexec was found")
    return [exe, "-n", nprocs, *args]


def run_torchrun(nprocs: int, args: list[str], timeout: float = 120, cwd=None) -> tuple[int, str]:
    """``torchrun --nproc_per_node nprocs ARGS`` (:func:`torchrun_args`), bounded in time;
    (returncode, output of every rank)."""
    return run_command(torchrun_args(nprocs, args), timeout, cwd)


def run_mpiexec(nprocs: int, args: list[str], timeout: float = 120, cwd=None) -> tuple[int, str]:
    """``mpiexec -n nprocs ARGS``, bounded in time; skips when MPI is not installed."""
    return run_command(mpiexec_args(nprocs, args), timeout, cwd)
