"""A generated classification problem with as many training examples as a cluster-scale split needs.

The inputs are standard Gaussian vectors x in R^``dim``; the label of x is the argmax of a fixed
random *teacher* network's ``classes`` logits, tanh(x W_1) W_2 with W_1 (``dim`` x
``teacher_hidden``) and W_2 (``teacher_hidden`` x ``classes``) of independent N(0, 1) entries
scaled by 1 / sqrt(fan-in).  The teacher, the ``train_size`` training examples and the
``test_size`` held-out examples are drawn from one generator seeded with ``data_seed`` (in that
order); labels are noiseless, so the held-out accuracy is bounded only by what the student can
represent.  The student is a ``dim -> hidden -> classes`` ReLU MLP, trained on the cross-entropy.

Why it exists (E8): scikit-learn's digits have 1437 training images, so a Dirichlet(0.1) split over
64 or 256 workers leaves many workers with less than one batch.  A Dirichlet(beta) split gives
worker i about (N / W) E_i examples with E_i ~ Exp(1) when the classes are not too unequal (the
sum over classes of Gamma(beta) shares of W Gamma(beta) draws), so the smallest of W workers holds
about N / W^2 examples: N = 2^19 leaves every one of 256 workers a batch of 16 for some split
seeds (:func:`first_valid_split_seed`).

Options as the digits problems (:mod:`experiments.digits`): ``seed`` fixes the student's
initialization and the workers' batch orders (worker ``agent`` draws from ``seed + 1000 * (agent
+ 1)``), ``partition`` / ``num_workers`` / ``beta`` / ``shards_per_worker`` / ``split_seed`` the
split of the training examples among the workers (:func:`experiments.partition.make_partition`,
``problem.partition``), ``batch_size`` the examples per inner step; ``evaluate`` gives the held-out
``loss`` and ``accuracy``.

Example:
    >>> problem = teacher_classification(train_size=4096, test_size=256, batch_size=8)
    >>> x, y = next(iter(problem.batches(0)))
    >>> tuple(x.shape), y.dtype, sum(p.numel() for p in problem.model().parameters())
    ((8, 16), torch.int64, 874)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from experiments.base import Problem, agent_generator, classification_metrics, cross_entropy_loss
from experiments.partition import make_partition
from topology.checks import check_positive_int, dtype_from_name

#: Training examples by default: enough for a Dirichlet(0.1) split over 256 workers in batches of 16.
DEFAULT_TRAIN_SIZE = 2**19


@dataclass(frozen=True)
class TeacherData:
    """float64 inputs (N, dim) and int64 teacher labels of the two splits."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@functools.lru_cache(maxsize=4)
def teacher_data(dim: int, teacher_hidden: int, classes: int, train_size: int, test_size: int,
                 data_seed: int) -> TeacherData:
    """The teacher's examples (cached: the tensors are shared, do not modify); see the module
    docstring for the draw order."""
    gen = torch.Generator().manual_seed(data_seed)
    w1 = torch.randn(dim, teacher_hidden, generator=gen, dtype=torch.float64) / dim**0.5
    w2 = torch.randn(teacher_hidden, classes, generator=gen, dtype=torch.float64) / teacher_hidden**0.5

    def draw(n):
        x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
        return x, (torch.tanh(x @ w1) @ w2).argmax(dim=1)

    x_train, y_train = draw(train_size)
    x_test, y_test = draw(test_size)
    return TeacherData(x_train, y_train, x_test, y_test)


def teacher_classification(
    dim: int = 16, teacher_hidden: int = 16, hidden: int = 32, classes: int = 10,
    train_size: int = DEFAULT_TRAIN_SIZE, test_size: int = 10_000, batch_size: int = 16, seed: int = 0,
    data_seed: int = 0, split_seed: int = 0, dtype=torch.float32, partition: str = "iid",
    num_workers: int | None = None, beta: float | None = None, shards_per_worker: int | None = None,
) -> Problem:
    """The teacher-student classification problem (module docstring)."""
    for name, value in (("dim", dim), ("teacher_hidden", teacher_hidden), ("hidden", hidden),
                        ("classes", classes), ("train_size", train_size), ("test_size", test_size)):
        check_positive_int(value, name)
    if classes < 2:
        raise ValueError(f"classes must be at least 2; got {classes}")
    batch_size = check_positive_int(batch_size, "batch_size")
    if isinstance(data_seed, bool) or not isinstance(data_seed, int) or data_seed < 0:
        raise ValueError(f"data_seed must be a non-negative integer; got {data_seed!r}")
    dtype = dtype_from_name(dtype, "dtype")
    data = teacher_data(dim, teacher_hidden, classes, train_size, test_size, data_seed)
    x_train, x_test = data.x_train.to(dtype), data.x_test.to(dtype)
    workers = make_partition(data.y_train, partition, num_workers=num_workers, beta=beta,
                             shards_per_worker=shards_per_worker, split_seed=split_seed, batch_size=batch_size,
                             num_classes=classes)

    def model() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes)).to(dtype)

    def batches(agent: int = 0):
        indices = workers.batch_indices(agent, batch_size, agent_generator(seed, agent))
        return ((x_train[index], data.y_train[index]) for index in indices)

    def evaluate(module) -> dict:
        return classification_metrics(module, x_test, data.y_test)

    return Problem("teacher_classification", model, cross_entropy_loss, batches, evaluate, workers)


def first_valid_split_seed(num_workers: int, beta: float, batch_size: int, *, limit: int = 100, **options) -> int:
    """The smallest ``split_seed`` in ``0 .. limit - 1`` whose Dirichlet(``beta``) split over
    ``num_workers`` workers leaves every worker at least ``batch_size`` examples (``options``: the
    other options of :func:`teacher_classification`); a ``ValueError`` when none does.

    This conditions the split on its smallest part (a mild selection, reported with the results);
    the split itself is :mod:`experiments.partition`'s, unchanged.
    """
    for split_seed in range(limit):
        try:
            teacher_classification(partition="dirichlet", num_workers=num_workers, beta=beta,
                                   batch_size=batch_size, split_seed=split_seed, **options)
        except ValueError as err:
            if "fewer than batch_size" not in str(err):
                raise
            continue
        return split_seed
    raise ValueError(
        f"no split_seed below {limit} gives each of {num_workers} workers at least batch_size={batch_size} examples "
        f"under Dirichlet({beta}): raise train_size or beta, or lower num_workers or batch_size"
    )
