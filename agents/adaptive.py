"""Adaptive slow step size (Zhang et al., Proposition 1 and section 2.1).

For a quadratic ``L(x) = x^T A x / 2 - b^T x`` the step size minimizing
``L(theta_0 + alpha (theta_k - theta_0))`` is

    alpha* = (theta_0 - theta*)^T A (theta_0 - theta_k) / (theta_0 - theta_k)^T A (theta_0 - theta_k).

The paper replaces A by the empirical Fisher's diagonal F (Adam's second moment) and theta* by
``theta_k - F^{-1} g``.  With ``delta = theta_0 - theta_k`` (slow minus fast) and F diagonal (so
symmetric), ``(theta_0 - theta*)^T F delta = (delta + F^{-1} g)^T F delta = delta^T F delta + g^T delta``,
hence

    alpha* = clip(1 + g^T delta / (delta^T F delta), alpha_low, 1),

which needs no division by F (zero second moments are harmless).  Choices where the paper is
silent, stated here:

* F is Adam's bias-corrected second moment ``exp_avg_sq / (1 - beta2^step)`` at the sync;
* g is the last minibatch gradient the inner optimizer used (the one at ``theta_{k-1}``, still in
  ``p.grad``): the paper takes "stochastic gradients computed on mini-batches used in training so
  as to not incur additional computational cost", and the gradient at ``theta_k`` itself would
  cost an extra evaluation;
* if ``delta^T F delta`` is 0 (or not finite), alpha* = 1 (with ``delta = 0`` every alpha gives the
  same point).

The computation is in the parameters' dtype, as one :func:`torch.dot` over the flattened vectors
in parameter order, in one function (:func:`adaptive_alpha`) that the serial reference and the
simulator both call, so both get the same bits.
"""

from __future__ import annotations

import math

import torch

from agents.reference import Lookahead, mix_chain_
from agents.slow_rule import SlowRule
from topology.validation import check_alpha


def flat_fisher(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> torch.Tensor:
    """Adam's bias-corrected second moment ``exp_avg_sq / (1 - beta2^step)``, flattened in
    ``params`` order; ``ValueError`` when the optimizer keeps no ``exp_avg_sq``."""
    beta2 = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            beta2[p] = group.get("betas", (None, None))[1]
    parts = []
    for p in params:
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state or beta2.get(p) is None:
            raise ValueError(
                "adaptive alpha needs an inner optimizer with a second-moment estimate exp_avg_sq "
                f"and betas (Adam, AdamW); got {type(optimizer).__name__}"
            )
        step = float(state["step"])
        parts.append((state["exp_avg_sq"] / (1.0 - beta2[p] ** step)).reshape(-1))
    return torch.cat(parts)


def flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


@torch.no_grad()
def adaptive_alpha(fast: torch.Tensor, slow: torch.Tensor, grad: torch.Tensor, fisher: torch.Tensor,
                   alpha_low: float) -> float:
    """``clip(1 + g^T delta / (delta^T F delta), alpha_low, 1)`` with ``delta = slow - fast``."""
    delta = slow - fast
    den = float(torch.dot(fisher * delta, delta))
    if not (den > 0.0 and math.isfinite(den)):
        return 1.0
    alpha = 1.0 + float(torch.dot(grad, delta)) / den
    if not math.isfinite(alpha):
        return 1.0
    return min(1.0, max(alpha_low, alpha))


class AdaptiveAlpha(SlowRule):
    """The simulator's adaptive slow update (a :class:`~agents.slow_rule.SlowRule`): the worker computes
    alpha* from its fast weights, its copy of the slow weights theta_{t,0} (every member of the
    block keeps one), its last gradient and Adam's second moment, and adds it to the sync's
    all-reduce as one extra scalar; every rank then applies
    ``s <- s + alpha* (x - s)`` (``d = x - s; d = alpha* d; s = s + d``) to its replica.

    Args:
        alpha_low: the lower clip, a real in (0, 1].

    ``history``: every alpha* taken, in order (saved in checkpoints).
    """

    extra = 1

    def __init__(self, alpha_low: float = 0.1):
        self.alpha_low = check_alpha(alpha_low, name="alpha_low")
        self.history: list[float] = []

    def start(self, slow: torch.Tensor) -> None:
        self.history = []

    def check(self, model, optimizer) -> None:
        """``ValueError`` unless the inner optimizer keeps Adam's ``exp_avg_sq`` (one throwaway
        step on a copy of ``model``, as :func:`agents.agent.probe_state_layout`)."""
        from agents.agent import probe_state_layout

        keys = {slot.key for slot in probe_state_layout(model, optimizer).slots}
        if "exp_avg_sq" not in keys:
            raise ValueError(
                "adaptive alpha needs an inner optimizer with a second-moment estimate exp_avg_sq "
                f"(Adam, AdamW); this one keeps {sorted(keys) or 'no per-parameter state'}"
            )

    def worker_extras(self, agent, slow: torch.Tensor) -> torch.Tensor:
        pack = agent.flat.pack              # the gradient and the Fisher are packed: no padding
        alpha = adaptive_alpha(pack(agent.params), pack(slow), flat_grad(agent.parameters),
                               flat_fisher(agent.optimizer, agent.parameters), self.alpha_low)
        return torch.tensor([alpha], dtype=slow.dtype, device=slow.device)

    @torch.no_grad()
    def step_(self, slow: torch.Tensor, mixed: torch.Tensor, extras: torch.Tensor, alpha: float) -> float:
        alpha_star = float(extras[0])
        self.history.append(alpha_star)
        delta = mixed - slow
        delta.mul_(alpha_star)
        slow.add_(delta)
        return alpha_star

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])


class AdaptiveLookahead(Lookahead):
    """Serial Lookahead with alpha* of Proposition 1 at every sync (one Adam-like worker).

    At every ``k``-th :meth:`step`: ``alpha* = adaptive_alpha(fast, slow, g, F, alpha_low)``
    (flattened in parameter order), then the Lookahead update with alpha*
    (``d = fast - slow; d = alpha* d; slow = slow + d; fast <- slow``) and the state policy with
    alpha*.  ``alphas_used`` lists every alpha* taken.

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = AdaptiveLookahead(torch.optim.Adam([w], lr=0.1), k=3, alpha_low=0.2)
        >>> for _ in range(3):
        ...     opt.zero_grad(); ((w - 1.0) ** 2).sum().backward(); _ = opt.step()
        >>> len(opt.alphas_used), 0.2 <= opt.alphas_used[0] <= 1.0
        (1, True)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha_low: float = 0.1,
                 state_policy="maintain") -> None:
        super().__init__(optimizer, k, 1.0, state_policy)
        self.alpha_low = check_alpha(alpha_low, name="alpha_low")
        self.alphas_used: list[float] = []

    @torch.no_grad()
    def _sync(self, level: int) -> None:
        params = self._params()
        slow = self._slow[0]
        fast_flat = torch.cat([p.reshape(-1) for p in params])
        slow_flat = torch.cat([s.reshape(-1) for s in slow])
        alpha = adaptive_alpha(fast_flat, slow_flat, flat_grad(params), flat_fisher(self.optimizer, params),
                               self.alpha_low)
        self.alphas_used.append(alpha)
        mix_chain_([params, slow], (alpha,))
        self._sync_state(level, params, (alpha,))
