"""The curves of ``python -m launch.plot``: the x axis, smoothing, mean +- std over seeds.

**x axis** (``--x``): ``step`` (the number of iterations completed, metrics.csv's and eval.csv's
``step``), ``sim_time`` (metrics.csv's ``sim_time``: the simulated time after that step on
``launch.cluster``) or ``wall`` (metrics.csv's ``wall_time``: seconds on rank 0 since the first
iteration).  eval.csv has only ``step``: an evaluated step takes the time of metrics.csv's rows of
the same step (all agents of a step share it), so an evaluated step that was not logged has no
time and is left out of the time axes, with a warning naming the steps (log every evaluated step:
``launch.log_every`` dividing ``launch.eval_every``).  A run without any ``sim_time`` (not run
with ``launch.cluster``) cannot be drawn against it: a ``ValueError`` naming the option.

**Smoothing** (``--smooth W``): a trailing moving average over the curve's own logged points,
y'_j = mean(y_{j-W+1} .. y_j), over the j + 1 points there are while j < W - 1 (so the first
point is unchanged and no point uses a later one); W = 1 draws the values as recorded.  It
applies to the curves of metrics.csv (training loss, distances), before the mean over seeds;
held-out curves and the learning rate are drawn as recorded.

**Seeds** (:func:`band`): the runs of a group (a sweep's runs that differ only in
``launch.seed``) give one curve, at the steps every run of the group recorded: y the mean over
the n runs, the band y +- s with s the sample standard deviation (n - 1 in the denominator; no
band when n = 1), and x the mean of the runs' x at that step (the step itself on the step axis).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from launch.cli.run_files import VIRTUAL, Notes, Run

#: ``--x`` choices: the metrics.csv column that gives the x of a step (None: the step) and the
#: axis label.
X_AXES = {"step": (None, "step"), "sim_time": ("sim_time", "simulated time (s)"), "wall": ("wall_time", "wall time (s)")}

#: How many steps a warning lists before it says "and N more".
LISTED = 5


@dataclass
class Curve:
    """One line of a panel: ``y`` against ``x``; a band ``y +- std`` over ``n`` runs when ``std``."""

    label: str
    x: list[float]
    y: list[float]
    dashed: bool = False
    std: list[float] | None = None
    n: int = 1


def x_of(run: Run, axis: str, notes: Notes) -> dict[int, float] | None:
    """Step -> x of ``run`` on ``axis`` (None on the step axis: x is the step).  Warns of the
    logged and evaluated steps that have no x; ``ValueError`` when no step has one."""
    column, _ = X_AXES[axis]
    if column is None:
        return None
    xs = {r["step"]: r.get(column) for r in run.metrics}
    xs = {s: x for s, x in xs.items() if x is not None and math.isfinite(x)}
    if not xs:
        hint = " (run it with launch.cluster=<preset> to record it)" if axis == "sim_time" else ""
        raise ValueError(f"--x {axis}: {run.path} has no {X_AXES[axis][1].split(' (')[0]}: its metrics.csv's "
                         f"{column} column is empty or absent{hint}; use --x step or --x wall")
    for name, rows in (("metrics.csv", run.metrics), ("eval.csv", run.evals)):
        missing = sorted({r["step"] for r in rows} - set(xs))
        if missing:
            notes.warn(f"{run.path}: {name}'s step(s) {_listed(missing)} have no {column} in metrics.csv: "
                       f"left out of the --x {axis} figure")
    return xs


def agent_points(rows: list[dict], key: str, agent) -> list[tuple[int, float]]:
    """(step, value) of ``agent``'s recorded values of ``key`` (empty cells left out)."""
    return [(r["step"], r[key]) for r in rows if r["agent"] == agent and r.get(key) is not None]


def mean_points(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, mean over the agents' recorded values of ``key`` at that step), X a's row left out."""
    by_step: dict[int, list[float]] = {}
    for r in rows:
        if r["agent"] != VIRTUAL and r.get(key) is not None:
            by_step.setdefault(r["step"], []).append(r[key])
    return [(s, math.fsum(v) / len(v)) for s, v in sorted(by_step.items())]


def smooth(values: list[float], width: int) -> list[float]:
    """The trailing moving average of ``width`` points (see the module docstring).

    Example:
        >>> smooth([1.0, 2.0, 3.0, 4.0], 2)
        [1.0, 1.5, 2.5, 3.5]
    """
    return [math.fsum(values[max(0, j - width + 1):j + 1]) / (j + 1 - max(0, j - width + 1))
            for j in range(len(values))]


def placed(points: list[tuple[int, float]], xs: dict[int, float] | None, width: int = 1
           ) -> dict[int, tuple[float, float]]:
    """Step -> (x, y) of ``points`` with finite values, smoothed over ``width`` points; the
    steps without an x (``xs``; None: the step axis) left out (:func:`x_of` warned of them)."""
    points = [(s, v) for s, v in points if math.isfinite(v) and (xs is None or s in xs)]
    values = smooth([v for _, v in points], width) if width > 1 else [v for _, v in points]
    return {s: (float(s) if xs is None else xs[s], v) for (s, _), v in zip(points, values)}


def curve(label: str, points: dict[int, tuple[float, float]], dashed: bool = False) -> Curve:
    steps = sorted(points)
    return Curve(label, [points[s][0] for s in steps], [points[s][1] for s in steps], dashed)


def band(label: str, runs: list[dict[int, tuple[float, float]]], notes: Notes, where: str) -> Curve:
    """One curve of the runs of a seed group (see the module docstring); warns when the runs'
    steps differ (the band uses those they share)."""
    shared = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
    if any(len(r) != len(shared) for r in runs):
        notes.warn(f"{where}: the runs of {label} recorded different steps; the mean +- std uses the "
                   f"{len(shared)} they share")
    n = len(runs)
    x = [math.fsum(r[s][0] for r in runs) / n for s in shared]
    y = [math.fsum(r[s][1] for r in runs) / n for s in shared]
    std = [statistics.stdev([r[s][1] for r in runs]) for s in shared] if n > 1 else None
    return Curve(f"{label} (mean \u00b1 std, n={n})" if n > 1 else label, x, y, std=std, n=n)


def non_finite(rows: list[dict], key: str) -> list[tuple[object, int]]:
    """(agent, step) of the recorded values of ``key`` that are NaN or infinite."""
    return [(r["agent"], r["step"]) for r in rows if r.get(key) is not None and not math.isfinite(r[key])]


def _listed(steps: list[int]) -> str:
    head = ", ".join(map(str, steps[:LISTED]))
    return head + (f" and {len(steps) - LISTED} more" if len(steps) > LISTED else "")
