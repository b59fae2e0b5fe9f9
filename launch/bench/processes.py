"""The processes the benchmarks (and the test suite) start: one session each, killed as a group.

:func:`spawn` starts ``nprocs`` ranks of :mod:`launch.bench.rank` as one torch.distributed job
(the environment torchrun would set, ``OMP_NUM_THREADS=1`` per process, a session of its own each
so that a timeout kills them all) and returns what each rank wrote.  :func:`stop_a_rank` stops
one rank of a running command-line job (SIGSTOP) and times how long the others take to give up.
"""

from __future__ import annotations

import json
import os
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


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc; empty where there is none).  torchrun starts
    its workers in sessions of their own, so killing its process group does not reach them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rank_pid(root: int, rank: int, variable: str) -> int | None:
    """The pid of the ``python -m launch`` process below ``root`` whose environment says it is
    ``rank`` (``variable``: RANK under torchrun, PMI_RANK under MPICH's mpiexec)."""
    for pid in descendants(root):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"{variable}={rank}".encode() in environ and b"-m\0launch\0" in cmdline:
            return pid
    return None


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_a_rank(command: list, rows: Path, rows_before: int, variable: str, rank: int, survivors: tuple[int, ...],
                give_up_s: float, env: dict | None = None) -> tuple[str, float]:
    """Start ``command`` (a command-line job), SIGSTOP ``rank`` once ``rows`` (its metrics.csv)
    has ``rows_before`` lines, wait for the ``survivors`` to exit, then kill everything.  Returns
    the output and the seconds from the SIGSTOP to the survivors' exit; ``RuntimeError`` when the
    job does not start within 180 s or the survivors still run ``give_up_s`` after the SIGSTOP."""
    proc = subprocess.Popen([str(c) for c in command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    stopped = None
    try:
        deadline = time.monotonic() + 180
        while not rows.exists() or len(rows.read_text().splitlines()) < rows_before:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the job did not start")
            time.sleep(0.1)
        stopped = rank_pid(proc.pid, rank, variable)
        others = [rank_pid(proc.pid, r, variable) for r in survivors]
        if stopped is None or None in others:
            raise RuntimeError(f"the ranks' processes were not found ({stopped}, {others})")
        os.kill(stopped, signal.SIGSTOP)
        start = time.monotonic()
        while any(alive(pid) for pid in others):
            if time.monotonic() - start > give_up_s:
                raise RuntimeError(f"the survivors still wait {give_up_s:g} s after the SIGSTOP: a hang")
            time.sleep(0.2)
        elapsed = time.monotonic() - start
    finally:
        for pid in descendants(proc.pid) + ([stopped] if stopped else []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        output, _ = proc.communicate(timeout=60)
    return output, elapsed


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(nprocs: int, task: dict, timeout: float = 600.0) -> list[dict]:
    """Run ``task`` on ``nprocs`` ranks (gloo on CPU, NCCL with ``task["device"] == "cuda"``).

    Returns each rank's result dict; raises ``RuntimeError`` with the output of a failed rank,
    or after killing every rank when they take longer than ``timeout`` seconds.
    """
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = []
        for rank in range(nprocs):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       OMP_NUM_THREADS="1")
            env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "launch.bench.rank", json.dumps(task), out],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True, cwd=ROOT,
            ))
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
                raise RuntimeError(f"benchmark rank {rank} of {nprocs} failed ({p.returncode}):\n{text}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(nprocs)]
