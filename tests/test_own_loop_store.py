"""The own loop's checkpoints and record, co-located: a loop with BatchNorm and dropout, Adam with
``pullback``, a StepLR, a shuffling sampler and per-epoch evaluations, stopped without warning
after a checkpoint and resumed by a new AgentOptimizer, ends bit for bit as the uninterrupted
run -- every agent, the model's BatchNorm buffers, the recorded rows of metrics.csv and eval.csv,
agents.pt -- and its record is read by ``launch.plot`` and ``launch.compare``.  A resume with
another learning rate is refused naming it.  (Several processes: tests/test_own_loop_distributed.py.)"""

from __future__ import annotations

import gc
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import topology
from launch import AgentOptimizer, Checkpointer
from launch.cli import compare, plot
from launch.engine.record.evaluation import read_eval
from launch.engine.record.metrics import read_metrics

SAMPLES, BATCH, EPOCHS, EVERY = 64, 8, 3, 5      # 8 steps per epoch: no checkpoint at an epoch's end
SCHEDULE = topology.multilayer((3, 2), (0.5, 0.6))


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 6, generator=g, dtype=torch.float64)
    return TensorDataset(x, x[:, :2].sum(1, keepdim=True) + 0.1 * torch.randn(SAMPLES, 1, generator=g, dtype=torch.float64))


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 1)).double()


def evaluate(model: nn.Module) -> dict:
    x, y = data().tensors
    model.eval()
    loss = float(nn.functional.mse_loss(model(x), y))
    model.train()
    return {"loss": loss}


def run(directory, ckpt, *, stop: int | None = None, lr: float = 0.01, comm=None, at_stop=None):
    """The loop (every rank runs it: a passive rank serves); ``stop``: abandon it (no close, no
    save) right after step ``stop``, calling ``at_stop()`` (default: return; a process exits
    there), on passive ranks too.  Returns the AgentOptimizer and the model."""
    model = bn_model()
    opt = AgentOptimizer(torch.optim.Adam(model.parameters(), lr=lr), SCHEDULE, model=model, state_policy="pullback",
                         comm=comm)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    checkpointer = Checkpointer(ckpt)
    extra = opt.resume(checkpointer)
    epoch0, position0 = (extra["epoch"], extra["position"]) if extra else (0, 0)
    if extra:
        scheduler.load_state_dict(extra["scheduler"])
    opt.record(directory, evaluate=evaluate, log_every=1)
    if not opt.is_worker:
        opt.serve((lambda o: at_stop() if o.t == stop else None) if stop is not None else None, checkpointer)
        return opt, model
    sampler = DistributedSampler(data(), num_replicas=opt.num_workers, rank=opt.worker_index, shuffle=True, seed=0)
    for epoch in range(epoch0, EPOCHS):
        sampler.set_epoch(epoch)
        # A DataLoader's iterator draws its base seed from torch's RNG unless given a generator:
        # a resumed run, which makes the epoch's iterator after the RNG was restored, would draw
        # once more than the uninterrupted run and shift every dropout mask after.
        batches = list(DataLoader(data(), batch_size=BATCH, sampler=sampler, generator=torch.Generator()))
        for position in range(position0 if epoch == epoch0 else 0, len(batches)):
            x, y = batches[position]
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)        # dropout draws from torch's RNG
            loss.backward()
            opt.step(loss=loss)
            if opt.t % EVERY == 0:
                opt.save(checkpointer, extra={"scheduler": scheduler.state_dict(), "epoch": epoch,
                                              "position": position + 1})
            if opt.t == stop:
                if at_stop is not None:
                    at_stop()
                return opt, model
        scheduler.step()
        opt.record_evaluation()
    opt.close()
    return opt, model


def rows(path, reader):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in reader(path)]


def same(a, b) -> bool:
    return all(x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)) for x, y in zip(a, b)) \
        and len(a) == len(b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("own_store")
    whole = run(out / "whole", out / "whole-ckpt")
    abandoned, _ = run(out / "resumed", out / "ckpt", stop=12)      # the last checkpoint: t=10
    del abandoned
    gc.collect()
    resumed = run(out / "resumed", out / "ckpt")
    return out, whole, resumed


def test_a_stopped_loop_resumes_bit_for_bit(runs):
    out, (opt, model), (opt2, model2) = runs
    assert opt.t == opt2.t == EPOCHS * SAMPLES // BATCH
    for i in opt.engine.agents:
        assert torch.equal(opt.engine.agents[i].flat.buffer, opt2.engine.agents[i].flat.buffer), i
    for (name, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), name                      # BatchNorm's running statistics included
    for name, reader in (("metrics.csv", read_metrics), ("eval.csv", read_eval)):
        whole, resumed = rows(out / "whole" / name, reader), rows(out / "resumed" / name, reader)
        assert len(whole) == len(resumed) and all(same(list(a.values()), list(b.values()))
                                                  for a, b in zip(whole, resumed)), name
    steps = [r["step"] for r in read_metrics(out / "resumed" / "metrics.csv")]
    assert steps == sorted(steps) and len(steps) == opt.t * SCHEDULE.num_agents   # every step once
    for a, b in zip(torch.load(out / "whole" / "agents.pt"), torch.load(out / "resumed" / "agents.pt")):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_record_has_the_command_lines_files(runs):
    out, (opt, model), _ = runs
    agents = torch.load(out / "whole" / "agents.pt")
    assert len(agents) == SCHEDULE.num_agents and list(agents[0]) == list(model.state_dict())
    for name, value in model.state_dict().items():         # the worker's: the model itself
        assert torch.equal(agents[0][name], value), name
    slow = opt.engine.agents[2].flat.pack(opt.engine.agents[2].params)
    assert torch.equal(torch.cat([agents[2][n].reshape(-1) for n, _ in model.named_parameters()]), slow)
    assert torch.equal(agents[2]["1.running_mean"], model.state_dict()["1.running_mean"])   # the worker's buffers
    summary = json.loads((out / "resumed" / "summary.json").read_text())
    assert summary["launch"] == "own_loop" and summary["steps"] == opt.t and summary["resumed_from"] == 10
    assert summary["status"] == "ok" and summary["optimizer"]["name"] == "Adam"
    assert summary["optimizer"]["hyperparameters"]["lr"] == 0.01
    assert summary["state_policy"] == ["pullback", "pullback"] and summary["dtype"] == "float64"
    evals = [r for r in read_eval(out / "whole" / "eval.csv") if r["step"] == opt.t]
    assert [r["agent"] for r in evals] == [0, 1, 2, "virtual"]
    assert summary["heldout"]["loss"] == [r["heldout_loss"] for r in evals[:3]]
    assert (out / "resumed" / "summary.txt").read_text().startswith("summary: ")


def test_plot_and_compare_read_the_record(runs, tmp_path):
    out, _, _ = runs
    assert plot.main([str(out / "resumed"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert compare.main([str(out / "whole"), str(out / "resumed")]) == 0


def test_a_resume_with_another_learning_rate_is_refused_naming_it(runs, tmp_path):
    out, _, _ = runs
    with pytest.raises(ValueError, match=r"optimizer\.lr"):
        run(tmp_path / "other", out / "ckpt", lr=0.02)


def test_three_gloo_ranks_stopped_and_resumed_bit_for_bit(runs, tmp_path):
    """The same loop on 3 gloo ranks (LA-2: the worker on rank 0, one slow level per rank; the
    passive ranks serve and write their checkpoint parts): every rank exits without closing right
    after step 12 (checkpoint at 10; the worker's exit may break the passive ranks' last sync, as
    a crash does), new processes resume it and finish.  agents.pt and every row of metrics.csv and
    eval.csv equal the uninterrupted 3-rank run's bit for bit, and its agents.pt is near the
    co-located run's (a three-term sum on ranks adds in another order than co-located, and Adam
    and BatchNorm amplify that rounding over 24 steps to about 1e-10 here); a resume with
    another learning rate is refused on every rank, naming it."""
    from tests.spawn import ROOT, run_torch

    out, _, _ = runs
    worker = ROOT / "tests" / "own_loop_store_worker.py"
    whole = run_torch(3, {"out": str(tmp_path / "whole"), "ckpt": str(tmp_path / "whole-ckpt")}, timeout=120,
                      worker=worker)
    assert all(code == 0 for code, _ in whole), whole
    spec = {"out": str(tmp_path / "run"), "ckpt": str(tmp_path / "ckpt")}
    run_torch(3, {**spec, "stop": 12}, timeout=120, worker=worker)     # a crash: any exit status
    assert json.loads((tmp_path / "ckpt" / "latest.json").read_text())["t"] == 10
    results = run_torch(3, spec, timeout=120, worker=worker)
    assert all(code == 0 for code, _ in results), results
    for a, b in zip(torch.load(tmp_path / "whole" / "agents.pt"), torch.load(tmp_path / "run" / "agents.pt")):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for name, reader in (("metrics.csv", read_metrics), ("eval.csv", read_eval)):
        whole_rows, resumed = rows(tmp_path / "whole" / name, reader), rows(tmp_path / "run" / name, reader)
        assert len(whole_rows) == len(resumed) and all(same(list(a.values()), list(b.values()))
                                                       for a, b in zip(whole_rows, resumed)), name
    for a, b in zip(torch.load(out / "whole" / "agents.pt"), torch.load(tmp_path / "run" / "agents.pt")):
        for k in a:
            if a[k].is_floating_point():
                assert float((a[k] - b[k]).abs().max()) <= 1e-8 * max(1.0, float(a[k].abs().max())), k
    results = run_torch(3, {"out": str(tmp_path / "other"), "ckpt": str(tmp_path / "ckpt"), "lr": 0.02},
                        timeout=120, worker=worker)
    assert all(code == 2 for code, _ in results), results
    errors = {(tmp_path / "other" / f"error-rank{r}.txt").read_text() for r in range(3)}
    assert len(errors) == 1 and "optimizer.lr" in errors.pop()
