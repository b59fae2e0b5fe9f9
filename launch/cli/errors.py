"""Errors of the command line: one line on stderr per rank, in the configuration's own words.

The engine names its arguments as the Python API spells them (``overlap=True``, ``outer=...``);
:func:`in_config_terms` rewrites those spellings into the configuration keys that set them, so a
``ValueError`` raised while the simulation is built reads as the user typed the command.
"""

from __future__ import annotations

import os
import sys

#: Python-API spellings in the engine's messages -> the configuration key that sets them.
ENGINE_SPELLINGS = {
    "overlap=True": "launch.overlap=true",
    "outer=...": "agents.outer",
}


def in_config_terms(err: ValueError) -> ValueError:
    """``err`` with the engine's argument spellings replaced by configuration keys.

    Example:
        >>> str(in_config_terms(ValueError("overlap=True cannot be combined with outer=...")))
        'launch.overlap=true cannot be combined with agents.outer'
    """
    text = str(err)
    for spelling, key in ENGINE_SPELLINGS.items():
        text = text.replace(spelling, key)
    return err if text == str(err) else ValueError(text)


def process_rank() -> int:
    """This process's rank as the launcher announced it (torchrun, MPICH, Open MPI), else 0."""
    for key in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def report_error(err: Exception) -> None:
    """One line on stderr, prefixed with the rank (every rank reports its own)."""
    print(f"error [rank {process_rank()}]: {err}", file=sys.stderr, flush=True)
