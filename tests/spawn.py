"""Start the processes of a multi-process test, bound their time, and clean up after them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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


def _wait_all(procs, timeout: float) -> list[tuple[int, str]]:
    """Wait for every process; on timeout kill them all (and their groups) and fail the test."""
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
            p.communicate()
        pytest.fail(f"processes did not finish within {timeout} s (a hang)")
    return results


def run_torch(nprocs: int, spec: dict, timeout: float = 120, worker: Path = WORKER) -> list[tuple[int, str]]:
    """Run ``worker`` as ``nprocs`` torch.distributed (gloo) ranks; (returncode, output) each."""
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
    return _wait_all(procs, timeout)


def mpiexec() -> str | None:
    """The mpiexec beside this Python (the ``mpich`` wheel installs it there), else on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def run_mpi(nprocs: int, spec: dict, timeout: float = 120) -> tuple[int, str]:
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install '.[mpi]')")
    exe = mpiexec()
    if exe is None:
        pytest.skip("mpi4py is installed but no mpiexec was found")
    proc = subprocess.Popen(
        [exe, "-n", str(nprocs), sys.executable, str(WORKER), json.dumps(spec)], env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    return _wait_all([proc], timeout)[0]
