"""The table of a sweep: ``sweep.csv`` (every column) and ``sweep.md`` (what varies), also printed.

One row per run (:func:`sweep_rows`): ``run`` (its folder), the overrides that differ between the
runs (``agents.optimizer.lr``, ``launch.seed``, ...), ``final_loss`` and
``final_distance_to_virtual`` (means over the agents' values at the last logged step of
metrics.csv; empty when absent), then every figure of its summary.json: the flat view
(:func:`launch.engine.record.summary.flat_summary`; a list one column per agent, ``heldout_loss_0``, ...)
and the nested figures summary.txt leaves out, by dotted key (``optimizer.lr``,
``outer.momentum``, ``versions.torch``, ``final_loss.per_worker.0``).

``sweep.csv`` has every column (for programs).  ``sweep.md`` and the printed table have the
identifying columns (``run`` and the overrides that differ) and the columns whose value is not
the same in every run (:func:`varying`), each once: a column equal, row for row, to one shown
before it (``seed`` to ``launch.seed``, ``optimizer.lr`` to ``agents.optimizer.lr``) is named in
a line ``equal to a column above: ...``; the columns that are the same in every run follow as one
line, ``same in every run: key=value, ...``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from launch.cli.plotting.figures import DISTANCE
from launch.cli.run_files import Notes, Run
from launch.cli.plotting.series import mean_points
from launch.engine.record.summary import flat_summary

def differing(runs: list[Run]) -> dict[Path, dict[str, str]]:
    """Each run's ``{key: value}`` of the overrides that are not shared by every run."""
    shared = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    return {r.path: {k.lstrip("+~"): v for k, _, v in (o.partition("=") for o in r.overrides if o not in shared)}
            for r in runs}


def sweep_rows(runs: list[Run], notes: Notes) -> tuple[list[dict], list[str]]:
    """The rows (module docstring) and the identifying columns; a summary.json whose layout is
    not a summary's is left out with a warning (it counts as unreadable)."""
    keys = differing(runs)
    identifying = ["run"] + [k for r in runs for k in keys[r.path]]
    identifying = list(dict.fromkeys(identifying))
    rows = []
    for run in runs:
        row = {"run": run.path.name, **keys[run.path]}
        last = max((r["step"] for r in run.metrics), default=None)
        for key in ("loss", DISTANCE):
            values = [v for s, v in mean_points(run.metrics, key) if s == last]
            row[f"final_{key}"] = values[0] if values else None
        if run.summary is None and not (run.path / "summary.json").is_file():
            notes.warn(f"{run.path} has no summary.json (the run did not finish): its figures are not in the table")
        try:
            row.update(figures(run.summary or {}))
        except (TypeError, KeyError, AttributeError, ValueError) as err:
            notes.cannot_read(run.path / "summary.json", ValueError(f"not a summary's layout ({err!r})"),
                              "its figures are left out of the table")
        rows.append(row)
    return rows, identifying


def figures(record: dict) -> dict:
    """The summary's figures as table columns (module docstring).

    Example:
        >>> figures({"steps": 3, "heldout": {"loss": [0.5, 0.25]}, "optimizer": {"name": "SGD",
        ...          "hyperparameters": {"lr": 0.1, "betas": [0.9, 0.99]}}, "versions": {"torch": "2.13.0"}})
        {'steps': 3, 'heldout_loss_0': 0.5, 'heldout_loss_1': 0.25, 'optimizer': 'SGD', 'optimizer.lr': 0.1, \
'optimizer.betas_0': 0.9, 'optimizer.betas_1': 0.99, 'versions.torch': '2.13.0'}
    """
    nested = {"optimizer": _inner(record, "optimizer", "hyperparameters"),
              "outer": {k: v for k, v in (_inner(record, "outer") or {}).items() if k != "name"},
              "final_loss.per_worker": _inner(record, "final_loss", "per_worker"),
              "versions": record.get("versions"), "device_name": record.get("device_name")}
    row = {}
    for key, value in [*flat_summary(record).items(), *(item for prefix, value in nested.items()
                                                         for item in _dotted(prefix, value).items())]:
        row.update({f"{key}_{i}": v for i, v in enumerate(value)} if isinstance(value, list) else {key: value})
    return row


def varying(rows: list[dict], identifying: list[str]) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(the columns of ``sweep.md``: the identifying ones, then those whose cells differ between
    rows; ``{column: cell}`` of the columns with the same cell in every row; ``{column: earlier
    column}`` of the varying columns equal, row for row, to an earlier shown one, left out).

    Example:
        >>> rows = [{"run": "0", "lr": "0.1", "optimizer.lr": 0.1, "steps": 5}, {"run": "1", "lr": "0.2",
        ...          "optimizer.lr": 0.2, "steps": 5}]
        >>> varying(rows, ["run", "lr"])
        (['run', 'lr'], {'steps': '5'}, {'optimizer.lr': 'lr'})
    """
    shown, same, duplicates = list(identifying), {}, {}
    cells = {column: tuple(_cell(row.get(column)) for row in rows) for column in _columns(rows)}
    for column, values in cells.items():
        if column in identifying:
            continue
        if len(set(values)) == 1:
            same[column] = values[0]
            continue
        twin = next((c for c in shown if cells[c] == values), None)
        if twin is None:
            shown.append(column)
        else:
            duplicates[column] = twin
    return shown, same, duplicates


def write_table(rows: list[dict], identifying: list[str], out: Path) -> tuple[Path, Path, str]:
    """``sweep.csv`` (every column) and ``sweep.md`` (:func:`varying`); returns both paths and
    the markdown text."""
    columns = _columns(rows)
    csv_path, md_path = out / "sweep.csv", out / "sweep.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(k)) for k in columns])
    shown, same, duplicates = varying(rows, identifying)
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row.get(k)) for k in shown) + " |" for row in rows]
    if duplicates:
        lines += ["", "equal to a column above: " + ", ".join(f"{k} (= {v})" for k, v in duplicates.items())]
    if same:
        lines += ["", "same in every run: " + ", ".join(f"{k}={v}" for k, v in same.items())]
    markdown = "\n".join(lines)
    md_path.write_text(markdown + "\n")
    return csv_path, md_path, markdown


def _inner(record: dict, *keys: str):
    """``record[k1][k2]...``, or None where a level is missing or not a mapping."""
    for key in keys:
        record = record.get(key) if isinstance(record, dict) else None
    return record


def _dotted(prefix: str, value) -> dict:
    """A nested mapping's leaves by dotted key (None: nothing)."""
    if isinstance(value, dict):
        return {k: v for key, inner in value.items() for k, v in _dotted(f"{prefix}.{key}", inner).items()}
    return {} if value is None else {prefix: value}


def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k in row))


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return format(value, ".6g")
    return str(value)
