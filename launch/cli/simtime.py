"""Simulated time on the command line: ``launch.cluster`` and ``launch.compute_s``.

With ``launch.cluster`` set to a preset of :data:`topology.network.PRESETS` (``nvlink_8``,
``ethernet_100g_64``, ``infiniband_400g_1024``), every iteration gets a simulated duration on that
cluster (:class:`topology.network.SimClock`, one agent per GPU: agent i on GPU i):

    step_time(t) = compute_s + comm(t)

where comm(t) is the alpha-beta cost of the plan of P_t's collectives on the flat buffers that the
sync moves (parameters, and the state slots under ``pullback``), overlapped syncs
(``launch.overlap``) modelled as overlapped.  ``metrics.csv``'s ``sim_time`` column is the
simulated time after the logged iteration, and the summary gives ``sim_time_s`` and
``sim_time_per_step_s``.

``compute_s`` is the simulated duration of one inner step: ``launch.compute_s`` when given (the
step's time on the target GPU), else *measured*: the median wall time of one worker's inner
step over the first :data:`MEASURED_STEPS` iterations of this run (an iteration's wall time over
the number of this process's workers; until that many iterations are done, the median of those so
far), then fixed.  Measured on this machine, it is this machine's compute, not the cluster's.
"""

from __future__ import annotations

import statistics

from topology.checks import check_choice, check_real
from topology.network import PRESETS, SimClock, preset
from topology.schedule import Schedule

#: Iterations whose wall time gives the measured compute time per inner step.
MEASURED_STEPS = 5


def check_cluster_options(cluster, compute_s) -> tuple[str | None, float | None]:
    """``launch.cluster`` (None or a preset name) and ``launch.compute_s`` (None or seconds >= 0),
    validated; ``compute_s`` without ``cluster`` is refused (it would be silently unused)."""
    if cluster is not None:
        cluster = check_choice(cluster, tuple(PRESETS), "launch.cluster")
    if compute_s is not None:
        if cluster is None:
            raise ValueError("launch.compute_s needs launch.cluster (a preset of the simulated network: "
                             f"{', '.join(PRESETS)})")
        compute_s = check_real(compute_s, "launch.compute_s", minimum=0.0)
    return cluster, compute_s


class SimulatedTime:
    """The run's simulated clock (module docstring).

    Args:
        schedule: the run's schedule.
        cluster: a preset name of :data:`topology.network.PRESETS`.
        nbytes: bytes of one agent's synchronized buffer.
        compute_s: seconds of one inner step, or None to measure it.
        local_workers: the number of workers whose inner steps one iteration of this process runs.
        hub_of: ``(block, plan) -> GPU | None`` of the overlapped syncs, or None.
    """

    def __init__(self, schedule: Schedule, cluster: str, nbytes: int, compute_s: float | None,
                 local_workers: int, hub_of=None):
        self.cluster_name = cluster
        self.measured = compute_s is None
        self.local_workers = max(1, local_workers)
        self.clock = SimClock(schedule, preset(cluster), nbytes, 0.0 if compute_s is None else compute_s,
                              hub_of=hub_of)
        self._walls: list[float] = []

    def advance(self, wall_s: float) -> float:
        """Account one iteration that took ``wall_s`` seconds here; the simulated time after it."""
        if self.measured and len(self._walls) < MEASURED_STEPS:
            self._walls.append(wall_s / self.local_workers)
            self.clock.compute_s = statistics.median(self._walls)
        self.clock.advance()
        return self.clock.time

    @property
    def time(self) -> float:
        return self.clock.time

    def summary(self) -> dict:
        """The summary's figures: ``cluster``, ``compute_s`` (and whether measured),
        ``sim_time_s``, ``sim_time_per_step_s``."""
        steps = max(self.clock.t, 1)
        return {"cluster": self.cluster_name, "compute_s": self.clock.compute_s, "compute_measured": self.measured,
                "sim_time_s": self.clock.time, "sim_time_per_step_s": self.clock.time / steps}
