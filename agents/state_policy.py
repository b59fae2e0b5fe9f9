"""What happens to an inner optimizer's state when a sync touches its agent.

Zhang et al. (App. D.1) and Gilbert (nested Lookahead) consider three policies for the inner
optimizer's state (SGD's momentum buffer, Adam's moments) at a synchronization:

``maintain``
    Keep the state as it is.
``reset``
    Re-initialise the state: every state tensor is zeroed in place, the step counter too.
    For Adam this is exactly a fresh state (``step = 0``, zero moments).  For SGD it zeroes the
    momentum buffer, so the next step sets ``buf = (1 - dampening) * grad`` (equal to a fresh
    buffer, ``buf = grad``, when ``dampening == 0``, the default).
``pullback``
    Interpolate the state with the same weights as the parameters.  Each slow agent holds a
    cached copy of the state (zero at the start), and at a sync the mixable state tensors are
    mixed by the same column of P_t as the parameters: for Lookahead,
    ``m <- alpha * m_fast + (1 - alpha) * m_cached`` and the cache takes a *copy* of the result
    (caching a reference to the live buffer, as some public implementations do, turns pullback
    into a silent no-op).

The *mixable* state of a parameter is every floating-point tensor in its state dict that has the
parameter's shape, except the step counter: ``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``.  Scalars (``step``) are kept as they are by ``pullback``.
"""

from __future__ import annotations

from typing import Iterable

import torch

from topology.checks import check_choice

POLICIES = ("maintain", "reset", "pullback")

#: State keys that are never mixed, whatever their shape.
NON_MIXABLE_KEYS = frozenset({"step"})


def validate_policy(policy: str, *, name: str = "state_policy") -> str:
    """Return ``policy`` if it is one of :data:`POLICIES`, else raise ``ValueError``."""
    return check_choice(policy, POLICIES, name)


def mixable_state_keys(state: dict, param: torch.Tensor) -> list[str]:
    """The keys of ``state`` that ``pullback`` mixes, in sorted order (a fixed layout).

    A key is mixable when its value is a floating-point tensor of ``param``'s shape and the key
    is not the step counter.
    """
    keys = []
    for key, value in state.items():
        if key in NON_MIXABLE_KEYS:
            continue
        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and value.shape == param.shape
        ):
            keys.append(key)
    return sorted(keys)


def reset_state_(states: Iterable[dict]) -> None:
    """Zero, in place, every tensor of every per-parameter state dict in ``states``."""
    tensors = [v for s in states for v in s.values() if isinstance(v, torch.Tensor)]
    if tensors:
        torch._foreach_zero_(tensors)
