"""Which weights an evaluation from the user's loop loads, and how every rank computes them.

A target is one vector over the agents, ``c``, and the weights evaluated are ``v = X c``:

- agent i (``agent=i``): ``c = e_i`` (under push-sum the agent's model, the de-biased
  z_i = x_i / w_i); ``level=l``: the l-th passive agent of the schedule, which
  is level l's slow weights in the schedules of :mod:`topology` (``multilayer``/``lookahead``:
  agent l; ``multilayer_local_sgd``/``lookahead_local_sgd``: agent W + l - 1;
  ``with_slow_agent``: agent W);
- the virtual iterate (``virtual=True``): ``c = a``, the schedule's consensus vector
  (``P_t a = a`` for every t, :meth:`topology.Schedule.consensus`), the iterate that follows
  ``theta_{t+1} = theta_t - lr G_t a`` (Wang et al. eq. 8); under push-sum X holds the numerators
  and a = 1/n, so v is their mean, the conserved average (:mod:`topology.decentralized`).

Each rank sums ``c_i x_i`` over its own agents (the same kernel order as a sync: products rounded
once, added in agent order) and one all-reduce (SUM) over every rank completes ``v``.  For one
agent's weights ``v = 1.0 * x_i + 0 + ... + 0`` is exactly x_i, bit for bit.

Targets are encoded as one integer for the control message (:mod:`launch.engine.own_loop.control`): the
agent's index, or m for the virtual iterate.
"""

from __future__ import annotations

import numbers

import torch

from topology.schedule import Schedule


def _check_index(value, name: str, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < upper:
        raise ValueError(f"{name} must be an int in 0..{upper - 1}; got {value!r}")
    return int(value)


def target_code(schedule: Schedule, level=None, agent=None, virtual: bool = False) -> int:
    """The target of ``evaluating(level, agent=, virtual=)`` as an integer (see the module
    docstring); ``ValueError`` for a bad or ambiguous choice.  Default (nothing given): the
    outermost level (the last passive agent) when the schedule has passive agents, else the
    virtual iterate."""
    given = [name for name, v in (("level", level), ("agent", agent)) if v is not None]
    if virtual:
        given.append("virtual")
    if len(given) > 1:
        raise ValueError(f"give at most one of level, agent and virtual=True; got {', '.join(given)}")
    m, passive = schedule.num_agents, schedule.passive
    if agent is not None:
        return _check_index(agent, "agent", m)
    if level is not None:
        if not passive:
            raise ValueError(f"level: this schedule ({schedule!r}) has no slow (passive) agents; "
                             f"evaluate agent=i or virtual=True")
        if isinstance(level, bool) or not isinstance(level, numbers.Integral) or not 1 <= level <= len(passive):
            raise ValueError(f"level must be an int in 1..{len(passive)} (level 1 innermost); got {level!r}")
        return passive[int(level) - 1]
    if virtual or not passive:
        if schedule.consensus() is None:
            raise ValueError(f"virtual: this schedule ({schedule!r}) has no unique consensus vector a "
                             f"(P_t a = a), so no virtual iterate; evaluate agent=i")
        return m
    return passive[-1]


def target_weights(schedule: Schedule, code: int) -> dict[int, float]:
    """The vector c of target ``code`` as ``{agent: weight}`` (non-zero weights only)."""
    if code < schedule.num_agents:
        return {code: 1.0}
    a = schedule.consensus().tolist()
    return {i: w for i, w in enumerate(a) if w != 0.0}


@torch.no_grad()
def local_part(agents: dict, weights: dict[int, float], like: torch.Tensor, debias: bool) -> torch.Tensor:
    """``sum c_i x_i`` over this rank's ``agents`` (``debias``: z_i in place of x_i under
    push-sum), a new tensor of ``like``'s shape (zero when none of them has a weight)."""
    acc = torch.zeros_like(like)
    for i in sorted(agents):
        if i in weights:
            acc.add_(torch.mul(agents[i].debiased() if debias else agents[i].params, weights[i]))
    return acc
