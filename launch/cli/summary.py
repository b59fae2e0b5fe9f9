"""The run's summary: ``summary.json`` (for programs) and ``summary.txt`` (one line, also printed).

:func:`summary_record` is the one description of a finished run; both files are written from it
(:func:`write_summary`):

- ``summary.json``: the record, every figure a JSON value (numbers full precision, NaN as
  ``null``); the schedule as ``{"name", "options", "repr"}`` (the configuration's
  ``topology.name`` and options);
- ``summary.txt``: ``summary: key=value key=value ...``: the flat view (:func:`flat_summary`)
  with numbers to 6 significant digits (``max_deviation`` 4, ``time_s`` 2 decimals), lists as
  ``[a,b,c]``; no value contains a space, so ``line.split()`` then ``key, _, value =
  item.partition("=")`` parses it (:func:`parse_summary_line`).  Programs should read
  ``summary.json``.

Keys (json; the flat view in brackets where it differs): ``problem``, ``topology``
[``topology``: its ``repr``], ``launch``, ``processes``, ``steps``, ``resumed_from`` (t of the
checkpoint resumed from, or null), ``dtype``, ``seed``, ``heldout`` (``{metric: [value per
agent]}``) [``heldout_<metric>``], ``virtual_heldout`` (``{metric: value}`` of theta = X a, or
null) [``virtual_heldout_<metric>``], ``spectral_gap``, ``max_deviation`` and ``tolerance`` (null
unless checked against the serial reference), ``time_s``, ``steps_per_s``, ``status`` (``ok`` or
``FAILED``: the run's results are not to be trusted), ``failure`` (why: ``deviation`` above
tolerance, ``non_finite`` at the end of the run; null when ok) and ``failure_detail`` (the sentence;
summary.json only); with ``launch.cluster``, ``cluster``, ``compute_s``, ``compute_measured``,
``sim_time_s`` and ``sim_time_per_step_s`` (:mod:`launch.engine.record.clock`; null without).  A final checkpoint that could not be written leaves ``status=ok`` (the
results are good and written; the run exits 5 and says so on stderr).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

#: The simulated-time keys (null without ``launch.cluster``: :mod:`launch.engine.record.clock`).
SIMULATED = ("cluster", "compute_s", "compute_measured", "sim_time_s", "sim_time_per_step_s")

#: Printed precision of each figure in summary.txt (others: 6 significant digits).
FORMATS = {"max_deviation": ".3e", "tolerance": "g", "time_s": ".2f", "steps_per_s": ".1f"}


def compact(text: str) -> str:
    """``text`` without spaces (a schedule's repr as one token)."""
    return "".join(text.split())


def summary_record(job, *, processes: int, agent_rows: list[dict], virtual_row: dict | None, gap: float,
                   tolerance: float | None, worst: float | None, elapsed: float, first: int, status: str,
                   failure: str | None = None, failure_detail: str | None = None, simulated: dict | None = None) -> dict:
    """The summary of a finished run of ``job`` (see the module docstring for the keys).

    ``agent_rows``: the final evaluation's rows of the agents (``heldout_<metric>`` keys, by
    agent); ``virtual_row``: theta's, or None; ``tolerance`` / ``worst``: None when unchecked;
    ``first``: the iteration the run started at (a resumed run's checkpoint t, else 0);
    ``simulated``: :meth:`launch.engine.record.clock.SimulatedTime.summary`, or None (no cluster)."""
    metrics = [k.removeprefix("heldout_") for k in agent_rows[0] if k.startswith("heldout_")]
    return {
        "problem": job.problem_name,
        "topology": {"name": job.topology_name, "options": _jsonable(job.topology_options or {}),
                     "repr": compact(repr(job.schedule))},
        "launch": job.launch.mode,
        "processes": processes,
        "steps": job.launch.steps,
        "resumed_from": first if first else None,
        "dtype": str(job.launch.dtype).replace("torch.", ""),
        "seed": job.launch.seed,
        "heldout": {k: [_number(r[f"heldout_{k}"]) for r in agent_rows] for k in metrics},
        "virtual_heldout": None if virtual_row is None else {k: _number(virtual_row[f"heldout_{k}"]) for k in metrics},
        "spectral_gap": _number(gap),
        "max_deviation": _number(worst),
        "tolerance": _number(tolerance),
        "time_s": _number(elapsed),
        "steps_per_s": _number((job.launch.steps - first) / max(elapsed, 1e-9)),
        "status": status,
        "failure": failure,
        "failure_detail": failure_detail,
        **{key: (simulated or {}).get(key) for key in SIMULATED},
    }


def flat_summary(record: dict) -> dict:
    """The record's flat view (summary.txt's keys, in order; nulls left out).

    Example:
        >>> flat_summary({"topology": {"name": "lookahead", "options": {}, "repr": "LA(k=5)"}, "steps": 3,
        ...               "heldout": {"loss": [0.5, 0.25]}, "virtual_heldout": {"loss": 0.3}, "tolerance": None})
        {'topology': 'LA(k=5)', 'steps': 3, 'heldout_loss': [0.5, 0.25], 'virtual_heldout_loss': 0.3}
    """
    flat = {}
    for key, value in record.items():
        if key == "failure_detail":          # a sentence: summary.json only
            continue
        if key == "topology":
            flat[key] = value["repr"]
        elif key in ("heldout", "virtual_heldout") and value is not None:
            flat.update({f"{key}_{metric}": v for metric, v in value.items()})
        elif value is not None:
            flat[key] = value
    return flat


def summary_line(record: dict) -> str:
    """``summary: key=value ...`` of :func:`flat_summary` (no spaces inside values)."""
    return "summary: " + " ".join(f"{k}={_text(k, v)}" for k, v in flat_summary(record).items())


def parse_summary_line(line: str) -> dict:
    """summary.txt's line back as a dict: numbers as int / float, lists as lists, ``nan`` as NaN,
    other values as strings.

    Example:
        >>> parse_summary_line("summary: problem=nqm steps=3 heldout_loss=[0.5,nan] status=ok")
        {'problem': 'nqm', 'steps': 3, 'heldout_loss': [0.5, nan], 'status': 'ok'}
    """
    items = line.strip().removeprefix("summary:").split()
    parsed = {}
    for item in items:
        key, _, value = item.partition("=")
        if value.startswith("[") and value.endswith("]"):
            parsed[key] = [_value(v) for v in value[1:-1].split(",") if v]
        else:
            parsed[key] = _value(value)
    return parsed


def write_summary(out_dir: Path, record: dict) -> str:
    """Write ``summary.json`` and ``summary.txt`` under ``out_dir``; returns the line."""
    line = summary_line(record)
    (out_dir / "summary.json").write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    (out_dir / "summary.txt").write_text(line + "\n")
    return line


def read_summary(run_dir: Path | str) -> dict:
    """A run directory's ``summary.json``."""
    return json.loads((Path(run_dir) / "summary.json").read_text())


def _number(value):
    """A float for JSON: None for None, NaN and infinities."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _jsonable(value):
    """Configuration values as JSON values (tuples as lists; anything else as its string)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _text(key: str, value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_text(key, v) for v in value) + "]"
    if value is None:
        return "nan"
    if isinstance(value, float):
        return format(value, FORMATS.get(key, ".6g"))
    return compact(str(value))


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
