"""What defines a run's trajectory: recorded in every checkpoint, compared on resume.

A *record* is a flat mapping from dotted keys to JSON values (lists and scalars are leaves).
:func:`engine_record` is the engine's record of a :class:`launch.Simulation`, everything it knows
that the trajectory depends on and that does not depend on the layout (ranks, placement):

``num_agents``, ``numel`` (parameters per agent), ``dtype``
    the shape of X;
``schedule``, ``schedule.fingerprint``
    ``repr(schedule)`` (t -> P_t: kind, periods, weights) and its fingerprint
    (:meth:`topology.Schedule.fingerprint`: a schedule whose repr does not show every matrix);
``state_policy``
    the resolved policy of each level;
``optimizer``, ``optimizer.<name>``
    the inner optimizer's class and its hyperparameters (``optimizer.defaults``: the values it was
    built with, untouched by learning-rate schedulers); only on ranks that hold a worker;
``outer``, ``outer.<name>``, ``outer.optimizer``, ``outer.optimizer.<name>``
    the slow rule's class (None without one), its scalar settings (``alpha_low``), and for
    :class:`agents.outer.OuterOptimizer` its optimizer's class and hyperparameters.

The caller may add its own record (the command line's resolved configuration,
:mod:`launch.cli.resume`) to the checkpoint; :func:`differences` compares either.  A key
*allowed* to change (:func:`allowed`: the key itself or a key above it, ``optimizer`` allows
``optimizer.lr``) is not a difference that stops a resume, except the keys of :data:`FIXED`: the
saved state would not fit.

Example:
    >>> flatten({"agents": {"optimizer": {"name": "sgd", "lr": 0.1}}, "seed": 0})
    {'agents.optimizer.name': 'sgd', 'agents.optimizer.lr': 0.1, 'seed': 0}
    >>> differences({"lr": 0.1, "k": 5}, {"lr": 0.2, "k": 5})
    [('lr', 0.1, 0.2)]
    >>> allowed("optimizer.lr", ["optimizer"]), allowed("optimizer", ["optimizer.lr"])
    (True, False)
"""

from __future__ import annotations

from typing import Iterable

from agents.outer import OuterOptimizer
from agents.settings import describe_optimizer, normalize

#: Keys no allowance can change on resume: the saved state would not fit the new run.
FIXED = ("num_agents", "numel", "dtype", "optimizer", "outer", "outer.optimizer")

#: Printed for a key one record has and the other has not.
ABSENT = "(absent)"


def flatten(mapping: dict, prefix: str = "") -> dict:
    """``mapping`` with nested mappings flattened into dotted keys (lists and scalars are leaves)."""
    flat: dict = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def allowed(key: str, allow: Iterable[str]) -> bool:
    """Whether ``key`` is one of ``allow`` or lies under one (``a`` allows ``a.b``)."""
    return any(key == a or key.startswith(a + ".") for a in allow)


def differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """``(key, saved value, current value)`` for every key whose values differ (:data:`ABSENT`
    where a record lacks the key), in the order of ``saved`` then ``current``."""
    keys = list(saved) + [k for k in current if k not in saved]
    return [(k, saved.get(k, ABSENT), current.get(k, ABSENT)) for k in keys
            if saved.get(k, ABSENT) != current.get(k, ABSENT)]


def engine_record(engine) -> dict:
    """The engine's record of ``engine`` (a :class:`launch.engine.core.SyncEngine`; module
    docstring), normalized."""
    agent = next(iter(engine.agents.values()))
    record = {
        "num_agents": engine.schedule.num_agents,
        "numel": agent.flat.numel,
        "dtype": str(agent.flat.buffer.dtype),
        "schedule": repr(engine.schedule),
        "schedule.fingerprint": engine.schedule.fingerprint(),
        "state_policy": list(engine.sync_policy.levels),
    }
    workers = engine.worker_optimizers()
    if workers:
        record.update(describe_optimizer(workers[0], "optimizer"))
    rule = engine.slow_rule
    record.update({"outer": None} if rule is None else rule.describe("outer"))
    return normalize(record)


def optimizers_of(engine) -> dict[str, list]:
    """``{"optimizer": [...], "outer.optimizer": [...]}``: the torch optimizers whose
    hyperparameters the records' ``optimizer.*`` / ``outer.optimizer.*`` keys describe (this
    rank's workers' inner optimizers, the slow rule's optimizer)."""
    rule = engine.slow_rule
    outer = rule.optimizer if isinstance(rule, OuterOptimizer) else None
    return {"optimizer": engine.worker_optimizers(), "outer.optimizer": [] if outer is None else [outer]}


def snapshot_hyperparameters(engine) -> dict:
    """The hyperparameters of every param group of :func:`optimizers_of` (``params`` left out):
    taken before a checkpoint is loaded, they are the new run's values."""
    return {prefix: [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in opts]
            for prefix, opts in optimizers_of(engine).items()}


def reapply_hyperparameters(engine, snapshot: dict, keys: Iterable[str]) -> None:
    """After a checkpoint is loaded (``load_state_dict`` puts the saved hyperparameters back in
    every param group): set the hyperparameters named by ``keys`` (``optimizer.lr``,
    ``outer.optimizer.momentum``...) back to the new run's values in ``snapshot``."""
    for prefix, opts in optimizers_of(engine).items():
        names = [k[len(prefix) + 1:] for k in keys if k.startswith(prefix + ".")]
        for opt, groups in zip(opts, snapshot[prefix]):
            for group, fresh in zip(opt.param_groups, groups):
                for name in names:
                    if name in fresh:
                        group[name] = fresh[name]
