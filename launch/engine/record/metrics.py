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
``distance_to_virtual``
    ||z_i - X a||_2 after the inner steps of the s-th iteration and *before its sync*, with a =
    schedule.consensus() and X a = theta, the virtual iterate (Wang et al. eq. 8; a sync does not
    move it, P a = a): agent i's distance to the virtual iterate, the spread that the sync
    removes -- measured after the sync, a Lookahead or local-SGD run logged at its syncs would
    show 0 (:mod:`launch.engine.readout`; not the consensus distance, which is the workers'
    spread around their mean); empty when the schedule has no consensus vector.  z_i is agent
    i's model (:func:`launch.engine.readout.models`): x_i, or under push-sum the de-biased
    x_i / w_i.  (Push-sum's matrices are row-stochastic, so a = 1/m and theta = mean_i x_i =
    sum_i x_i / sum_i w_i, the value every z_i converges to; the raw x_i do not converge to it.)
``wall_time``
    seconds on rank 0 since the first iteration began (a resumed run: continuing the kept rows').
``sim_time``
    the simulated time after iteration s on ``launch.cluster`` (:mod:`launch.engine.record.clock`);
    empty without a cluster.

Cost, in a run spread over several ranks (co-located and serial runs communicate nothing).
Rank 0 writes every row, so the losses and gradient norms of workers on other ranks, and the
distances of their agents, must reach it; theta is a sum over every agent's column.  What a run
does (:meth:`MetricsProbe.log`, called before the sync of a logged step, off the critical
path): three asynchronous collectives, each started at one logged step and waited for at the
next -- a reduce to rank 0 of [sum of a_i x_i over local i | losses and gradient norms] (d + 2m
numbers), its broadcast back (the theta every rank needs for its own agents' distances, measured
on a copy of its models taken at the logged step), and a reduce of the m squared distances;
without a consensus vector, the reduce of the losses and gradient norms alone.

So a row is written one to three logged steps after its step (with that step's ``wall_time``),
the rest at the end of the run (:meth:`MetricsProbe.finish`), and no logged step waits for a
collective it started.  The values are those of the synchronous :meth:`MetricsProbe.measure`
(two all-reduces over the world, for callers that want rows at once), up to the summation order
of theta.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections import deque
from pathlib import Path

import torch

from launch.engine.guard.health import collective
from launch.engine.readout import squared_distances, virtual_weights, weighted_sum

COLUMNS = ("step", "agent", "loss", "grad_norm", "distance_to_virtual", "wall_time", "sim_time")


class MetricsProbe:
    """Measures every agent's row at a logged step.

    Args:
        run: a :mod:`launch.cli.runs` run (its ``columns()``, ``models()``, ``grad_norms()``,
            ``engine``).
        comm: the run's communicator, or None for a single-process run.
        schedule: the run's schedule.
    """

    def __init__(self, run, comm, schedule):
        self.run = run
        self.comm = comm if comm is not None and comm.world_size > 1 else None
        self.m = schedule.num_agents
        self.a = virtual_weights(schedule)
        self.world = tuple(range(comm.world_size)) if self.comm is not None else None
        #: In flight, oldest first: [step, wall, generator, pending collective, rows or None].
        self._entries: deque = deque()

    # -- at once -------------------------------------------------------------------------------------
    def measure(self, losses: dict[int, torch.Tensor]) -> list[dict]:
        """The m rows (without ``step`` and ``wall_time``) after the current iteration, at once
        (distributed: two all-reduces over the world).

        ``losses``: the local workers' losses of that iteration, as ``step()`` returned them.
        """
        buf, d = self._partial_sum(losses)
        self._all_reduce(buf)
        theta, stats = buf[:d], buf[d:].cpu().tolist()
        distances = [math.nan] * self.m
        if self.a is not None:
            # (2) ||z_i - theta|| where z_i lives, then shared (z_i: de-biased under push-sum).
            squared = squared_distances(self.run.models(), theta, self.m)
            self._all_reduce(squared)
            distances = squared.sqrt().cpu().tolist()
        return _rows(stats, distances)

    # -- off the critical path (the command line) ------------------------------------------------------
    def log(self, step: int, losses: dict[int, torch.Tensor], wall: float) -> list[tuple[int, list[dict], float]]:
        """Start measuring logged step ``step`` (``wall``: its wall time); returns the entries
        ``(step, rows, wall)`` complete now, in step order (rows on rank 0 only; [] elsewhere).
        Every rank calls it at the same steps."""
        if self.comm is None:
            return [(step, self.measure(losses), wall)]
        self._advance()
        entry = [step, wall, self._entry(step, losses), None, None]
        self._entries.append(entry)
        self._move(entry)
        return self._complete()

    def finish(self) -> list[tuple[int, list[dict], float]]:
        """Complete every entry in flight (collective: every rank calls it at the end)."""
        while any(entry[4] is None for entry in self._entries):
            self._advance()
        return self._complete()

    def _move(self, entry: list) -> None:
        """Run ``entry``'s generator to its next collective (or to its rows), started under the
        lost-rank handler as every collective of a run."""
        with collective(self.comm, self.run.engine.t, f"metrics of step {entry[0]}", self.world):
            try:
                entry[3] = next(entry[2])
            except StopIteration as stop:
                entry[3], entry[4] = None, stop.value

    def _advance(self) -> None:
        """Every entry in flight moves one phase on: its collective waited for, the next started."""
        for entry in self._entries:
            if entry[4] is None:
                with collective(self.comm, self.run.engine.t, f"metrics of step {entry[0]}", self.world):
                    entry[3].wait()
                self._move(entry)

    def _complete(self) -> list:
        """The complete entries at the front, oldest first (rows are written in step order)."""
        done = []
        while self._entries and self._entries[0][4] is not None:
            step, wall, _, _, rows = self._entries.popleft()
            done.append((step, rows, wall))
        return done

    def _entry(self, step: int, losses):
        """The phases of one logged step: yields each collective it starts, returns its rows."""
        comm, world = self.comm, self.world
        if self.a is None:                   # no consensus vector: the losses and norms alone
            stats = self._stats(losses, next(iter(self.run.columns().values())))
            yield comm.reduce_async_(stats, 0, world)
            return _rows(stats.cpu().tolist(), [math.nan] * self.m) if comm.rank == 0 else []
        buf, d = self._partial_sum(losses)
        snapshot = {i: z.clone() for i, z in self.run.models().items()}
        yield comm.reduce_async_(buf, 0, world)
        yield comm.broadcast_async_(buf, 0, world)
        squared = squared_distances(snapshot, buf[:d], self.m)
        del snapshot
        yield comm.reduce_async_(squared, 0, world)
        return _rows(buf[d:].cpu().tolist(), squared.sqrt().cpu().tolist()) if comm.rank == 0 else []

    # -- the sums -----------------------------------------------------------------------------------
    def _stats(self, losses, like: torch.Tensor) -> torch.Tensor:
        """[loss, grad_norm] of every local agent (NaN for a passive one, zero for other ranks')."""
        stats = torch.zeros(2 * self.m, dtype=like.dtype, device=like.device)
        norms = self.run.grad_norms()
        for i in self.run.columns():
            stats[2 * i] = float(losses[i]) if i in losses else math.nan
            stats[2 * i + 1] = norms.get(i, math.nan)
        return stats

    def _partial_sum(self, losses) -> tuple[torch.Tensor, int]:
        """(1) [sum of a_i x_i over the local agents | the local stats] (d + 2m), and d.  Summed
        over ranks, the per-agent scalars stay as they are (non-local entries are zero; a passive
        agent's are NaN, and NaN + 0 = NaN)."""
        columns = self.run.columns()
        any_column = next(iter(columns.values()))
        d = any_column.numel()
        buf = torch.empty(d + 2 * self.m, dtype=any_column.dtype, device=any_column.device)
        weighted_sum(columns, self.a or {}, buf[:d])
        buf[d:] = self._stats(losses, any_column)
        return buf, d

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        if self.comm is not None:   # under the lost-rank handler, as every collective of a run
            with collective(self.comm, self.run.engine.t, "metrics all-reduce", self.world):
                self.comm.all_reduce_(tensor, self.world)


def _rows(stats: list[float], distances: list[float]) -> list[dict]:
    return [{"agent": i, "loss": stats[2 * i], "grad_norm": stats[2 * i + 1], "distance_to_virtual": distances[i]}
            for i in range(len(distances))]


class MetricsWriter:
    """Appends rows to ``path`` (CSV with a header of :data:`COLUMNS`), flushed at every write.

    Empty fields are "not applicable": ``loss`` and ``grad_norm`` of an agent not in ``workers``
    (a passive agent), ``distance_to_virtual`` when ``consensus`` is False.  A value that is
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
        self.offset = kept[-1][WALL] if kept else 0.0
        partial = self.path.with_name(f".{self.path.name}.tmp")   # the kept history, replaced at once
        with open(partial, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            writer.writerows(row[:WALL] + [f"{row[WALL]:.6f}"] + row[WALL + 1:] for row in kept)
        os.replace(partial, self.path)
        self._file = open(self.path, "a", newline="")
        self._csv = csv.writer(self._file)
        self.start = time.perf_counter()

    def write(self, step: int, rows: list[dict], wall: float | None = None, sim_time: float | None = None) -> None:
        """Append ``rows`` of ``step``; ``wall``: its wall time in this process, seconds since
        ``self.start`` (default: now; the caller sets ``start`` when the first iteration begins).  A
        resumed run's ``wall_time`` continues from its history's: the offset is added.
        ``sim_time``: its simulated time (None: empty)."""
        wall = self.offset + (time.perf_counter() - self.start if wall is None else wall)
        simulated = "" if sim_time is None else repr(float(sim_time))
        for row in rows:
            worker = self.workers is None or row["agent"] in self.workers
            self._csv.writerow([step, row["agent"], _fmt(row["loss"], worker), _fmt(row["grad_norm"], worker),
                                _fmt(row["distance_to_virtual"], self.consensus), f"{wall:.6f}", simulated])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


#: The position of ``wall_time`` in a row.
WALL = COLUMNS.index("wall_time")


def _history(path: Path, until: int) -> list[list]:
    """The complete rows of ``path`` (if it exists) with step <= ``until``, as written
    (``wall_time`` as a float).  A last line without its newline (cut short by a crash) is
    dropped; a row of a file written before the ``sim_time`` column existed gets it empty."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    kept = []
    for fields in csv.reader(lines):
        if len(fields) == len(COLUMNS) - 1:
            fields.append("")
        if len(fields) != len(COLUMNS) or not fields[0].isdigit():
            continue   # the header
        try:
            wall = float(fields[WALL])
        except ValueError:
            continue
        if int(fields[0]) <= until:
            kept.append(fields[:WALL] + [wall] + fields[WALL + 1:])
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
