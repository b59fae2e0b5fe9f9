"""``python -m launch.plot PATH [--out DIR]``: look at a run, or at a sweep, without writing code.

- ``PATH`` a **run directory** (it holds ``metrics.csv``): ``curves.png``, one panel each for the
  training loss of every worker, every held-out metric of every agent and of the virtual iterate
  X a (``eval.csv``; dashed), and the consensus distance of every agent (left out when the
  schedule has no consensus vector), against the step; a panel of the inner learning
  rate when it changes during the run.
- ``PATH`` a **multirun directory** (hydra's ``multirun/<date>/<time>``: sub-directories that
  are runs): ``sweep.png``, one curve per run labelled by its overrides (those that differ
  between the runs): the workers' mean training loss, the held-out metrics of X a (of agent 0
  when there is no consensus vector) and the agents' mean consensus distance; ``sweep.csv`` and
  ``sweep.md``, one row per run: the run's folder, each swept key, the final training loss and
  consensus distance (means over the last logged step's agents) and every figure of its
  ``summary.json`` (:func:`launch.cli.summary.flat_summary`; lists one column per agent:
  ``heldout_loss_0``, ...).  The table is also printed.

The files go to ``DIR`` (default ``PATH``).  PNG through matplotlib's Agg backend (no display
needed).  Exit status 0, or 2 with one line when ``PATH`` is neither, or matplotlib is missing.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from launch.cli.errors import EXIT_CONFIG, EXIT_OK, report_error
from launch.engine.record.evaluation import VIRTUAL, read_eval
from launch.engine.record.metrics import read_metrics
from launch.cli.summary import flat_summary, read_summary

#: At most this many curves get a legend entry (a ring of 64 agents draws without one).
LEGEND_MAX = 12


def is_run(path: Path) -> bool:
    return (path / "metrics.csv").is_file()


def runs_of(path: Path) -> list[Path]:
    """The run directories directly below ``path``, in hydra's job order (0, 1, ..., 10)."""
    found = [p for p in path.iterdir() if p.is_dir() and is_run(p)]
    return sorted(found, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def overrides_of(run: Path) -> list[str]:
    """The command-line overrides of a run (``.hydra/overrides.yaml``), [] when absent."""
    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def differing(runs: list[Path]) -> dict[Path, list[str]]:
    """Each run's overrides that are not shared by every run."""
    overrides = {run: overrides_of(run) for run in runs}
    shared = set.intersection(*(set(o) for o in overrides.values())) if overrides else set()
    return {run: [o for o in overrides[run] if o not in shared] for run in runs}


def labels_of(runs: list[Path]) -> dict[Path, str]:
    """Each run's label: its overrides that differ between the runs (its folder name when none do)."""
    return {run: " ".join(items) or run.name for run, items in differing(runs).items()}


def swept_keys(runs: list[Path]) -> dict[Path, dict[str, str]]:
    """Each run's ``{key: value}`` of the overrides that differ between the runs."""
    return {run: {key.lstrip("+~"): value for key, _, value in (item.partition("=") for item in items)}
            for run, items in differing(runs).items()}


# -- figures ---------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("python -m launch.plot needs matplotlib: pip install -e '.[experiments]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict], key: str, agent) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if r["agent"] == agent and key in r and not math.isnan(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def _mean_by_step(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = {}
    for r in rows:
        if r["agent"] != VIRTUAL and not math.isnan(r.get(key, math.nan)):
            by_step.setdefault(r["step"], []).append(r[key])
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def _heldout_keys(rows: list[dict]) -> list[str]:
    return [k for k in (rows[0] if rows else {}) if k.startswith("heldout_")]


def _has(rows: list[dict], key: str) -> bool:
    return any(not math.isnan(r.get(key, math.nan)) for r in rows)


def _finish(ax, title: str, curves: int) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    if 0 < curves <= LEGEND_MAX:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_run(run: Path, out: Path) -> Path:
    """``curves.png`` of the run directory ``run`` (see the module docstring)."""
    plt = _pyplot()
    metrics = read_metrics(run / "metrics.csv")
    evals = read_eval(run / "eval.csv") if (run / "eval.csv").is_file() else []
    agents = sorted({r["agent"] for r in metrics})
    lrs = {r["lr"] for r in evals if not math.isnan(r["lr"])}
    panels = ["loss"] + _heldout_keys(evals)
    panels += ["distance_to_virtual"] if _has(metrics, "distance_to_virtual") else []
    panels += ["lr"] if len(lrs) > 1 else []
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        rows = metrics if panel in ("loss", "distance_to_virtual") else evals
        curves = 0
        for agent in agents + ([VIRTUAL] if panel.startswith("heldout_") else []):
            steps, values = _series(rows, panel, agent)
            if steps:
                name = "X a (virtual)" if agent == VIRTUAL else f"agent {agent}"
                ax.plot(steps, values, "--" if agent == VIRTUAL else "-", label=name, marker="." if len(steps) < 30 else None)
                curves += 1
        title = {"loss": "training loss (workers)", "distance_to_virtual": "distance to the virtual iterate ||z_i - X a||",
                 "lr": "inner learning rate"}.get(panel, panel.replace("heldout_", "held-out "))
        _finish(ax, title, curves)
    fig.suptitle(str(run), fontsize=8)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(runs: list[Path], out: Path) -> Path:
    """``sweep.png``: one curve per run (see the module docstring)."""
    plt = _pyplot()
    labels = labels_of(runs)
    data = {run: (read_metrics(run / "metrics.csv"),
                  read_eval(run / "eval.csv") if (run / "eval.csv").is_file() else []) for run in runs}
    heldout = sorted({k for _, evals in data.values() for k in _heldout_keys(evals)})
    panels = ["loss"] + heldout + ["distance_to_virtual"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for run in runs:
            metrics, evals = data[run]
            if panel.startswith("heldout_"):
                agent = VIRTUAL if any(r["agent"] == VIRTUAL for r in evals) else 0
                steps, values = _series(evals, panel, agent)
            else:
                steps, values = _mean_by_step(metrics, panel)
            if steps:
                ax.plot(steps, values, label=labels[run], marker="." if len(steps) < 30 else None)
        title = {"loss": "training loss (mean over workers)",
                 "distance_to_virtual": "distance to X a (mean over agents)"}.get(
            panel, f"{panel.replace('heldout_', 'held-out ')} of X a")
        _finish(ax, title, len(runs))
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the sweep's table -------------------------------------------------------------------------------
def sweep_rows(runs: list[Path]) -> list[dict]:
    """One row per run: ``run``, the swept keys, ``final_loss`` and ``final_distance_to_virtual``
    (means over the agents at the last logged step; NaN when absent), then the run's summary
    figures (lists one column per agent)."""
    keys = swept_keys(runs)
    rows = []
    for run in runs:
        metrics = read_metrics(run / "metrics.csv")
        last = max((r["step"] for r in metrics), default=0)
        final = [r for r in metrics if r["step"] == last]
        row = {"run": run.name, **keys[run]}
        for key in ("loss", "distance_to_virtual"):
            values = [r[key] for r in final if not math.isnan(r[key])]
            row[f"final_{key}"] = sum(values) / len(values) if values else math.nan
        if (run / "summary.json").is_file():
            for key, value in flat_summary(read_summary(run)).items():
                if isinstance(value, list):
                    row.update({f"{key}_{i}": v for i, v in enumerate(value)})
                else:
                    row[key] = value
        rows.append(row)
    return rows


def _columns(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return format(value, ".6g")
    return str(value)


def write_table(rows: list[dict], out: Path) -> tuple[Path, Path, str]:
    """``sweep.csv`` and ``sweep.md`` of ``rows``; returns both paths and the markdown text."""
    columns = _columns(rows)
    csv_path, md_path = out / "sweep.csv", out / "sweep.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(k)) for k in columns])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(k)) for k in columns) + " |" for row in rows]
    markdown = "\n".join(lines)
    md_path.write_text(markdown + "\n")
    return csv_path, md_path, markdown


# -- the command -----------------------------------------------------------------------------------
def plot(path: Path | str, out: Path | str | None = None) -> list[Path]:
    """Draw ``path`` (a run or a multirun directory) into ``out`` (default ``path``); returns the
    files written.  ``ValueError`` when ``path`` is neither."""
    path = Path(path)
    out = Path(out) if out is not None else path
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory (give a run directory, with metrics.csv, or a multirun directory)")
    out.mkdir(parents=True, exist_ok=True)
    if is_run(path):
        return [plot_run(path, out)]
    runs = runs_of(path)
    if not runs:
        raise ValueError(f"{path} is neither a run directory (it has no metrics.csv) nor a multirun directory "
                         f"(no sub-directory has one)")
    figure = plot_sweep(runs, out)
    csv_path, md_path, markdown = write_table(sweep_rows(runs), out)
    print(markdown)
    return [figure, csv_path, md_path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a run directory (outputs/<date>/<time>) or a multirun directory")
    parser.add_argument("--out", help="where to write the figures and tables (default: PATH)")
    args = parser.parse_args(argv)
    try:
        written = plot(args.path, args.out)
    except ValueError as err:
        report_error(err)
        return EXIT_CONFIG
    for p in written:
        print(f"wrote {p}")
    return EXIT_OK
