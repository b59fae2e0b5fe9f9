"""Optional TensorBoard logging of a run's record (rank 0 writes).

Needs the ``tensorboard`` package (``pip install tensorboard``), which the project does not
install; without it, asking for TensorBoard is an error before anything runs
(:func:`summary_writer_class`; the command line's ``launch.tensorboard=true`` is then one line,
exit 2, on every rank).  Event files go to ``<run directory>/tensorboard`` (``tensorboard
--logdir outputs`` shows every run).  Scalars, by step:

- ``train/loss/agent_<i>``, ``train/grad_norm/agent_<i>`` (workers) and
  ``distance_to_virtual/agent_<i>``, at every logged step (the rows of ``metrics.csv``);
- ``heldout_<metric>/agent_<i>`` and ``heldout_<metric>/virtual`` at every evaluated step, and
  ``lr/agent_<i>`` (the rows of ``eval.csv``, :mod:`launch.engine.record.evaluation`).
"""

from __future__ import annotations

import math
from pathlib import Path

MISSING = ("needs the tensorboard package, which is not installed: pip install tensorboard (metrics.csv "
           "and eval.csv are written in any case, and python -m launch.plot draws them)")


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or ``ValueError`` ("TensorBoard logging
    :data:`MISSING`") when the ``tensorboard`` package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(f"TensorBoard logging {MISSING}") from None
    return SummaryWriter


class TensorBoardLog:
    """Scalars of one run into ``out_dir / "tensorboard"`` (see the module docstring)."""

    def __init__(self, out_dir: Path | str):
        self.writer = summary_writer_class()(log_dir=str(Path(out_dir) / "tensorboard"))

    def metrics(self, step: int, rows: list[dict]) -> None:
        """The rows of ``metrics.csv`` at ``step``."""
        for row in rows:
            for key, tag in (("loss", "train/loss"), ("grad_norm", "train/grad_norm"),
                             ("distance_to_virtual", "distance_to_virtual")):
                self._scalar(f"{tag}/agent_{row['agent']}", row.get(key), step)

    def evaluation(self, rows: list[dict]) -> None:
        """Rows of ``eval.csv``."""
        for row in rows:
            name = row["agent"] if isinstance(row["agent"], str) else f"agent_{row['agent']}"
            for key, value in row.items():
                if key.startswith("heldout_") or key == "lr":
                    self._scalar(f"{key}/{name}", value, row["step"])

    def _scalar(self, tag: str, value, step: int) -> None:
        if value is not None and not math.isnan(value):
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
