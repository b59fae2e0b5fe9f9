"""The summary of a finished run, for both doors: ``summary.json`` (for programs) and
``summary.txt`` (one line, also printed).

A summary is a record (a dict): the command line's (:func:`launch.cli.summary.summary_record`)
and the own loop's (:mod:`launch.engine.own_loop.record`) are written by :func:`write_summary`:

- ``summary.json``: the record, every figure a JSON value (numbers full precision; NaN and +-Inf,
  which JSON has not, as ``null``: :func:`json_safe`, so a summary is always written);
- ``summary.txt``: ``summary: key=value key=value ...``: the flat view (:func:`flat_summary`)
  with numbers to 6 significant digits (``max_deviation`` 4, ``time_s`` 2 decimals), lists as
  ``[a,b,c]``, NaN as ``nan``; no value contains a space, so ``line.split()`` then ``key, _,
  value = item.partition("=")`` parses it (:func:`parse_summary_line`).  Programs should read
  ``summary.json``.

What a run was made of (:func:`provenance`; the keys are described in :mod:`launch.cli.summary`):
``optimizer``, ``state_policy``, ``outer``, ``final_loss``, ``versions``, ``device`` and
``device_name``.
"""

from __future__ import annotations

import functools
import json
import math
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from agents.level_policy import resolve_policy
from agents.settings import jsonable
from launch.engine.record.metrics import read_metrics
from topology.schedule import MultilayerSchedule

#: Printed precision of each figure in summary.txt (others: 6 significant digits).
FORMATS = {"max_deviation": ".3e", "tolerance": "g", "time_s": ".2f", "steps_per_s": ".1f"}

#: Keys of summary.json that summary.txt leaves out (a sentence, nested provenance).
JSON_ONLY = ("failure_detail", "versions", "device_name")

#: The distribution name of this project (its package metadata: ``versions.lookahead_agents``).
DISTRIBUTION = "lookahead-agents"


def compact(text: str) -> str:
    """``text`` without spaces (a schedule's repr as one token)."""
    return "".join(text.split())


def provenance(optimizer: torch.optim.Optimizer, state_policy, schedule, outer: dict | None, device: str,
               metrics_csv: Path | None) -> dict:
    """What a run was made of and where it ran: the keys ``optimizer`` ... ``device_name`` of the
    module docstring.  ``optimizer``: an inner optimizer of the run (its class and ``defaults``);
    ``state_policy``: as configured (a name, per level, ...); ``outer``: the slow rule's
    validated options or None; ``metrics_csv``: the run's metrics.csv (``final_loss``), or None."""
    depth = schedule.depth if isinstance(schedule, MultilayerSchedule) else None
    return {
        "optimizer": optimizer_record(optimizer),
        "state_policy": list(resolve_policy(state_policy, depth)),
        "outer": None if outer is None else jsonable(outer),
        "final_loss": final_loss(metrics_csv, schedule.workers) if metrics_csv is not None else None,
        "versions": versions(),
        **device_record(device),
    }


def optimizer_record(optimizer: torch.optim.Optimizer) -> dict:
    """``{"name", "hyperparameters"}`` of an inner optimizer: its class name and its ``defaults``
    (every hyperparameter, the defaults it was not given included).

    Example:
        >>> optimizer_record(torch.optim.SGD([torch.zeros(1)], lr=0.1))["hyperparameters"]["lr"]
        0.1
    """
    return {"name": type(optimizer).__name__, "hyperparameters": jsonable(dict(optimizer.defaults))}


def final_loss(metrics_csv: Path, workers) -> dict | None:
    """``{"step", "mean", "per_worker"}``: the losses of ``workers`` at the last step logged in
    ``metrics_csv`` and their mean (NaN when one is not finite: null in the JSON); None when
    the file is missing or has no row."""
    rows = read_metrics(metrics_csv) if Path(metrics_csv).is_file() else []
    if not rows:
        return None
    last = max(r["step"] for r in rows)
    losses = {r["agent"]: _float(r["loss"]) for r in rows if r["step"] == last and r["agent"] in set(workers)}
    mean = math.fsum(losses.values()) / len(losses) if losses else math.nan
    return {"step": last, "mean": finite_or_none(mean), "per_worker": {str(i): finite_or_none(v) for i, v in sorted(losses.items())}}


@functools.lru_cache(maxsize=1)
def versions() -> dict:
    """``{"python", "torch", "lookahead_agents", "git_commit"}`` (see the module docstring)."""
    try:
        project = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        project = None
    return {"python": platform.python_version(), "torch": torch.__version__, "lookahead_agents": project,
            "git_commit": git_commit(Path(__file__).resolve().parents[3])}


def git_commit(root: Path) -> str | None:
    """``git rev-parse HEAD`` of ``root`` when ``root`` is the top of a git checkout, with
    ``-dirty`` appended when a tracked file differs from it (untracked files do not count, as
    with ``git describe --dirty``); None without git, outside a checkout, or when git fails."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return None
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def device_record(device: str) -> dict:
    """``{"device", "device_name"}``: the run's device, and the CUDA device's name (None on a CPU)."""
    name = torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else None
    return {"device": str(device), "device_name": name}


def json_safe(value):
    """``value`` with every non-finite float (NaN, +-Inf), at any depth, replaced by None.

    Example:
        >>> json_safe({"a": [1.0, float("inf")], "b": float("nan"), "c": "inf"})
        {'a': [1.0, None], 'b': None, 'c': 'inf'}
    """
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def flat_summary(record: dict) -> dict:
    """The record's flat view (summary.txt's keys, in order; nulls and :data:`JSON_ONLY` left out).

    Example:
        >>> flat_summary({"topology": {"name": "lookahead", "options": {}, "repr": "LA(k=5)"}, "steps": 3,
        ...               "heldout": {"loss": [0.5, 0.25]}, "virtual_heldout": {"loss": 0.3}, "tolerance": None,
        ...               "optimizer": {"name": "SGD", "hyperparameters": {"lr": 0.1}},
        ...               "final_loss": {"step": 3, "mean": 0.4, "per_worker": {"0": 0.4}}})
        {'topology': 'LA(k=5)', 'steps': 3, 'heldout_loss': [0.5, 0.25], 'virtual_heldout_loss': 0.3, \
'optimizer': 'SGD', 'final_loss': 0.4}
    """
    flat = {}
    for key, value in record.items():
        if key in JSON_ONLY or value is None:
            continue
        if key == "topology":
            flat[key] = value["repr"]
        elif key in ("heldout", "virtual_heldout"):
            flat.update({f"{key}_{metric}": v for metric, v in value.items()})
        elif key in ("optimizer", "outer"):
            flat[key] = value["name"]
        elif key == "final_loss":
            flat[key] = value["mean"]
        else:
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
    """Write ``summary.json`` (non-finite numbers as null: :func:`json_safe`) and ``summary.txt``
    under ``out_dir``; returns the line."""
    line = summary_line(record)
    (out_dir / "summary.json").write_text(json.dumps(json_safe(record), indent=1, allow_nan=False) + "\n")
    (out_dir / "summary.txt").write_text(line + "\n")
    return line


def read_summary(run_dir: Path | str) -> dict:
    """A run directory's ``summary.json``."""
    return json.loads((Path(run_dir) / "summary.json").read_text())


def _float(value) -> float:
    return math.nan if value is None else value


def finite_or_none(value):
    """A float for JSON: None for None, NaN and infinities."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


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
