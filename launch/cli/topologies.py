"""Topologies by name, for the command line: ``SCHEDULES[name](**options) -> Schedule``.

The ``topology`` group of the command line (``launch/cli/conf/topology/*.yaml``) holds a ``name``
and the keyword options of the factory registered under it.  A new topology becomes available to
the command line by adding its factory here and a yaml file beside the others
(:mod:`launch.cli.registry` gathers this table with the command line's other names).

:func:`build_schedule` makes a schedule from such a mapping and checks its options against the
factory's signature first (unknown or missing options are a ``ValueError`` naming the key), so
that the ``phases`` entry can build each of its phases' topologies the same way:

    name: phases
    phases:
      - {steps: 1000, topology: {name: local_sgd, num_workers: 4, tau: 1}}
      - {steps: null, topology: {name: local_sgd, num_workers: 4, tau: 8}}

(post-local SGD: :mod:`topology.phases`).  A phase's topology may itself be ``phases``; an error
names its full key, e.g. ``topology.phases[1].topology.phases[0].steps``.

Example:
    >>> from launch.cli.topologies import make_schedule
    >>> make_schedule("multilayer", ks=[5, 2], alphas=[0.5, 0.5])
    MultilayerSchedule(ks=(5, 2), alphas=(0.5, 0.5))
    >>> make_schedule("phases", phases=[
    ...     {"steps": 10, "topology": {"name": "local_sgd", "num_workers": 2, "tau": 1}},
    ...     {"steps": None, "topology": {"name": "local_sgd", "num_workers": 2, "tau": 4}}])
    phases([(10, local_sgd(2 workers, tau=1)), (None, local_sgd(2 workers, tau=4))])
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Callable, Sequence

from topology import decentralized
from topology.checks import check_integer, check_list
from topology.nested import nested
from topology.phases import phases as phased
from topology.schedule import Schedule, from_matrices, lookahead, multilayer
from topology.slow import with_slow_agent
from topology.stagewise import check_stages, stagewise_lookahead

#: The keys of one entry of the ``phases`` option.
PHASE_KEYS = ("steps", "topology")


def stagewise(stages: Sequence) -> Schedule:
    """SLRLA's stagewise Lookahead (:func:`topology.stagewise.stagewise_lookahead`) from a list of
    stages, each a mapping ``{steps, lr, alpha, k, beta}`` (:func:`topology.stagewise.check_stages`:
    the stages are validated as SLRLA stages, ``lr`` and ``beta`` included, although the schedule
    uses only ``steps``, ``k`` and ``alpha``)."""
    return stagewise_lookahead(check_stages(stages))


def phases(phases: Sequence) -> Schedule:
    """:func:`topology.phases` from a list of mappings ``{steps: N | None, topology: {name: ...,
    <options>}}``, each topology made by :func:`build_schedule` (so it may be ``phases`` too).
    Errors name the full key, e.g. ``topology.phases[1].steps`` or, for an error of phase 1's own
    factory, ``topology.phases[1].topology: tau must be an integer >= 1; got 0``."""
    return _phases(phases, "phases")


def _phases(entries, key: str) -> Schedule:
    entries = check_list(entries, key, "{steps, topology} mappings")
    spec = []
    for i, entry in enumerate(entries):
        at = f"{key}[{i}]"
        if not isinstance(entry, Mapping) or set(entry) != set(PHASE_KEYS):
            raise ValueError(f"{at} must be a mapping with exactly the keys steps, topology "
                             f"(steps: an integer, or null for the last phase); got {entry!r}")
        steps = entry["steps"]
        if i == len(entries) - 1:
            if steps is not None:
                raise ValueError(f"{at}.steps must be null: the last phase runs until the end; got {steps!r}")
        else:
            steps = check_integer(steps, f"{at}.steps", minimum=1)
        try:
            schedule = build_schedule(entry["topology"], key=f"{at}.topology")
        except ValueError as err:  # the factory's own message names its argument: say where it is
            text = str(err)
            raise ValueError(text if text.startswith(f"{at}.topology") else f"{at}.topology: {text}") from err
        spec.append((steps, schedule))
    try:
        return phased(spec)
    except ValueError as err:  # e.g. phases[1] must have the same agents as phases[0]
        raise ValueError(f"{key}: {err}") from err


#: Schedule factories by name.  ``matrices`` is :func:`topology.from_matrices` (``matrices``,
#: ``period``, ``workers``): any explicit cycle of mixing matrices.  ``nested`` (``k, alpha, s,
#: h``), ``with_slow_agent`` (``num_workers, k, alpha``; for SlowMo / DiLoCo with an outer
#: optimizer), ``stagewise`` (SLRLA's ``stages``), ``phases`` (a list of ``{steps, topology}``),
#: and the decentralized schedules of :data:`topology.decentralized.SCHEDULES` (``ring``,
#: ``torus``, ``local_sgd``, ``push_sum_random``...).
SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "lookahead": lookahead,
    "multilayer": multilayer,
    "matrices": from_matrices,
    "nested": nested,
    "with_slow_agent": with_slow_agent,
    "stagewise": stagewise,
    "phases": phases,
    **decentralized.SCHEDULES,
}


def check_options(name: str, options: Mapping, key: str = "topology") -> None:
    """``options`` are keyword options that ``SCHEDULES[name]`` takes, every required one given;
    ``ValueError`` naming ``key`` otherwise (``name`` must be registered)."""
    params = [p for p in inspect.signature(SCHEDULES[name]).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    accepted = sorted(p.name for p in params)
    unknown = sorted(set(options) - set(accepted), key=str)
    if unknown:
        raise ValueError(f"{key} has option(s) {unknown} that topology {name!r} does not take; allowed: {accepted}")
    missing = [p.name for p in params if p.default is p.empty and p.name not in options]
    if missing:
        raise ValueError(f"{key}.{missing[0]} must be set: topology {name!r} has no default for it")


def build_schedule(config: Mapping, key: str = "topology") -> Schedule:
    """The schedule of a configuration mapping ``{name: ..., <options>}``: the name checked
    against :data:`SCHEDULES`, the options against the factory's signature (errors name
    ``key``), then ``SCHEDULES[name](**options)``."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{key} must be a mapping {{name: ..., <options>}}; got {config!r}")
    options = dict(config)
    name = options.pop("name", None)
    if not isinstance(name, str) or name not in SCHEDULES:
        raise ValueError(f"{key}.name must be one of {', '.join(sorted(SCHEDULES))}; got {name!r}")
    check_options(name, options, key)
    if name == "phases":  # the one nested entry: its phases' errors name their full key
        return _phases(options["phases"], f"{key}.phases")
    return SCHEDULES[name](**options)


def make_schedule(name: str, **options) -> Schedule:
    """The schedule ``SCHEDULES[name](**options)``; ``ValueError`` for an unknown name or option
    (:func:`build_schedule` with ``key="topology"``)."""
    return build_schedule({"name": name, **options})
