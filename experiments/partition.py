"""Which training examples each worker reads: the iid stream, or a non-iid split by label.

A classification problem (``digits_*``, ``cifar10_resnet18``) takes the options ``partition``,
``beta``, ``shards_per_worker``, ``num_workers`` and ``split_seed`` and builds a
:class:`Partition` of its training labels with :func:`make_partition`:

- ``"iid"`` (the default): no split.  Every worker reads shuffled epochs of the *whole* training
  set, each from its own generator (``seed + 1000 * (agent + 1)``) -- the problems' historical
  behaviour, batch for batch.  ``num_workers`` is optional; when given, agents ``>= num_workers``
  are refused and :meth:`Partition.histograms` has one row per worker (each the whole training
  set's histogram).
- ``"dirichlet"``: the label-skew split of the federated / decentralized literature in its
  per-class form (Yurochkin et al., 2019, Bayesian nonparametric federated learning; Wang et al.,
  2020, FedMA; Hsu et al., 2019, draw a class mix per worker instead).  For each class c in
  increasing order: its example indices (increasing) are permuted by the split generator, then
  proportions ``p ~ Dirichlet(beta, ..., beta)`` over the ``num_workers`` workers are drawn from
  it, and the permuted indices are cut at ``round(n_c * (p_0 + ... + p_i))`` for
  ``i < num_workers - 1`` (``numpy.rint``: half to even; the last cut is ``n_c``), worker i
  taking the i-th piece.  Small ``beta`` concentrates each class on few workers; ``beta -> inf``
  gives every worker ~1/W of every class.  ``beta`` defaults to 0.5.
- ``"shards"``: McMahan et al. (2017).  The indices are sorted by label (a stable sort: ties in
  index order), cut into ``S = num_workers * shards_per_worker`` contiguous shards (shard j is
  positions ``[j N // S, (j + 1) N // S)``, so sizes differ by at most one), and a permutation of
  the shards drawn from the split generator hands worker i the shards
  ``perm[i * shards_per_worker : (i + 1) * shards_per_worker]``.  ``shards_per_worker`` defaults
  to 2.  A shard no longer than the rarest class spans at most 2 labels, so a worker then holds
  at most ``2 * shards_per_worker`` labels.

The split generator is ``numpy.random.default_rng(split_seed)``: a given ``split_seed`` gives the
same split on every run and rank (for a given numpy version), whatever the training ``seed``.
Under ``dirichlet`` and ``shards`` every training example belongs to exactly one worker, and
worker i reads shuffled epochs of its own examples only (an epoch: a permutation of its examples
from its generator, cut into full batches of ``batch_size``, the remainder dropped -- as
:func:`experiments.base.epoch_batches` does for the whole set).

A worker with fewer examples than ``batch_size`` (possibly none, under a small ``beta``) cannot
fill one batch: :func:`make_partition` refuses such a split with a ``ValueError`` naming the
worker and its size (raise ``beta``, lower ``num_workers`` or ``batch_size``, or take another
``split_seed``); it does not redraw.

>>> labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
>>> shards = make_partition(labels, "shards", num_workers=3, shards_per_worker=2)
>>> sorted(torch.cat(shards.parts).tolist()) == list(range(12))  # each example in exactly one part
True
>>> shards.histograms().sum(dim=1)  # 6 shards of 2 examples, 2 shards per worker
tensor([4, 4, 4])
>>> even = make_partition(labels, "dirichlet", num_workers=2, beta=1e6)  # p ~ (1/2, 1/2)
>>> even.histograms()
tensor([[2, 2, 2],
        [2, 2, 2]])
>>> make_partition(labels, num_workers=2).histograms()  # iid: every worker reads every example
tensor([[4, 4, 4],
        [4, 4, 4]])
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from experiments.base import epoch_batches
from topology.checks import check_positive_int

SCHEMES = ("iid", "dirichlet", "shards")
DEFAULT_BETA = 0.5
DEFAULT_SHARDS_PER_WORKER = 2


# -- the splits (pure functions of the labels and the generator) ---------------------------------------
def split_dirichlet(labels: np.ndarray, num_workers: int, beta: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, Dirichlet(``beta``) proportions over the workers (module docstring); the parts,
    each sorted, may be empty."""
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        proportions = rng.dirichlet(np.full(num_workers, beta))
        # Cut i at round(n_c * (p_0 + ... + p_i)), i < W - 1: cumsum is non-decreasing and rint
        # monotone, so the cuts are ordered; np.split's last piece ends at n_c itself (a float sum
        # that misses 1 by an ulp loses no example), and the minimum keeps a sum above 1 in range.
        cuts = np.minimum(np.rint(len(members) * np.cumsum(proportions)[:-1]).astype(np.int64), len(members))
        for worker, piece in enumerate(np.split(members, cuts)):
            pieces[worker].append(piece)
    return [np.sort(np.concatenate(p)) for p in pieces]


def split_shards(labels: np.ndarray, num_workers: int, shards_per_worker: int,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """Label-sorted contiguous shards, ``shards_per_worker`` random ones per worker (module
    docstring); the parts are sorted."""
    order = np.argsort(labels, kind="stable")
    n, count = len(labels), num_workers * shards_per_worker
    shards = [order[j * n // count : (j + 1) * n // count] for j in range(count)]
    perm = rng.permutation(count)
    mine = (perm[i * shards_per_worker : (i + 1) * shards_per_worker] for i in range(num_workers))
    return [np.sort(np.concatenate([shards[j] for j in js])) for js in mine]


# -- the record a problem keeps ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Partition:
    """The training examples of each worker.

    ``parts[i]`` holds worker i's training indices (int64, increasing); ``parts`` is None under
    ``iid`` (every worker reads all ``len(labels)`` examples).  ``options`` holds the resolved
    ``beta`` / ``shards_per_worker`` (None where they do not apply) and ``split_seed``.
    """

    scheme: str
    num_workers: int | None
    labels: torch.Tensor
    num_classes: int
    parts: tuple[torch.Tensor, ...] | None
    options: dict

    def check_agent(self, agent) -> int:
        """``agent`` if it is a worker index this partition serves; a ``ValueError`` otherwise."""
        if isinstance(agent, bool) or not isinstance(agent, int) or agent < 0:
            raise ValueError(f"agent must be a non-negative agent index; got {agent!r}")
        if self.num_workers is not None and agent >= self.num_workers:
            raise ValueError(f"agent must be below num_workers={self.num_workers} (the problem's workers are "
                             f"0 .. {self.num_workers - 1}); got {agent}")
        return agent

    def indices(self, agent: int) -> torch.Tensor:
        """Worker ``agent``'s training indices (all of them under ``iid``)."""
        self.check_agent(agent)
        return torch.arange(len(self.labels)) if self.parts is None else self.parts[agent]

    def batch_indices(self, agent: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Worker ``agent``'s endless training-index batches: shuffled epochs of its own examples,
        each epoch's permutation drawn from ``generator`` when its first batch is taken (under
        ``iid``, exactly ``epoch_batches(len(labels), batch_size, generator)``).  The problems pass
        ``agent_generator(seed, agent)``, and CIFAR's augmentation draws from it between batches.
        The agent is checked here, before the first batch."""
        self.check_agent(agent)
        if self.parts is None:
            return epoch_batches(len(self.labels), batch_size, generator)
        own = self.parts[agent]
        return (own[local] for local in epoch_batches(len(own), batch_size, generator))

    def histograms(self) -> torch.Tensor:
        """(num_workers, num_classes) int64: row i counts the labels of the examples worker i reads
        from (under ``iid`` every row is the whole training set's); needs ``num_workers``."""
        if self.num_workers is None:
            raise ValueError("label histograms need the problem option num_workers (partition='iid' was "
                             "built without it)")
        return torch.stack([torch.bincount(self.labels[self.indices(i)], minlength=self.num_classes)
                            for i in range(self.num_workers)])


def make_partition(labels, partition: str = "iid", *, num_workers: int | None = None, beta: float | None = None,
                   shards_per_worker: int | None = None, split_seed: int = 0, batch_size: int | None = None,
                   num_classes: int | None = None) -> Partition:
    """Validate the problem options and split ``labels`` (the training labels, ints in
    ``0 .. num_classes - 1``; ``num_classes`` defaults to ``max + 1``).

    ``beta`` only applies to ``dirichlet`` and ``shards_per_worker`` only to ``shards`` (setting
    either for another scheme is refused).  With ``batch_size``, a worker with fewer examples is
    refused (module docstring).  Every wrong option is a ``ValueError`` naming it.
    """
    if partition not in SCHEMES:
        raise ValueError(f"partition must be one of {', '.join(SCHEMES)}; got {partition!r}")
    if num_workers is not None:
        num_workers = check_positive_int(num_workers, "num_workers")
    elif partition != "iid":
        raise ValueError(f"num_workers is required with partition={partition!r} (the number of workers the "
                         f"training set is split among)")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise ValueError(f"split_seed must be a non-negative integer; got {split_seed!r}")
    if beta is not None and partition != "dirichlet":
        raise ValueError(f"beta applies to partition='dirichlet' only; got beta={beta!r} with partition={partition!r}")
    if shards_per_worker is not None and partition != "shards":
        raise ValueError(f"shards_per_worker applies to partition='shards' only; got shards_per_worker="
                         f"{shards_per_worker!r} with partition={partition!r}")
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.ndim != 1 or len(labels) == 0 or int(labels.min()) < 0:
        raise ValueError("labels must be a non-empty 1-D sequence of non-negative class indices")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    rng = np.random.default_rng(split_seed)
    options = {"beta": None, "shards_per_worker": None, "split_seed": split_seed}
    parts = None
    if partition == "dirichlet":
        beta = DEFAULT_BETA if beta is None else beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be a finite number > 0 (the Dirichlet concentration); got {beta!r}")
        options["beta"] = float(beta)
        parts = split_dirichlet(labels.numpy(), num_workers, float(beta), rng)
    elif partition == "shards":
        shards_per_worker = check_positive_int(
            DEFAULT_SHARDS_PER_WORKER if shards_per_worker is None else shards_per_worker, "shards_per_worker")
        if num_workers * shards_per_worker > len(labels):
            raise ValueError(f"num_workers * shards_per_worker (= {num_workers * shards_per_worker} shards) must be "
                             f"at most the {len(labels)} training examples")
        options["shards_per_worker"] = shards_per_worker
        parts = split_shards(labels.numpy(), num_workers, shards_per_worker, rng)
    if parts is not None:
        parts = tuple(torch.from_numpy(p.astype(np.int64)) for p in parts)
    result = Partition(partition, num_workers, labels, num_classes, parts, options)
    if batch_size is not None:
        if parts is None and batch_size > len(labels):
            raise ValueError(f"batch_size must be at most the {len(labels)} training examples; got {batch_size}")
        sizes = [] if parts is None else [len(p) for p in parts]
        if sizes and min(sizes) < batch_size:
            worker = sizes.index(min(sizes))
            raise ValueError(
                f"partition={partition!r} ({_describe(result)}) leaves worker {worker} with {sizes[worker]} training "
                f"examples, fewer than batch_size={batch_size}: raise beta, lower num_workers or batch_size, or "
                f"take another split_seed"
            )
    return result


def _describe(partition: Partition) -> str:
    set_options = {k: v for k, v in partition.options.items() if v is not None}
    return ", ".join(f"{k}={v}" for k, v in {"num_workers": partition.num_workers, **set_options}.items())


# -- writing ------------------------------------------------------------------------------------------
def write_label_histograms(partition: Partition, folder, name: str = "label_histograms") -> tuple[Path, Path]:
    """``folder/name.csv`` and ``folder/name.json``: each worker's label histogram.

    The CSV has a header ``worker,label_0,...,label_{C-1},total`` and one row per worker; the JSON
    ``{"partition", "num_workers", "num_classes", "beta", "shards_per_worker", "split_seed",
    "histograms"}`` (``histograms[i][c]``: examples of label c worker i reads from).  Returns the
    two paths.
    """
    counts = partition.histograms().tolist()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = folder / f"{name}.csv", folder / f"{name}.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["worker", *(f"label_{c}" for c in range(partition.num_classes)), "total"])
        writer.writerows([i, *row, sum(row)] for i, row in enumerate(counts))
    record = {"partition": partition.scheme, "num_workers": partition.num_workers,
              "num_classes": partition.num_classes, **partition.options, "histograms": counts}
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    return csv_path, json_path
