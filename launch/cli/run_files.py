"""Reading the record of a run for ``python -m launch.plot``: never a traceback, never a silent drop.

A run directory holds ``metrics.csv`` (required), and, when the run wrote them, ``eval.csv``,
``summary.json``, ``agents.pt`` and hydra's ``.hydra/overrides.yaml`` / ``.hydra/config.yaml``.
:func:`read_run` reads them into a :class:`Run`; everything it leaves out is said on stderr by
:class:`Notes`:

- a file that exists but cannot be read (an ``OSError``, not UTF-8, a CSV without ``step`` /
  ``agent`` columns or with a value that is not a number, JSON that does not parse or is not an
  object) is a ``warning:`` naming the file and what is left out, and counts as unreadable
  (:attr:`Notes.unreadable`: the command's exit status is then 2, after it drew the rest);
  an unreadable ``metrics.csv`` is an error (``ValueError``: nothing to draw);
- what the data lacks (no ``eval.csv``, an agent without rows in one of the files, a run
  directory of a sweep without ``metrics.csv``) is a ``warning:`` too, but not an error.

The CSV values: :func:`read_rows` keeps an empty cell as None (the value does not apply: a
passive agent's loss, the distance of a schedule without a consensus vector) and a written
``nan`` / ``inf`` as that float (a value that was recorded and is not finite).  Old metrics.csv
files name the distance to the virtual iterate ``consensus_distance``; it is read as
``distance_to_virtual`` (:data:`RENAMED`) when the file has no column of that name.
"""

from __future__ import annotations

import csv
import json
import math
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

#: The agent column of theta = X a in eval.csv.
VIRTUAL = "virtual"

#: Columns of older files -> their current names (read when the current one is absent).
RENAMED = {"consensus_distance": "distance_to_virtual"}

#: The dtypes a run can have, by the name summary.json and the configuration give them.
FLOATS = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}

#: Errors of reading a file that is there: it is unreadable, not a bug.
READ_ERRORS = (OSError, EOFError, ValueError, TypeError, KeyError, AttributeError, csv.Error, pickle.UnpicklingError,
               OmegaConfBaseException)


class Notes:
    """The warnings and notes of one command: each printed at once, on stderr, one line each."""

    def __init__(self, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.unreadable: list[Path] = []

    def warn(self, text: str) -> None:
        print(f"warning: {' '.join(text.split())}", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        print(f"note: {' '.join(text.split())}", file=self.stream, flush=True)

    def cannot_read(self, path: Path, err: Exception, left_out: str) -> None:
        """``path`` exists but could not be read: a warning, and it counts as unreadable."""
        self.unreadable.append(path)
        self.warn(f"cannot read {path}: {_reason(err)}; {left_out}")


@dataclass
class Run:
    """One run directory's record (see the module docstring)."""

    path: Path
    metrics: list[dict]
    evals: list[dict] = field(default_factory=list)
    summary: dict | None = None
    overrides: list[str] = field(default_factory=list)
    dtype: str | None = None               # launch.dtype (summary.json, else .hydra/config.yaml)
    scale: float | None = None             # the largest ||z_i||_2 of agents.pt (None: not there)

    @property
    def eps(self) -> float:
        """The machine epsilon of the run's dtype (float64's when it is not known)."""
        return torch.finfo(FLOATS.get(self.dtype, torch.float64)).eps


def read_rows(path: Path) -> list[dict]:
    """A metrics.csv / eval.csv: ``step`` an int, ``agent`` an int or ``"virtual"``, the other
    cells floats (None where empty).  ``ValueError`` when a column or a value is malformed."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("step", "agent") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"no {' or '.join(missing)} column (the header is {reader.fieldnames})")
        names = {k: (RENAMED[k] if k in RENAMED and RENAMED[k] not in reader.fieldnames else k)
                 for k in reader.fieldnames}
        rows = []
        for line, row in enumerate(reader, start=2):
            if None in row or None in row.values():
                raise ValueError(f"line {line} has {'more' if None in row else 'fewer'} cells than the header")
            rows.append({names[k]: _cell(k, v) for k, v in row.items()})
        return rows


def read_run(path: Path, notes: Notes, models: bool = True) -> Run:
    """The record of the run directory ``path`` (``models``: with :attr:`Run.scale`, which reads
    agents.pt); ``ValueError`` when its metrics.csv cannot be read, a warning (:class:`Notes`)
    for each other file that cannot."""
    try:
        run = Run(path, read_rows(path / "metrics.csv"))
    except READ_ERRORS as err:
        raise ValueError(f"cannot read {path / 'metrics.csv'}: {_reason(err)}") from None
    if (path / "eval.csv").is_file():
        run.evals = _attempt(notes, path / "eval.csv", read_rows, [], "the held-out panels are left out")
    else:
        notes.warn(f"{path} has no eval.csv: no held-out metric or learning rate is drawn for it")
    if (path / "summary.json").is_file():
        run.summary = _attempt(notes, path / "summary.json", _json_object, None, "its figures are left out")
    run.overrides = _overrides(path, notes)
    run.dtype = (run.summary or {}).get("dtype") or _configured_dtype(path, notes)
    if models and (path / "agents.pt").is_file():
        run.scale = _attempt(notes, path / "agents.pt", largest_norm, None,
                             "a distance panel is not compared with the models' size")
    _warn_missing_agents(run, notes)
    return run


def is_run(path: Path) -> bool:
    return (path / "metrics.csv").is_file()


def read_sweep(path: Path, notes: Notes) -> list[Run]:
    """The runs directly below ``path``, in hydra's job order (0, 1, ..., 10).  A sub-directory
    without metrics.csv (a job that failed before its first row) or whose metrics.csv cannot be
    read is left out with a warning."""
    runs = []
    for sub in sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)):
        if not is_run(sub):
            notes.warn(f"{sub} has no metrics.csv: left out of the sweep")
            continue
        try:
            runs.append(read_run(sub, notes))
        except ValueError as err:
            notes.unreadable.append(sub / "metrics.csv")
            notes.warn(f"{err}; the run is left out of the sweep")
    return runs


def largest_norm(path: Path) -> float:
    """max_i ||z_i||_2 over the agents of an ``agents.pt`` (a list of state dicts), every
    floating entry of the state dict counted (buffers included)."""
    states = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(states, (list, tuple)) or not all(isinstance(s, dict) for s in states):
        raise ValueError("not a list of state dicts")
    norms = [math.sqrt(sum(float(v.double().square().sum()) for v in s.values()
                           if torch.is_tensor(v) and v.is_floating_point())) for s in states]
    return max(norms, default=0.0)


def _cell(key: str, value: str):
    if key == "step":
        return int(value)
    if key == "agent":
        return value if value == VIRTUAL else int(value)
    return float(value) if value != "" else None


def _json_object(path: Path) -> dict:
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"it holds a JSON {type(value).__name__}, not an object")
    return value


def _attempt(notes: Notes, path: Path, reader, default, left_out: str):
    try:
        return reader(path)
    except READ_ERRORS as err:
        notes.cannot_read(path, err, left_out)
        return default


def _overrides(path: Path, notes: Notes) -> list[str]:
    """The run's command-line overrides (``.hydra/overrides.yaml``), [] when absent."""
    file = path / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return []
    return _attempt(notes, file, lambda f: [str(o) for o in OmegaConf.load(f)], [], "the run is labelled by its folder")


def _configured_dtype(path: Path, notes: Notes) -> str | None:
    """``launch.dtype`` of ``.hydra/config.yaml``, or None."""
    file = path / ".hydra" / "config.yaml"
    if not file.is_file():
        return None
    return _attempt(notes, file, lambda f: str(OmegaConf.load(f).launch.dtype), None, "its dtype is taken as float64")


def _warn_missing_agents(run: Run, notes: Notes) -> None:
    """An agent with rows in one of metrics.csv / eval.csv and none in the other."""
    in_metrics = {r["agent"] for r in run.metrics}
    in_evals = {r["agent"] for r in run.evals} - {VIRTUAL}
    if run.metrics and run.evals:
        for agent in sorted(in_metrics - in_evals):
            notes.warn(f"{run.path}: agent {agent} has no row in eval.csv: it is not in the held-out panels")
        for agent in sorted(in_evals - in_metrics):
            notes.warn(f"{run.path}: agent {agent} has no row in metrics.csv: it is drawn in the held-out "
                       f"panels only")


def _reason(err: Exception) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__
