"""Classification of scikit-learn's 8 x 8 digits (1797 images, shipped with scikit-learn: nothing
downloads): logistic regression, a small MLP and a small CNN.

The split is fixed by ``split_seed`` alone (stratified, ``test_fraction`` of the images held out),
so runs with different ``seed`` (initialization and batch order) are evaluated on the same test
images.  ``split_seed`` also fixes the split of the training images among the workers under a
non-iid ``partition`` (:mod:`experiments.partition`: ``iid``, the default, ``dirichlet`` with
``beta``, or ``shards`` with ``shards_per_worker``, among ``num_workers`` workers).  Features are
standardized with the training split's per-pixel mean and standard deviation (pixels constant on
the training split are only centred).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from experiments import models
from experiments.base import Problem, agent_generator, classification_metrics, cross_entropy_loss
from experiments.partition import make_partition
from topology.checks import check_positive_int, dtype_from_name


@dataclass(frozen=True)
class DigitsSplit:
    """Standardized float64 features (N, 64) and int64 labels of the two splits."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@functools.lru_cache(maxsize=8)
def digits_split(split_seed: int = 0, test_fraction: float = 0.2) -> DigitsSplit:
    """The fixed train/test split of the digits (cached: the tensors are shared, do not modify)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=test_fraction, random_state=split_seed, stratify=data.target
    )
    x_train, x_test = torch.tensor(x_train, dtype=torch.float64), torch.tensor(x_test, dtype=torch.float64)
    mean, std = x_train.mean(0), x_train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return DigitsSplit((x_train - mean) / std, torch.tensor(y_train), (x_test - mean) / std, torch.tensor(y_test))


def _digits_problem(name: str, build, *, batch_size, seed, split_seed, test_fraction, dtype, partition,
                    num_workers, beta, shards_per_worker) -> Problem:
    batch_size = check_positive_int(batch_size, "batch_size")
    dtype = dtype_from_name(dtype, "dtype")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be a number in (0, 1); got {test_fraction!r}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise ValueError(f"split_seed must be a non-negative integer; got {split_seed!r}")
    split = digits_split(split_seed, float(test_fraction))
    x_train, x_test = split.x_train.to(dtype), split.x_test.to(dtype)
    workers = make_partition(split.y_train, partition, num_workers=num_workers, beta=beta,
                             shards_per_worker=shards_per_worker, split_seed=split_seed, batch_size=batch_size,
                             num_classes=10)

    def model() -> nn.Module:
        torch.manual_seed(seed)
        return build().to(dtype)

    def batches(agent: int = 0):
        indices = workers.batch_indices(agent, batch_size, agent_generator(seed, agent))
        return ((x_train[index], split.y_train[index]) for index in indices)

    def evaluate(module) -> dict:
        return classification_metrics(module, x_test, split.y_test)

    return Problem(name, model, cross_entropy_loss, batches, evaluate, workers)


def digits_logistic(batch_size: int = 32, seed: int = 0, split_seed: int = 0, test_fraction: float = 0.2,
                    dtype=torch.float32, partition: str = "iid", num_workers: int | None = None,
                    beta: float | None = None, shards_per_worker: int | None = None) -> Problem:
    """Multinomial logistic regression on the digits; ``evaluate``: test ``loss`` and ``accuracy``.

    Worker ``agent`` reads shuffled epochs of its training images from ``seed + 1000 * (agent + 1)``:
    of all of them under ``partition="iid"``, of its own part of them under ``"dirichlet"``
    (concentration ``beta``) or ``"shards"`` (``shards_per_worker``) among ``num_workers``
    workers (:func:`experiments.partition.make_partition`; ``problem.partition`` holds the split).
    """
    return _digits_problem("digits_logistic", models.digits_logistic, batch_size=batch_size, seed=seed,
                           split_seed=split_seed, test_fraction=test_fraction, dtype=dtype, partition=partition,
                           num_workers=num_workers, beta=beta, shards_per_worker=shards_per_worker)


def digits_mlp(hidden: int = 64, batch_size: int = 32, seed: int = 0, split_seed: int = 0,
               test_fraction: float = 0.2, dtype=torch.float32, partition: str = "iid",
               num_workers: int | None = None, beta: float | None = None,
               shards_per_worker: int | None = None) -> Problem:
    """A 64 -> ``hidden`` -> 10 ReLU MLP on the digits (otherwise as :func:`digits_logistic`)."""
    hidden = check_positive_int(hidden, "hidden")
    return _digits_problem("digits_mlp", lambda: models.digits_mlp(hidden), batch_size=batch_size, seed=seed,
                           split_seed=split_seed, test_fraction=test_fraction, dtype=dtype, partition=partition,
                           num_workers=num_workers, beta=beta, shards_per_worker=shards_per_worker)


def digits_cnn(batch_size: int = 32, seed: int = 0, split_seed: int = 0, test_fraction: float = 0.2,
               dtype=torch.float32, partition: str = "iid", num_workers: int | None = None,
               beta: float | None = None, shards_per_worker: int | None = None) -> Problem:
    """:class:`experiments.models.DigitsCNN` on the 8 x 8 images (otherwise as :func:`digits_logistic`)."""
    return _digits_problem("digits_cnn", models.DigitsCNN, batch_size=batch_size, seed=seed,
                           split_seed=split_seed, test_fraction=test_fraction, dtype=dtype, partition=partition,
                           num_workers=num_workers, beta=beta, shards_per_worker=shards_per_worker)
