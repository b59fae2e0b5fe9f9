"""The end of a command-line run: its results are never lost.

After the last iteration every rank calls :func:`finish_run`, which does, in this order:

1. the end-of-run finiteness check, collective like a sync's (the run's ``check_finite``,
   :meth:`launch.engine.core.SyncEngine.check_finite`; a serial run checks its columns): a run
   that diverged after its last sync is caught here; and the held-out metrics of the last
   evaluation: an agent whose parameters are finite but whose held-out loss is not (parameters
   of 1e155) has diverged too -- the same verdict on every rank, from the evaluation's gather;
2. the final checkpoint (when the run checkpoints and iterated), unless the check failed (the last
   good checkpoint is then kept); a :class:`launch.engine.store.checkpoint.CheckpointError` (a full
   disk, a read-only folder) is kept in the :class:`Ending`, not raised, so that the caller still
   gathers and writes ``agents.pt``, ``summary.txt`` and ``metrics.csv``.

Then the caller writes the results and takes its exit status from :meth:`Ending.status`:
:data:`~launch.cli.errors.EXIT_NONFINITE` (3) when the run ended non-finite (its summary says
``status=FAILED failure=non_finite``), :data:`~launch.cli.errors.EXIT_CHECKPOINT` (5) when the
results are written but the final checkpoint is not (:meth:`Ending.report` prints that, one line
on every rank).  Both verdicts come from collectives, so every rank exits with the same status.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launch.cli.errors import EXIT_CHECKPOINT, EXIT_DEVIATION, EXIT_NONFINITE, EXIT_OK, report_error
from launch.engine.store.checkpoint import CheckpointError
from launch.engine.guard.health import END_OF_RUN, NonFiniteError

#: Where a non-finite held-out metric of the last evaluation is found.
HELDOUT = "held-out evaluation at the end of the run"


@dataclass
class Ending:
    """How a run ended: a non-finite verdict, a final checkpoint that failed (or neither)."""

    nonfinite: NonFiniteError | None = None
    checkpoint: CheckpointError | None = None

    def failure(self, status: int, worst: float | None = None, tolerance: float | None = None
                ) -> tuple[str | None, str | None]:
        """What the summary says of a run that ended with exit ``status``: a token (``non_finite``,
        ``deviation``) and a sentence; (None, None) when its results are good (a final checkpoint
        that failed is reported apart: :meth:`report`)."""
        if self.nonfinite is not None:
            err = self.nonfinite
            loss = "held-out metrics" if err.stopped[1] == HELDOUT else "loss"
            parts = ([f"parameters of agent(s) {err.parameters}"] if err.parameters else []) + (
                [f"{loss} of agent(s) {err.losses}"] if err.losses else [])
            return "non_finite", (f"non-finite {' and '.join(parts)} at the end of the run, t={err.step}; "
                                  f"no final checkpoint")
        if status == EXIT_DEVIATION:
            return "deviation", (f"a deviation of {worst:.3e} from the serial reference, above tolerance "
                                 f"{tolerance:g}")
        return None, None

    def status(self, summary_status: int = 0) -> int:
        """The exit status: :data:`EXIT_NONFINITE`, else ``summary_status`` when non-zero (a
        deviation), else :data:`EXIT_CHECKPOINT` when the final checkpoint failed, else 0."""
        if self.nonfinite is not None:
            return EXIT_NONFINITE
        if summary_status:
            return summary_status
        return EXIT_CHECKPOINT if self.checkpoint is not None else EXIT_OK

    def report(self, out_dir: Path | None) -> None:
        """One line on stderr when the final checkpoint failed, saying that the results are
        written (``out_dir``: where, on rank 0; None on the other ranks)."""
        if self.checkpoint is not None:
            where = f" in {out_dir}" if out_dir is not None else " by rank 0"
            report_error(f"{self.checkpoint}; the run's results were written all the same: agents.pt, "
                         f"summary.txt and metrics.csv{where}")


def finish_run(run_, checkpointer, first: int, steps: int, heldout_nonfinite: list[int] = ()) -> Ending:
    """Steps 1 and 2 of the module docstring (collective: every rank calls it);
    ``heldout_nonfinite``: the agents whose held-out metrics at the end are not finite."""
    ending = Ending()
    try:
        run_.check_finite(END_OF_RUN)
        if heldout_nonfinite:
            raise NonFiniteError(steps, [], list(heldout_nonfinite), HELDOUT)
    except NonFiniteError as err:
        ending.nonfinite = err
        return ending
    if checkpointer is not None and first < steps:
        try:
            checkpointer.save(run_.engine)
        except CheckpointError as err:
            ending.checkpoint = err
    return ending
