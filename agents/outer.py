"""Outer optimizers at the slow agent: Lookahead, SlowMo and DiLoCo on one code path.

At a sync the slow agent (slow weights ``s``) sees the *mixed* value of the workers,
``mixed = sum_i w_i x_i`` (for Lookahead the one fast worker, ``mixed = x``), and treats
``s - mixed`` as a pseudo-gradient for an outer optimizer (any ``torch.optim.Optimizer`` built on
the slow weights)::

    s.grad = s - mixed;  outer.step();  every x_i <- s

* outer SGD, lr alpha, no momentum: ``s <- s - alpha (s - x) = s + alpha (x - s)``: Lookahead
  (Zhang et al.);
* outer SGD with momentum beta: SlowMo (Wang et al. 2020, slow momentum, with its base-lr
  factor folded into lr);
* outer SGD with ``nesterov=True``: DiLoCo's outer step (Douillard et al. 2023).

Which is which is only the outer optimizer's hyperparameters: :class:`OuterOptimizer` wraps the
factory, and the simulator (``launch.engine.sync.slow_rule``) and the serial reference
(:class:`OuterLookahead`) run the same ``outer.step()`` on the same numbers.

Arithmetic: torch's SGD without momentum computes ``s + (-lr) * (s - x)``; ``-(s - x)`` is
exactly ``x - s`` and negating a product is exact, so that is ``s + lr * (x - s)`` rounded the
same way as the reference Lookahead's ``d = x - s; d = alpha d; s = s + d`` whenever the kernel
does not fuse the multiply-add (the tests check the actual bits and fall back to 1e-12).

Inner-optimizer state under ``pullback`` is mixed with the schedule's step size alpha,
``m <- cache + alpha (m_mixed - cache)`` (the outer optimizer acts on the parameters only).
"""

from __future__ import annotations

from typing import Callable

import torch

from agents.flat import cpu_copy
from agents.reference import Lookahead
from agents.settings import describe_optimizer
from agents.slow_rule import SlowRule

OuterFactory = Callable[[list], torch.optim.Optimizer]


class OuterOptimizer(SlowRule):
    """The slow agent's update as an outer optimizer on the pseudo-gradient ``s - mixed``.

    Args:
        factory: ``params -> torch.optim.Optimizer``, e.g.
            ``lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True)`` (DiLoCo).

    A :class:`~agents.slow_rule.SlowRule`: one replica per rank, all bitwise equal (the same steps
    on the same all-reduced inputs), so no rank ever sends the slow weights.  No extra scalars:
    the outer step needs only ``mixed``.
    """

    def __init__(self, factory: OuterFactory):
        if not callable(factory):
            raise ValueError("outer must be a factory: params -> torch.optim.Optimizer")
        self.factory = factory
        self.optimizer: torch.optim.Optimizer | None = None

    def start(self, slow: torch.Tensor) -> None:
        """Build the outer optimizer on ``slow`` (the rank's replica of the slow weights)."""
        slow.grad = torch.zeros_like(slow)
        self.optimizer = self.factory([slow])
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise ValueError(f"outer must return a torch.optim.Optimizer; got {type(self.optimizer).__name__}")

    @torch.no_grad()
    def step_(self, slow: torch.Tensor, mixed: torch.Tensor, extras: torch.Tensor, alpha: float) -> float:
        """``slow <- outer step on slow.grad = slow - mixed``; returns the state-mixing alpha."""
        torch.sub(slow, mixed, out=slow.grad)
        self.optimizer.step()
        return alpha

    def describe(self, prefix: str = "outer") -> dict:
        """:meth:`agents.slow_rule.SlowRule.describe`, plus ``prefix.optimizer`` (the outer
        optimizer's class) and its hyperparameters -- before :meth:`start`, those of the optimizer
        the factory builds on a throwaway parameter."""
        record = super().describe(prefix)
        optimizer = self.optimizer if self.optimizer is not None else self.factory([torch.nn.Parameter(torch.zeros(1))])
        record.update(describe_optimizer(optimizer, f"{prefix}.optimizer"))
        return record

    def state_dict(self) -> dict:
        """The outer optimizer's ``state_dict`` (momentum buffers...), as CPU copies."""
        return {"optimizer": cpu_copy(self.optimizer.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


class OuterLookahead(Lookahead):
    """Serial Lookahead whose slow update is an outer optimizer (one fast worker).

    Every ``k``-th :meth:`step` (the first after exactly k inner steps): for each parameter
    ``slow.grad = slow - fast``, ``outer.step()`` on the slow weights, then ``fast <- slow``; the
    state policy follows with step size ``alpha`` (used only by ``pullback``).

    Args:
        optimizer: the inner optimizer.
        k: sync period.
        outer: factory ``params -> torch.optim.Optimizer`` for the slow weights.
        alpha: the step size with which ``pullback`` mixes the inner state (default 0.5).
        state_policy: ``maintain`` | ``reset`` | ``pullback``.

    Example (outer SGD with lr alpha is Lookahead)::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> opt = OuterLookahead(torch.optim.SGD([w], lr=0.5), k=2,
        ...                      outer=lambda p: torch.optim.SGD(p, lr=0.5))
        >>> for _ in range(2):
        ...     opt.zero_grad(); w.sum().backward(); _ = opt.step()
        >>> w.item()
        -0.5
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, outer: OuterFactory | None = None,
                 alpha: float = 0.5, state_policy="maintain") -> None:
        super().__init__(optimizer, k, alpha, state_policy)
        if outer is None:
            raise ValueError("outer must be a factory: params -> torch.optim.Optimizer; got None")
        slow = self._slow[0]
        for s in slow:
            s.grad = torch.zeros_like(s)
        self.outer = OuterOptimizer(outer).factory(slow)

    @torch.no_grad()
    def _sync(self, level: int) -> None:
        params = self._params()
        slow = self._slow[0]
        for s, p in zip(slow, params):
            torch.sub(s, p, out=s.grad)
        self.outer.step()
        torch._foreach_copy_(params, slow)
        self._sync_state(level, params, self._alphas)
