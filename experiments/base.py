"""What every built-in problem shares: the :class:`Problem` record and the classification helpers.

A problem is a :class:`Problem`: ``model()`` builds a fresh module (seeded), ``loss_fn(module,
batch)`` is the training loss, ``batches(agent)`` the endless stream of worker ``agent``, and
``evaluate(module)`` the metrics on a fixed held-out set (a dict with at least ``"loss"``;
classifiers add ``"accuracy"``); a classifier's ``partition`` says which training examples each
worker reads (:mod:`experiments.partition`; None for the other problems).  Losses and
evaluations move the batch to the module's device and dtype, so a problem runs unchanged on
whatever ``launch`` puts the agents on.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

#: Seed of worker ``agent``'s data stream: ``seed + AGENT_SEED_STRIDE * (agent + 1)``.
AGENT_SEED_STRIDE = 1000



@dataclass
class Problem:
    name: str
    model: Callable[[], nn.Module]
    loss_fn: Callable[[nn.Module, object], torch.Tensor]
    batches: Callable[[int], Iterator]
    evaluate: Callable[[nn.Module], dict]
    partition: object = None  # an experiments.partition.Partition (classifiers), or None


#: The largest tensor a built-in problem allocates, in entries (2 GiB of float64): a size option
#: that would exceed it is a ``ValueError`` naming it, not an allocator error.
MAX_ENTRIES = 2**28


def check_entries(name: str, value: int, entries: int, what: str) -> None:
    """``ValueError`` naming option ``name`` (= ``value``) when ``what`` would hold more than
    :data:`MAX_ENTRIES` entries.

    Example:
        >>> check_entries("dim", 10**11, 1024 * 10**11, "the held-out inputs (1024 x dim)")
        Traceback (most recent call last):
        ...
        ValueError: dim=100000000000 is too large: the held-out inputs (1024 x dim) would hold 102400000000000 entries; at most 268435456 (2**28) per tensor
    """
    if entries > MAX_ENTRIES:
        raise ValueError(f"{name}={value} is too large: {what} would hold {entries} entries; at most "
                         f"{MAX_ENTRIES} (2**28) per tensor")


def agent_generator(seed: int, agent: int) -> torch.Generator:
    """The generator of worker ``agent``'s stream: seeded with ``seed + 1000 * (agent + 1)``."""
    if isinstance(agent, bool) or not isinstance(agent, int) or agent < 0:
        raise ValueError(f"agent must be a non-negative agent index; got {agent!r}")
    return torch.Generator().manual_seed(seed + AGENT_SEED_STRIDE * (agent + 1))


def epoch_batches(num_examples: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches: each epoch a fresh permutation of ``range(num_examples)`` (from
    ``generator``) cut into ``num_examples // batch_size`` full batches (the remainder is dropped,
    so every batch has exactly ``batch_size`` examples)."""
    if batch_size > num_examples:
        raise ValueError(f"batch_size must be at most the {num_examples} training examples; got {batch_size}")
    per_epoch = num_examples // batch_size
    for _ in itertools.count():
        order = torch.randperm(num_examples, generator=generator)
        for b in range(per_epoch):
            yield order[b * batch_size : (b + 1) * batch_size]


def module_place(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of ``module``'s first parameter (where its inputs must go)."""
    p = next(module.parameters())
    return p.device, p.dtype


def cross_entropy_loss(module: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy of ``module(x)`` against integer labels ``y``; ``batch = (x, y)``."""
    x, y = batch
    device, dtype = module_place(module)
    return F.cross_entropy(module(x.to(device=device, dtype=dtype)), y.to(device))


@torch.no_grad()
def classification_metrics(module: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> dict:
    """``{"loss": mean cross-entropy, "accuracy": fraction of argmax == y}`` over all of (x, y),
    in ``eval()`` mode (batch-norm uses its running statistics), restoring the module's mode."""
    device, dtype = module_place(module)
    was_training = module.training
    module.eval()
    total_loss, correct = 0.0, 0
    try:
        for start in range(0, len(y), chunk):
            xb = x[start : start + chunk].to(device=device, dtype=dtype)
            yb = y[start : start + chunk].to(device)
            logits = module(xb)
            total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(dim=1) == yb).sum())
    finally:
        module.train(was_training)
    return {"loss": total_loss / len(y), "accuracy": correct / len(y)}
