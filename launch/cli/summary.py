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
unless checked against the serial reference), ``time_s``, ``steps_per_s``, ``status``,
``failure``, ``failure_detail`` and ``exit_status`` (below); with ``launch.cluster``,
``cluster``, ``compute_s``, ``compute_measured``, ``sim_time_s`` and ``sim_time_per_step_s``
(:mod:`launch.engine.record.clock`; null without).  Then what the run was made of (:func:`provenance`):

- ``optimizer``: ``{"name", "hyperparameters"}``: the inner optimizer's class name (``SGD``) and
  every hyperparameter it runs with, defaults included (its ``defaults``: ``lr``, ``momentum``,
  ``weight_decay``, ...) [``optimizer``: the name];
- ``state_policy``: the policy of each level, level 1 first (one entry for a schedule without
  levels) [``[maintain,maintain]``];
- ``outer``: the slow rule (``agents.outer``) with every option, defaults filled in, or null
  [``outer``: its name];
- ``final_loss``: ``{"step", "mean", "per_worker"}``: the training loss of the last logged step
  of metrics.csv (``per_worker``: ``{worker: loss}``; ``mean``: their mean over the workers), or
  null when metrics.csv has no row [``final_loss``: the mean];
- ``versions``: ``{"python", "torch", "lookahead_agents", "git_commit"}``: the project's version
  from its package metadata (null when not installed), and ``git rev-parse HEAD`` of the source
  when it is a git checkout (``<sha>-dirty`` when tracked files have changes, as ``git describe
  --dirty``; null without git or outside a checkout) [left out];
- ``device`` (``cpu``, ``cuda:0`` ...: rank 0's) and ``device_name`` (the CUDA device's name;
  null on a CPU) [``device``].

``status`` agrees with the exit status: ``ok`` when it is 0, else ``FAILED``; ``failure`` says
why (null when ok): ``deviation`` (exit 1: above tolerance), ``non_finite`` (exit 3: NaN or Inf
at the end of the run) or ``checkpoint`` (exit 5: the results are written and good, but the final
checkpoint is not: a resume starts from the last one written); ``failure_detail`` is the
sentence (summary.json only).

Non-finite numbers: JSON has none, so every NaN and +-Inf anywhere in the record is written as
``null`` in summary.json (:func:`json_safe`: a summary is always written); summary.txt writes
them as ``nan`` / ``inf``.
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
from launch.cli.errors import EXIT_CHECKPOINT, EXIT_DEVIATION, EXIT_NONFINITE, EXIT_OK
from launch.cli.run_files import read_rows
from topology.schedule import MultilayerSchedule

#: The simulated-time keys (null without ``launch.cluster``: :mod:`launch.engine.record.clock`).
SIMULATED = ("cluster", "compute_s", "compute_measured", "sim_time_s", "sim_time_per_step_s")

#: Printed precision of each figure in summary.txt (others: 6 significant digits).
FORMATS = {"max_deviation": ".3e", "tolerance": "g", "time_s": ".2f", "steps_per_s": ".1f"}

#: The summary's ``failure`` of each failing exit status.
FAILURES = {EXIT_DEVIATION: "deviation", EXIT_NONFINITE: "non_finite", EXIT_CHECKPOINT: "checkpoint"}

#: Keys of summary.json that summary.txt leaves out (a sentence, nested provenance).
JSON_ONLY = ("failure_detail", "versions", "device_name")

#: The distribution name of this project (its package metadata: ``versions.lookahead_agents``).
DISTRIBUTION = "lookahead-agents"


def compact(text: str) -> str:
    """``text`` without spaces (a schedule's repr as one token)."""
    return "".join(text.split())


def summary_record(job, *, processes: int, agent_rows: list[dict], virtual_row: dict | None, gap: float,
                   tolerance: float | None, worst: float | None, elapsed: float, first: int, exit_status: int,
                   failure: str | None = None, failure_detail: str | None = None, final_checkpoint=None,
                   metrics_csv: Path | None = None, simulated: dict | None = None) -> dict:
    """The summary of a finished run of ``job`` (see the module docstring for the keys).

    ``agent_rows``: the final evaluation's rows of the agents (``heldout_<metric>`` keys, by
    agent); ``virtual_row``: theta's, or None; ``tolerance`` / ``worst``: None when unchecked;
    ``first``: the iteration the run started at (a resumed run's checkpoint t, else 0);
    ``exit_status``: the run's exit status, with ``failure`` / ``failure_detail`` (the run's
    ending's verdict) and ``final_checkpoint`` (the error of a final checkpoint that could not
    be written, or None): :func:`verdict`; ``metrics_csv``: the run's metrics.csv (the final
    training loss); ``simulated``: :meth:`launch.engine.record.clock.SimulatedTime.summary`, or None."""
    metrics = [k.removeprefix("heldout_") for k in agent_rows[0] if k.startswith("heldout_")]
    status, failure, failure_detail = verdict(exit_status, failure, failure_detail, final_checkpoint)
    return {
        "problem": job.problem_name,
        "topology": {"name": job.topology_name, "options": jsonable(job.topology_options or {}),
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
        "exit_status": exit_status,
        **{key: (simulated or {}).get(key) for key in SIMULATED},
        **provenance(job.optimizer, job.state_policy, job.schedule, job.outer, job.launch.device, metrics_csv),
    }


def verdict(exit_status: int, failure: str | None, detail: str | None, final_checkpoint=None
            ) -> tuple[str, str | None, str | None]:
    """(``status``, ``failure``, ``failure_detail``) of a run that exits ``exit_status``: ``ok``
    exactly when it is 0, else ``FAILED`` with the ending's ``failure`` and ``detail`` or, when
    the ending gave none, the failure of the status (:data:`FAILURES`: a final checkpoint that
    could not be written is ``checkpoint``, its error the detail).

    Example:
        >>> verdict(5, None, None, OSError("disk full"))
        ('FAILED', 'checkpoint', 'disk full; the results are written and good, the final checkpoint is not')
        >>> verdict(0, None, None)
        ('ok', None, None)
    """
    if exit_status == EXIT_OK:
        return "ok", None, None
    failure = failure or FAILURES.get(exit_status, f"exit_{exit_status}")
    if detail is None and final_checkpoint is not None:
        detail = f"{final_checkpoint}; the results are written and good, the final checkpoint is not"
    return "FAILED", failure, detail


def provenance(optimizer, state_policy, schedule, outer: dict | None, device: str, metrics_csv: Path | None) -> dict:
    """What a run was made of and where it ran: the keys ``optimizer`` ... ``device_name`` of the
    module docstring.  ``optimizer``: the inner-optimizer factory (``params -> Optimizer``);
    ``state_policy``: as configured (a name, per level, ...); ``outer``: the slow rule's
    validated options or None; ``metrics_csv``: the run's metrics.csv (``final_loss``), or None."""
    depth = schedule.depth if isinstance(schedule, MultilayerSchedule) else None
    return {
        "optimizer": optimizer_record(optimizer([torch.nn.Parameter(torch.zeros(1))])),
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
    rows = read_rows(metrics_csv) if Path(metrics_csv).is_file() else []
    if not rows:
        return None
    last = max(r["step"] for r in rows)
    losses = {r["agent"]: _float(r["loss"]) for r in rows if r["step"] == last and r["agent"] in set(workers)}
    mean = math.fsum(losses.values()) / len(losses) if losses else math.nan
    return {"step": last, "mean": _number(mean), "per_worker": {str(i): _number(v) for i, v in sorted(losses.items())}}


@functools.lru_cache(maxsize=1)
def versions() -> dict:
    """``{"python", "torch", "lookahead_agents", "git_commit"}`` (see the module docstring)."""
    try:
        project = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        project = None
    return {"python": platform.python_version(), "torch": torch.__version__, "lookahead_agents": project,
            "git_commit": git_commit(Path(__file__).resolve().parents[2])}


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


def _number(value):
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
