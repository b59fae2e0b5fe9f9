"""The figures of ``python -m launch.plot``: ``curves.png`` of a run, ``sweep.png`` of a sweep.

``curves.png``, one panel each (in this order; each left out when it holds no information:
:mod:`launch.cli.plotting.panels`):

- ``training loss (workers)``: metrics.csv's ``loss`` of every agent that has one (a passive
  agent takes no inner step);
- ``held-out <metric>``: eval.csv's ``heldout_<metric>`` of every agent found in eval.csv (also
  those metrics.csv does not have) and of X a (dashed);
- ``distance to X a``: metrics.csv's ``distance_to_virtual`` (``consensus_distance`` in older
  files), ||z_i - X a||_2 of every agent;
- ``inner learning rate``: eval.csv's ``lr`` of every worker.

``sweep.png``: one curve per group of runs (:func:`seed_groups`: runs that differ only in their
``launch.seed`` override form a group, drawn as the mean +- std over its n runs, n in the legend) of the
workers' mean training loss, the held-out metrics of X a (of the lowest agent when the run has no
X a) and the agents' mean distance to X a.

Recorded values that are NaN or infinite are not drawn: a warning names the panel, the agents
and the first step.
"""

from __future__ import annotations

from launch.cli.plotting.panels import Panel
from launch.cli.run_files import VIRTUAL, Notes, Run
from launch.cli.plotting.series import X_AXES, agent_points, band, curve, mean_points, non_finite, placed, x_of

#: The key of the seed in a sweep's overrides.
SEED = "launch.seed"

#: metrics.csv's distance to the virtual iterate, and its panel's title.
DISTANCE = "distance_to_virtual"
DISTANCE_TITLE = "distance to X a (||z_i - X a||)"


def heldout_keys(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k.startswith("heldout_") and k not in keys]
    return keys


def run_panels(run: Run, axis: str, width: int, notes: Notes) -> list[Panel]:
    """The panels of ``curves.png`` (module docstring), before any is left out."""
    xs = x_of(run, axis, notes)
    agents = sorted({r["agent"] for r in run.metrics})
    evaluated = sorted({r["agent"] for r in run.evals} - {VIRTUAL}) + (
        [VIRTUAL] if any(r["agent"] == VIRTUAL for r in run.evals) else [])

    def panel(title, rows, key, who, smoothing=1, scale=None):
        _warn_non_finite(run, rows, key, title, notes)
        curves = [curve(_name(a), points, dashed=a == VIRTUAL) for a in who
                  if (points := placed(agent_points(rows, key, a), xs, smoothing))]
        return Panel(title, curves, run.eps, scale)

    panels = [panel("training loss (workers)", run.metrics, "loss", agents, width)]
    panels += [panel(f"held-out {k.removeprefix('heldout_')}", run.evals, k, evaluated) for k in heldout_keys(run.evals)]
    panels.append(panel(DISTANCE_TITLE, run.metrics, DISTANCE, agents, width, run.scale))
    panels.append(panel("inner learning rate", run.evals, "lr", evaluated))
    return panels


def seed_groups(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """The runs of a sweep in groups: runs with a ``launch.seed`` override whose other overrides
    are the same form one group; any other run is a group of its own (without hydra's
    overrides nothing says that two runs differ only in their seed).  Each group is labelled by
    its overrides that not every group shares (its first run's folder when none; ``all runs``
    for a single group), in the order of their first run.

    Example:
        >>> from pathlib import Path
        >>> runs = [Run(Path(str(i)), [], overrides=[f"agents.optimizer.lr={lr}", f"launch.seed={s}"])
        ...         for i, (lr, s) in enumerate([(0.1, 0), (0.1, 1), (0.2, 0)])] + [Run(Path("3"), []), Run(Path("4"), [])]
        >>> [(label, [r.path.name for r in group]) for label, group in seed_groups(runs)]
        [('agents.optimizer.lr=0.1', ['0', '1']), ('agents.optimizer.lr=0.2', ['2']), ('3', ['3']), ('4', ['4'])]
    """
    def key(run: Run) -> tuple:
        others = tuple(o for o in run.overrides if _key(o) != SEED)
        return others if len(others) < len(run.overrides) else (str(run.path), *run.overrides)

    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    shared = set.intersection(*(set(members[0].overrides) for members in groups.values())) if groups else set()
    return [(" ".join(o for o in members[0].overrides if o not in shared and _key(o) != SEED)
             or ("all runs" if len(groups) == 1 else members[0].path.name), members) for members in groups.values()]


def _key(override: str) -> str:
    """The key an override sets (``+launch.seed=1`` -> ``launch.seed``)."""
    return override.lstrip("+~").partition("=")[0]


def sweep_panels(runs: list[Run], axis: str, width: int, notes: Notes) -> list[Panel]:
    """The panels of ``sweep.png`` (module docstring), before any is left out."""
    xs = {run.path: x_of(run, axis, notes) for run in runs}
    groups = seed_groups(runs)
    eps = max(run.eps for run in runs)
    scales = [run.scale for run in runs]

    def panel(title, key, source, points_of, smoothing=1, scale=None):
        for run in runs:
            _warn_non_finite(run, source(run), key, title, notes)
        curves = [band(label, [placed(points_of(source(r), key), xs[r.path], smoothing) for r in members],
                       notes, f"{title}") for label, members in groups]
        return Panel(title, [c for c in curves if c.x], eps, scale)

    panels = [panel("training loss (mean over workers)", "loss", lambda r: r.metrics, mean_points, width)]
    for key in sorted({k for run in runs for k in heldout_keys(run.evals)}):
        panels.append(panel(f"held-out {key.removeprefix('heldout_')} of X a", key, lambda r: r.evals, _reported))
    panels.append(panel("distance to X a (mean over agents)", DISTANCE, lambda r: r.metrics, mean_points, width,
                        max(scales) if None not in scales else None))
    return panels


def xlabel(axis: str) -> str:
    return X_AXES[axis][1]


def _reported(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """X a's points of ``key``, or the lowest agent's when the run has no X a."""
    agents = {r["agent"] for r in rows}
    agent = VIRTUAL if VIRTUAL in agents else min(agents - {VIRTUAL}, default=0)
    return agent_points(rows, key, agent)


def _name(agent) -> str:
    return "X a (virtual)" if agent == VIRTUAL else f"agent {agent}"


def _warn_non_finite(run: Run, rows: list[dict], key: str, title: str, notes: Notes) -> None:
    bad = non_finite(rows, key)
    if bad:
        agents = sorted({a for a, _ in bad}, key=str)
        notes.warn(f"{run.path}: panel '{title}': {len(bad)} NaN or infinite value(s) of agent(s) "
                   f"{', '.join(map(str, agents))} are not drawn (the first at step {min(s for _, s in bad)})")
