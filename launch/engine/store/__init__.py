"""Saving and resuming a run: one checkpoint mechanism for both doors.

- :mod:`.checkpoint`: :class:`~.checkpoint.Checkpointer` (checksummed, atomic, crash-anywhere
  checkpoints of every agent, the counter t and RNG states; a resume that proves it continues the
  same run);
- :mod:`.manifest`: the manifest (``latest.json``) and the checksums of a checkpoint's files;
- :mod:`.run_record`: what defines a run's trajectory, recorded in every checkpoint and compared
  on resume.

Imports: :mod:`launch.engine.guard`, :mod:`launch.engine.core` and below.
"""
