"""Built-in problems by name: a model, a loss and data streams (nothing downloads).

A problem is a :class:`Problem` (see :mod:`experiments.base`): ``model()`` builds a fresh module
(seeded), ``loss_fn(module, batch)`` is the training loss, ``batches(agent)`` the endless stream of
worker ``agent``, and ``evaluate(module)`` the metrics on a fixed held-out set (a dict with at
least ``"loss"``; the classifiers add ``"accuracy"``).  Problems are registered by name in
:data:`PROBLEMS` (factories taking keyword options, each with a default):

- ``teacher_student``: regression onto a random tanh teacher (below);
- ``noisy_quadratic``: Zhang et al.'s noisy quadratic model (:mod:`experiments.nqm`);
- ``digits_logistic``, ``digits_mlp``, ``digits_cnn``: scikit-learn's digits (:mod:`experiments.digits`);
- ``cifar10_resnet18``: CIFAR-10 from a local folder, ResNet-18 (:mod:`experiments.cifar`).

The classifiers (``digits_*``, ``cifar10_resnet18``) also take ``partition`` (``iid``, the default,
``dirichlet`` or ``shards``), ``num_workers``, ``beta``, ``shards_per_worker`` and ``split_seed``:
which training examples each worker reads (:mod:`experiments.partition`; ``problem.partition``).
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch
from torch import nn

from experiments.base import Problem, agent_generator, check_entries, module_place
from experiments.cifar import cifar10_resnet18
from experiments.digits import digits_cnn, digits_logistic, digits_mlp
from experiments.nqm import noisy_quadratic
from experiments.teacher_classification import teacher_classification
from topology.checks import check_number, check_positive_int, dtype_from_name

__all__ = ["PROBLEMS", "Problem", "make_problem", "teacher_student"]

#: The teacher-student problem's held-out points.
EVAL_POINTS = 1024


def teacher_student(
    dim: int = 16, hidden: int = 32, batch_size: int = 32, noise: float = 0.1, seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Problem:
    """Regression onto a random two-layer tanh teacher, with Gaussian label noise.

    The student is a ``dim -> hidden -> 1`` tanh MLP.  Worker ``agent`` draws its batches from a
    generator seeded with ``seed + 1000 * (agent + 1)``; the held-out set (1024 points) from
    ``seed + 7``.  ``dim``, ``hidden`` and ``batch_size`` are positive integers (no tensor above
    :data:`experiments.base.MAX_ENTRIES` entries), ``noise`` a finite number >= 0.
    """
    dim, hidden = check_positive_int(dim, "dim"), check_positive_int(hidden, "hidden")
    batch_size = check_positive_int(batch_size, "batch_size")
    noise = check_number(noise, "noise", minimum=0.0)
    check_entries("dim", dim, EVAL_POINTS * dim, f"the held-out inputs ({EVAL_POINTS} x dim)")
    check_entries("hidden", hidden, dim * hidden, "the first layer (dim x hidden)")
    check_entries("batch_size", batch_size, batch_size * dim, "a batch (batch_size x dim)")
    dtype = dtype_from_name(dtype, "dtype")
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(dim, hidden, generator=gen, dtype=dtype) / dim**0.5
    w2 = torch.randn(hidden, 1, generator=gen, dtype=dtype) / hidden**0.5

    def teacher(x):
        return torch.tanh(x @ w1) @ w2

    def model() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1)).to(dtype)

    def loss_fn(module, batch):
        device, dtype = module_place(module)
        x, y = (t.to(device=device, dtype=dtype) for t in batch)
        return ((module(x) - y) ** 2).mean()

    def batches(agent: int = 0):
        g = agent_generator(seed, agent)
        for _ in itertools.count():
            x = torch.randn(batch_size, dim, generator=g, dtype=dtype)
            yield x, teacher(x) + noise * torch.randn(batch_size, 1, generator=g, dtype=dtype)

    held = torch.Generator().manual_seed(seed + 7)
    x_eval = torch.randn(EVAL_POINTS, dim, generator=held, dtype=dtype)
    eval_batch = (x_eval, teacher(x_eval))

    @torch.no_grad()
    def evaluate(module) -> dict:
        return {"loss": float(loss_fn(module, eval_batch))}

    return Problem("teacher_student", model, loss_fn, batches, evaluate)


#: Built-in problems by name: ``PROBLEMS[name](**options) -> Problem``.
PROBLEMS: dict[str, Callable[..., Problem]] = {
    "teacher_student": teacher_student,
    "noisy_quadratic": noisy_quadratic,
    "digits_logistic": digits_logistic,
    "digits_mlp": digits_mlp,
    "digits_cnn": digits_cnn,
    "cifar10_resnet18": cifar10_resnet18,
    "teacher_classification": teacher_classification,
}


def make_problem(name: str, **options) -> Problem:
    """``PROBLEMS[name](**options)``, with a ``ValueError`` naming the known problems."""
    if name not in PROBLEMS:
        raise ValueError(f"problem must be one of {sorted(PROBLEMS)}; got {name!r}")
    return PROBLEMS[name](**options)
