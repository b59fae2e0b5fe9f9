"""NaN / Inf detection co-located: at the next sync at the latest, naming agent and step,
before the bad values are mixed into other agents and before a checkpoint could replace the last
good one."""

import itertools

import pytest
import torch

import topology
from launch.engine.simulation import run_with_checkpoints
from launch.engine.store.checkpoint import Checkpointer
from launch.engine.guard.health import NonFiniteError
from launch.engine.simulation import Simulation
from tests import problems


def poisoned(at: int, value=float("nan")):
    """problems.batches(1) with batch number ``at`` (0-based) made non-finite."""
    for n, (x, y) in enumerate(problems.batches(1)):
        yield (x.clone().fill_(value), y) if n == at else (x, y)


def make_sim(data, k=5, loss_fn=problems.loss_fn, **options):
    return Simulation(problems.make_model(0), loss_fn, data, topology.lookahead(k, 0.5),
                      problems.OPTIMIZERS["adam"], **options)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_bad_parameters_detected_at_next_sync_and_checkpoint_kept(tmp_path, value):
    # Batch 7 (iteration t=7) makes agent 0's parameters non-finite.  Syncs come after iterations
    # 4, 9, ...; checkpoints every 3 iterations: t=3, 6 are good, t=9 must not be written.
    sim = make_sim(poisoned(7, value))
    checkpointer = Checkpointer(tmp_path, every=3)
    with pytest.raises(NonFiniteError) as info:
        run_with_checkpoints(sim, 30, checkpointer)
    err = info.value
    assert isinstance(err, FloatingPointError)
    assert err.agents == [0] and err.step == 9 and err.parameters == [0]
    assert "agent(s) [0]" in str(err) and "t=9" in str(err)
    # Detected before the mix: the slow agent never saw the bad values.
    assert torch.isfinite(sim.agents[1].params).all()
    assert not torch.isfinite(sim.agents[0].params).all()
    # The last good checkpoint is intact and resumes (to a finite state).
    assert checkpointer.latest_step() == 6
    assert not (tmp_path / "step-00000009").exists()
    fresh = make_sim(problems.batches(1))
    assert checkpointer.load(fresh) == 6
    fresh.run(10)
    assert all(torch.isfinite(a.params).all() for a in fresh.agents.values())


def test_non_finite_loss_with_finite_parameters_is_reported():
    # The loss is +inf at iteration 2 but its gradient is the usual one: parameters stay finite.
    counter = itertools.count()

    def loss_fn(module, batch):
        loss = problems.loss_fn(module, batch)
        return loss + (float("inf") if next(counter) == 2 else 0.0)

    sim = make_sim(problems.batches(1), loss_fn=loss_fn)
    with pytest.raises(NonFiniteError) as info:
        sim.run(10)
    assert info.value.losses == [0] and info.value.parameters == [] and info.value.step == 4
    assert "loss of agent(s) [0]" in str(info.value)


def test_passive_agent_and_several_workers_named():
    """Agent 2 of a 3-worker local-SGD schedule, and agent 1 (a slow agent) of Lookahead."""
    m = 3
    average = torch.full((m, m), 1.0 / m, dtype=torch.float64)
    schedule = topology.from_matrices([torch.eye(m, dtype=torch.float64), average])
    sim = Simulation(problems.make_model(0), problems.loss_fn,
                     lambda i: poisoned(0) if i == 2 else problems.batches(1 + i), schedule,
                     problems.OPTIMIZERS["sgd"])
    with pytest.raises(NonFiniteError) as info:
        sim.run(4)
    assert info.value.agents == [2] and info.value.step == 1

    sim = make_sim(problems.batches(1), k=2)
    sim.step()
    sim.agents[1].params[3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"parameters of agent\(s\) \[1\].*t=1"):
        sim.step()


def test_check_can_be_turned_off():
    sim = make_sim(poisoned(0), check_finite=False)
    sim.run(10)  # no error: NaN spreads to the slow agent at the sync
    assert not torch.isfinite(sim.agents[1].params).all()
    with pytest.raises(ValueError, match="check_finite must be True or False"):
        make_sim(problems.batches(1), check_finite="yes")


def test_pending_losses_are_folded_without_losing_a_nan(monkeypatch):
    """Between two rare syncs the losses are folded into max |loss|, which keeps a NaN."""
    from launch.engine.guard import finiteness

    monkeypatch.setattr(finiteness, "FOLD_LOSSES", 4)
    counter = itertools.count()

    def loss_fn(module, batch):
        return problems.loss_fn(module, batch) * (float("nan") if next(counter) == 1 else 1.0)

    sim = make_sim(problems.batches(1), k=20, loss_fn=loss_fn)
    for _ in range(12):
        sim.step()
        assert len(sim.engine.finiteness.pending[0]) <= 5
    with pytest.raises(NonFiniteError) as info:
        sim.run(10)
    assert info.value.step == 19 and 0 in info.value.losses
