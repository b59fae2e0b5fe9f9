"""Helpers for the processes that tests and benchmarks start (one session per process)."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Sequence


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
