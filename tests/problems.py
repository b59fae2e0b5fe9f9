"""Small deterministic problems shared by the tests (and the distributed worker script).

Everything is a pure function of its arguments, so every process of a multi-process test builds
the same model, data and optimizer.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

import topology

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
    # A large step: the fast weights overshoot, so adaptive alpha* leaves the clip range's top.
    "adam_fast": lambda params: torch.optim.Adam(params, lr=0.05),
}


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A 4 -> 6 -> 2 tanh MLP (44 parameters) with seeded initial values."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)


def batches(seed: int = 1, dtype: torch.dtype = torch.float64, batch_size: int = 8):
    """An endless stream of noisy regression batches (x, y), the same for a given seed."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(4, 2, generator=gen, dtype=dtype)
    for _ in itertools.count():
        x = torch.randn(batch_size, 4, generator=gen, dtype=dtype)
        y = torch.tanh(x @ target) + 0.1 * torch.randn(batch_size, 2, generator=gen, dtype=dtype)
        yield x, y


def loss_fn(module: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((module(x) - y) ** 2).mean()


def multilayer_schedule(ks, alphas=None):
    alphas = alphas if alphas is not None else [0.5 + 0.1 * i for i in range(len(ks))]
    return topology.multilayer(ks, alphas)


def flat_parameters(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])
