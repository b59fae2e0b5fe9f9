"""Side-by-side timing: interleaved rounds, per-round ratios, medians.

A *contender* is a function ``run(n)`` that performs ``n`` units of work on something already
built and warm and returns the seconds *per unit*: wall-clock (a distributed contender returns
the slowest rank's), or a pair (wall, CPU) for a single process (:func:`per_call`).  The CPU time
of a one-thread process leaves out the time other processes of a shared machine take from it, so
its ratio is a steadier second opinion on the wall-clock one.  :func:`interleave` calls every contender once per round, in the same order, so
that slow phases of a shared machine hit all of them alike; :func:`ratio` is the median over
rounds of ``a's time / b's time in the same round``.  The order rotates by one contender every
round, so that none is always first (after an idle phase) or last.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

Contender = Callable[[int], float]


def per_call(body: Callable[[], object], finish: Callable[[], object] | None = None) -> Contender:
    """The contender that calls ``body`` n times, then ``finish`` once (e.g.
    ``torch.cuda.synchronize``: the queued work of the round inside its time, and no
    synchronisation between two calls), and returns (wall, CPU) seconds per call."""
    def run(n: int) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            body()
        if finish is not None:
            finish()
        return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n
    return run


def interleave(contenders: dict[str, Contender], *, units: int, repeats: int,
               warmup: int = 1) -> dict[str, list]:
    """Seconds per unit (as the contender returns them) of every contender in each of
    ``repeats`` interleaved rounds.

    ``warmup`` untimed rounds of one unit run first (allocations, caches, lazy initialisation).
    """
    for _ in range(warmup):
        for run in contenders.values():
            run(1)
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(contenders[name](units))
    return times


def _clock(sample, clock: str) -> float:
    if isinstance(sample, tuple):
        return sample[CLOCKS.index(clock)]
    if clock != "wall":
        raise ValueError(f"clock must be wall for a contender that returns one time; got {clock!r}")
    return sample


CLOCKS = ("wall", "cpu")


def ratio(times: dict[str, list], a: str, b: str, clock: str = "wall") -> float:
    """Median over rounds of ``times[a][r] / times[b][r]`` on ``clock`` (wall or cpu)."""
    return statistics.median(_clock(x, clock) / _clock(y, clock) for x, y in zip(times[a], times[b]))


def median(values, clock: str = "wall") -> float:
    """Median of ``values`` (samples of one contender) on ``clock``."""
    return statistics.median(_clock(v, clock) for v in values)
