"""Our decentralized schedules against PyTorch's own model averagers, bit for bit on gloo.

Four gloo processes, one worker agent each, float64, SGD with momentum: the same loop once through
the Simulation and once written the PyTorch way (the rank's model and optimizer, then the
averager's ``average_parameters`` after every ``optimizer.step()``).  With the step counters
aligned as the README says, every rank's parameters are equal bit for bit after every iteration
(the averaging is ``x * (1/W)`` then SUM here, ``x / W`` then SUM there: the same bits for W a
power of two):

- ``local_sgd(W, tau)`` = ``PeriodicModelAverager(tau, warmup_steps=tau - 1)``;
- ``phases([(w, local_sgd(W, 1)), (None, local_sgd(W, tau))])`` = averaging every step for
  s < w, then ``PeriodicModelAverager(tau, warmup_steps=w + tau - 1)``;
- ``hierarchical(W, {2: 2, 4: 4})`` = ``HierarchicalModelAverager({2: 2, 4: 4})`` with
  ``averager.step = 1`` before the loop.

The default counters are one step off: the test also checks that they would differ.
"""

from pathlib import Path

import torch

from tests.spawn import run_torch

WORKER = Path(__file__).resolve().parent / "averagers_worker.py"
STEPS = 9


def test_schedules_equal_pytorch_averagers_bit_for_bit(tmp_path):
    results = run_torch(4, {"out": str(tmp_path), "steps": STEPS}, timeout=240, worker=WORKER)
    assert all(code == 0 for code, _ in results), results
    for rank in range(4):
        runs = torch.load(tmp_path / f"rank{rank}.pt")
        ours, theirs = runs.pop("default_counters")
        assert not torch.equal(ours, theirs)
        for name, (ours, theirs) in runs.items():
            assert ours.shape == theirs.shape == (STEPS, ours.shape[1]), name
            assert torch.equal(ours, theirs), (name, rank, float((ours - theirs).abs().max()))
        # The workers' models do differ between syncs: the comparison is not vacuous.
        other = torch.load(tmp_path / f"rank{(rank + 1) % 4}.pt")
        assert not torch.equal(runs["local_sgd"][0][0], other["local_sgd"][0][0])
