"""The serial reference of the model (agents.matrix_reference) against PyTorch's own post-local SGD
recipe: DDP + ``post_localSGD_hook`` + ``PeriodicModelAverager``, 4 gloo processes, float64, 200
steps, SGD with momentum and Adam (tests/post_local_worker.py runs the recipe).

``phases([(s, data_parallel(W)), (None, local_sgd(W, tau))])`` is the recipe with
``start_localSGD_iter=s`` and ``warmup_steps=s + tau - 1``; PyTorch's documented
``warmup_steps=s`` inserts one averaging step (``(1, local_sgd(W, 1))``); the hook's gradient
all-reduce inside ``subgroup`` after the warm-up is a Q_t that averages the gradients of each pair.
On 2 ranks every sum has two exactly scaled terms: bit for bit.  On 4 ranks gloo sums in another
order: to rounding.  Local SGD over 2 agents of 2 ranks (a DDP model over each agent's pair, the
averager over each lane) is ``shard_schedule(local_sgd(2, tau), 2)``: every sum has two terms
there too, bit for bit.  Averaging the *parameters* during the warm-up instead (the only way before
gradient mixing) is far off with a stateful optimizer: the comparison is not vacuous.
"""

from pathlib import Path

import pytest
import torch

import topology
from agents.matrix_reference import run_model
from tests import post_local_worker as recipe
from tests import problems
from tests.spawn import run_torch
from tests.trajectories import relative_deviation
from topology import decentralized as dec

WORKER = Path(__file__).resolve().parent / "post_local_worker.py"


def serial(schedule, optimizer: str) -> torch.Tensor:
    return run_model(schedule, problems.make_model(0), problems.OPTIMIZERS[optimizer], problems.loss_fn,
                     lambda i: problems.batches(1 + i), recipe.STEPS)


@pytest.fixture(scope="module")
def pytorch_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("post_local")
    results = run_torch(4, {"out": str(out)}, timeout=240, worker=WORKER)
    assert all(code == 0 for code, _ in results), results
    return [torch.load(out / f"rank{rank}.pt") for rank in range(4)]


def trajectories(runs, name: str, world: int) -> torch.Tensor:
    """(steps, world, d): the recipe's trajectory of every worker of case ``name``."""
    found = dict(run[name] for run in runs if name in run)
    assert sorted(found) == list(range(world)), (name, sorted(found))
    return torch.stack([found[i] for i in range(world)], dim=1)


@pytest.mark.parametrize("name, world, optimizer, variant", recipe.cases(), ids=[c[0] for c in recipe.cases()])
def test_serial_reference_equals_pytorch_post_local_recipe(pytorch_runs, name, world, optimizer, variant):
    theirs = trajectories(pytorch_runs, name, world)
    ours = serial(recipe.schedule(world, variant), optimizer)
    assert ours.shape == theirs.shape == (recipe.STEPS, world, ours.shape[2])
    print(f"{name}: bit for bit {torch.equal(ours, theirs)}, relative deviation {relative_deviation(ours, theirs):.2g}")
    if world == 2 or variant == "agents of 2 ranks":
        assert torch.equal(ours, theirs), (name, float((ours - theirs).abs().max()))
    else:
        assert relative_deviation(ours, theirs) <= 1e-12, (name, relative_deviation(ours, theirs))
    first, last = ours[:, 0], ours[:, world - 1]
    if variant == "agents of 2 ranks":
        # The shards of an agent are equal, the agents differ between syncs.
        assert torch.equal(first, ours[:, 1]) and not torch.equal(first[0], last[0])
    else:
        # The workers are equal during the warm-up (data parallel) and not after it.
        assert torch.equal(first[recipe.START - 1], last[recipe.START - 1])
        assert not torch.equal(first[recipe.START + 1], last[recipe.START + 1])


@pytest.mark.parametrize("optimizer", recipe.OPTIMIZERS)
def test_parameter_averaging_warmup_is_not_the_recipe(pytorch_runs, optimizer):
    """Before gradient mixing, the warm-up could only average the parameters every step; with
    momentum or Adam that is not PyTorch's recipe (the optimizer states differ)."""
    world = 4
    theirs = trajectories(pytorch_runs, f"4 ranks {optimizer} aligned", world)
    averaged = topology.phases([(recipe.START, dec.local_sgd(world, 1)), (None, dec.local_sgd(world, recipe.TAU))])
    deviation = relative_deviation(serial(averaged, optimizer), theirs)
    print(f"4 ranks {optimizer}: parameter averaging during the warm-up, relative deviation {deviation:.2g}")
    assert deviation > 1e-3
