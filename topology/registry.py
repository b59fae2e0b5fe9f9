"""Schedules by name, for configuration files: ``SCHEDULES[name](**options) -> Schedule``.

The ``topology`` group of the command line (``launch/conf/topology/*.yaml``) holds a ``name`` and
the keyword options of the factory registered under it.  A new topology becomes available to the
command line by adding its factory here and a yaml file beside the others.

Example:
    >>> from topology.registry import make_schedule
    >>> make_schedule("multilayer", ks=[5, 2], alphas=[0.5, 0.5])
    MultilayerSchedule(ks=(5, 2), alphas=(0.5, 0.5))
"""

from __future__ import annotations

from typing import Callable

from topology.schedule import MultilayerSchedule, Schedule, from_matrices, lookahead, multilayer

#: Schedule factories by name.  ``matrices`` is :func:`topology.from_matrices` (``matrices``,
#: ``period``, ``workers``): any explicit cycle of mixing matrices.
SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "lookahead": lookahead,
    "multilayer": multilayer,
    "matrices": from_matrices,
}


def make_schedule(name: str, **options) -> Schedule:
    """The schedule ``SCHEDULES[name](**options)``; ``ValueError`` for an unknown name."""
    if name not in SCHEDULES:
        raise ValueError(f"topology.name must be one of {', '.join(sorted(SCHEDULES))}; got {name!r}")
    return SCHEDULES[name](**options)


def has_serial_reference(schedule: Schedule) -> bool:
    """Whether :class:`agents.reference.MultilayerLookahead` is a serial reference of ``schedule``
    (true for Lookahead and multilayer Lookahead: the columns are the fast and slow weights)."""
    return isinstance(schedule, MultilayerSchedule)
