"""``AgentOptimizer.evaluating`` with BatchNorm: the worker's parameters and buffers come back bit
for bit whatever the body does, and ``recompute_bn`` gives the evaluated weights the running
statistics ``torch.optim.swa_utils.update_bn`` computes for them."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader

import topology
from launch import AgentOptimizer
from tests.test_own_loop_store import bn_model, data


def trained():
    model = bn_model()
    opt = AgentOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), topology.lookahead(3, 0.5),
                         model=model)
    loader = DataLoader(data(), batch_size=8)
    for x, y in list(loader)[:7]:                 # t = 7: the slow weights differ from the fast ones
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt, loader


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_workers_parameters_and_buffers_come_back_bit_for_bit():
    model, opt, loader = trained()
    before = state(model)
    with opt.evaluating(level=1):
        x, _ = next(iter(loader))
        model(x)                                  # train mode: moves the running statistics
        assert not torch.equal(model.state_dict()["1.running_mean"], before["1.running_mean"])
        assert not torch.equal(model.state_dict()["0.weight"], before["0.weight"])   # the slow weights
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_recompute_bn_gives_update_bns_statistics_for_the_slow_weights():
    model, opt, loader = trained()
    before = state(model)
    slow = copy.deepcopy(model)
    packed = opt.engine.agents[1].flat.pack(opt.engine.agents[1].params)
    torch.nn.utils.vector_to_parameters(packed, slow.parameters())
    torch.optim.swa_utils.update_bn(loader, slow)
    with opt.evaluating(level=1, recompute_bn=loader):
        inside = state(model)
        assert model.training                     # update_bn leaves the mode as it found it
    for k, v in slow.state_dict().items():
        assert torch.equal(inside[k], v), k       # the slow weights and their own statistics
    assert not torch.equal(inside["1.running_var"], before["1.running_var"])
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_gradscaler_skips_agree_across_worker_ranks(tmp_path):
    """Local SGD over 2 gloo ranks with a GradScaler each; worker 1's loss at iteration 3 is
    infinite: both workers skip that iteration (their counters stay in step, no "out of step"),
    worker 0's parameters do not move at it although its own gradient was finite, and the next
    average (t = 6) leaves both workers equal."""
    from tests.spawn import ROOT, run_torch

    results = run_torch(2, {"out": str(tmp_path)}, timeout=120, worker=ROOT / "tests" / "own_loop_amp_worker.py")
    assert all(code == 0 for code, _ in results), results
    runs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert runs[0]["t"] == runs[1]["t"] == [1, 2, 3, 3, 4, 5, 6]
    assert torch.equal(runs[0]["params"][3], runs[0]["params"][2])     # skipped on worker 0 too
    assert not torch.equal(runs[0]["params"][4], runs[0]["params"][3])
    assert torch.equal(runs[0]["params"][-1], runs[1]["params"][-1])   # averaged at t = 6
