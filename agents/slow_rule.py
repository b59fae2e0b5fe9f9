"""What a state-dependent slow update provides: the :class:`SlowRule` interface.

Plain Lookahead's slow update is linear, ``s' = sum_i a_i x_i``, and P_t alone describes it.  A
*slow rule* makes the slow agent's new value a non-linear function of the workers' average
``mixed`` and of state the rule keeps: an outer optimizer (:class:`agents.outer.OuterOptimizer`:
outer SGD = Lookahead, SlowMo, DiLoCo) or the adaptive step size alpha*
(:class:`agents.adaptive.AdaptiveAlpha`).  The engine (``launch.engine.sync.slow_rule``) runs any
rule through this interface alone, and checkpoints save and load it the same way:

1. :meth:`SlowRule.check` once at construction (local and deterministic: the same error on every
   rank), :meth:`SlowRule.start` once the slow weights hold theta_0;
2. at every sync each worker adds :attr:`SlowRule.extra` scalars, :meth:`SlowRule.worker_extras`,
   to the sync's collective (summed over the workers with the schedule's weights);
3. every rank applies :meth:`SlowRule.step_` to its replica of the slow weights (bitwise equal on
   every rank: the same op on the same inputs), which returns the step size with which the
   inner state's caches are mixed under ``pullback``;
4. :meth:`SlowRule.state_dict` / :meth:`SlowRule.load_state_dict`: everything the rule keeps
   besides the slow weights (as CPU copies).
"""

from __future__ import annotations

import abc

import torch


class SlowRule(abc.ABC):
    """A slow agent's state-dependent update (see the module docstring)."""

    #: Scalars each worker adds to the sync's collective.
    extra: int = 0

    def check(self, model: torch.nn.Module, optimizer) -> None:
        """``ValueError`` when the rule cannot run with this model and inner-optimizer factory
        (called once, on every rank, before any collective).  Default: nothing to check."""

    @abc.abstractmethod
    def start(self, slow: torch.Tensor) -> None:
        """Begin on ``slow``, the rank's replica of the slow weights (theta_0, flat)."""

    def worker_extras(self, agent, slow: torch.Tensor) -> torch.Tensor | None:
        """The :attr:`extra` scalars worker ``agent`` contributes at a sync (None when 0)."""
        return None

    @abc.abstractmethod
    def step_(self, slow: torch.Tensor, mixed: torch.Tensor, extras: torch.Tensor, alpha: float) -> float:
        """Update ``slow`` in place from the workers' average ``mixed`` and the summed
        ``extras``; ``alpha`` is the schedule's step size 1 - a_slow.  Returns the step size with
        which ``pullback`` mixes the inner state's caches."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything the rule keeps besides the slow weights, as CPU copies."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (after :meth:`start`)."""

    def describe(self, prefix: str = "outer") -> dict:
        """The rule's settings as flat keys: ``prefix`` (its class) and ``prefix.<name>`` (its
        public scalar attributes); a rule with more settings adds them (an outer optimizer: its
        class and hyperparameters, :meth:`agents.outer.OuterOptimizer.describe`).  Compared across
        ranks at start-up and with a checkpoint on resume."""
        record = {prefix: type(self).__name__}
        record.update({f"{prefix}.{k}": v for k, v in sorted(vars(self).items())
                       if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str)))})
        return record
