"""Several workers in one process for the own loop: the user's model and inner optimizer become each
worker in turn.

A co-located :class:`launch.AgentOptimizer` whose schedule has W > 1 workers (local SGD, gossip,
hierarchical, Lookahead over local SGD) holds every agent in this process.  The first worker
*adopts* the user's model and optimizer, as with one worker; every other worker w is an agent of
its own (:class:`agents.agent.Agent`: its flat buffer, its parameters as views into it, its own copy
of the inner optimizer).  The loop drives them in turn::

    for w in opt.each_worker():          # the model and the optimizer are worker w in the body
        opt.zero_grad(); loss_fn(model, batches[w]).backward(); opt.step()

Entering worker w (:meth:`WorkerSwap.enter`) points the user's parameters at w's flat buffer
(``p.data = w's view``: the same Parameter objects, so the user's optimizer, clipping and hooks
see them), its buffers (BatchNorm statistics) at w's own copies, and torch's RNG at w's stream;
leaving restores the first worker's.  ``opt.step()`` in w's body moves the gradients the
backward left on the user's parameters to w's parameters, copies the user's hyperparameters
(an LR scheduler steps the user's ``param_groups``) into w's optimizer and steps it
(:meth:`WorkerSwap.step`).  Each worker thus computes exactly what it would in a process of its own
started from the same seed: the same weights, buffers, optimizer state and dropout masks (torch's
CPU and CUDA generators: each worker has its own stream, each starting where torch's stood when the
AgentOptimizer was built; code outside the body draws from the first worker's).
"""

from __future__ import annotations

import torch
from torch import nn

from agents.agent import Agent


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class WorkerSwap:
    """The co-located workers other than the adopted one, and the swap of the user's model onto
    them (module docstring).

    Args:
        model: the user's model (its buffers are swapped).
        optimizer: the user's inner optimizer (its hyperparameters are copied at each step).
        adopted: the first worker, which *is* the user's model and optimizer.
        others: the other local workers, in agent order.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, adopted: Agent, others: list[Agent]):
        self.optimizer, self.adopted = optimizer, adopted
        self.params = list(adopted.parameters)                    # the user's parameters, in the agents' order
        self.buffers = list(model.buffers())
        # Every worker starts from the same buffers and RNG, as processes seeded alike do.
        self.own_buffers = {a.index: [b.detach().clone() for b in self.buffers] for a in others}
        start = _rng_state()
        self.rng = {a.index: start for a in others}
        self.others = {a.index: a for a in others}
        self.current: Agent | None = None
        self._home: tuple | None = None

    def enter(self, agent: Agent) -> None:
        """The user's model and RNG become ``agent``'s (nothing to do for the adopted worker)."""
        self.current = agent
        if agent is self.adopted:
            return
        self._home = ([p.data for p in self.params], [b.data for b in self.buffers], _rng_state())
        for p, view in zip(self.params, agent.parameters):
            p.data = view.data
        for b, own in zip(self.buffers, self.own_buffers[agent.index]):
            b.data = own
        _set_rng_state(self.rng[agent.index])

    def leave(self, agent: Agent) -> None:
        """Back to the adopted worker's parameters, buffers and RNG; ``agent``'s RNG kept."""
        self.current = None
        if agent is self.adopted or self._home is None:
            return
        self.rng[agent.index] = _rng_state()
        params, buffers, rng = self._home
        for p, data in zip(self.params, params):
            p.data = data
        for b, data in zip(self.buffers, buffers):
            b.data = data
        _set_rng_state(rng)
        self._home = None

    def state(self) -> dict:
        """What a checkpoint keeps of the other workers besides their agents: their buffers and
        RNG streams (CPU copies)."""
        return {i: {"buffers": [b.cpu().clone() for b in self.own_buffers[i]], "rng": self.rng[i]}
                for i in self.others}

    def load_state(self, state: dict) -> None:
        """:meth:`state` restored (a resume)."""
        with torch.no_grad():
            for i, saved in state.items():
                for own, value in zip(self.own_buffers[i], saved["buffers"]):
                    own.copy_(value)
                self.rng[i] = saved["rng"]

    def step(self, agent: Agent):
        """``agent``'s inner step: the gradients on the user's parameters, the user's current
        hyperparameters, ``agent``'s own optimizer state.  Returns the step's return value."""
        theirs = agent.optimizer
        for p, q in zip(self.params, agent.parameters):
            q.grad = p.grad
        for mine, group in zip(self.optimizer.param_groups, theirs.param_groups):
            group.update({k: v for k, v in mine.items() if k != "params"})
        try:
            return theirs.step()
        finally:
            for q in agent.parameters:
                q.grad = None
