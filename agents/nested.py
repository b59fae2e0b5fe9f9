"""Serial nested Lookahead (Gilbert): Lookahead (k, alpha) inside Lookahead (s, h).

It is :class:`~agents.reference.MultilayerLookahead` with ``ks = (k, s)`` and
``alphas = (alpha, h)``; see :mod:`topology.nested` for the reading of the paper's pseudocode
and :mod:`agents.level_policy` for the momentum policies per level.
"""

from __future__ import annotations

import torch

from agents.reference import MultilayerLookahead
from topology.validation import check_alpha, check_period


class NestedLookahead(MultilayerLookahead):
    """Nested Lookahead: inner sync every ``k`` steps (step size ``alpha``), outer sync every
    ``k * s`` steps (step size ``h``), after that step's inner sync.

    Args:
        optimizer: the inner optimizer A.
        k, alpha: the inner Lookahead's period and slow step size.
        s, h: the outer Lookahead's period (in inner cycles) and step size.
        state_policy: ``maintain`` | ``reset`` | ``pullback`` (every level) or per level:
            ``reset_inner``, ``reset_outer``, ``reset_both``, ``pullback_inner``,
            ``pullback_outer``, ``pullback_both``, ``reset_inner_pullback_outer``,
            ``pullback_inner_reset_outer``, a pair (inner, outer) or ``{1: ..., 2: ...}``.

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> opt = NestedLookahead(torch.optim.SGD([w], lr=1.0), k=2, alpha=0.5, s=2, h=0.5)
        >>> for _ in range(4):
        ...     opt.zero_grad(); w.sum().backward(); _ = opt.step()
        >>> w.item()   # phi: -1 after step 2, then -1 + 0.5 (-3 + 1) = -2; omega = 0.5 * -2
        -1.0
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5, s: int = 2,
                 h: float = 0.5, state_policy="maintain") -> None:
        check_period(k, name="k")
        check_alpha(alpha, name="alpha")
        check_period(s, name="s")
        check_alpha(h, name="h")
        super().__init__(optimizer, (k, s), (alpha, h), state_policy)
