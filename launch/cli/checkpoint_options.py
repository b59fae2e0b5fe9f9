"""Checkpoints on the command line: ``launch.checkpoint_every``, ``launch.checkpoint_dir``,
``launch.resume``, ``launch.resume_allow`` (see :mod:`launch.engine.store.checkpoint` for what a
checkpoint holds).

- ``checkpoint_every: N`` writes a checkpoint every N iterations and at the end, under
  ``checkpoint_dir`` (relative paths are taken from the run directory; give an absolute path, or
  the same ``hydra.run.dir``, to resume a run in a new process);
- ``resume: true`` starts from the latest complete checkpoint in ``checkpoint_dir`` (a clear error
  when there is none) and runs on until t reaches ``launch.steps``, a total: a checkpoint past it
  is an error naming both (:func:`launch.engine.store.checkpoint.check_resume_step`, in the app).  The
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

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from launch.cli.resume import config_record, engine_keys, resume_allow
from launch.engine.store.checkpoint import Checkpointer
from topology.checks import check_bool, check_integer


@dataclass(frozen=True)
class CheckpointOptions:
    """The checkpoint keys of the ``launch`` group, validated, and the run's configuration record
    (what a resume compares)."""

    every: int | None           # launch.checkpoint_every
    directory: str              # launch.checkpoint_dir (relative: from the run directory)
    resume: bool                # launch.resume
    allow: tuple[str, ...]      # launch.resume_allow, the recorded keys (free keys dropped)
    record: dict                # :func:`launch.cli.resume.config_record`


def build_checkpoints(cfg: DictConfig, job) -> CheckpointOptions | None:
    """The run's checkpoint options (None when neither ``checkpoint_every`` nor ``resume`` is
    set); validated locally and identically on every rank: a bad value is a ``ValueError``
    naming the key."""
    every = check_integer(cfg.launch.get("checkpoint_every"), "launch.checkpoint_every", minimum=1,
                          optional="")
    resume = check_bool(cfg.launch.get("resume", False), "launch.resume")
    if every is None and not resume:
        return None
    if job.launch.mode == "serial":
        raise ValueError("launch.checkpoint_every / launch.resume need a simulator run (launch=colocated, torch or mpi); "
                         "launch=serial does not checkpoint")
    if resume and job.stages is not None:
        raise ValueError("launch.resume is not supported with topology=stagewise (SLRLA's stage controller "
                         "is not checkpointed)")
    record = config_record(cfg, job)
    return CheckpointOptions(every, str(cfg.launch.get("checkpoint_dir") or "checkpoints"), resume,
                             resume_allow(cfg, record), record)


def checkpointer_for(options: CheckpointOptions | None, out_dir: Path) -> Checkpointer | None:
    """The run's :class:`Checkpointer` (None without checkpoint options), its folder taken from
    the run directory ``out_dir`` when relative."""
    if options is None:
        return None
    directory = Path(options.directory)
    if not directory.is_absolute():
        directory = out_dir / directory
    return Checkpointer(directory, every=options.every, config=options.record,
                        allow=options.allow + engine_keys(options.allow), allow_option="launch.resume_allow")
