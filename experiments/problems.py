"""Built-in problems: a model, a loss and data streams, generated in code (nothing downloads).

A problem is a :class:`Problem`: ``model()`` builds a fresh module (seeded), ``loss_fn(module,
batch)`` is the training loss, ``batches(agent)`` the endless stream of worker ``agent``, and
``evaluate(module)`` the metrics on a fixed held-out set (a dict with at least ``"loss"``).
Problems are registered by name in :data:`PROBLEMS` (factories taking keyword options).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn


@dataclass
class Problem:
    name: str
    model: Callable[[], nn.Module]
    loss_fn: Callable[[nn.Module, object], torch.Tensor]
    batches: Callable[[int], Iterator]
    evaluate: Callable[[nn.Module], dict]


def teacher_student(
    dim: int = 16, hidden: int = 32, batch_size: int = 32, noise: float = 0.1, seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Problem:
    """Regression onto a random two-layer tanh teacher, with Gaussian label noise.

    The student is a ``dim -> hidden -> 1`` tanh MLP.  Worker ``agent`` draws its batches from a
    generator seeded with ``seed + 1000 * (agent + 1)``; the held-out set (1024 points) from
    ``seed + 7``.
    """
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(dim, hidden, generator=gen, dtype=dtype) / dim**0.5
    w2 = torch.randn(hidden, 1, generator=gen, dtype=dtype) / hidden**0.5

    def teacher(x):
        return torch.tanh(x @ w1) @ w2

    def model() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1)).to(dtype)

    def loss_fn(module, batch):
        x, y = batch
        return ((module(x) - y) ** 2).mean()

    def batches(agent: int = 0):
        g = torch.Generator().manual_seed(seed + 1000 * (agent + 1))
        for _ in itertools.count():
            x = torch.randn(batch_size, dim, generator=g, dtype=dtype)
            yield x, teacher(x) + noise * torch.randn(batch_size, 1, generator=g, dtype=dtype)

    held = torch.Generator().manual_seed(seed + 7)
    x_eval = torch.randn(1024, dim, generator=held, dtype=dtype)
    eval_batch = (x_eval, teacher(x_eval))

    @torch.no_grad()
    def evaluate(module) -> dict:
        return {"loss": float(loss_fn(module, eval_batch))}

    return Problem("teacher_student", model, loss_fn, batches, evaluate)


#: Built-in problems by name: ``PROBLEMS[name](**options) -> Problem``.
PROBLEMS: dict[str, Callable[..., Problem]] = {
    "teacher_student": teacher_student,
}
