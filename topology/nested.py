"""Nested Lookahead (Gilbert, *Nested Lookahead: a Lookahead optimizer that uses Lookahead*) as a schedule.

Lookahead (k, alpha) inside Lookahead (s, h): fast weights theta take k inner steps, then the
inner slow weights phi move ``phi <- phi + alpha (theta - phi)`` and theta is pulled to phi; after
s such inner cycles the outer weights move ``omega <- omega + h (phi - omega)`` and theta, phi are
pulled to omega.  That is multilayer Lookahead LA-2 with ``ks = (k, s)``, ``alphas = (alpha, h)``
(:class:`~topology.schedule.MultilayerSchedule`): agent 0 = theta, agent 1 = phi, agent 2 = omega;
the inner sync after every k inner steps (t + 1 a multiple of k), the outer sync, one per s inner
cycles, after every k * s inner steps, *after* that step's inner sync (the outer update uses the
phi just updated).

Where the paper's pseudocode is ambiguous, and what is taken here:

* "Synchronize theta <- omega" at the top of each outer iteration is immediately followed by
  "theta <- phi_{t-1}" in the first inner iteration, which, read literally, discards omega and
  would make the outer weights never feed back.  The prose ("theta guide phi, which in turn guide
  omega"; Lookahead's "fast weights are reset to the slow weights" at every level) and the
  published multilayer algorithm (Pushkin & Barba) both pull *phi and theta* to omega after the
  outer update; that is taken here.
* The inner update is printed ``phi_{t,i} <- phi_{t,i-1} + alpha (theta_{t,k} - phi_{t-1})``: the
  mixed indices (phi_{t,i-1} vs phi_{t-1}) are read as the one current phi, i.e. standard
  Lookahead ``phi <- phi + alpha (theta - phi)``; likewise the outer update uses ``phi_{t,k}``
  for what is the phi after the s-th inner cycle (the loop over i runs to s, not k).
* Slow weights start at theta_0 and the first sync comes after exactly k inner steps (the
  project's conventions, :mod:`agents.reference`); one outer update per s inner cycles, as the
  paper's algorithm says.

Momentum policies at the inner sync, the outer sync or both (``reset_inner``,
``pullback_outer``, ...) are per-level state policies: :mod:`agents.level_policy`.
"""

from __future__ import annotations

from topology.schedule import MultilayerSchedule
from topology.validation import check_alpha, check_period


def nested(k: int, alpha: float, s: int, h: float) -> MultilayerSchedule:
    """Nested Lookahead: Lookahead (``k``, ``alpha``) inside Lookahead (``s``, ``h``).

    Example:
        >>> sched = nested(k=5, alpha=0.5, s=2, h=0.8)
        >>> sched.num_agents, sched.period, sched.level(4), sched.level(9)
        (3, 10, 1, 2)
    """
    check_period(k, name="k")
    check_alpha(alpha, name="alpha")
    check_period(s, name="s")
    check_alpha(h, name="h")
    return MultilayerSchedule((k, s), (alpha, h))
