"""Checkpoints co-located: resume mid-round bit for bit, data positions, RNG states, atomic files."""

import random

import numpy as np
import pytest
import torch

import topology
from launch.engine.store import checkpoint as ckpt_module
from launch.engine.simulation import run_with_checkpoints
from launch.engine.store.checkpoint import Checkpointer
from launch.engine.simulation import Simulation, simulate
from tests import problems

KS, ALPHAS = (3, 2), (0.5, 0.6)   # syncs after iterations 2, 5 (level 2), 8, 11 (level 2), ...
CUT = 7                           # between the syncs of iterations 5 and 8: mid-round
STEPS = 20


def noisy_loss(module, batch):
    """The regression loss plus noise from all three global RNGs (as dropout or augmentation
    would use them): a resume that does not restore them all diverges."""
    x, y = batch
    noise = 1e-2 * (torch.randn_like(y) + float(np.random.randn()) + random.random())
    return ((module(x) - y - noise) ** 2).mean()


def make_sim(dtype, optimizer, policy, data=None, seed_rngs=0):
    torch.manual_seed(seed_rngs)
    np.random.seed(seed_rngs)
    random.seed(seed_rngs)
    return Simulation(
        problems.make_model(0, dtype), noisy_loss, data if data is not None else problems.batches(1, dtype),
        topology.multilayer(KS, ALPHAS), problems.OPTIMIZERS[optimizer], state_policy=policy,
    )


def buffers(sim):
    """Every agent's whole flat buffer (parameters and state slots), cloned."""
    return torch.stack([sim.agents[i].flat.buffer.clone() for i in sorted(sim.agents)])


def record(sim, until):
    rows = []
    while sim.t < until:
        sim.step()
        rows.append(buffers(sim))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("optimizer, policy", [
    ("adam", "maintain"), ("adam", "reset"), ("adam", "pullback"), ("sgd_momentum", "pullback"),
])
def test_resume_mid_round_is_bitwise_identical(tmp_path, dtype, optimizer, policy):
    uninterrupted = record(make_sim(dtype, optimizer, policy), STEPS)

    first = make_sim(dtype, optimizer, policy)
    run_with_checkpoints(first, CUT, Checkpointer(tmp_path, every=5))   # saves at t=5 and t=7
    assert Checkpointer(tmp_path).latest_step() == CUT
    del first                                                            # "the crash"

    resumed = make_sim(dtype, optimizer, policy, seed_rngs=1234)         # a new process's RNGs
    assert Checkpointer(tmp_path).load(resumed) == CUT
    assert resumed.t == CUT
    after = record(resumed, STEPS)
    assert torch.equal(after, uninterrupted[CUT:])
    # The comparison has teeth: the run moved after the cut, through syncs of both levels.
    assert (uninterrupted[-1] - uninterrupted[CUT]).abs().max() > 1e-4


def test_resume_without_rng_states_diverges(tmp_path, monkeypatch):
    """The bitwise test above depends on the RNG states: drop them and the trajectories differ."""
    uninterrupted = record(make_sim(torch.float64, "adam", "maintain"), STEPS)
    run_with_checkpoints(make_sim(torch.float64, "adam", "maintain"), CUT, Checkpointer(tmp_path))
    monkeypatch.setattr(ckpt_module, "set_rng_state", lambda state: None)
    resumed = make_sim(torch.float64, "adam", "maintain", seed_rngs=1234)
    Checkpointer(tmp_path).load(resumed)
    assert not torch.equal(record(resumed, STEPS), uninterrupted[CUT:])


class CountingStream:
    """A stateful stream: batch n is a pure function of n; counts the batches it produced."""

    def __init__(self, dtype):
        self.position, self.produced, self.dtype = 0, 0, dtype

    def __iter__(self):
        return self

    def __next__(self):
        gen = torch.Generator().manual_seed(10_000 + self.position)
        x = torch.randn(8, 4, generator=gen, dtype=self.dtype)
        self.position += 1
        self.produced += 1
        return x, torch.tanh(x[:, :2])

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


@pytest.mark.parametrize("stateful", [True, False])
def test_data_position_restored(tmp_path, stateful):
    """With state_dict the stream jumps to its position; without it the fresh stream is advanced
    by the number of batches consumed (here: a seeded generator)."""
    def data():
        return CountingStream(torch.float64) if stateful else problems.batches(1)

    uninterrupted = record(make_sim(torch.float64, "sgd_momentum", "maintain", data()), STEPS)
    run_with_checkpoints(make_sim(torch.float64, "sgd_momentum", "maintain", data()), CUT, Checkpointer(tmp_path))
    stream = data()
    resumed = make_sim(torch.float64, "sgd_momentum", "maintain", stream, seed_rngs=5)
    Checkpointer(tmp_path).load(resumed)
    if stateful:
        assert stream.produced == 0 and stream.position == CUT      # loaded, nothing skipped
    assert resumed.agents[0].steps == CUT
    assert torch.equal(record(resumed, STEPS), uninterrupted[CUT:])


def test_simulate_resumes_from_its_checkpointer(tmp_path):
    def run(steps, checkpoint=None):
        torch.manual_seed(0)
        return simulate(problems.make_model(0), problems.loss_fn, problems.batches(1),
                        topology.multilayer(KS, ALPHAS), problems.OPTIMIZERS["adam"], steps,
                        state_policy="pullback", checkpoint=checkpoint)

    full = run(STEPS)
    run(11, Checkpointer(tmp_path, every=4))                 # saves at 4, 8 and 11 (the end)
    assert Checkpointer(tmp_path).latest_step() == 11
    resumed = run(STEPS, Checkpointer(tmp_path, every=4))     # loads t=11, runs 9 more
    assert resumed.simulation.t == STEPS
    for a, b in zip(full.parameters, resumed.parameters):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_are_atomic_and_pruned(tmp_path, monkeypatch):
    sim = make_sim(torch.float64, "adam", "pullback")
    checkpointer = Checkpointer(tmp_path, every=3, keep=2)
    run_with_checkpoints(sim, 9, checkpointer)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000006", "step-00000009"]
    assert not list(tmp_path.rglob("*.tmp"))
    good = {p.name: p.read_bytes() for p in (tmp_path / "step-00000009").iterdir()}

    # A crash while writing the next checkpoint (the disk fills up in the middle of agent 1's
    # shard): the manifest still names t=9, whose files are untouched, and no temporary is left.
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and isinstance(obj.get("agent"), dict) and obj["agent"]["index"] == 1:
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    sim.step(), sim.step(), sim.step()
    with pytest.raises(RuntimeError, match="t=12 not written"):
        checkpointer.save(sim)
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpointer.latest_step() == 9
    assert {p.name: p.read_bytes() for p in (tmp_path / "step-00000009").iterdir()} == good
    assert not list(tmp_path.rglob("*.tmp"))
    fresh = make_sim(torch.float64, "adam", "pullback")
    assert checkpointer.load(fresh) == 9


def test_load_refuses_what_does_not_fit(tmp_path):
    sim = make_sim(torch.float64, "adam", "pullback")
    run_with_checkpoints(sim, 4, Checkpointer(tmp_path))
    with pytest.raises(ValueError, match="fresh Simulation"):
        Checkpointer(tmp_path).load(sim)
    with pytest.raises(ValueError, match="state_policy"):
        Checkpointer(tmp_path).load(make_sim(torch.float64, "adam", "maintain"))
    with pytest.raises(ValueError, match="float32"):
        Checkpointer(tmp_path).load(make_sim(torch.float32, "adam", "pullback"))
    with pytest.raises(ValueError, match="no checkpoint"):
        Checkpointer(tmp_path / "empty").load(make_sim(torch.float64, "adam", "pullback"), required=True)
    with pytest.raises(ValueError, match="every must be an integer"):
        Checkpointer(tmp_path, every=0)
    (tmp_path / "step-00000004" / "agent-1.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="agent-1.pt does not match its sha256"):
        Checkpointer(tmp_path).load(make_sim(torch.float64, "adam", "pullback"))


def test_same_config_and_seed_give_identical_runs():
    """Determinism co-located (across processes and with gloo: tests/test_reliability_dist.py)."""
    runs = [record(make_sim(torch.float32, "adam", "pullback"), STEPS) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other_seed = record(make_sim(torch.float32, "adam", "pullback", seed_rngs=1), STEPS)
    assert not torch.equal(runs[0], other_seed)   # the noise does depend on the seed


@pytest.mark.parametrize("rule", ["slowmo", "adaptive"])
def test_resume_with_an_outer_optimizer_is_bitwise_identical(tmp_path, rule):
    """The outer optimizer's momentum (SlowMo) or alpha* history (adaptive) and the replicated
    anchor are part of the checkpoint."""
    from agents.adaptive import AdaptiveAlpha
    from agents.outer import OuterOptimizer

    def make(seed_rngs=0):
        torch.manual_seed(seed_rngs)
        outer = (OuterOptimizer(lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9)) if rule == "slowmo"
                 else AdaptiveAlpha(0.1))
        return Simulation(problems.make_model(0), problems.loss_fn, problems.batches(1),
                          topology.lookahead(3, 0.5), problems.OPTIMIZERS["adam"], state_policy="pullback",
                          outer=outer)

    uninterrupted = make()
    full = record(uninterrupted, STEPS)
    run_with_checkpoints(make(), CUT, Checkpointer(tmp_path))
    resumed = make(seed_rngs=9)
    Checkpointer(tmp_path).load(resumed)
    assert torch.equal(record(resumed, STEPS), full[CUT:])
    if rule == "adaptive":
        assert resumed.engine.slow_rule.history == uninterrupted.engine.slow_rule.history
    else:  # the momentum matters: without it the resumed run differs
        resumed = make()
        Checkpointer(tmp_path).load(resumed)
        resumed.engine.slow_rule.optimizer.state.clear()
        assert not torch.equal(record(resumed, STEPS), full[CUT:])
