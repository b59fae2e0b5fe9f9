"""The command line's summary of a run: ``summary.json`` (for programs) and ``summary.txt`` (one
line, also printed).

:func:`summary_record` is the one description of a finished command-line run; both files are
written from it by :func:`launch.engine.record.summary.write_summary` (the own loop's record
writes its summary through the same functions):

- ``summary.json``: the record, every figure a JSON value (numbers full precision, NaN as
  ``null``); the schedule as ``{"name", "options", "repr"}`` (the configuration's
  ``topology.name`` and options);
- ``summary.txt``: ``summary: key=value key=value ...``: the flat view (:func:`launch.engine.record.summary.flat_summary`)
  with numbers to 6 significant digits (``max_deviation`` 4, ``time_s`` 2 decimals), lists as
  ``[a,b,c]``; no value contains a space, so ``line.split()`` then ``key, _, value =
  item.partition("=")`` parses it (:func:`launch.engine.record.summary.parse_summary_line`).  Programs should read
  ``summary.json``.

Keys (json; the flat view in brackets where it differs): ``problem``, ``topology``
[``topology``: its ``repr``], ``launch``, ``processes``, ``steps``, ``resumed_from`` (t of the
checkpoint resumed from, or null), ``dtype``, ``seed``, ``heldout`` (``{metric: [value per
agent]}``) [``heldout_<metric>``], ``virtual_heldout`` (``{metric: value}`` of theta = X a, or
null) [``virtual_heldout_<metric>``], ``spectral_gap``, ``max_deviation`` and ``tolerance`` (null
unless checked against the serial reference), ``time_s``, ``steps_per_s``, ``status``,
``failure``, ``failure_detail`` and ``exit_status`` (below); with ``launch.cluster``,
``cluster``, ``compute_s``, ``compute_measured``, ``sim_time_s`` and ``sim_time_per_step_s``
(:mod:`launch.engine.record.clock`; null without).  Then what the run was made of (:func:`launch.engine.record.summary.provenance`):

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
``null`` in summary.json (:func:`launch.engine.record.summary.json_safe`: a summary is always written); summary.txt writes
them as ``nan`` / ``inf``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from agents.settings import jsonable
from launch.cli.errors import EXIT_CHECKPOINT, EXIT_DEVIATION, EXIT_NONFINITE, EXIT_OK
from launch.engine.record.summary import compact, finite_or_none, provenance

#: The simulated-time keys (null without ``launch.cluster``: :mod:`launch.engine.record.clock`).
SIMULATED = ("cluster", "compute_s", "compute_measured", "sim_time_s", "sim_time_per_step_s")


#: The summary's ``failure`` of each failing exit status.
FAILURES = {EXIT_DEVIATION: "deviation", EXIT_NONFINITE: "non_finite", EXIT_CHECKPOINT: "checkpoint"}


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
        "heldout": {k: [finite_or_none(r[f"heldout_{k}"]) for r in agent_rows] for k in metrics},
        "virtual_heldout": None if virtual_row is None else {k: finite_or_none(virtual_row[f"heldout_{k}"]) for k in metrics},
        "spectral_gap": finite_or_none(gap),
        "max_deviation": finite_or_none(worst),
        "tolerance": finite_or_none(tolerance),
        "time_s": finite_or_none(elapsed),
        "steps_per_s": finite_or_none((job.launch.steps - first) / max(elapsed, 1e-9)),
        "status": status,
        "failure": failure,
        "failure_detail": failure_detail,
        "exit_status": exit_status,
        **{key: (simulated or {}).get(key) for key in SIMULATED},
        **provenance(job.optimizer([torch.nn.Parameter(torch.zeros(1))]), job.state_policy, job.schedule, job.outer,
                     job.launch.device, metrics_csv),
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
