"""Models and batches of the benchmarks: plain float32 MLPs of a given size, fixed batches.

Every contender of a benchmark reads the *same* batches (a fixed list, cycled), so timings differ
only by what is being compared.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


def mlp(width: int, *, inputs: int | None = None, outputs: int = 10, seed: int = 0) -> nn.Sequential:
    """``inputs -> width -> width // 2 -> outputs`` ReLU MLP (float32, seeded).

    ``inputs`` defaults to ``width // 2``, so the model has about ``width**2`` parameters:
    width 1024 gives 1.06M, width 320 gives 108k.
    """
    inputs = inputs if inputs is not None else width // 2
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width // 2), nn.ReLU(),
        nn.Linear(width // 2, outputs),
    )


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def batches(module: nn.Sequential, batch_size: int, count: int = 8, seed: int = 1) -> list:
    """``count`` fixed (x, y) classification batches for ``module`` (an :func:`mlp`)."""
    gen = torch.Generator().manual_seed(seed)
    inputs, outputs = module[0].in_features, module[-1].out_features
    return [
        (torch.randn(batch_size, inputs, generator=gen),
         torch.randint(0, outputs, (batch_size,), generator=gen))
        for _ in range(count)
    ]


def stream(fixed: list):
    """An endless iterator cycling over ``fixed``."""
    return itertools.cycle(fixed)


def loss_fn(module: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


class FlatVector(nn.Module):
    """A module whose only parameter is a vector of ``numel`` entries (B2: a buffer of that size)."""

    def __init__(self, numel: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(numel, dtype=dtype))

    def forward(self, x):  # pragma: no cover - never trained
        return x * self.weight.sum()
