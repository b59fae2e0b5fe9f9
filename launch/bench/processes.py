"""The processes the benchmarks (and the test suite) start: one session each, killed as a group.

:func:`spawn` starts ``nprocs`` ranks of :mod:`launch.bench.rank` as one torch.distributed job
(the environment torchrun would set, ``OMP_NUM_THREADS=1`` per process, a session of its own each
so that a timeout kills them all), or as one ``mpiexec`` job, and returns what each rank wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[2]


def kill_process_groups(procs: Sequence[subprocess.Popen]) -> None:
    """SIGKILL the process group of every process of ``procs`` (each started with
    ``start_new_session=True``, so its children go too), then reap them all."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.communicate()


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mpiexec() -> str:
    """The mpiexec beside this Python (the ``mpich`` wheel installs it there), else on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        raise RuntimeError("an MPI benchmark needs mpiexec (pip install '.[mpi]')")
    return found


def spawn(nprocs: int, task: dict, timeout: float = 600.0) -> list[dict]:
    """Run ``task`` on ``nprocs`` ranks (gloo on CPU, NCCL with ``task["device"] == "cuda"``; under
    mpiexec with ``task["launch"] == "mpi"``).

    Returns each rank's result dict; raises ``RuntimeError`` with the output of a failed rank,
    or after killing every rank when they take longer than ``timeout`` seconds.
    """
    port = free_port()
    command = [sys.executable, "-m", "launch.bench.rank", json.dumps(task)]
    with tempfile.TemporaryDirectory() as out:
        procs = []
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        for rank in range(nprocs if task.get("launch") != "mpi" else 0):
            procs.append(subprocess.Popen(
                command + [out], env=dict(env, RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank),
                                          LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1",
                                          MASTER_PORT=str(port)),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=ROOT,
            ))
        if task.get("launch") == "mpi":
            procs.append(subprocess.Popen([mpiexec(), "-n", str(nprocs), *command, out], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True, cwd=ROOT))
        deadline = time.monotonic() + timeout
        outputs = []
        try:
            for p in procs:
                outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            kill_process_groups(procs)
            raise RuntimeError(f"{nprocs} benchmark processes did not finish within {timeout} s") from None
        for rank, (p, text) in enumerate(zip(procs, outputs)):
            if p.returncode != 0:
                who = "mpiexec" if task.get("launch") == "mpi" else f"benchmark rank {rank} of {nprocs}"
                raise RuntimeError(f"{who} failed ({p.returncode}):\n{text}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(nprocs)]
