"""What a command-line run records as it goes: ``metrics.csv``, ``eval.csv``, TensorBoard's files,
the simulated clock's column and the progress bar (rank 0 writes; every rank measures).

:class:`RunLog` is called twice per iteration by the app's loop (:mod:`launch.cli.app`):
:meth:`RunLog.before` (the learning rates of the iteration about to run, when it will be logged
or evaluated) and :meth:`RunLog.after` (the simulated clock, the metrics of a logged step -- off
the critical path, :class:`launch.engine.record.metrics.MetricsProbe` -- and the evaluation of an
evaluated one, :class:`launch.engine.record.evaluation.Evaluator`).  :meth:`RunLog.flush`
completes the metrics in flight (before a checkpoint, so that a checkpoint of t implies every row
up to t is in ``metrics.csv``; and at the end).
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from launch.cli.simtime import SimulatedTime
from launch.cli.tensorboard import TensorBoardLog
from launch.engine.record.evaluation import EvalWriter, Evaluator
from launch.engine.record.metrics import MetricsProbe, MetricsWriter


class RunLog:
    """The record of one run of ``job`` (a :class:`launch.cli.build.Job`) on ``run_``.

    Args:
        out_dir: where rank 0 writes (None on the other ranks).
        first: the iteration the run starts at (a resumed run's checkpoint t: the kept history
            of ``metrics.csv`` ends there).
        clock: the simulated clock of ``launch.cluster``, or None.
        where: the progress bar's description of the launch.
    """

    def __init__(self, job, run_, comm, out_dir: Path | None, first: int, clock: SimulatedTime | None, where: str):
        launch, schedule = job.launch, job.schedule
        self.steps, self.log_every, self.workers, self.clock = launch.steps, job.log_every, schedule.workers, clock
        self.probe = MetricsProbe(run_, comm, schedule)
        template = job.model().to(launch.device) if job.evaluate_on_device else job.model()
        self.evaluator = Evaluator(run_, comm, schedule, job.evaluate, template, every=launch.eval_every,
                                   last=launch.steps)
        self.metrics = (MetricsWriter(out_dir / "metrics.csv", workers=schedule.workers, consensus=self.probe.a is not None,
                                      resume_at=first or None) if out_dir is not None else None)
        self.evals = EvalWriter(out_dir / "eval.csv", resume_at=first or None) if out_dir is not None else None
        self.board = TensorBoardLog(out_dir) if out_dir is not None and launch.tensorboard else None
        self.bar = tqdm(total=launch.steps, initial=first, desc=f"{job.problem_name} {where}", unit="step",
                        disable=self.metrics is None, mininterval=0.5)
        self.start = time.perf_counter()
        if self.metrics is not None:
            self.metrics.start = self.start
        #: The rows of the last evaluation (rank 0; [] elsewhere), and each logged step's simulated
        #: time until its row is written.
        self.final: list[dict] = []
        self._sim_times: dict[int, float] = {}
        self._started = self.start

    def logged(self, done: int) -> bool:
        """Whether the step that completes iteration ``done - 1`` is logged in metrics.csv."""
        return done % self.log_every == 0 or done == self.steps

    def before(self, done: int) -> None:
        """Before the iteration that ``done`` completes: its learning rates, when recorded."""
        if self.logged(done) or self.evaluator.due(done):
            self.evaluator.note_lr(done)
        self._started = time.perf_counter()

    def after(self, done: int, losses: dict) -> None:
        """After it: the clock, the metrics of a logged step, the evaluation of an evaluated one."""
        if self.clock is not None:
            simulated = self.clock.advance(self._started)
            if self.logged(done):
                self._sim_times[done] = simulated
        if self.logged(done):
            self._write(self.probe.log(done, losses, time.perf_counter() - self.start))
        if self.evaluator.due(done):
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

    def flush(self) -> None:
        """Complete the metrics in flight (a collective) and write them."""
        self._write(self.probe.finish())

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
        """Close the files and the bar; returns the wall time since the first iteration began."""
        self.bar.close()
        for sink in (self.metrics, self.evals, self.board):
            if sink is not None:
                sink.close()
        return time.perf_counter() - self.start
