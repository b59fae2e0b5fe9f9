"""``eval.csv``: held-out metrics during training, and the inner learning rate.

``launch.eval_every=N`` evaluates, after every N-th iteration and after the last one
(``null``: after the last one only), the problem's held-out metrics (``problem.evaluate``) of

- every agent i, on its model z_i (x_i, or x_i / w_i under push-sum) with its buffers (a
  worker's own; a passive agent's: those of the lowest-numbered worker, as in ``agents.pt``);
- the virtual iterate theta = X a (Wang et al. eq. 8), when the schedule has a consensus vector
  a (``schedule.consensus()``), with the lowest-numbered worker's buffers;

and records, at every logged step (``launch.log_every``, the last one included) and every
evaluated step, each worker's inner learning rate during that iteration
(``param_groups[0]["lr"]`` of its optimizer, read before the iteration: SLRLA's stages change it).

Columns (:func:`eval_columns`):

``step``
    s, the number of iterations completed.
``agent``
    the agent's index i, or ``virtual`` for theta = X a (after the agents of its step).
``lr``
    worker i's inner learning rate during iteration s; empty for a passive agent and ``virtual``.
``heldout_<metric>``
    the problem's held-out metrics (``heldout_loss``, ``heldout_accuracy`` ...) after iteration
    s; empty at a logged step that is not evaluated.

Distributed, each rank evaluates its own agents; an evaluated step costs, over the world, one
all-gather of the lowest worker's buffers (only when the model has buffers), one all-reduce of
d numbers (the partial sums of X a; only with a consensus vector; rank 0 evaluates theta) and
one all-gather of the rows and of the learning rates recorded since the last evaluation.  Other
steps communicate nothing, so rank 0 writes (and flushes) the rows of the steps up to s at each
evaluated step.  Evaluation reads the agents and never changes them: the trajectory is that of
a run without it.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import torch

from agents.flat import load_flat_
from launch.engine.guard.health import collective, gather_objects
from launch.engine.readout import virtual_weights, weighted_sum

VIRTUAL = "virtual"


def eval_columns(metrics) -> list[str]:
    """The columns of ``eval.csv`` for a problem whose ``evaluate`` returns ``metrics``."""
    return ["step", "agent", "lr"] + [f"heldout_{k}" for k in metrics]


class Evaluator:
    """The held-out metrics of a run's agents (see the module docstring).

    Args:
        run: the run (:class:`launch.engine.record.run.Run`).
        comm: the run's communicator, or None for a single-process run.
        schedule: the run's schedule.
        evaluate: ``evaluate(module) -> {metric: value}``, the problem's held-out metrics.
        template: a module of the agents' architecture where the metrics are taken (its
            parameters and buffers are overwritten at each evaluation).
        every: evaluate after every ``every``-th step (None: only at ``last``).
        last: the run's last step, always evaluated (None: not known in advance).
        load: ``load(template, flat)`` puts an agent's flat parameters into ``template`` (default
            :func:`agents.flat.load_flat_`: every parameter of the template, in order).
    """

    def __init__(self, run, comm, schedule, evaluate, template, *, every: int | None, last: int | None,
                 load=load_flat_):
        self.run, self.evaluate_module, self.template, self.load = run, evaluate, template, load
        self.every, self.last = every, last
        self.comm = comm if comm is not None and comm.world_size > 1 else None
        self.rank = 0 if comm is None else comm.rank
        self.has_buffers = any(True for _ in self.template.buffers())
        self.a = virtual_weights(schedule)
        self.first_worker = min(schedule.workers)
        self.m = schedule.num_agents
        self.pending_lrs: dict[int, dict[int, float]] = {}  # step -> {local worker: lr}, not yet gathered
        self.evaluated = 0  # the last evaluated step
        #: The metrics' names, known from the first evaluation on (the columns of eval.csv).
        self.keys: list[str] | None = None
        #: The agents whose held-out metrics were not all finite at the last evaluation (the same
        #: on every rank: every rank receives every rank's metrics).
        self.nonfinite: list[int] = []

    # -- when -----------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether step s is evaluated: every ``eval_every``-th and the last."""
        return step == self.last or (self.every is not None and step % self.every == 0)

    def note_lr(self, step: int) -> None:
        """Record the local workers' learning rates for step ``step`` (call before its iteration)."""
        self.pending_lrs[step] = self.run.learning_rates()

    # -- evaluating -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, step: int) -> list[dict] | None:
        """Evaluate after step ``step`` (collective when distributed: every rank calls).  On rank 0
        the rows of ``eval.csv`` for every step recorded since the last evaluation, up to
        ``step`` (the evaluated one with metrics); None on the other ranks."""
        self.evaluated = step
        self.run.wait_in_flight()  # overlapped syncs: a receiver may still be written
        buffers = self._lowest_worker_buffers(step)
        own = self.run.worker_buffers()
        metrics = {i: self._metrics(z, own.get(i, buffers)) for i, z in self.run.models().items()}
        self.keys = list(next(iter(metrics.values())))        # every rank holds an agent
        virtual = self._virtual(buffers, step)
        lrs, self.pending_lrs = self.pending_lrs, {}
        parts = (gather_objects(self.comm, (metrics, lrs), step, "gather of the evaluation")
                 if self.comm is not None else [(metrics, lrs)])
        self.nonfinite = sorted(i for part, _ in parts for i, values in part.items()
                                if not all(math.isfinite(v) for v in values.values()))
        if self.rank != 0:
            return None
        merged_metrics: dict[int, dict] = {}
        for part_metrics, _ in parts:
            merged_metrics.update(part_metrics)
        return self._rows(step, merged_metrics, _merge_lrs(lrs for _, lrs in parts), virtual)

    def flush_lrs(self, step: int) -> list[dict] | None:
        """The learning-rate rows recorded since the last evaluation, gathered now (before a
        checkpoint, so that a checkpoint of t implies eval.csv's rows up to t): on rank 0 those
        rows (held-out metrics empty), None elsewhere.  A collective when distributed, made only
        once eval.csv has its columns (after the first evaluation, the same on every rank: rows
        may be pending on some ranks only, a passive rank has none); before the first evaluation
        the rows wait for it (a run resumed from a checkpoint taken before any evaluation has no
        learning-rate rows up to it)."""
        if self.keys is None:
            return [] if self.rank == 0 else None
        lrs, self.pending_lrs = self.pending_lrs, {}
        parts = gather_objects(self.comm, lrs, step, "gather of the learning rates") if self.comm is not None else [lrs]
        if self.rank != 0:
            return None
        merged = _merge_lrs(parts)
        empty = {f"heldout_{k}": math.nan for k in self.keys}
        return [{"step": s, "agent": i, "lr": merged[s].get(i, math.nan), **empty}
                for s in sorted(merged) for i in range(self.m)]

    def _rows(self, step: int, metrics: dict, lrs: dict, virtual: dict | None) -> list[dict]:
        keys = list(next(iter(metrics.values())))
        empty = {f"heldout_{k}": math.nan for k in keys}
        rows = []
        for s in sorted(set(lrs) | {step}):
            for i in range(self.m):
                values = {f"heldout_{k}": v for k, v in metrics[i].items()} if s == step else empty
                rows.append({"step": s, "agent": i, "lr": lrs.get(s, {}).get(i, math.nan), **values})
            if s == step and virtual is not None:
                rows.append({"step": s, "agent": VIRTUAL, "lr": math.nan,
                             **{f"heldout_{k}": v for k, v in virtual.items()}})
        return rows

    def _metrics(self, flat: torch.Tensor, buffers: dict) -> dict:
        """The held-out metrics of the model ``flat`` with ``buffers`` (in the template)."""
        self.load(self.template, flat.detach().to(next(self.template.parameters()).device))
        for name, buf in self.template.named_buffers():
            if name in buffers:
                buf.copy_(buffers[name])
        return self.evaluate_module(self.template)

    def _lowest_worker_buffers(self, step: int) -> dict:
        """The buffers of the lowest-numbered worker, on every rank (one all-gather when the model
        has buffers and the run spans ranks)."""
        if not self.has_buffers:
            return {}
        local = self.run.worker_buffers().get(self.first_worker)
        if self.comm is None:
            return local or {}
        mine = {n: t.cpu() for n, t in local.items()} if local is not None else None
        held = [b for b in gather_objects(self.comm, mine, step, "gather of the worker's buffers") if b is not None]
        return held[0]

    def _virtual(self, buffers: dict, step: int) -> dict | None:
        """The metrics of theta = X a = sum_i a_i x_i on rank 0 (an all-reduce of the local partial
        sums when the run spans ranks); None without a consensus vector and on the other ranks."""
        if self.a is None:
            return None
        columns = self.run.columns()
        theta = weighted_sum(columns, self.a, torch.empty_like(next(iter(columns.values()))))
        if self.comm is not None:
            world = tuple(range(self.comm.world_size))
            with collective(self.comm, step, "all-reduce of the virtual iterate", world):
                self.comm.all_reduce_(theta, world)
        return self._metrics(theta, buffers) if self.rank == 0 else None


def _merge_lrs(parts) -> dict[int, dict[int, float]]:
    """Every rank's ``{step: {worker: lr}}`` as one (each rank holds its own workers')."""
    merged: dict[int, dict[int, float]] = {}
    for part in parts:
        for s, values in part.items():
            merged.setdefault(s, {}).update(values)
    return merged


class EvalWriter:
    """Appends :class:`Evaluator` rows to ``path`` (the header from the first rows' metrics),
    flushed at every write; NaN (not applicable) is an empty field, floats with 17 digits.

    ``resume_at=t`` (a resumed run): the file's history is kept as in
    :class:`launch.engine.record.metrics.MetricsWriter` -- its complete rows of steps up to t stay
    (those after t, which the resumed run recomputes, and a line cut short are dropped) and the new
    rows are appended; the kept history is written back at once (a crash cannot lose it).  Without
    it the file is written afresh at the first rows."""

    def __init__(self, path: Path | str, *, resume_at: int | None = None):
        self.path = Path(path)
        self._file = None
        self._columns: list[str] = []
        self._kept: list[list[str]] = []
        if resume_at is not None and self.path.exists():
            columns, kept = _eval_history(self.path, resume_at)
            if columns:
                self._columns, self._kept = columns, kept
                self._open()

    def _open(self) -> None:
        partial = self.path.with_name(f".{self.path.name}.tmp")
        with open(partial, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self._columns)
            writer.writerows(self._kept)
        os.replace(partial, self.path)
        self._file = open(self.path, "a", newline="")
        self._csv = csv.writer(self._file)

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        if self._file is None:
            self._columns = ["step", "agent", "lr"] + [k for k in rows[0] if k.startswith("heldout_")]
            self._open()
        for row in rows:
            self._csv.writerow([_cell(row.get(k, math.nan)) for k in self._columns])
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _cell(value) -> str:
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    return "" if value is None or math.isnan(value) else repr(float(value))


def _eval_history(path: Path, until: int) -> tuple[list[str], list[list[str]]]:
    """The header of ``path`` and its complete rows of steps up to ``until`` (a last line
    without its newline, cut short by a crash, is dropped)."""
    lines = path.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    rows = list(csv.reader(lines))
    if not rows:
        return [], []
    header, body = rows[0], rows[1:]
    return header, [r for r in body if len(r) == len(header) and r[0].isdigit() and int(r[0]) <= until]


def read_eval(path: Path | str) -> list[dict]:
    """The rows of an ``eval.csv``: ``step`` an int, ``agent`` an int or ``"virtual"``, the other
    columns floats (NaN where empty)."""
    with open(path, newline="") as f:
        rows = []
        for row in csv.DictReader(f):
            parsed = {}
            for key, value in row.items():
                if key == "step":
                    parsed[key] = int(value)
                elif key == "agent":
                    parsed[key] = value if value == VIRTUAL else int(value)
                else:
                    parsed[key] = float(value) if value else math.nan
            rows.append(parsed)
        return rows
