"""Checkpoints on the command line: ``launch.checkpoint_every``, ``launch.checkpoint_dir``,
``launch.resume``, ``launch.resume_allow`` (see :mod:`launch.engine.store.checkpoint` for what a
checkpoint holds).

- ``checkpoint_every: N`` writes a checkpoint every N iterations and at the end, under
  ``checkpoint_dir`` (relative paths are taken from the run directory; give an absolute path, or
  the same ``hydra.run.dir``, to resume a run in a new process);
- ``resume: true`` starts from the latest complete checkpoint in ``checkpoint_dir`` (a clear error
  when there is none) and runs on until t reaches ``launch.steps``, a total: a checkpoint past it
  is an error naming both (:func:`launch.engine.simulation.check_resume_step`, in the app).  The
  trajectory is the uninterrupted run's, bit for bit (same layout) or within 1e-12 (another
  layout).  The resume first proves it continues the same run: the checkpoint's resolved
  configuration (:func:`launch.cli.resume.config_record`) must equal the new command's, except the
  keys listed in ``resume_allow`` (:mod:`launch.cli.resume`), whose new values then apply;
- every checkpoint's files are checksummed (:mod:`launch.engine.store.manifest`): a corrupted, swapped
  or edited checkpoint is refused, naming the file.

Only simulator runs (colocated, torch, mpi) checkpoint; the co-located reference check is skipped
on resume (the serial reference cannot resume), and SLRLA's stage controller is not checkpointed,
so ``topology=stagewise`` refuses ``resume``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from launch.cli.resume import config_record, engine_keys, resume_allow
from launch.engine.store.checkpoint import Checkpointer


def checkpointer_for(cfg: DictConfig, job, out_dir: Path) -> tuple[Checkpointer | None, bool]:
    """The run's :class:`Checkpointer` (None when neither key is set) and whether to resume.

    Validated locally and identically on every rank: a bad value is a ``ValueError`` naming the key.
    """
    every = cfg.launch.get("checkpoint_every")
    resume = cfg.launch.get("resume", False)
    if not isinstance(resume, bool):
        raise ValueError(f"launch.resume must be true or false; got {resume!r}")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"launch.checkpoint_every must be null or an integer >= 1; got {every!r}")
    if every is None and not resume:
        return None, False
    if job.mode == "serial":
        raise ValueError("launch.checkpoint_every / launch.resume need a simulator run (launch=colocated, torch or mpi); "
                         "launch=serial does not checkpoint")
    if resume and job.stages is not None:
        raise ValueError("launch.resume is not supported with topology=stagewise (SLRLA's stage controller "
                         "is not checkpointed)")
    directory = Path(str(cfg.launch.get("checkpoint_dir") or "checkpoints"))
    if not directory.is_absolute():
        directory = out_dir / directory
    record = config_record(cfg, job)
    allow = resume_allow(cfg, record)
    return Checkpointer(directory, every=every, config=record, allow=allow + engine_keys(allow),
                        allow_option="launch.resume_allow"), resume
