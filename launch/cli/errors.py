"""Errors of the command line: one line on stderr per rank, in the configuration's own words.

Exit statuses of ``python -m launch`` (and ``python -m launch.equivalence``):

- :data:`EXIT_OK` 0: success;
- :data:`EXIT_DEVIATION` 1: a deviation above ``tolerance`` (the reference check);
- :data:`EXIT_CONFIG` 2: an invalid configuration or missing data (a mistyped key, a bad value,
  a missing file): one line ``error [rank R]: ...`` naming the key as typed, on every rank;
- :data:`EXIT_NONFINITE` 3: the run stopped on NaN or Inf
  (:class:`launch.engine.guard.health.NonFiniteError`): one line per rank, no traceback; the
  ``metrics.csv`` / ``eval.csv`` rows written before it stay;
- :data:`EXIT_RANK_FAILURE` 4: a rank was lost (:class:`launch.engine.guard.health.RankFailureError`):
  one line per surviving rank.

The engine names its arguments as the Python API spells them (``overlap=True``, ``outer=...``);
:func:`in_config_terms` rewrites those spellings into the configuration keys that set them, and
:func:`in_group_terms` prefixes a factory's message with its group (``n must be`` ->
``topology.n must be``).  Hydra's own errors (an unknown group option, an unknown key, an
override it cannot parse) happen before any of our code runs: :func:`run_hydra_app` runs the app
so that they reach it as exceptions, and :func:`hydra_error_line` turns each into one line.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import time

EXIT_OK, EXIT_DEVIATION, EXIT_CONFIG, EXIT_NONFINITE, EXIT_RANK_FAILURE, EXIT_CHECKPOINT = 0, 1, 2, 3, 4, 5

#: Seconds a process started by a launcher waits before it exits with an error: torchrun and
#: mpiexec stop every process as soon as one exits non-zero, and the others, which raise the same
#: error a moment later (their start-up is not simultaneous: importing torch on a loaded 2-core
#: machine can differ by seconds between ranks), must have printed their line.
LINGER_S = 5.0

#: Python-API spellings in the engine's messages -> the configuration key that sets them.
ENGINE_SPELLINGS = {
    "overlap=True": "launch.overlap=true",
    "outer=...": "agents.outer",
    "or set agents_per_rank)": "or set launch.agents_per_rank)",
    "with agents_per_rank=": "with launch.agents_per_rank=",
}

#: Indexed names a factory derives from a scalar option (``lookahead(k, alpha)`` checks
#: ``ks[0]``, ``alphas[0]``): reported as the option the user typed.
INDEXED_ALIASES = {"ks[0]": "k", "alphas[0]": "alpha"}


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


def in_group_terms(err: ValueError, group: str, name: str, options: dict, accepted) -> ValueError:
    """A factory's ``ValueError`` in configuration terms: a message that begins with one of the
    factory's parameter names (``accepted``; ``n must be``, ``ks[1] must``) gets the group's
    prefix; an indexed name derived from a scalar option the user gave (:data:`INDEXED_ALIASES`)
    becomes that option; any other message is prefixed with ``group=name:``.

    Example:
        >>> str(in_group_terms(ValueError("alphas[0] must be in (0, 1]; got 2"), "topology", "lookahead",
        ...                    {"k": 5, "alpha": 2}, {"k", "alpha"}))
        'topology.alpha must be in (0, 1]; got 2'
        >>> str(in_group_terms(ValueError("the graph is not connected"), "topology", "ring", {}, {"n"}))
        'topology=ring: the graph is not connected'
    """
    text = " ".join(str(err).split())
    for internal, alias in INDEXED_ALIASES.items():
        if text.startswith(internal) and alias in options and internal.split("[")[0] not in options:
            text = alias + text[len(internal):]
    head = re.match(r"[A-Za-z_]\w*", text)
    if head and accepted is not None and head.group(0) in accepted:
        return ValueError(f"{group}.{text}")
    return ValueError(f"{group}={name}: {text}")


def launcher_world() -> tuple[int, str, str]:
    """(number of processes, launcher, environment variable) as a launcher announced them to
    this process: torchrun (``WORLD_SIZE``), MPICH / Intel MPI (``PMI_SIZE``), Open MPI
    (``OMPI_COMM_WORLD_SIZE``); (1, "", "") when started alone.

    Example:
        >>> import os
        >>> launcher_world() if not any(k in os.environ for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")) else (1, "", "")
        (1, '', '')
    """
    for variable, launcher in (("WORLD_SIZE", "torchrun"), ("OMPI_COMM_WORLD_SIZE", "mpiexec"), ("PMI_SIZE", "mpiexec")):
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 1:
            return int(value), launcher, variable
    return 1, "", ""


def process_rank() -> int:
    """This process's rank as the launcher announced it (torchrun, MPICH, Open MPI), else 0."""
    for key in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def report_error(err: Exception | str) -> None:
    """One line on stderr, prefixed with the rank (every rank reports its own)."""
    text = " ".join(str(err).split())
    print(f"error [rank {process_rank()}]: {text}", file=sys.stderr, flush=True)


# -- hydra's own errors ------------------------------------------------------------------------------
def hydra_error_line(err: BaseException) -> str:
    """One line, naming the key or group option as typed, for an error hydra raised while it
    composed the configuration (before the app's code runs).

    Example:
        >>> from hydra.errors import OverrideParseException
        >>> hydra_error_line(OverrideParseException(override="a=[1", message="no viable alternative at input '[1'"))
        "cannot parse the override a=[1: no viable alternative at input '[1' (hydra's override grammar: key=value, +key=value to add a key)"
    """
    from hydra.errors import MissingConfigException, OverrideParseException

    cause = err.__cause__
    if isinstance(err, MissingConfigException):
        found = re.search(r"Could not find '([^'/]+)/([^']+)'", str(err))
        if found:
            group, option = found.groups()
            available = ", ".join(err.options or [])
            return f"{group}={option}: there is no {group} configuration {option!r}; available: {available}"
    if cause is not None and getattr(cause, "full_key", None) and "not in struct" in str(cause):
        return _unknown_key(err, cause)
    if isinstance(err, OverrideParseException):
        first = str(err).splitlines()[0]
        return (f"cannot parse the override {err.override}: {first} "
                f"(hydra's override grammar: key=value, +key=value to add a key)")
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Config search path", "provider="))]
    if cause is not None:
        lines += [line.strip() for line in str(cause).splitlines()[:1] if line.strip()]
    return "; ".join(lines) or type(err).__name__


def _unknown_key(err: BaseException, cause) -> str:
    """An override of a key the configuration does not have (``launch.foo=1``, ``lauch.steps=3``)."""
    typed = re.search(r"Could not override '([^']+)'", str(err))
    key = typed.group(1) if typed else cause.full_key
    value = re.search(r"use \+(\S+)", str(err))
    parent = cause.full_key.rpartition(".")[0]
    siblings = [k for k in (getattr(cause, "parent_node", None) or {}) if k != "hydra"]
    missing = cause.key if cause.key is not None else cause.full_key.rpartition(".")[2]
    close = difflib.get_close_matches(str(missing), [str(k) for k in siblings], n=1)
    where = f"{parent} has" if parent else "the configuration has"
    line = f"{key}: there is no such key"
    if close:
        fixed = ".".join(p for p in (parent, close[0]) if p)
        line += f"; did you mean {fixed}{key[len(cause.full_key):]}?"
    add = value.group(1) if value else f"{key}=..."
    return line + f" ({where} {', '.join(map(str, siblings))}; a key it does not have is added as +{add})"


def linger(status: int) -> int:
    """``status``, after :data:`LINGER_S` seconds when it is an error of :data:`EXIT_CONFIG` or
    above and this process is one of several a launcher started (so that every rank's line gets
    out before the launcher stops them)."""
    if status >= EXIT_CONFIG and launcher_world()[0] > 1:
        time.sleep(LINGER_S)
    return status


def run_hydra_app(hydra_main) -> int | None:
    """Run a ``@hydra.main`` function so that an error of hydra's (composition, overrides) is one
    line naming the key and status :data:`EXIT_CONFIG` instead of hydra's multi-line report
    (exit 1); returns None when the app ran (its own status is the caller's).

    Hydra lets exceptions through only when ``HYDRA_FULL_ERROR=1``; it is set for the app's
    run.  A user who set it already gets the full traceback, as hydra documents.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except (HydraException, OmegaConfBaseException) as err:
        if full:
            raise
        report_error(hydra_error_line(err))
        return EXIT_CONFIG
    except OSError as err:   # hydra makes the run directory and its log there before the app runs
        if full:
            raise
        where = f" {err.filename}" if err.filename else ""
        report_error(f"cannot write the run's files{where} ({err.strerror or err}): choose a folder that can be "
                     f"written with hydra.run.dir=... (hydra.sweep.dir=... for a sweep)")
        return EXIT_CONFIG
    finally:
        if not full:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    return None
