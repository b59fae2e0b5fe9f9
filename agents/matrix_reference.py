"""Serial reference of the whole multi-agent model, straight from its matrices.

One iteration t of the model (:mod:`topology.schedule`) is

    X_{t+1} = (X_t - lr * A(G_t Q_t)) P_t,

and :func:`run_model` computes it in one process, written for clarity, not speed: one copy of the
model per agent (theta_0 in every one), one inner optimizer per worker (its own state), and at
every iteration t, in this order:

1. every worker i, in increasing order, takes its forward and backward on its next batch
   (``data(i)``): its gradient g_i, flattened in the order of ``model.parameters()``;
2. every worker j gets the mixed gradient h_j = sum_i Q_t[i, j] g_i (over the support of column
   j, i increasing: ``h = Q[i_0, j] g_{i_0}``, then ``h = h + Q[i, j] g_i``), all h's formed from
   the g's before any is written, and its inner optimizer steps on it (``.grad`` = h_j);
3. every agent j gets x_j' = sum_i P_t[i, j] x_i over the support of column j, in the same order
   (an identity column keeps x_j untouched), all formed from the old values.

Passive agents never step (their gradient is zero; Q_t is zero on them).  Inner-optimizer state
is never mixed (the ``maintain`` state policy); push-sum schedules are refused.

With Q_t the mean over the W workers for t < s and P_t averaging every tau steps after that,
this is PyTorch's post-local SGD recipe (DDP + ``post_localSGD_hook`` + ``PeriodicModelAverager``):
DDP's hook all-reduces g_i / W, the averager x_i / W; on 2 ranks both are sums of two exactly
scaled terms (W = 2), so this reference and PyTorch's recipe agree bit for bit; on 4 ranks
to rounding (the all-reduce sums in another order).  ``tests/test_post_local.py`` checks both.

Example (data parallelism on two workers: both step on the mean gradient and stay equal)::

    >>> import torch, topology
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(2, 1).double()
    >>> batches = lambda i: iter([(torch.ones(1, 2, dtype=torch.float64) * (i + 1),)] * 3)
    >>> loss = lambda module, batch: module(batch[0]).sum()
    >>> X = run_model(topology.data_parallel(2), model, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    ...               loss, batches, steps=3)
    >>> X.shape, torch.equal(X[:, 0], X[:, 1])
    (torch.Size([3, 2, 3]), True)
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
from torch import nn

from topology.schedule import Schedule

__all__ = ["run_model"]


def run_model(schedule: Schedule, model: nn.Module, optimizer: Callable[[list], torch.optim.Optimizer],
              loss_fn: Callable, data: Callable[[int], Iterable], steps: int) -> torch.Tensor:
    """Every agent's flat parameters after each of ``steps`` iterations of ``schedule``, as a
    (steps, m, d) tensor (module docstring).

    Args:
        schedule: t -> (Q_t, P_t) and the workers; not push-sum.
        model: theta_0, copied into every agent (not changed here).
        optimizer: ``params -> torch.optim.Optimizer``, one per worker.
        loss_fn: ``loss_fn(module, batch) -> scalar tensor``.
        data: ``worker index -> iterable of batches``.
    """
    if schedule.push_sum:
        raise ValueError("run_model does not model push-sum schedules (their weights and de-biasing)")
    agents = [copy.deepcopy(model) for _ in range(schedule.num_agents)]
    params = [list(agent.parameters()) for agent in agents]
    inner = {i: optimizer(params[i]) for i in schedule.workers}
    streams = {i: iter(data(i)) for i in schedule.workers}
    identity = torch.eye(schedule.num_agents, dtype=torch.float64)
    rows = []
    for t in range(steps):
        gradients = {}
        for i in schedule.workers:
            inner[i].zero_grad(set_to_none=True)
            loss_fn(agents[i], next(streams[i])).backward()
            gradients[i] = _flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in params[i]])
        q, matrix = schedule.gradient_matrix(t), schedule.matrix(t)
        mixed = {j: _combine(q[:, j], gradients) for j in schedule.workers}
        for j in schedule.workers:
            _write(_grads(params[j]), mixed[j])
            inner[j].step()
        values = [_flat(p) for p in params]
        for j in range(schedule.num_agents):
            if not torch.equal(matrix[:, j], identity[:, j]):
                _write(params[j], _combine(matrix[:, j], dict(enumerate(values))))
        rows.append(torch.stack([_flat(p) for p in params]))
    return torch.stack(rows)


def _combine(column: torch.Tensor, vectors: dict[int, torch.Tensor]) -> torch.Tensor:
    """sum over i with column[i] != 0, i increasing, of column[i] * vectors[i], added left to right."""
    total = None
    for i in sorted(vectors):
        weight = float(column[i])
        if weight != 0.0:
            term = weight * vectors[i]
            total = term if total is None else total + term
    return total


@torch.no_grad()
def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """The ``.grad`` of every parameter, a zero one given where it had none (an unused parameter)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


@torch.no_grad()
def _write(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy ``flat`` into ``tensors`` (in order, each its own numel), in place."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
