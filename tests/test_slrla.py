"""SLRLA: by hand, serial (Algorithm 3 as written) vs co-located vs gloo, every agent, float64."""

import pytest
import torch

import topology
from agents.slrla import SLRLAController, Stage, proximal, slrla_reference
from launch.engine.simulation import Simulation
from tests import problems
from tests.spawn import run_torch
from tests.trajectories import relative_deviation

TOL = 1e-12
STAGES = [Stage(steps=30, lr=0.05, alpha=0.5, k=5, beta=0.1), Stage(steps=24, lr=0.02, alpha=0.8, k=3, beta=1.0),
          Stage(steps=20, lr=0.01, alpha=0.6, k=4, beta=3.0)]


def colocated(stages, optimizer, policy, model=None, loss_fn=problems.loss_fn, data=None):
    controller = SLRLAController(stages)
    sim = Simulation(model or problems.make_model(0), loss_fn, data or problems.batches(1),
                     topology.stagewise_lookahead(controller.stages), proximal(optimizer), state_policy=policy)
    controller.start(sim)
    rows = []
    for _ in range(controller.total_steps):
        sim.step()
        controller(sim)
        rows.append(torch.stack([sim.agents[i].params.clone() for i in range(2)]))
    return torch.stack(rows)


class Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))


def ones():
    while True:
        yield None


def test_slrla_by_hand():
    """F(w) = w (gradient 1), inner SGD, theta_0 = 0.
    Stage 1 (lr 1, k 2, alpha 0.5, beta 1, anchor 0): g = 1 + (w - 0):
      step 1: g 1, w -1; step 2: g 1 - 1 = 0, w -1; sync: slow = 0.5 * -1 = -0.5 = w = theta_1.
    Stage 2 (lr 0.5, k 1, alpha 0.5, beta 2, anchor -0.5): g = 1 + 2 (w + 0.5):
      step 3: g 1, w -1, sync: slow = -0.5 + 0.5 (-1 + 0.5) = -0.75 = w;
      step 4: g 1 + 2 (-0.25) = 0.5, w -1, sync: slow = -0.75 + 0.5 (-1 + 0.75) = -0.875 = w.
    Without the regularizer step 2 would reach w = -2 (slow -1)."""
    stages = [Stage(steps=2, lr=1.0, alpha=0.5, k=2, beta=1.0), Stage(steps=2, lr=0.5, alpha=0.5, k=1, beta=2.0)]
    expected = [[-1.0, 0.0], [-0.5, -0.5], [-0.75, -0.75], [-0.875, -0.875]]
    loss = lambda m, b: m.w.sum()  # noqa: E731
    sgd = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731  (lr set by each stage)
    serial = slrla_reference(Scalar(), loss, ones(), sgd, stages)
    assert serial[:, :, 0].tolist() == expected
    assert colocated(stages, sgd, "maintain", model=Scalar(), loss_fn=loss, data=ones())[:, :, 0].tolist() == expected


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("policy", ["maintain", "reset", "pullback"])
def test_colocated_slrla_equals_algorithm_3(optimizer, policy):
    ref = slrla_reference(problems.make_model(0), problems.loss_fn, problems.batches(1),
                          problems.OPTIMIZERS[optimizer], STAGES, policy)
    sim = colocated(STAGES, problems.OPTIMIZERS[optimizer], policy)
    assert relative_deviation(sim, ref) <= TOL
    # The regularizer matters: without it (beta = 0) the run differs.
    plain = [Stage(s.steps, s.lr, s.alpha, s.k, 0.0) for s in STAGES]
    assert relative_deviation(colocated(plain, problems.OPTIMIZERS[optimizer], policy), ref) > 1e-6


def test_stage_validation():
    with pytest.raises(ValueError, match="steps must be a multiple of k"):
        Stage(steps=10, lr=0.1, alpha=0.5, k=3, beta=1.0)
    with pytest.raises(ValueError, match="beta must be a finite real >= 0"):
        Stage(steps=9, lr=0.1, alpha=0.5, k=3, beta=-1.0)
    with pytest.raises(ValueError, match="SLRLA needs the optimizer factory"):
        controller = SLRLAController(STAGES)
        controller.start(Simulation(problems.make_model(0), problems.loss_fn, problems.batches(1),
                                    topology.stagewise_lookahead(STAGES), problems.OPTIMIZERS["sgd"]))


def test_torch_gloo_slrla_equals_colocated_with_only_the_lookahead_syncs(tmp_path):
    stages = [dict(steps=s.steps, lr=s.lr, alpha=s.alpha, k=s.k, beta=s.beta) for s in STAGES]
    spec = dict(backend="torch", slrla=stages, optimizer="adam", policy="pullback", steps=74, out=str(tmp_path))
    results = run_torch(2, spec)
    assert all(code == 0 for code, _ in results), results
    expected = colocated(STAGES, problems.OPTIMIZERS["adam"], "pullback")
    syncs = {t for t in range(74) if not topology.stagewise_lookahead(STAGES).matrix(t).equal(torch.eye(2, dtype=torch.float64))}
    assert len(syncs) == 6 + 8 + 5
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert relative_deviation(saved["trajectory"][:, 0], expected[:, rank]) <= TOL
        # Communication: exactly one all-reduce per Lookahead sync, nothing at stage changes.
        assert [t for t in range(74) if saved["all_reduces"][t]] == sorted(syncs)
        assert all(n <= 1 for n in saved["all_reduces"]) and not any(saved["sends"])
