"""Stagewise locally-regularized Lookahead (SLRLA; Zhou et al., *Towards understanding why
LookAhead generalizes better than SGD and beyond*, Algorithm 3)::

    for q = 1..Q:
        F_q(theta) = F(theta) + beta_q / 2 ||theta - theta_{q-1}||^2
        theta_q = Lookahead(F_q, lr_q, T_q steps, alpha_q, k_q, start at theta_{q-1}, A)

Choices where the slides are silent, stated here:

* Each stage is a fresh Lookahead run (as a new call of ``Look-ahead(...)``): the inner
  optimizer's state starts fresh (Adam's step 0, zero momentum), slow weights and pullback caches
  start at the stage's theta_{q-1}.  ``T_q`` must be a multiple of ``k_q``, so a stage ends with a
  sync and its output theta_q is the slow weights, which then equal the fast weights.
* The regularizer enters through its gradient, added to the minibatch gradient before the inner
  step by :class:`Proximal`: ``g <- g + beta_q (theta - theta_{q-1})``, computed as
  ``d = theta - anchor; d = beta d; g = g + d``; the reference and the simulator use this same
  wrapper, so they get the same bits.

Why the distributed run needs no communication beyond the Lookahead syncs: the anchor
theta_{q-1} is the output of stage q - 1, i.e. the value that stage's final sync wrote into every
agent of the block.  Each worker therefore already holds theta_{q-1} in its own parameters when
stage q begins and copies it locally; the slow agents need no anchor (they take no gradient).  The
stage's hyperparameters (lr, beta, alpha, k) are functions of the global step counter that every
rank keeps, and the schedule (:func:`topology.stagewise.stagewise_lookahead`) compiles all stages'
syncs at start-up.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from agents.reference import Lookahead, init_optimizer_hooks
from agents.state_policy import reset_state_
from topology.stagewise import Stage, check_stages  # the stages live beside their schedule

__all__ = [
    "Proximal",
    "SLRLAController",
    "Stage",
    "begin_stage_",
    "check_stages",
    "proximal",
    "slrla_reference",
    "stage_lookahead",
]


class Proximal(torch.optim.Optimizer):
    """``optimizer`` on ``F + beta / 2 ||theta - anchor||^2``: adds ``beta (theta - anchor)`` to
    every gradient before ``optimizer.step()``.  ``param_groups`` and ``state`` are the inner
    optimizer's own (reset and pullback act on them); ``beta = 0`` adds nothing.

    Call :meth:`set_anchor` to take the current parameters as the anchor (copies).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, beta: float = 0.0):
        self.optimizer = optimizer
        self.beta = float(beta)
        self.defaults = optimizer.defaults
        init_optimizer_hooks(self)
        self.set_anchor()

    @property
    def param_groups(self):  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def set_anchor(self) -> None:
        self.anchor = [p.detach().clone() for p in self._params()]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.beta:
            for p, a in zip(self._params(), self.anchor):
                if p.grad is None:
                    continue
                d = p - a
                d.mul_(self.beta)
                p.grad.add_(d)
        self.optimizer.step()
        return loss


def proximal(factory: Callable[[list], torch.optim.Optimizer]) -> Callable[[list], Proximal]:
    """An optimizer factory for the simulator: ``params -> Proximal(factory(params))``."""
    return lambda params: Proximal(factory(params))


def begin_stage_(optimizer: Proximal, stage: Stage) -> None:
    """Start a stage on a worker: fresh inner state, ``lr`` and ``beta`` of the stage, anchor =
    the current parameters (theta_{q-1}).  Local: no communication."""
    reset_state_(optimizer.state.values())
    for group in optimizer.param_groups:
        group["lr"] = stage.lr
    optimizer.beta = float(stage.beta)
    optimizer.set_anchor()


class SLRLAController:
    """Drives SLRLA's stages in a :class:`launch.engine.simulation.Simulation` built with the schedule
    :func:`topology.stagewise.stagewise_lookahead` of the same stages and the optimizer factory
    :func:`proximal`.  Call :meth:`start` before the first step and pass it as the run's
    callback: after the final step of each stage it begins the next one on this rank's agents
    (workers: :func:`begin_stage_`; slow agents: their pullback caches restart at zero).

    Example::

        controller = SLRLAController(stages)
        sim = Simulation(model, loss_fn, data, topology.stagewise_lookahead(stages),
                         agents.slrla.proximal(lambda p: torch.optim.Adam(p, lr=1e-3)))
        controller.start(sim)
        sim.run(controller.total_steps, controller)
    """

    def __init__(self, stages: Sequence):
        self.stages = check_stages(stages)
        self.ends = [0]
        for s in self.stages:
            self.ends.append(self.ends[-1] + s.steps)
        self.total_steps = self.ends[-1]

    def _begin(self, sim, q: int) -> None:
        for agent in sim.agents.values():
            if agent.is_worker:
                if not isinstance(agent.optimizer, Proximal):
                    raise ValueError("SLRLA needs the optimizer factory agents.slrla.proximal(factory)")
                begin_stage_(agent.optimizer, self.stages[q])
            else:
                agent.flat.state.zero_()

    def start(self, sim) -> None:
        self._begin(sim, 0)

    def __call__(self, sim, losses=None) -> None:
        if sim.t in self.ends[1:-1]:
            self._begin(sim, self.ends.index(sim.t))


def stage_lookahead(params: list, factory, stage: Stage, state_policy="maintain") -> Lookahead:
    """Algorithm 3's ``Look-ahead(F_q, ...)`` call for one stage, serially: a fresh
    ``Lookahead(Proximal(factory(params) with lr_q, beta_q), k_q, alpha_q)`` anchored at the
    current ``params`` (theta_{q-1})."""
    inner = factory(params)
    for group in inner.param_groups:
        group["lr"] = stage.lr
    return Lookahead(Proximal(inner, stage.beta), stage.k, stage.alpha, state_policy)


def slrla_reference(model: torch.nn.Module, loss_fn, batches, factory, stages: Sequence,
                    state_policy: str = "maintain") -> torch.Tensor:
    """SLRLA straight from Algorithm 3, serially: for each stage a fresh ``Lookahead(Proximal(
    factory(params), beta_q), k_q, alpha_q)`` anchored at the current parameters, ``T_q`` steps.
    Returns the (steps, 2, d) trajectory of (fast, slow) weights."""
    stages = check_stages(stages)
    params = list(model.parameters())
    rows = []
    for stage in stages:
        la = stage_lookahead(params, factory, stage, state_policy)
        for _ in range(stage.steps):
            la.zero_grad()
            loss_fn(model, next(batches)).backward()
            la.step()
            fast = torch.cat([p.detach().reshape(-1) for p in params])
            slow = torch.cat([s.reshape(-1) for s in la.slow_params(1)])
            rows.append(torch.stack([fast, slow]))
    return torch.stack(rows)
