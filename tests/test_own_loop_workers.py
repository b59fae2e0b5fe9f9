"""Several workers in one process through the own loop (``AgentOptimizer.each_worker``): the same
loop -- BatchNorm, dropout, Adam or SGD with momentum, clipping, a StepLR, a shard per worker --
run co-located with every worker in turn equals the run with one worker per gloo process: every
agent's weights and every worker's BatchNorm buffers, bit for bit, for local SGD with 2 workers
(two-term sums), with 4 (the exact mode: its sums have four terms), a ring of 4 (gossip: exact in
both modes) and Lookahead over 2 local-SGD workers; without the exact mode 4 workers differ by
rounding.  And the misuses are refused."""

from __future__ import annotations

import pytest
import torch

import topology
from launch import AgentOptimizer
from tests import colocated_workers_cases as cases
from tests.spawn import ROOT, run_job

WORKER = ROOT / "tests" / "colocated_workers_worker.py"
STEPS = 24


def distributed(nprocs: int, spec_cases: dict, tmp_path) -> list[dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_job("torch", nprocs, dict(backend="torch", out=str(tmp_path), cases=spec_cases, timeout_s=60), WORKER, 300)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(nprocs)]


def merged(ranks: list[dict], name: str) -> dict:
    out = {"params": {}, "buffers": {}}
    for r in ranks:
        out["params"].update(r[name]["params"])
        out["buffers"].update(r[name]["buffers"])
    return out


def identical(a: dict, b: dict) -> bool:
    return (a["params"].keys() == b["params"].keys() and a["buffers"].keys() == b["buffers"].keys()
            and all(torch.equal(a["params"][i], b["params"][i]) for i in a["params"])
            and all(all(torch.equal(x, y) for x, y in zip(a["buffers"][i], b["buffers"][i])) for i in a["buffers"]))


def test_two_workers_and_lookahead_over_them(tmp_path):
    specs = {"local2": dict(schedule=["local_sgd", 2, 4], steps=STEPS),
             "local2-sgd": dict(schedule=["local_sgd", 2, 3], steps=STEPS, optimizer="sgd")}
    ranks = distributed(2, specs, tmp_path / "two")
    for name, case in specs.items():
        colocated = cases.run(case)
        assert len(colocated["params"]) == 2 and len(colocated["buffers"]) == 2
        assert identical(colocated, merged(ranks, name)), name
    la = {"la-over-local": dict(schedule=["lookahead_local_sgd", 2, 2, 0.5, {"1": 2}], steps=STEPS, exact=True)}
    ranks = distributed(3, la, tmp_path / "la")      # 2 workers and the slow agent: a 3-term sum, exact mode
    colocated = cases.run(la["la-over-local"])
    assert len(colocated["params"]) == 3 and identical(colocated, merged(ranks, "la-over-local"))


def test_four_workers_local_sgd_exact_and_a_ring(tmp_path):
    specs = {"local4-exact": dict(schedule=["local_sgd", 4, 4], steps=STEPS, exact=True),
             "local4": dict(schedule=["local_sgd", 4, 4], steps=STEPS),
             "ring4": dict(schedule=["ring", 4], steps=STEPS)}
    ranks = distributed(4, specs, tmp_path)
    results = {name: (cases.run(case), merged(ranks, name)) for name, case in specs.items()}
    assert identical(*results["local4-exact"]) and identical(*results["ring4"])
    colocated, ranked = results["local4"]    # without the mode gloo's ring adds the 4 terms in its own order
    assert not identical(colocated, ranked)


def test_a_checkpoint_keeps_every_workers_buffers_and_rng(tmp_path):
    """Stopped after step 10 (a checkpoint), resumed by a new AgentOptimizer: the same bits as the
    run never stopped -- every agent, every worker's BatchNorm buffers, dropout after the resume."""
    case = dict(schedule=["local_sgd", 3, 4], steps=STEPS, exact=True)
    whole = cases.run(case)
    cases.run(case, checkpoints=tmp_path, stop=10)
    resumed = cases.run(case, checkpoints=tmp_path)
    assert len(resumed["buffers"]) == 3 and identical(whole, resumed)


def test_misuses_are_refused():
    net = cases.model()
    opt = AgentOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), topology.decentralized.local_sgd(2, 2), model=net)
    x, y = cases.dataset().tensors
    with pytest.raises(ValueError, match="call step\\(\\) once per worker inside `for w in opt.each_worker\\(\\):`"):
        torch.nn.functional.mse_loss(net(x[:8]), y[:8]).backward()
        opt.step()
    with pytest.raises(ValueError, match="worker 1 \\(agent 1\\) did not call step\\(\\)"):
        for w in opt.each_worker():
            if w == 0:
                opt.zero_grad()
                torch.nn.functional.mse_loss(net(x[:8]), y[:8]).backward()
                opt.step()
    assert opt.t == 0                                  # nothing synced
    with pytest.raises(ValueError, match="called step\\(\\) twice"):
        for w in opt.each_worker():
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x[:8]), y[:8]).backward()
            opt.step()
            opt.step()
    # Out of the body, the model is the first worker again: its parameters views into agent 0's buffer.
    flat = opt.agents[0].flat.buffer
    assert all(flat.data_ptr() <= p.data_ptr() < flat.data_ptr() + flat.numel() * flat.element_size()
               for p in net.parameters())
    other = cases.model()
    with pytest.raises(ValueError, match="not under push-sum"):
        AgentOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), topology.decentralized.push_sum_random(3, 1),
                       model=other)
