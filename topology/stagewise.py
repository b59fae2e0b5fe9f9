"""Stagewise Lookahead: each stage q has its own period k_q and step size alpha_q (SLRLA).

The stages themselves (:class:`Stage`, :func:`check_stages`) live here, beside the schedule
they define, so that the registry and the SLRLA driver (:mod:`agents.slrla`, which re-exports
both) validate them with one function.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Sequence

import torch

from topology.checks import check_list, check_real
from topology.schedule import Schedule, compose
from topology.validation import check_alpha, check_mixing_matrix, check_period
from topology.word import concat, repeat, run

#: The keys of a stage given as a mapping (a configuration file's ``stages`` entries).
STAGE_KEYS = ("steps", "lr", "alpha", "k", "beta")


@dataclass(frozen=True)
class Stage:
    """One SLRLA stage: ``steps`` inner steps (a multiple of ``k``) of Lookahead (``k``,
    ``alpha``) with inner learning rate ``lr`` on ``F + beta / 2 ||theta - theta_{q-1}||^2``.

    ``steps`` and ``k`` are integers >= 1, ``alpha`` a real in (0, 1], ``lr`` and ``beta`` finite
    reals >= 0 (a ``ValueError`` naming the field otherwise)."""

    steps: int
    lr: float
    alpha: float
    k: int
    beta: float

    def __post_init__(self):
        check_period(self.steps, name="steps")
        check_period(self.k, name="k")
        check_alpha(self.alpha, name="alpha")
        if self.steps % self.k:
            raise ValueError(f"steps must be a multiple of k (a stage ends with a sync); got steps={self.steps}, k={self.k}")
        for name in ("lr", "beta"):
            check_real(getattr(self, name), name, minimum=0.0)


def check_stages(stages, *, name: str = "stages") -> tuple[Stage, ...]:
    """SLRLA's stages: a non-empty list of :class:`Stage` or of mappings with exactly the keys
    ``steps, lr, alpha, k, beta``.  A bad stage is a ``ValueError`` naming it, e.g.
    ``stages[1].k must be an integer >= 1; got 0``.

    Example:
        >>> check_stages([{"steps": 4, "lr": 0.1, "alpha": 0.5, "k": 2, "beta": 0.0}])[0].k
        2
    """
    stages = check_list(stages, name, f"{{{', '.join(STAGE_KEYS)}}} mappings")
    checked = []
    for q, stage in enumerate(stages):
        if isinstance(stage, Stage):
            checked.append(stage)
            continue
        if not isinstance(stage, Mapping):
            raise ValueError(f"{name}[{q}] must be a mapping {{{', '.join(STAGE_KEYS)}}}; got {stage!r}")
        missing = sorted(set(STAGE_KEYS) - set(stage))
        unknown = sorted(set(stage) - set(STAGE_KEYS), key=str)
        if missing or unknown:
            raise ValueError(f"{name}[{q}] must have exactly the keys {', '.join(STAGE_KEYS)}; "
                             f"missing {missing}, unknown {unknown}")
        try:
            checked.append(Stage(**stage))
        except ValueError as err:
            raise ValueError(f"{name}[{q}].{err}") from None
    if not checked:
        raise ValueError(f"{name} must hold at least one Stage")
    return tuple(checked)


def stagewise_lookahead(stages: Sequence) -> Schedule:
    """Lookahead whose (k, alpha) change by stage: ``stages`` are objects with ``steps``, ``k``
    and ``alpha`` (e.g. :class:`Stage`), run one after the other.  Within stage q (starting at
    global step S_q) the sync comes after the inner step of iteration t when ``t - S_q + 1`` is a
    multiple of k_q.  The period is the total number of steps (the schedule then starts over);
    the distinct matrices are one per distinct alpha (plus the identity), in order of first
    appearance.  Stage q is the word (I^(k_q - 1) S_q)^(steps_q // k_q) I^(steps_q % k_q): built
    in O(number of stages), whatever the number of steps.

    Example:
        >>> from types import SimpleNamespace as S
        >>> s = stagewise_lookahead([S(steps=4, k=2, alpha=0.5), S(steps=3, k=3, alpha=0.8)])
        >>> [t for t in range(7) if not s.matrix(t).equal(torch.eye(2, dtype=torch.float64))]
        [1, 3, 6]
    """
    matrices = [torch.eye(2, dtype=torch.float64)]
    words = []
    for q, stage in enumerate(stages):
        steps = check_period(stage.steps, name=f"stages[{q}].steps")
        k = check_period(stage.k, name=f"stages[{q}].k")
        alpha = check_alpha(stage.alpha, name=f"stages[{q}].alpha")
        sync = torch.tensor([[alpha, alpha], [1.0 - alpha, 1.0 - alpha]], dtype=torch.float64)
        matrices.append(check_mixing_matrix(sync, 2, name=f"stages[{q}]'s sync matrix"))
        cycle = concat(run(0, k - 1), run(len(matrices) - 1, 1))
        words.append(concat(repeat(cycle, steps // k), run(0, steps % k)))
    if not words:
        raise ValueError("stages must hold at least one stage")
    return compose(matrices, concat(*words), workers=(0,))


__all__ = ["STAGE_KEYS", "Stage", "check_stages", "stagewise_lookahead"]
