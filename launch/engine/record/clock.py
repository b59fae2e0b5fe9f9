"""Simulated time: every iteration of a run clocked on a simulated cluster.

With a cluster preset of :data:`topology.network.PRESETS` (``nvlink_8``, ``ethernet_100g_64``,
``infiniband_400g_1024``; the command line's ``launch.cluster``), every iteration t gets a
simulated duration on that cluster (:class:`topology.network.SimClock`):

    step_time(t) = compute_s + comm(t)

where comm(t) is the alpha-beta cost of the collectives of P_t's plan on the bytes one agent's
sync moves (its parameters, and the state slots under ``pullback``: ``SyncEngine.sync_nbytes``,
what the communicator counts per collective).  The simulated layout (:func:`simulated_placement`)
is the run's own when it spans several processes (rank r on GPU r, its agents with it), and one
agent per GPU (agent i on GPU i) for a co-located run, the layout it stands for.  The blocks
costed as overlapped are those the engine compiled as overlapped (:func:`simulated_hubs`: the
engine's own compilation when the simulated layout is the run's; else the compiler's answer,
:func:`launch.engine.sync.compile.overlap_hubs`, for the simulated layout with the run's
``overlap`` option).  A slow rule (``outer``) syncs differently from its plan and is not
modelled (the command line refuses it).

``metrics.csv``'s ``sim_time`` column is the simulated time after the logged iteration, and the
summary gives ``cluster``, ``compute_s``, ``compute_measured``, ``sim_time_s`` and
``sim_time_per_step_s`` (over every iteration 0..steps-1, a resumed run's included).

``compute_s`` is the simulated duration of one inner step: given (the step's time on the target
GPU; the command line's ``launch.compute_s``, at most :data:`MAX_COMPUTE_S`), else *measured*:
the median, over the first :data:`MEASURED_STEPS` iterations this process runs, of an iteration's
wall time here (the sync included; CUDA synchronized) divided by the number of workers this
process steps; until that many are done, the median of those so far.  ``sim_time`` after
iteration s is the SimClock's time after iterations 0..s with the estimate current at s (a
resumed run measures again, and replays its first iterations with its own estimate).  Measured,
it is this machine's compute, not the cluster's: give ``compute_s`` for figures that do not
depend on where the run took place.
"""

from __future__ import annotations

import statistics
import time

import torch

from launch.engine.placement import Placement
from launch.engine.sync.compile import overlap_hubs
from topology.network import PRESETS, HubOf, SimClock, preset
from topology.plan import compile_plan
from topology.schedule import Schedule

#: Iterations whose wall time gives the measured compute time per inner step.
MEASURED_STEPS = 5

#: The largest ``launch.compute_s``: a day per inner step, so that the clock of any run stays a
#: finite number (a step count times this, plus the syncs, is far below the float range).
MAX_COMPUTE_S = 86400.0


def simulated_placement(cluster: str, num_agents: int, world_size: int, agents_per_rank: int | None,
                        name: str = "cluster") -> Placement:
    """The layout the clock models (module docstring), GPU = rank; a ``ValueError`` naming the
    option ``name`` (the caller's word for the cluster) when it has too few GPUs for it."""
    placement = (Placement.make(num_agents, num_agents) if world_size == 1
                 else Placement.make(num_agents, world_size, agents_per_rank))
    gpus = preset(cluster).num_gpus
    if placement.world_size > gpus:
        what = (f"{num_agents} agents, one per GPU (a co-located run)" if world_size == 1
                else f"{world_size} processes, one per GPU")
        raise ValueError(f"{name}={cluster} has {gpus} GPUs; the run needs {what}: choose a larger "
                         f"cluster ({', '.join(f'{n}: {c.num_gpus}' for n, c in PRESETS.items())} GPUs)")
    return placement


def simulated_hubs(engine, placement: Placement) -> HubOf:
    """Which blocks the clock costs as overlapped, on the simulated ``placement``: what ``engine``
    (a :class:`launch.engine.core.SyncEngine`) compiled, when ``placement`` is its own; else the
    compiler's decision for ``placement`` with the engine's ``overlap`` option and buffer size."""
    if placement == engine.placement:
        return engine.compiled.hub_of
    schedule = engine.schedule
    plans = [compile_plan(p) for p in schedule.distinct_matrices]
    hubs = overlap_hubs(schedule, plans, placement, engine.options.overlap, engine.sync_nbytes,
                        engine.options.exact)
    return lambda block, plan: hubs.get((plan, block))


class SimulatedTime:
    """The run's simulated clock (module docstring).

    Args:
        schedule: the run's schedule (plain mixing: no slow rule).
        cluster: a preset name of :data:`topology.network.PRESETS`.
        placement: the simulated layout (:func:`simulated_placement`).
        nbytes: bytes of one agent's synchronized buffer.
        compute_s: seconds of one inner step, or None to measure it.
        hub_of: which blocks are costed as overlapped (:func:`simulated_hubs`).
        local_workers: the number of workers whose inner steps one iteration of this process runs.
        start: the iteration the run starts at (a resumed run's checkpoint t; replayed).
        device: the run's device (CUDA is synchronized before a measured iteration's end).
    """

    def __init__(self, schedule: Schedule, cluster: str, placement: Placement, nbytes: int, compute_s: float | None,
                 hub_of: HubOf, local_workers: int, start: int = 0, device: str = "cpu"):
        self.schedule = schedule
        self.cluster_name = cluster
        self.nbytes = nbytes
        self.measured = compute_s is None
        self.local_workers = max(1, local_workers)
        self.cuda = str(device).startswith("cuda")
        self.agent_gpus = tuple(placement.rank_of(i) for i in range(schedule.num_agents))
        self.hub_of = hub_of
        #: Iterations accounted so far (0..done-1), a resumed run's first ones included.
        self.done = start
        self._walls: list[float] = []
        self.clock = self._replayed(0.0 if compute_s is None else compute_s)

    def _replayed(self, compute_s: float) -> SimClock:
        """A clock at ``compute_s`` advanced through iterations 0..done-1."""
        clock = SimClock(self.schedule, preset(self.cluster_name), self.nbytes, compute_s,
                         agent_gpus=self.agent_gpus, hub_of=self.hub_of)
        for _ in range(self.done):
            clock.advance()
        return clock

    @property
    def measuring(self) -> bool:
        return self.measured and len(self._walls) < MEASURED_STEPS

    def advance(self, started: float) -> float:
        """Account the iteration that began at ``started`` (``time.perf_counter()``); returns the
        simulated time after it."""
        if self.measuring:
            if self.cuda:
                torch.cuda.synchronize()
            self._walls.append((time.perf_counter() - started) / self.local_workers)
            self.clock = self._replayed(statistics.median(self._walls))   # the new estimate from t = 0
        self.clock.advance()
        self.done += 1
        return self.clock.time

    @property
    def time(self) -> float:
        """Simulated seconds after the iterations accounted so far."""
        return self.clock.time

    def summary(self) -> dict:
        """The summary's figures: ``cluster``, ``compute_s``, ``compute_measured``, ``sim_time_s``,
        ``sim_time_per_step_s``."""
        return {"cluster": self.cluster_name, "compute_s": self.clock.compute_s, "compute_measured": self.measured,
                "sim_time_s": self.clock.time, "sim_time_per_step_s": self.clock.time / max(self.clock.t, 1)}

    def describe(self) -> str:
        """One line for the end of the run."""
        how = "measured here" if self.measured else "launch.compute_s"
        return (f"simulated time on {self.cluster_name}: {self.clock.time:.6g} s, "
                f"{self.clock.time / max(self.clock.t, 1):.6g} s per step "
                f"(compute {self.clock.compute_s:.6g} s per inner step, {how})")
