"""``metrics.csv``: per-agent loss, gradient norm and distance to the consensus iterate.

One row per agent per logged step, columns :data:`COLUMNS`:

``step``
    s, the number of iterations completed (1..steps).  Steps s with s % log_every == 0 are
    logged, and the last step.
``agent``
    the agent's index i (its column of X).
``loss``
    the training loss of the s-th inner step of worker i, on its batch, at its parameters before
    that step (empty for a passive agent, which takes no step; ``nan`` / ``inf`` when not finite).
``grad_norm``
    ||g||_2 of that step's gradient, over all parameters (empty for a passive agent).
``consensus_distance``
    ||z_i - X a||_2 after the s-th iteration (its sync included), with a = schedule.consensus()
    and X a = theta, the virtual iterate (Wang et al. eq. 8); empty when the schedule has no
    consensus vector.  z_i is agent i's model (:func:`launch.engine.diagnostics.local_models`): x_i,
    or under push-sum the de-biased x_i / w_i.  (Push-sum's matrices are row-stochastic, so
    a = 1/m and theta = mean_i x_i = sum_i x_i / sum_i w_i, the value every z_i converges to;
    the raw x_i do not converge to it.)
``wall_time``
    seconds on rank 0 since the first iteration began.

Cost, in a run spread over several ranks: theta is a sum over every agent, and each rank holds
only its own columns, so one collective is unavoidable before any distance can be computed, and
a second one after (each distance is known only where its column lives).  That is the minimum
with O(d) traffic (one all-gather of X would do in one collective, at m times the bytes).  So a
logged step costs exactly two all-reduces over the world: (1) [sum of a_i x_i over local i |
loss and gradient norm of every agent, zero where not local] (d + 2m numbers); (2) the m
squared distances, zero where not local.  Nothing is communicated on other steps.  Co-located
and serial runs skip the collectives.  Rank 0 appends the rows and flushes the file.
"""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path

import torch

from launch.engine.health import collective

COLUMNS = ("step", "agent", "loss", "grad_norm", "consensus_distance", "wall_time")


class MetricsProbe:
    """Measures every agent's row at a logged step (a collective when the run spans ranks).

    Args:
        run: a :mod:`launch.cli.runs` run (its ``columns()``, ``models()``, ``grad_norms()``, ``agents``).
        comm: the run's communicator, or None for a single-process run.
        num_agents: m.
        consensus: the vector a (float64, length m), or None.
    """

    def __init__(self, run, comm, num_agents: int, consensus: torch.Tensor | None):
        self.run = run
        self.comm = comm if comm is not None and comm.world_size > 1 else None
        self.m = num_agents
        self.a = None if consensus is None else [float(v) for v in consensus]
        self.world = tuple(range(comm.world_size)) if self.comm is not None else None
        if self.comm is not None:
            # The world group: created (no-op if a plan already did) and warmed by every rank.
            with collective(self.comm, run.simulation.t, "creation of the metrics' group", self.world):
                self.comm.init_groups([self.world])

    def measure(self, losses: dict[int, torch.Tensor]) -> list[dict]:
        """The m rows (without ``step`` and ``wall_time``) after the current iteration.

        ``losses``: the local workers' losses of that iteration, as ``step()`` returned them.
        """
        columns = self.run.columns()
        any_column = next(iter(columns.values()))
        d = any_column.numel()
        # (1) theta = X a = sum_i a_i x_i, accumulated over the local agents, then summed over
        # ranks; the per-agent scalars ride in the same buffer (non-local entries are zero;
        # a passive agent's entries are NaN, and NaN + 0 = NaN, so they stay NaN).
        buf = torch.zeros(d + 2 * self.m, dtype=any_column.dtype, device=any_column.device)
        if self.a is not None:
            for i, x in columns.items():
                buf[:d].add_(x, alpha=self.a[i])
        norms = self.run.grad_norms()
        for i in columns:
            buf[d + 2 * i] = float(losses[i]) if i in losses else math.nan
            buf[d + 2 * i + 1] = norms.get(i, math.nan)
        self._all_reduce(buf)
        theta, stats = buf[:d], buf[d:].cpu().tolist()
        distances = [math.nan] * self.m
        if self.a is not None:
            # (2) ||z_i - theta|| where z_i lives, then shared (z_i: de-biased under push-sum).
            models = self.run.models()
            squared = torch.zeros(self.m, dtype=torch.float64, device=any_column.device)
            for i, z in models.items():
                squared[i] = float(torch.sum((z - theta) ** 2))
            self._all_reduce(squared)
            distances = squared.sqrt().cpu().tolist()
        return [
            {"agent": i, "loss": stats[2 * i], "grad_norm": stats[2 * i + 1], "consensus_distance": distances[i]}
            for i in range(self.m)
        ]

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        if self.comm is not None:   # under the lost-rank handler, as every collective of a run
            with collective(self.comm, self.run.simulation.t, "metrics all-reduce", self.world):
                self.comm.all_reduce_(tensor, self.world)


class MetricsWriter:
    """Appends rows to ``path`` (CSV with a header of :data:`COLUMNS`), flushed at every write.

    Empty fields are "not applicable": ``loss`` and ``grad_norm`` of an agent not in ``workers``
    (a passive agent), ``consensus_distance`` when ``consensus`` is False.  A value that is
    applicable but not finite is written as ``nan``, ``inf`` or ``-inf`` (``workers=None``: every
    NaN is taken as not applicable).  Floats with 17 significant digits.

    ``resume_at=t`` (a resumed run): the file's history is kept: its rows of steps up to t are
    kept, the rows after t (which the resumed run recomputes) and any partial last line are
    dropped, and the new rows are appended, their ``wall_time`` continuing from the last kept
    row's.  Without it (a new run) the file is written afresh.
    """

    def __init__(self, path: Path | str, *, workers=None, consensus: bool = True, resume_at: int | None = None):
        self.path = Path(path)
        self.workers = None if workers is None else frozenset(workers)
        self.consensus = consensus
        kept = _history(self.path, resume_at) if resume_at is not None else []
        self.offset = kept[-1][-1] if kept else 0.0
        partial = self.path.with_name(f".{self.path.name}.tmp")   # the kept history, replaced at once
        with open(partial, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            writer.writerows(row[:-1] + [f"{row[-1]:.6f}"] for row in kept)
        os.replace(partial, self.path)
        self._file = open(self.path, "a", newline="")
        self._csv = csv.writer(self._file)
        self.start = time.perf_counter()

    def write(self, step: int, rows: list[dict]) -> None:
        wall = self.offset + time.perf_counter() - self.start
        for row in rows:
            worker = self.workers is None or row["agent"] in self.workers
            self._csv.writerow([step, row["agent"], _fmt(row["loss"], worker), _fmt(row["grad_norm"], worker),
                                _fmt(row["consensus_distance"], self.consensus), f"{wall:.6f}"])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _history(path: Path, until: int) -> list[list]:
    """The complete rows of ``path`` (if it exists) with step <= ``until``, as written
    (``wall_time`` as a float, last)."""
    if not path.exists():
        return []
    kept = []
    with open(path, newline="") as f:
        for fields in csv.reader(f):
            if len(fields) != len(COLUMNS) or not fields[0].isdigit():
                continue   # the header, or a line cut short by a crash
            try:
                wall = float(fields[-1])
            except ValueError:
                continue
            if int(fields[0]) <= until:
                kept.append(fields[:-1] + [wall])
    return kept


def _fmt(value: float, applicable: bool = False) -> str:
    if value is None or (math.isnan(value) and not applicable):
        return ""
    return repr(float(value))   # nan, inf, -inf for the non-finite


def read_metrics(path: Path | str) -> list[dict]:
    """The rows of a ``metrics.csv`` as dicts (``step``, ``agent`` int; the others float: NaN
    where empty, and ``nan`` / ``inf`` as written)."""
    with open(path, newline="") as f:
        rows = []
        for row in csv.DictReader(f):
            rows.append({k: (int(v) if k in ("step", "agent") else (float(v) if v else math.nan)) for k, v in row.items()})
        return rows
