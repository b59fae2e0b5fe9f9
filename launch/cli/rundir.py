"""The default run directory: one per job, the same in every process of a torchrun / mpiexec job.

Hydra's default (``outputs/${now:...}/${now:%H-%M-%S}``) is read by each process at its own
start, so the processes of one job could name two folders a second apart.  The configuration
uses ``${launch_stamp:}`` instead (``launch/cli/conf/config.yaml``):

- a process started alone: the current local time, ``%Y-%m-%d/%H-%M-%S`` (hydra's layout);
- a process started by a launcher (``WORLD_SIZE``, ``PMI_SIZE`` or ``OMPI_COMM_WORLD_SIZE`` above
  1): the start time of its parent process, the launcher (torchrun's agent, MPICH's proxy, Open
  MPI's daemon), followed by ``-p`` and that parent's process id, e.g.
  ``2025-01-31/12-00-00-p4242``.  Every process the launcher started on this machine has the same
  parent, so they agree, and two jobs never share a folder.  On several machines, or where
  ``/proc`` does not exist, pass ``hydra.run.dir=...`` (the same for every process).
"""

from __future__ import annotations

import os
import time

from omegaconf import OmegaConf

from launch.cli.errors import launcher_world

FORMAT = "%Y-%m-%d/%H-%M-%S"
RESOLVER = "launch_stamp"


def parent_start_time(pid: int) -> float | None:
    """The wall-clock start time (seconds since the epoch) of process ``pid`` from ``/proc``, or
    None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in ticks since boot
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def run_stamp() -> str:
    """The run directory's name below ``outputs/`` (see the module docstring)."""
    size, _, _ = launcher_world()
    if size > 1:
        parent = os.getppid()
        start = parent_start_time(parent)
        if start is not None:
            return f"{time.strftime(FORMAT, time.localtime(start))}-p{parent}"
    return time.strftime(FORMAT)


def register() -> None:
    """Register ``${launch_stamp:}`` (cached: one value per process)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, run_stamp, use_cache=True)
