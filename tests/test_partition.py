"""Non-iid splits of the classification problems (experiments.partition): coverage, disjointness,
determinism, the documented semantics of dirichlet and shards, the batch streams, validation, and
the label-histogram writer."""

import collections
import csv
import itertools
import json

import numpy as np
import pytest
import torch

import topology
from experiments import cifar, digits
from experiments.base import agent_generator, epoch_batches
from experiments.partition import make_partition, write_label_histograms
from experiments.problems import PROBLEMS
from experiments.report import simulation
from tests.test_problems import write_fake_cifar

TRAIN = digits.digits_split().y_train  # 1437 labels, 139 .. 146 per class
SPLITS = [
    ("dirichlet", {"beta": 0.05}), ("dirichlet", {"beta": 0.5}), ("dirichlet", {"beta": 100.0}),
    ("shards", {"shards_per_worker": 1}), ("shards", {"shards_per_worker": 3}),
]
UNBALANCED = torch.tensor([0] * 50 + [1] * 3 + [3] * 20 + [4] * 7)  # class 2 absent, 1 rare


def split(labels, scheme, options, num_workers=7, split_seed=0):
    return make_partition(labels, scheme, num_workers=num_workers, split_seed=split_seed, **options)


# -- every example exactly once, histograms -------------------------------------------------------------
@pytest.mark.parametrize("labels", [TRAIN, UNBALANCED], ids=["digits", "unbalanced"])
@pytest.mark.parametrize("scheme,options", SPLITS)
@pytest.mark.parametrize("split_seed", [0, 3])
def test_parts_are_disjoint_and_cover_the_training_set(labels, scheme, options, split_seed):
    part = split(labels, scheme, options, split_seed=split_seed)
    assert len(part.parts) == 7
    every = torch.cat(part.parts)
    assert sorted(every.tolist()) == list(range(len(labels)))  # the union, with no repeat
    for p in part.parts:
        assert p.dtype == torch.int64 and torch.equal(p, p.sort().values)


@pytest.mark.parametrize("scheme,options", SPLITS)
def test_histograms_count_each_workers_labels(scheme, options):
    part = split(TRAIN, scheme, options)
    hist = part.histograms()
    assert hist.shape == (7, 10)
    for i, p in enumerate(part.parts):
        counted = collections.Counter(TRAIN[p].tolist())
        assert hist[i].tolist() == [counted.get(c, 0) for c in range(10)]
    assert torch.equal(hist.sum(0), torch.bincount(TRAIN, minlength=10))


def test_iid_histograms_are_the_whole_training_set_for_every_worker():
    part = make_partition(TRAIN, "iid", num_workers=3)
    assert part.parts is None
    assert torch.equal(part.histograms(), torch.bincount(TRAIN, minlength=10).expand(3, 10))
    with pytest.raises(ValueError, match="num_workers"):
        make_partition(TRAIN).histograms()


# -- determinism ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,options", SPLITS)
def test_split_seed_fixes_the_split(scheme, options):
    a, b, c = (split(TRAIN, scheme, options, split_seed=s) for s in (4, 4, 5))
    assert all(torch.equal(p, q) for p, q in zip(a.parts, b.parts))
    assert any(not torch.equal(p, q) for p, q in zip(a.parts, c.parts))


def test_the_problem_split_depends_on_split_seed_not_on_the_training_seed():
    options = {"partition": "dirichlet", "num_workers": 4, "beta": 0.3, "batch_size": 8}
    p0 = PROBLEMS["digits_mlp"](seed=0, **options).partition
    p1 = PROBLEMS["digits_mlp"](seed=1, **options).partition
    p2 = PROBLEMS["digits_mlp"](seed=0, split_seed=2, **options).partition
    assert all(torch.equal(p, q) for p, q in zip(p0.parts, p1.parts))
    assert not torch.equal(p0.histograms(), p2.histograms())


# -- dirichlet ----------------------------------------------------------------------------------------------
def test_dirichlet_follows_the_documented_draws():
    """Per class in increasing order: a permutation, then Dirichlet(beta) proportions, from
    default_rng(split_seed); the class's examples are cut at rint(n_c * cumsum(p))."""
    beta, workers = 0.7, 5
    rng = np.random.default_rng(9)
    expected = []
    for c in range(10):
        n_c = int((TRAIN == c).sum())
        rng.permutation(n_c)
        cuts = np.rint(n_c * np.cumsum(rng.dirichlet([beta] * workers))[:-1]).astype(int)
        expected.append(np.diff([0, *cuts, n_c]))
    part = make_partition(TRAIN, "dirichlet", num_workers=workers, beta=beta, split_seed=9)
    assert part.histograms().tolist() == np.stack(expected, axis=1).tolist()


def class_concentration(hist):
    """Mean over classes of the largest share of the class held by one worker."""
    hist = hist.double()
    return float((hist.max(0).values / hist.sum(0)).mean())


@pytest.mark.parametrize("split_seed", range(4))
def test_dirichlet_small_beta_is_skewed_and_huge_beta_nearly_uniform(split_seed):
    skewed = make_partition(TRAIN, "dirichlet", num_workers=10, beta=0.05, split_seed=split_seed).histograms()
    # Dir(0.05, ..., 0.05) over 10 workers puts most of a class on one worker (E[max p] ~ 0.8).
    assert class_concentration(skewed) > 0.5
    assert (skewed == 0).sum() > 40  # most (worker, class) cells empty
    even = make_partition(TRAIN, "dirichlet", num_workers=10, beta=1e6, split_seed=split_seed).histograms()
    # p_i = 1/10 +- 1e-4: each cut within 0.5 + 0.02 of i n_c / 10, so each count within 1.05 of n_c / 10.
    n_c = torch.bincount(TRAIN, minlength=10).double()
    assert ((even.double() - n_c / 10).abs() <= 1.05).all()
    assert class_concentration(even) < 0.11


# -- shards -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("labels", [TRAIN, UNBALANCED], ids=["digits", "unbalanced"])
@pytest.mark.parametrize("workers,per_worker", [(10, 2), (7, 3), (4, 1)])
def test_shards_are_label_sorted_runs_handed_out_whole(labels, workers, per_worker):
    """Each worker's part is exactly ``per_worker`` of the documented shards (contiguous runs of
    the stably label-sorted order, sizes N // S or N // S + 1), each shard given once."""
    part = make_partition(labels, "shards", num_workers=workers, shards_per_worker=per_worker, split_seed=1)
    order = np.argsort(labels.numpy(), kind="stable")
    n, count = len(labels), workers * per_worker
    shards = [frozenset(order[j * n // count : (j + 1) * n // count].tolist()) for j in range(count)]
    assert {len(s) for s in shards} <= {n // count, n // count + 1}
    used = []
    for p in part.parts:
        mine = [j for j, s in enumerate(shards) if s <= set(p.tolist())]
        assert len(mine) == per_worker and sum(len(shards[j]) for j in mine) == len(p)
        used += mine
    assert sorted(used) == list(range(count))


@pytest.mark.parametrize("workers,per_worker", [(10, 2), (20, 1), (7, 3)])
def test_shards_give_each_worker_at_most_two_labels_per_shard(workers, per_worker):
    # The documented condition: no shard longer than the rarest class (139 examples); then a shard
    # spans at most 2 labels (3 would need a whole class inside it, plus one more example).
    n = len(TRAIN)
    assert -(-n // (workers * per_worker)) <= int(torch.bincount(TRAIN).min())
    hist = make_partition(TRAIN, "shards", num_workers=workers, shards_per_worker=per_worker).histograms()
    assert ((hist > 0).sum(1) <= 2 * per_worker).all()
    assert ((hist > 0).sum(1) < 10).all()  # far from iid


# -- the batch streams --------------------------------------------------------------------------------
def test_iid_is_the_historical_stream():
    """partition='iid' (the default, with or without num_workers) reads shuffled epochs of the
    whole training split from seed + 1000 (agent + 1), as before partitions existed."""
    split_ = digits.digits_split()
    for problem in (PROBLEMS["digits_mlp"](batch_size=16, seed=5),
                    PROBLEMS["digits_mlp"](batch_size=16, seed=5, partition="iid", num_workers=4)):
        for agent in (0, 3):
            ref = epoch_batches(len(split_.y_train), 16, agent_generator(5, agent))
            for (x, y), index in itertools.islice(zip(problem.batches(agent), ref), 200):
                assert torch.equal(x, split_.x_train[index].float()) and torch.equal(y, split_.y_train[index])


@pytest.mark.parametrize("scheme,options", [("dirichlet", {"beta": 0.5}), ("shards", {"shards_per_worker": 2})])
def test_non_iid_workers_read_shuffled_epochs_of_their_own_part(scheme, options):
    problem = PROBLEMS["digits_logistic"](batch_size=8, seed=2, partition=scheme, num_workers=5, **options)
    split_ = digits.digits_split()
    for agent in range(5):
        own = problem.partition.parts[agent]
        per_epoch = len(own) // 8
        indices = list(itertools.islice(
            problem.partition.batch_indices(agent, 8, agent_generator(2, agent)), 2 * per_epoch))
        first = torch.cat(indices[:per_epoch])
        assert set(torch.cat(indices).tolist()) <= set(own.tolist())
        assert len(set(first.tolist())) == per_epoch * 8  # an epoch repeats no example
        # The problem's batches are those examples, from the worker's own generator.
        for (x, y), index in zip(itertools.islice(problem.batches(agent), 2 * per_epoch), indices):
            assert torch.equal(x, split_.x_train[index].float()) and torch.equal(y, split_.y_train[index])
    assert not torch.equal(next(problem.batches(0))[1], next(problem.batches(1))[1])


def test_non_iid_problem_trains_through_a_decentralized_schedule():
    from topology import decentralized

    problem = PROBLEMS["digits_logistic"](partition="shards", num_workers=4, batch_size=16)
    sim = simulation(problem, decentralized.local_sgd(4, 2), lambda p: torch.optim.SGD(p, lr=0.1))
    initial = problem.evaluate(problem.model())["loss"]
    for _ in range(30):
        assert all(torch.isfinite(v) for v in sim.step().values())
    assert problem.evaluate(sim.agents[0].module)["loss"] < initial
    with pytest.raises(ValueError, match="num_workers"):
        simulation(problem, topology.from_matrices([torch.eye(5, dtype=torch.float64)]),
                   lambda p: torch.optim.SGD(p, lr=0.1))


def test_cifar_partition_and_stream(tmp_path):
    """iid (with or without num_workers) is the historical stream: one generator per worker for the
    epoch permutations and, between them, the augmentation; a shards worker sees its labels only."""
    write_fake_cifar(tmp_path / "cifar-10-batches-py", per_batch=6)
    data = cifar.load_cifar10(tmp_path)
    g = agent_generator(0, 1)
    historical = ((cifar.augment(cifar.normalize(data.x_train[i], torch.float32), g), data.y_train[i])
                  for i in epoch_batches(30, 2, g))
    iid = PROBLEMS["cifar10_resnet18"](root=str(tmp_path), batch_size=2, test_size=2)
    again = PROBLEMS["cifar10_resnet18"](root=str(tmp_path), batch_size=2, test_size=2, partition="iid",
                                         num_workers=2)
    for (x, y), (u, v), (a, b) in itertools.islice(zip(iid.batches(1), again.batches(1), historical), 20):
        assert torch.equal(x, a) and torch.equal(y, b) and torch.equal(u, a) and torch.equal(v, b)
    problem = PROBLEMS["cifar10_resnet18"](root=str(tmp_path), batch_size=2, test_size=2, partition="shards",
                                           num_workers=3, shards_per_worker=2, split_seed=4)
    labels = problem.partition.labels
    assert sorted(torch.cat(problem.partition.parts).tolist()) == list(range(30))
    for agent in range(3):
        own = set(labels[problem.partition.parts[agent]].tolist())
        for _, y in itertools.islice(problem.batches(agent), 10):
            assert set(y.tolist()) <= own


# -- validation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,message", [
    ({"partition": "noniid"}, "partition must be one of iid, dirichlet, shards"),
    ({"partition": "dirichlet"}, "num_workers is required with partition='dirichlet'"),
    ({"partition": "shards"}, "num_workers is required with partition='shards'"),
    ({"partition": "shards", "num_workers": 0}, "num_workers must be a positive integer"),
    ({"partition": "dirichlet", "num_workers": 2.0}, "num_workers must be a positive integer"),
    ({"partition": "dirichlet", "num_workers": 4, "beta": 0}, "beta must be a finite number > 0"),
    ({"partition": "dirichlet", "num_workers": 4, "beta": -1.0}, "beta must be a finite number > 0"),
    ({"partition": "dirichlet", "num_workers": 4, "beta": float("inf")}, "beta must be a finite number > 0"),
    ({"partition": "dirichlet", "num_workers": 4, "beta": float("nan")}, "beta must be a finite number > 0"),
    ({"partition": "dirichlet", "num_workers": 4, "beta": True}, "beta must be a finite number > 0"),
    ({"partition": "dirichlet", "num_workers": 4, "beta": "0.5"}, "beta must be a finite number > 0"),
    ({"partition": "shards", "num_workers": 4, "shards_per_worker": 0}, "shards_per_worker must be a positive integer"),
    ({"partition": "shards", "num_workers": 4, "shards_per_worker": 1.5}, "shards_per_worker must be a positive"),
    ({"partition": "iid", "beta": 0.5}, "beta applies to partition='dirichlet' only"),
    ({"partition": "shards", "num_workers": 2, "beta": 0.5}, "beta applies to partition='dirichlet' only"),
    ({"partition": "dirichlet", "num_workers": 2, "shards_per_worker": 2}, "shards_per_worker applies to partition="),
    ({"partition": "shards", "num_workers": 800, "shards_per_worker": 2, "batch_size": 1},
     r"num_workers \* shards_per_worker \(= 1600 shards\) must be at most the 1437 training examples"),
    ({"partition": "shards", "num_workers": 60, "shards_per_worker": 1}, "leaves worker .* fewer than batch_size=32"),
    ({"partition": "dirichlet", "num_workers": 10, "beta": 0.01, "split_seed": 2},
     r"partition='dirichlet' \(num_workers=10, beta=0.01, split_seed=2\) leaves worker \d+ with \d+ training"),
    ({"split_seed": -1}, "split_seed must be a non-negative integer"),
    ({"batch_size": 2000}, "batch_size must be at most the 1437 training examples"),
])
def test_bad_options_are_refused_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        PROBLEMS["digits_mlp"](**options)


def test_agents_outside_the_workers_are_refused_before_any_batch():
    problem = PROBLEMS["digits_mlp"](partition="dirichlet", num_workers=3, beta=1.0, batch_size=8)
    with pytest.raises(ValueError, match=r"agent must be below num_workers=3 .*got 3"):
        problem.batches(3)
    with pytest.raises(ValueError, match="non-negative agent index"):
        problem.batches(-1)
    iid = PROBLEMS["digits_mlp"](num_workers=2)
    with pytest.raises(ValueError, match="agent must be below num_workers=2"):
        iid.batches(2)
    next(PROBLEMS["digits_mlp"]().batches(50))  # iid without num_workers: any worker


# -- writing ------------------------------------------------------------------------------------------
def test_write_label_histograms_csv_and_json(tmp_path):
    part = make_partition(TRAIN, "shards", num_workers=6, shards_per_worker=2, split_seed=3)
    csv_path, json_path = write_label_histograms(part, tmp_path / "run")
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["worker", *(f"label_{c}" for c in range(10)), "total"]
    assert len(rows) == 7
    for i, row in enumerate(rows[1:]):
        assert int(row[0]) == i and int(row[-1]) == len(part.parts[i])
        assert [int(v) for v in row[1:-1]] == torch.bincount(TRAIN[part.parts[i]], minlength=10).tolist()
    record = json.loads(json_path.read_text())
    assert record["partition"] == "shards" and record["num_workers"] == 6 and record["num_classes"] == 10
    assert record["shards_per_worker"] == 2 and record["beta"] is None and record["split_seed"] == 3
    assert record["histograms"] == [[int(v) for v in row[1:-1]] for row in rows[1:]]
