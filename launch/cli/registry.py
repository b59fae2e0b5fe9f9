"""Every name the command line knows, in one place.

- topologies: ``topology.name`` -> a schedule factory (:data:`SCHEDULES`, :func:`make_schedule`);
- problems: ``problem.name`` -> a problem factory (:func:`problems`, ``experiments.problems``);
- inner optimizers: ``agents.optimizer.name`` -> a ``torch.optim`` class (:func:`optimizers`);
- slow rules: ``agents.outer.name`` -> how to validate its options, build the simulator's rule
  and the serial reference's optimizer (:data:`OUTER_RULES`);
- serial references: which jobs have one (:func:`serial_reference_missing`).

A new topology is a factory in :data:`SCHEDULES` plus a yaml file in ``launch/cli/conf/topology``;
a new problem, a factory in ``experiments.problems.PROBLEMS`` plus a yaml file; a new slow rule, an
:class:`agents.slow_rule.SlowRule`, its serial optimizer and an entry of :data:`OUTER_RULES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from agents.adaptive import AdaptiveAlpha, AdaptiveLookahead
from agents.outer import OuterLookahead, OuterOptimizer
from agents.reference import MultilayerLookahead
from agents.slow_rule import SlowRule
from launch.cli.topologies import SCHEDULES, make_schedule
from topology.schedule import MultilayerSchedule, Schedule

__all__ = ["SCHEDULES", "make_schedule", "problems", "optimizers", "OUTER_RULES", "OuterRuleEntry",
           "serial_reference_missing", "serial_optimizer", "has_serial_reference"]


def problems() -> dict:
    """``experiments.problems.PROBLEMS``: problem factories by name (imported on first use: the
    problems pull in their own dependencies, scikit-learn for the digits)."""
    from experiments.problems import PROBLEMS

    return PROBLEMS


def optimizers() -> dict[str, type]:
    """Every ``torch.optim`` optimizer, keyed by its lower-case class name (``sgd``, ``adam``...)."""
    return {
        name.lower(): cls for name, cls in vars(torch.optim).items()
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    }


# -- slow rules (agents.outer) ------------------------------------------------------------------------
def _sgd_factory(options: dict) -> Callable[[list], torch.optim.Optimizer]:
    """``params -> torch.optim.SGD(params, lr, momentum, nesterov)`` of ``agents.outer`` (sgd)."""
    kwargs = {k: v for k, v in options.items() if k != "name"}
    return lambda params: torch.optim.SGD(params, **kwargs)


def _sgd_options(outer: dict) -> dict:
    if "lr" not in outer:
        raise ValueError("agents.outer.lr must be set for outer sgd (the outer learning rate; lr=alpha, "
                         "no momentum, is Lookahead)")
    outer.setdefault("momentum", 0.0)
    outer.setdefault("nesterov", False)
    try:
        _sgd_factory(outer)([nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise ValueError(f"agents.outer: torch.optim.SGD refuses {outer}: {err}") from None
    return outer


def _adaptive_options(outer: dict) -> dict:
    outer.setdefault("alpha_low", 0.1)
    try:
        AdaptiveAlpha(outer["alpha_low"])
    except ValueError as err:
        raise ValueError(f"agents.outer.{err}") from None
    return outer


@dataclass(frozen=True)
class OuterRuleEntry:
    """One ``agents.outer.name``: its option keys, how to validate them (filling defaults), the
    simulator's :class:`~agents.slow_rule.SlowRule`, and the serial reference's optimizer
    ``serial(inner, k, alpha, options, state_policy)``."""

    keys: frozenset
    validate: Callable[[dict], dict]
    make: Callable[[dict], SlowRule]
    serial: Callable


#: The slow rules of ``agents.outer``: outer SGD (lr alpha and no momentum is Lookahead; with
#: momentum SlowMo; with nesterov DiLoCo) and Zhang et al.'s adaptive alpha.
OUTER_RULES: dict[str, OuterRuleEntry] = {
    "sgd": OuterRuleEntry(
        frozenset({"lr", "momentum", "nesterov"}), _sgd_options,
        lambda o: OuterOptimizer(_sgd_factory(o)),
        lambda inner, k, alpha, o, policy: OuterLookahead(inner, k, _sgd_factory(o), alpha=alpha, state_policy=policy)),
    "adaptive": OuterRuleEntry(
        frozenset({"alpha_low"}), _adaptive_options,
        lambda o: AdaptiveAlpha(o["alpha_low"]),
        lambda inner, k, alpha, o, policy: AdaptiveLookahead(inner, k, o["alpha_low"], state_policy=policy)),
}


# -- serial references --------------------------------------------------------------------------------
def has_serial_reference(schedule: Schedule) -> bool:
    """Whether :class:`agents.reference.MultilayerLookahead` is a serial reference of ``schedule``
    (Lookahead, multilayer and nested Lookahead: the columns are the fast and slow weights; not
    the decentralized schedules, ``with_slow_agent`` or ``matrices``)."""
    return isinstance(schedule, MultilayerSchedule)


def serial_reference_missing(schedule: Schedule, outer: dict | None = None, stages=None) -> str | None:
    """Why a job has no serial reference (a sentence), or None when it has one: (multilayer /
    nested) Lookahead with any state policy; with a slow rule (``agents.outer``) only one level
    (:class:`agents.outer.OuterLookahead`, :class:`agents.adaptive.AdaptiveLookahead`); SLRLA
    (``stages``: :func:`agents.slrla.slrla_reference`)."""
    if stages is not None:
        return None
    if not has_serial_reference(schedule):
        return (f"topology {schedule!r} has no serial reference (only lookahead, multilayer, nested and "
                f"stagewise do)")
    if outer is not None and schedule.depth != 1:
        return f"agents.outer has a serial reference only with one slow level (lookahead); {schedule!r} has {schedule.depth}"
    return None


def serial_optimizer(params, schedule: MultilayerSchedule, optimizer, state_policy, outer: dict | None):
    """The serial reference's optimizer on ``params`` (see :func:`serial_reference_missing`)."""
    inner = optimizer(params)
    if outer is None:
        return MultilayerLookahead(inner, schedule.ks, schedule.alphas, state_policy=state_policy)
    entry = OUTER_RULES[outer["name"]]
    return entry.serial(inner, schedule.ks[0], schedule.alphas[0], outer, state_policy)
