"""What a run records as it goes: ``metrics.csv``, ``eval.csv``, TensorBoard's files, the
simulated clock's column and a progress bar (rank 0 writes; every rank measures).

One implementation for both doors: the command line's loop (:mod:`launch.cli.app`) and
:meth:`launch.AgentOptimizer.record` drive a :class:`RunRecord` the same way, three times per
iteration: :meth:`RunRecord.before` (the learning rates of the iteration about to run, when it
will be logged or evaluated), :meth:`RunRecord.before_sync` (after the inner steps: the metrics
of a logged step -- off the critical path, :class:`launch.engine.record.metrics.MetricsProbe`)
and :meth:`RunRecord.after` (after the sync: the simulated clock and the evaluation of an
evaluated step, :class:`launch.engine.record.evaluation.Evaluator`).
:meth:`RunRecord.flush` completes the metrics in flight (before a checkpoint, so that a checkpoint
of t implies every row up to t is in ``metrics.csv``; and at the end).  Every call but
:meth:`RunRecord.before` is a collective when the run spans several ranks: every rank makes it at
the same step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from agents.flat import load_flat_

from launch.engine.record.clock import SimulatedTime
from launch.engine.record.evaluation import EvalWriter, Evaluator
from launch.engine.record.metrics import MetricsProbe, MetricsWriter
from launch.engine.record.run import Run
from launch.engine.record.tensorboard import TensorBoardLog
from topology.schedule import Schedule


class RunRecord:
    """The record of one run (module docstring).

    Args:
        run: the run (:class:`launch.engine.record.run.Run`).
        comm: its communicator, or None for a single-process run.
        schedule: its schedule.
        out_dir: where rank 0 writes (None on the other ranks: they only measure).
        log_every: metrics.csv logs the steps that are multiples of it (and ``steps``).
        evaluate: ``evaluate(module) -> {metric: value}``, the held-out metrics, and ``template``,
            a module of the agents' architecture on which they are taken; None: no evaluation.
        eval_every: evaluate after every ``eval_every``-th step too (None: at ``steps`` only).
        steps: the last step, logged and evaluated (None: not known in advance).
        first: the step the run starts at (a resumed run's checkpoint t: the files' history is
            kept up to it).
        clock: the simulated clock, or None.
        tensorboard: also write TensorBoard's event files.
        progress: show a progress bar on rank 0, described by ``progress`` (None: no bar).
        load: how an agent's flat parameters are put into ``template``
            (:class:`launch.engine.record.evaluation.Evaluator`).
    """

    def __init__(self, run: Run, comm, schedule: Schedule, out_dir: Path | None, *, log_every: int,
                 evaluate: Callable | None = None, template=None, eval_every: int | None = None,
                 steps: int | None = None, first: int = 0, clock: SimulatedTime | None = None,
                 tensorboard: bool = False, progress: str | None = None, load=load_flat_):
        self.steps, self.log_every, self.workers, self.clock = steps, log_every, schedule.workers, clock
        self.probe = MetricsProbe(run, comm, schedule)
        self.evaluator = (Evaluator(run, comm, schedule, evaluate, template, every=eval_every, last=steps, load=load)
                          if evaluate is not None else None)
        write = out_dir is not None
        self.metrics = (MetricsWriter(out_dir / "metrics.csv", workers=schedule.workers, consensus=self.probe.a is not None,
                                      resume_at=first or None) if write else None)
        self.evals = EvalWriter(out_dir / "eval.csv", resume_at=first or None) if write and evaluate is not None else None
        self.board = TensorBoardLog(out_dir) if write and tensorboard else None
        self.bar = tqdm(total=steps, initial=first, desc=progress, unit="step", mininterval=0.5,
                        disable=not write or progress is None)
        self.start = time.perf_counter()
        if self.metrics is not None:
            self.metrics.start = self.start
        #: The rows of the last evaluation (rank 0; [] elsewhere), and each logged step's simulated
        #: time until its row is written.
        self.final: list[dict] = []
        self._sim_times: dict[int, float] = {}
        #: Rows measured complete at before_sync, written at after() (when the clock has advanced).
        self._ready: list = []
        self._started = self.start

    def logged(self, done: int) -> bool:
        """Whether the step that completes iteration ``done - 1`` is logged in metrics.csv."""
        return done % self.log_every == 0 or done == self.steps

    def due(self, done: int) -> bool:
        """Whether step ``done`` is evaluated (:meth:`launch.engine.record.evaluation.Evaluator.due`)."""
        return self.evaluator is not None and self.evaluator.due(done)

    def before(self, done: int) -> None:
        """Before the iteration that ``done`` completes: its learning rates, when recorded."""
        if self.evaluator is not None and (self.logged(done) or self.due(done)):
            self.evaluator.note_lr(done)
        self._started = time.perf_counter()

    def before_sync(self, done: int, losses: dict) -> None:
        """After its inner steps, before its sync: the metrics of a logged step (the agents'
        distances before the sync mixes them: :mod:`launch.engine.record.metrics`)."""
        if self.logged(done):   # rows complete now wait for after(): the clock's time of their step
            self._ready.extend(self.probe.log(done, losses, time.perf_counter() - self.start))

    def after(self, done: int) -> None:
        """After its sync: the clock, the evaluation of an evaluated step."""
        if self.clock is not None:
            simulated = self.clock.advance(self._started)
            if self.logged(done):
                self._sim_times[done] = simulated
        self._write(self._ready)
        self._ready = []
        if self.due(done):
            self.evaluate(done)
        self.bar.update()

    def evaluate(self, done: int) -> None:
        """The evaluation after step ``done`` (a collective), written by rank 0."""
        rows = self.evaluator.evaluate(done)
        if rows is None:
            return
        if self.evals is not None:
            self.evals.write(rows)
        if self.board is not None:
            self.board.evaluation(rows)
        self.final = rows

    @property
    def nonfinite(self) -> list[int]:
        """The agents whose held-out metrics at the last evaluation were not all finite (the same
        on every rank)."""
        return [] if self.evaluator is None else self.evaluator.nonfinite

    def flush(self) -> None:
        """Complete the metrics in flight and the learning rates recorded since the last
        evaluation (collectives), and write them."""
        self._write(self._ready + self.probe.finish())
        self._ready = []
        if self.evaluator is not None:
            rows = self.evaluator.flush_lrs(self.evaluator.evaluated)
            if rows and self.evals is not None:
                self.evals.write(rows)

    def _write(self, entries) -> None:
        """Rank 0: append the complete metrics rows to metrics.csv (and TensorBoard), and show the
        workers' mean loss of the latest (NaN / Inf shown as such)."""
        for step, rows, wall in entries:
            simulated = self._sim_times.pop(step, None)
            if self.metrics is None:
                continue
            self.metrics.write(step, rows, wall, simulated)
            if self.board is not None:
                self.board.metrics(step, rows)
            losses = [rows[i]["loss"] for i in self.workers]
            self.bar.set_postfix(loss=f"{sum(losses) / max(len(losses), 1):.4g}", refresh=False)

    def close(self) -> float:
        """Close the files and the bar; returns the wall time since the record began."""
        self.bar.close()
        for sink in (self.metrics, self.evals, self.board):
            if sink is not None:
                sink.close()
        return time.perf_counter() - self.start
