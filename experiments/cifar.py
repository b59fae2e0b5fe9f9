"""CIFAR-10 with a ResNet-18, from the standard python pickle batches in a local folder.

Nothing downloads: ``root`` names a folder holding ``data_batch_1`` .. ``data_batch_5`` and
``test_batch`` (the ``cifar-10-batches-py`` folder of the official ``cifar-10-python.tar.gz``), or
its parent.  Each file is a pickled dict with ``b"data"``, a (N, 3072) uint8 array (1024 red, then
1024 green, then 1024 blue values of a 32 x 32 image, row-major), and ``b"labels"``, N ints in
0..9.  Files are unpickled with an allow-list (numpy arrays and dtypes only), so a tampered file
cannot run code.
"""

from __future__ import annotations

import io
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from experiments import models
from experiments.base import Problem, agent_generator, classification_metrics, cross_entropy_loss
from experiments.partition import make_partition
from topology.checks import check_positive_int, dtype_from_name

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
#: Per-channel mean and standard deviation of the CIFAR-10 training images (in [0, 1] units).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def find_batches(root) -> Path:
    """The folder holding the six batch files: ``root`` itself or ``root / "cifar-10-batches-py"``.

    Raises ``FileNotFoundError`` naming both places looked in and the files expected.
    """
    root = Path(root).expanduser()
    for folder in (root, root / FOLDER):
        if all((folder / name).is_file() for name in (*TRAIN_FILES, TEST_FILE)):
            return folder
    here, below = root.resolve(), (root / FOLDER).resolve()
    missing = [n for n in (*TRAIN_FILES, TEST_FILE) if not (here / n).is_file() and not (below / n).is_file()]
    raise FileNotFoundError(
        f"CIFAR-10 not found: expected the python pickle batches {', '.join(TRAIN_FILES)} and {TEST_FILE} "
        f"together in {here} or in {below} (missing from both: {', '.join(missing) or 'none, but they are split'}). "
        f"Download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extract it, and "
        f"pass the folder as root=..."
    )


def load_batch(path) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch file as (images uint8 (N, 3, 32, 32), labels int64 (N,))."""
    with open(path, "rb") as f:
        entry = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    if not isinstance(entry, dict) or b"data" not in entry or b"labels" not in entry:
        raise ValueError(f"{path} is not a CIFAR-10 batch: expected a dict with b'data' and b'labels'")
    data = np.asarray(entry[b"data"], dtype=np.uint8)
    labels = np.asarray(entry[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(
            f"{path}: b'data' must be (N, 3072) with N labels; got {data.shape} and {len(labels)} labels"
        )
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.copy())


@dataclass(frozen=True)
class CifarData:
    x_train: torch.Tensor  # uint8 (50000, 3, 32, 32)
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_cifar10(root) -> CifarData:
    """All six batches from ``root`` (see :func:`find_batches`)."""
    folder = find_batches(root)
    train = [load_batch(folder / name) for name in TRAIN_FILES]
    x_test, y_test = load_batch(folder / TEST_FILE)
    return CifarData(torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), x_test, y_test)


def normalize(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 images -> (x / 255 - MEAN) / STD per channel, in ``dtype``."""
    mean = torch.tensor(MEAN, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=dtype).view(1, 3, 1, 1)
    return (images.to(dtype) / 255 - mean) / std


def augment(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation on normalized images: a random 32 x 32 crop of the image
    zero-padded (the mean colour, after normalization) by ``padding`` on each side, then a
    horizontal flip with probability 1/2, drawn per image from ``generator``."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    crops = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops)


def training_batches(data: CifarData, indices, generator: torch.Generator, dtype: torch.dtype,
                     augment_data: bool):
    """The normalized (and with ``augment_data`` augmented, from ``generator``) training images
    and labels of each index batch of ``indices``."""
    for index in indices:
        x = normalize(data.x_train[index], dtype)
        yield (augment(x, generator) if augment_data else x), data.y_train[index]


def cifar10_resnet18(root: str = "data", batch_size: int = 128, augment_data: bool = True, seed: int = 0,
                     test_size: int | None = None, dtype=torch.float32, partition: str = "iid",
                     num_workers: int | None = None, beta: float | None = None,
                     shards_per_worker: int | None = None, split_seed: int = 0) -> Problem:
    """ResNet-18 (:class:`experiments.models.ResNet18`) on CIFAR-10 read from ``root``.

    Args:
        root: folder with the batch files, or its parent (``FileNotFoundError`` when absent).
        batch_size: training images per step.
        augment_data: random crop (padding 4) and horizontal flip on training batches.
        seed: model initialization; worker ``agent`` shuffles and augments from
            ``seed + 1000 * (agent + 1)``.
        test_size: evaluate on the first ``test_size`` test images (default all 10000).
        partition, num_workers, beta, shards_per_worker, split_seed: which training images each
            worker reads (:func:`experiments.partition.make_partition`): all of them under
            ``"iid"`` (the default), its own part of a ``"dirichlet"`` or ``"shards"`` split
            among ``num_workers`` workers, fixed by ``split_seed``; ``problem.partition`` holds it.

    ``evaluate`` returns the test ``loss`` and ``accuracy`` in eval mode (batch norm uses the
    module's running statistics: these are buffers, not parameters, so a sync does not mix them).
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    dtype = dtype_from_name(dtype, "dtype")
    data = load_cifar10(root)
    n_test = len(data.y_test) if test_size is None else check_positive_int(test_size, "test_size")
    if n_test > len(data.y_test):
        raise ValueError(f"test_size must be at most the {len(data.y_test)} test images; got {test_size}")
    x_test, y_test = normalize(data.x_test[:n_test], dtype), data.y_test[:n_test]
    workers = make_partition(data.y_train, partition, num_workers=num_workers, beta=beta,
                             shards_per_worker=shards_per_worker, split_seed=split_seed, batch_size=batch_size,
                             num_classes=10)

    def model():
        torch.manual_seed(seed)
        return models.ResNet18(num_classes=10).to(dtype)

    def batches(agent: int = 0):
        g = agent_generator(seed, agent)
        return training_batches(data, workers.batch_indices(agent, batch_size, g), g, dtype, augment_data)

    def evaluate(module) -> dict:
        return classification_metrics(module, x_test, y_test, chunk=500)

    return Problem("cifar10_resnet18", model, cross_entropy_loss, batches, evaluate, workers)
