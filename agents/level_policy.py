"""State policies per Lookahead level: nested Lookahead's ``reset_inner``, ``pullback_outer``, ...

Gilbert's nested Lookahead (Lookahead inside Lookahead, with momentum policies) resets or pulls back the
inner optimizer's momentum "upon finishing an inner loop", at the inner sync, the outer sync or
both.  For a multilayer schedule (level 1 innermost, level n outermost) a state policy is here one
of ``maintain`` / ``reset`` / ``pullback`` *per level*: ``policies[l - 1]`` says what level ``l``
does to the state when it takes part in a sync.  Level l takes part in every sync of level
L >= l (a level-2 sync of nested Lookahead is also the end of an inner cycle), exactly as the
parameters go through the chain ``slow_l <- slow_l + alpha_l (slow_{l-1} - slow_l)``, l = 1..L.

The state goes through the same chain, level by level (``state_0`` = the live state)::

    pullback at l:  cache_l <- cache_l + alpha_l * (state_{l-1} - cache_l);  state_l = cache_l
    maintain at l:  state_l = state_{l-1}            (pass-through: the level keeps no state)
    reset    at l:  state_l = 0

and then the live state and the caches of levels 1..L-1 take copies of ``state_L``, as
``x, slow_1 .. slow_{L-1}`` take copies of ``slow_L``.  So after a level-L sync the live state and
every cache of levels <= L hold the same value, just as the parameters do.

Why the caches of levels that do not pull back stay consistent (derivation): a cache is only read
by its own level's pullback (``cache_l`` on the right-hand side above), and it is written at every
sync of level >= l (by the chain when l pulls back, by the final copy otherwise).  So at the next
sync of level >= l it holds ``state`` as it was right after the last sync of level >= l: the state
at the start of level l's current cycle, the state analogue of ``slow_l``.  A level that does not
pull back never reads its cache; keeping it written costs nothing extra in the simulator (its
slow agent is a receiver of the same all-reduce) and keeps that invariant uniform.

Uniform policies reduce to the single policies of :mod:`agents.state_policy`: all ``pullback`` is
the full chain, all ``maintain`` leaves the state alone, all ``reset`` zeroes it.  The chain is
linear, so a level-L sync gives ``state_L = sum_j b_j state_j`` (j = 0: live, j >= 1: cache_j) with
weights :func:`state_weights`; ``b = 0`` means the state is reset, and then Adam's ``step``
counter is zeroed too (a fresh state).  Otherwise non-mixable state (``step``) is kept.

Named policies (``n`` levels; "inner" is level 1, "outer" is level n)::

    maintain | reset | pullback                 every level
    reset_inner, pullback_inner                 level 1; the others maintain
    reset_outer, pullback_outer                 level n; the others maintain
    reset_both, pullback_both                   levels 1 and n (every level when n = 2)
    reset_inner_pullback_outer                  level 1 reset, level n pullback
    pullback_inner_reset_outer                  level 1 pullback, level n reset

or a sequence of n policies (level 1 first), or a mapping ``{level: policy}`` (missing levels
maintain).  Only multilayer schedules have levels; any other schedule takes a single policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Sequence

import torch

from agents.state_policy import POLICIES, validate_policy
from topology.checks import is_integer

NAMED = (
    "reset_inner", "reset_outer", "reset_both", "pullback_inner", "pullback_outer",
    "pullback_both", "reset_inner_pullback_outer", "pullback_inner_reset_outer",
)


def _named(name: str, depth: int) -> tuple[str, ...]:
    inner, outer = {
        "reset_inner": ("reset", "maintain"), "reset_outer": ("maintain", "reset"),
        "reset_both": ("reset", "reset"), "pullback_inner": ("pullback", "maintain"),
        "pullback_outer": ("maintain", "pullback"), "pullback_both": ("pullback", "pullback"),
        "reset_inner_pullback_outer": ("reset", "pullback"),
        "pullback_inner_reset_outer": ("pullback", "reset"),
    }[name]
    levels = ["maintain"] * depth
    # With one level, inner and outer are the same level: the outer word wins unless it is
    # "maintain" (so pullback_outer and pullback_inner both pull back level 1).
    levels[0] = inner
    if outer != "maintain" or depth > 1:
        levels[-1] = outer
    return tuple(levels)


def resolve_policy(policy, depth: int | None, *, name: str = "state_policy") -> tuple[str, ...]:
    """The per-level policies ``(p_1, ..., p_n)`` of ``policy`` for ``depth = n`` levels.

    ``depth=None`` (a schedule without levels) accepts only a single policy and returns it as a
    1-tuple.  Raises ``ValueError`` naming ``name``, what was given and what is allowed.
    """
    allowed = f"one of {', '.join(POLICIES + NAMED)}, a sequence of per-level policies or a mapping level -> policy"
    if isinstance(policy, str):
        if policy in POLICIES:
            return (policy,) * (depth or 1)
        if policy in NAMED:
            if depth is None:
                raise ValueError(
                    f"{name}={policy!r} names levels, but the schedule has none (only multilayer "
                    f"schedules do); use one of {', '.join(POLICIES)}"
                )
            return _named(policy, depth)
        raise ValueError(f"{name} must be {allowed}; got {policy!r}")
    if depth is None:
        raise ValueError(
            f"{name} must be one of {', '.join(POLICIES)} for a schedule without levels; got {policy!r}"
        )
    if isinstance(policy, Mapping):
        bad = [lv for lv in policy if not (is_integer(lv) and 1 <= lv <= depth)]
        if bad:
            raise ValueError(f"{name} levels must be ints in 1..{depth}; got {bad!r}")
        return tuple(
            validate_policy(policy.get(lv, "maintain"), name=f"{name}[{lv}]") for lv in range(1, depth + 1)
        )
    if isinstance(policy, Sequence):
        if len(policy) != depth:
            raise ValueError(f"{name} must hold {depth} per-level policies (level 1 first); got {len(policy)}")
        return tuple(validate_policy(p, name=f"{name}[{i + 1}]") for i, p in enumerate(policy))
    raise ValueError(f"{name} must be {allowed}; got {policy!r}")


def state_weights(policies: Sequence[str], alphas: Sequence[float], level: int) -> tuple[float, ...]:
    """``(b_0, ..., b_L)``: a level-L sync sets the state to ``sum_j b_j state_j``.

    Derived by running the chain of the module docstring on coefficient vectors: start with
    ``c = e_0`` (the live state); at level l, pullback gives ``c <- alpha_l c + (1 - alpha_l) e_l``,
    maintain leaves c, reset gives ``c = 0``.  With every level pulling back this is the
    parameters' ``a_0 = alpha_1 ... alpha_L``, ``a_j = (1 - alpha_j) alpha_{j+1} ... alpha_L``.
    """
    c = [1.0] + [0.0] * level
    for l in range(1, level + 1):
        policy = policies[l - 1]
        if policy == "pullback":
            c = [alphas[l - 1] * v for v in c]
            c[l] = 1.0 - alphas[l - 1]
        elif policy == "reset":
            c = [0.0] * (level + 1)
    return tuple(c)


def any_pullback(policies: Sequence[str]) -> bool:
    return "pullback" in policies


@torch.no_grad()
def run_state_chain_(
    live: list[torch.Tensor], caches: list[list[torch.Tensor]], policies: Sequence[str],
    alphas: Sequence[float], level: int,
) -> bool:
    """The state chain of a level-``level`` sync, in place, in the reference's arithmetic.

    ``live`` are the live mixable state tensors, ``caches[l - 1]`` level l's copies (same order).
    Pullback levels use the three separately rounded ops of :func:`agents.reference.mix_chain_`
    (``d = prev - cache; d = alpha * d; cache = cache + d``).  Returns True when the result is
    the zero state (a reset with no pullback above it): the caller then zeroes the whole state,
    ``step`` included, and the caches of levels 1..L are zeroed here.
    """
    prev, zero = live, False
    for l in range(1, level + 1):
        policy = policies[l - 1]
        if policy == "pullback":
            if zero:
                prev = [torch.zeros_like(t) for t in live]
            delta = torch._foreach_sub(prev, caches[l - 1])
            torch._foreach_mul_(delta, alphas[l - 1])
            torch._foreach_add_(caches[l - 1], delta)
            prev, zero = caches[l - 1], False
        elif policy == "reset":
            zero = True
    targets = [live] + [caches[l - 1] for l in range(1, level + 1)]
    for target in targets:
        if not target or (target is prev and not zero):
            continue
        if zero:
            torch._foreach_zero_(target)
        else:
            torch._foreach_copy_(target, prev)
    return zero
