"""Stagewise Lookahead: each stage q has its own period k_q and step size alpha_q (SLRLA)."""

from __future__ import annotations

from typing import Sequence

import torch

from topology.schedule import Schedule, from_matrices
from topology.validation import check_alpha, check_period


def stagewise_lookahead(stages: Sequence) -> Schedule:
    """Lookahead whose (k, alpha) change by stage: ``stages`` are objects with ``steps``, ``k``
    and ``alpha`` (e.g. :class:`agents.slrla.Stage`), run one after the other.  Within stage q
    (starting at global step S_q) the sync comes after the inner step of iteration t when
    ``t - S_q + 1`` is a multiple of k_q.  The period is the total number of steps; the
    distinct matrices are one per distinct alpha (plus the identity).

    Example:
        >>> from types import SimpleNamespace as S
        >>> s = stagewise_lookahead([S(steps=4, k=2, alpha=0.5), S(steps=3, k=3, alpha=0.8)])
        >>> [t for t in range(7) if not s.matrix(t).equal(torch.eye(2, dtype=torch.float64))]
        [1, 3, 6]
    """
    plan = []
    for q, stage in enumerate(stages):
        steps = check_period(stage.steps, name=f"stages[{q}].steps")
        k = check_period(stage.k, name=f"stages[{q}].k")
        alpha = check_alpha(stage.alpha, name=f"stages[{q}].alpha")
        for local in range(steps):
            plan.append(alpha if (local + 1) % k == 0 else None)
    if not plan:
        raise ValueError("stages must hold at least one stage")
    eye = torch.eye(2, dtype=torch.float64)

    def matrix(t: int):
        alpha = plan[t]
        if alpha is None:
            return eye
        return torch.tensor([[alpha, alpha], [1.0 - alpha, 1.0 - alpha]], dtype=torch.float64)

    return from_matrices(matrix, period=len(plan), workers=(0,))
