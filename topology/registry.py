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

from typing import Callable, Sequence

from topology import decentralized
from topology.nested import nested
from topology.schedule import MultilayerSchedule, Schedule, from_matrices, lookahead, multilayer
from topology.slow import with_slow_agent
from topology.stagewise import stagewise_lookahead


def stagewise(stages: Sequence) -> Schedule:
    """SLRLA's stagewise Lookahead (:func:`topology.stagewise.stagewise_lookahead`) from a list of
    stages, each a mapping ``{steps, lr, alpha, k, beta}`` (:class:`agents.slrla.Stage`: the
    stages are validated as SLRLA stages, ``lr`` and ``beta`` included, although the schedule
    uses only ``steps``, ``k`` and ``alpha``)."""
    from agents.slrla import check_stages  # agents imports topology: import here, not at the top

    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence):
        raise ValueError(f"stages must be a list of {{steps, lr, alpha, k, beta}} mappings; got {stages!r}")
    for q, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise ValueError(f"stages[{q}] must be a mapping {{steps, lr, alpha, k, beta}}; got {stage!r}")
        missing = sorted({"steps", "lr", "alpha", "k", "beta"} - set(stage))
        unknown = sorted(set(stage) - {"steps", "lr", "alpha", "k", "beta"})
        if missing or unknown:
            raise ValueError(f"stages[{q}] must have exactly the keys steps, lr, alpha, k, beta; "
                             f"missing {missing}, unknown {unknown}")
    return stagewise_lookahead(check_stages(stages))


#: Schedule factories by name.  ``matrices`` is :func:`topology.from_matrices` (``matrices``,
#: ``period``, ``workers``): any explicit cycle of mixing matrices.  ``nested`` (``k, alpha, s,
#: h``), ``with_slow_agent`` (``num_workers, k, alpha``; for SlowMo / DiLoCo with an outer
#: optimizer), ``stagewise`` (SLRLA's ``stages``), and the decentralized schedules of
#: :data:`topology.decentralized.SCHEDULES` (``ring``, ``torus``, ``local_sgd``, ``push_sum_random``...).
SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "lookahead": lookahead,
    "multilayer": multilayer,
    "matrices": from_matrices,
    "nested": nested,
    "with_slow_agent": with_slow_agent,
    "stagewise": stagewise,
    **decentralized.SCHEDULES,
}


def make_schedule(name: str, **options) -> Schedule:
    """The schedule ``SCHEDULES[name](**options)``; ``ValueError`` for an unknown name."""
    if name not in SCHEDULES:
        raise ValueError(f"topology.name must be one of {', '.join(sorted(SCHEDULES))}; got {name!r}")
    return SCHEDULES[name](**options)


def has_serial_reference(schedule: Schedule) -> bool:
    """Whether :class:`agents.reference.MultilayerLookahead` is a serial reference of ``schedule``
    (true for Lookahead, multilayer and nested Lookahead: the columns are the fast and slow
    weights; false for the decentralized schedules, ``with_slow_agent`` and ``matrices``).
    ``stagewise`` has its own serial reference (:func:`agents.slrla.slrla_reference`), which
    :mod:`launch.runs` knows about."""
    return isinstance(schedule, MultilayerSchedule)
