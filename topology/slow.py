"""Workers around one slow agent: local SGD with a slow (outer) update, as in SlowMo and DiLoCo."""

from __future__ import annotations

import torch

from topology.schedule import Schedule, compose
from topology.validation import check_alpha, check_mixing_matrix, check_period
from topology.word import concat, run


def with_slow_agent(num_workers: int, k: int, alpha: float) -> Schedule:
    """``num_workers`` workers (agents 0..n-1) and a slow agent n, synced every ``k`` steps.

    At a sync every agent receives ``alpha * mean(workers) + (1 - alpha) * slow``: P = a 1^T with
    ``a = (alpha / n, ..., alpha / n, 1 - alpha)``.  With one worker this is Lookahead; with an
    outer optimizer (:mod:`agents.outer`) the slow agent steps on ``slow - mean(workers)``.

    Example:
        >>> s = with_slow_agent(3, k=4, alpha=0.5)
        >>> s.num_agents, s.workers, s.passive, s.period
        (4, (0, 1, 2), (3,), 4)
    """
    check_period(num_workers, name="num_workers")
    k = check_period(k, name="k")
    alpha = check_alpha(alpha, name="alpha")
    m = num_workers + 1
    a = torch.full((m,), alpha / num_workers, dtype=torch.float64)
    a[-1] = 1.0 - alpha
    sync = check_mixing_matrix(a.unsqueeze(1).repeat(1, m), m, name="the sync matrix")
    eye = torch.eye(m, dtype=torch.float64)
    # One period: k - 1 identities, then the sync (a word of 2 runs, whatever k).
    return compose([eye, sync], concat(run(0, k - 1), run(1, 1)), workers=tuple(range(num_workers)))
