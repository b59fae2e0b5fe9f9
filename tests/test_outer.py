"""Outer optimizers (Lookahead / SlowMo / DiLoCo) and adaptive alpha: by hand, serial vs
co-located vs gloo, every agent at every step, float64."""

import pytest
import torch

import topology
from agents.adaptive import AdaptiveAlpha, AdaptiveLookahead, adaptive_alpha
from agents.outer import OuterLookahead, OuterOptimizer
from launch.engine.simulation import Simulation
from tests.spawn import run_torch
from tests.trajectories import reference_trajectory, relative_deviation, simulation_trajectory

TOL = 1e-12
K, ALPHA = 5, 0.5
OUTERS = {
    "sgd": dict(lr=ALPHA),
    "slowmo": dict(lr=0.7, momentum=0.6),
    "diloco": dict(lr=0.7, momentum=0.9, nesterov=True),
}


def sgd_factory(kwargs):
    return lambda params: torch.optim.SGD(params, **kwargs)


class Vector(torch.nn.Module):
    def __init__(self, values):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))


def ones():
    while True:
        yield None


def run_by_hand(make_reference, sim_options, loss, values, inner, steps):
    """The fast weights after each step, serially and co-located (every agent)."""
    model = Vector(values)
    opt = make_reference(inner([model.w]))
    serial = []
    for _ in range(steps):
        opt.zero_grad()
        loss(model, None).backward()
        opt.step()
        serial.append(model.w.detach().clone())
    sim = Simulation(Vector(values), loss, ones(), topology.lookahead(2, ALPHA), inner, **sim_options)
    colocated = []
    for _ in range(steps):
        sim.step()
        colocated.append([sim.agents[i].params.clone() for i in range(2)])
    return opt, serial, colocated, sim


# Inner SGD lr 1 on a constant gradient 1, k = 2: the fast weights lose 2 per cycle.  By hand:
#   sync 1: fast -2, slow 0, pseudo-gradient g1 = 0 - (-2) = 2;
#   sync 2: fast = s1 - 2, g2 = 2 again.
# torch SGD: buf_1 = g1, buf_2 = momentum * buf_1 + g2; step = buf (heavy ball) or
# g + momentum * buf (Nesterov); s <- s - lr * step.
HAND = {
    # plain: s1 = 0 - 0.5 * 2 = -1, s2 = -1 - 0.5 * 2 = -2  (Lookahead with alpha = 0.5)
    "sgd": (dict(lr=0.5), -1.0, -2.0),
    # SlowMo: s1 = -0.5 * 2 = -1; buf_2 = 0.5 * 2 + 2 = 3, s2 = -1 - 1.5 = -2.5
    "slowmo": (dict(lr=0.5, momentum=0.5), -1.0, -2.5),
    # DiLoCo: s1 = -0.5 * (2 + 0.5 * 2) = -1.5; buf_2 = 3, s2 = -1.5 - 0.5 * (2 + 1.5) = -3.25
    "diloco": (dict(lr=0.5, momentum=0.5, nesterov=True), -1.5, -3.25),
}


@pytest.mark.parametrize("name", HAND)
def test_outer_optimizers_by_hand(name):
    kwargs, s1, s2 = HAND[name]
    inner = lambda p: torch.optim.SGD(p, lr=1.0)  # noqa: E731
    _, serial, colocated, _ = run_by_hand(
        lambda o: OuterLookahead(o, k=2, outer=sgd_factory(kwargs), alpha=ALPHA),
        dict(outer=OuterOptimizer(sgd_factory(kwargs))), lambda m, b: m.w.sum(), [0.0], inner, 4)
    assert [float(w) for w in serial] == [-1.0, s1, s1 - 1.0, s2]
    assert [[float(x) for x in row] for row in colocated] == [
        [-1.0, 0.0], [s1, s1], [s1 - 1.0, s1], [s2, s2]]


def test_adaptive_alpha_by_hand():
    """Adam with betas (0, 0) and eps 0 is sign descent with F = g^2 (bias corrections are 1).
    L = w1^2 + w2^2 from (1, 0.25), lr 0.75, k = 3:
      w1: 1 -> 0.25 -> -0.5 -> 0.25   (gradients 2, 0.5, -1)
      w2: 0.25 -> -0.5 -> 0.25 -> -0.5  (gradients 0.5, -1, 0.5)
    delta = slow - fast = (0.75, 0.75); last gradient g = (-1, 0.5); F = (1, 0.25);
    g.delta = -0.375; delta F delta = 0.5625 + 0.140625 = 0.703125;
    alpha* = 1 - 0.375 / 0.703125 (in (alpha_low, 1)); slow <- slow + alpha* (fast - slow)."""
    alpha = 1.0 + (-0.375) / 0.703125
    expected = [1.0 + alpha * (0.25 - 1.0), 0.25 + alpha * (-0.5 - 0.25)]
    inner = lambda p: torch.optim.Adam(p, lr=0.75, betas=(0.0, 0.0), eps=0.0)  # noqa: E731
    loss = lambda m, b: (m.w ** 2).sum()  # noqa: E731
    model = Vector([1.0, 0.25])
    opt = AdaptiveLookahead(inner([model.w]), k=3, alpha_low=0.1)
    sim = Simulation(Vector([1.0, 0.25]), loss, ones(), topology.lookahead(3, 0.5), inner,
                     outer=AdaptiveAlpha(0.1))
    for step in range(3):
        opt.zero_grad()
        loss(model, None).backward()
        opt.step()
        sim.step()
    assert opt.alphas_used == [alpha] and sim.engine.slow_rule.history == [alpha]
    assert model.w.tolist() == expected
    for i in range(2):
        assert sim.agents[i].params.tolist() == expected
    # Clipping: alpha* below alpha_low is raised to it; a zero denominator gives 1.
    v = torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert adaptive_alpha(v, 2 * v, -v, v, 0.3) == 0.3
    assert adaptive_alpha(v, v, v, v, 0.3) == 1.0


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("policy", ["maintain", "reset", "pullback"])
def test_outer_sgd_with_lr_alpha_is_lookahead_bit_for_bit(optimizer, policy):
    steps = 100
    ref = reference_trajectory((K,), (ALPHA,), optimizer, policy, steps)
    outer_ref = reference_trajectory((K,), (ALPHA,), optimizer, policy, steps, wrap=lambda inner: OuterLookahead(
        inner, k=K, outer=sgd_factory(OUTERS["sgd"]), alpha=ALPHA, state_policy=policy))
    sim, _ = simulation_trajectory(topology.lookahead(K, ALPHA), optimizer, policy, steps,
                                   outer=OuterOptimizer(sgd_factory(OUTERS["sgd"])))
    # Bit for bit on this machine (torch's SGD step does not fuse the multiply-add here); the
    # claim that must hold anywhere is the 1e-12 bound.
    assert relative_deviation(sim, ref) <= TOL and relative_deviation(outer_ref, ref) <= TOL
    assert torch.equal(sim, ref) and torch.equal(outer_ref, ref)


@pytest.mark.parametrize("name", ["slowmo", "diloco"])
@pytest.mark.parametrize("policy", ["maintain", "pullback"])
def test_colocated_outer_equals_serial_reference(name, policy):
    steps = 100
    ref = reference_trajectory((K,), (ALPHA,), "adam", policy, steps, wrap=lambda inner: OuterLookahead(
        inner, k=K, outer=sgd_factory(OUTERS[name]), alpha=ALPHA, state_policy=policy))
    sim, _ = simulation_trajectory(topology.lookahead(K, ALPHA), "adam", policy, steps,
                                   outer=OuterOptimizer(sgd_factory(OUTERS[name])))
    plain = reference_trajectory((K,), (ALPHA,), "adam", policy, steps)
    assert relative_deviation(sim, ref) <= TOL
    assert relative_deviation(ref, plain) > 1e-4  # momentum changes the run


@pytest.mark.parametrize("policy", ["maintain", "pullback"])
def test_colocated_adaptive_equals_serial_reference(policy):
    steps = 150
    ref = reference_trajectory((K,), (ALPHA,), "adam_fast", policy, steps, wrap=lambda inner: AdaptiveLookahead(
        inner, k=K, alpha_low=0.1, state_policy=policy))
    rule = AdaptiveAlpha(0.1)
    sim, _ = simulation_trajectory(topology.lookahead(K, ALPHA), "adam_fast", policy, steps, outer=rule)
    assert relative_deviation(sim, ref) <= TOL
    # alpha* took values below 1 and at the upper clip: the test has teeth.
    assert any(a < 1.0 for a in rule.history) and 1.0 in rule.history
    assert any(0.1 < a < 1.0 for a in rule.history) or policy == "pullback"
    assert len(rule.history) == steps // K


def test_adaptive_rejects_an_optimizer_without_second_moment():
    with pytest.raises(ValueError, match="adaptive alpha needs an inner optimizer with a second-moment"):
        simulation_trajectory(topology.lookahead(K, ALPHA), "sgd_momentum", "maintain", 1, outer=AdaptiveAlpha(0.1))
    with pytest.raises(ValueError, match=r"alpha_low must be a real number in \(0, 1\]"):
        AdaptiveAlpha(0.0)


@pytest.mark.parametrize(
    "schedule, words",
    [
        (topology.multilayer((2, 2), (0.5, 0.5)), "exactly one passive"),
        (topology.from_matrices([torch.eye(2)], workers=[0]), None),
    ],
)
def test_outer_rejects_schedules_without_one_slow_agent(schedule, words):
    outer = OuterOptimizer(sgd_factory(OUTERS["sgd"]))
    if words is None:  # the identity schedule never syncs: accepted, nothing moves the slow agent
        simulation_trajectory(schedule, "sgd", "maintain", 3, outer=outer)
        return
    with pytest.raises(ValueError, match=words):
        simulation_trajectory(schedule, "sgd", "maintain", 1, outer=outer)


def test_multi_worker_diloco_colocated_keeps_every_agent_equal_after_a_sync():
    schedule = topology.with_slow_agent(2, k=4, alpha=0.5)
    sim, _ = simulation_trajectory(schedule, "adam", "maintain", 20,
                                   outer=OuterOptimizer(sgd_factory(OUTERS["diloco"])))
    for t in range(3, 20, 4):
        assert torch.equal(sim[t, 0], sim[t, 2]) and torch.equal(sim[t, 1], sim[t, 2])
    assert not torch.equal(sim[4, 0], sim[4, 1])  # the workers read different data


CASES = {
    "adaptive": dict(nprocs=2, outer={"adaptive": 0.1}, optimizer="adam_fast", policy="pullback", extra=1),
    "diloco_2_workers": dict(nprocs=3, outer={"sgd": OUTERS["diloco"]}, optimizer="adam", policy="maintain", extra=0),
}


@pytest.mark.parametrize("case", CASES)
def test_torch_gloo_outer_equals_colocated(tmp_path, case):
    c = CASES[case]
    steps = 60
    if c["nprocs"] == 2:
        schedule = topology.lookahead(K, ALPHA)
        spec = dict(ks=[K], alphas=[ALPHA])
        outer = AdaptiveAlpha(0.1)
    else:
        schedule = topology.with_slow_agent(2, k=K, alpha=ALPHA)
        spec = dict(matrices=[p.tolist() for p in schedule.distinct_matrices[:1]] * (K - 1)
                    + [schedule.distinct_matrices[1].tolist()], workers=[0, 1])
        outer = OuterOptimizer(sgd_factory(OUTERS["diloco"]))
    spec.update(backend="torch", optimizer=c["optimizer"], policy=c["policy"], steps=steps, out=str(tmp_path),
                outer=c["outer"])
    results = run_torch(c["nprocs"], spec)
    assert all(code == 0 for code, _ in results), results
    colocated, _ = simulation_trajectory(schedule, c["optimizer"], c["policy"], steps, outer=outer)
    d = colocated.shape[-1]
    width = 3 if c["policy"] == "pullback" else 1
    for rank in range(c["nprocs"]):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert relative_deviation(saved["trajectory"][:, 0], colocated[:, rank]) <= TOL
        # One collective per sync: d numbers (x3 with Adam's moments under pullback) plus the
        # piggy-backed alpha*.  With one worker the workers' column is the worker's own, so the
        # plan is one message worker -> slow agent; with several workers one all-reduce.
        for t in range(steps):
            synced = int((t + 1) % K == 0)
            if c["nprocs"] == 2:
                assert saved["all_reduces"][t] == 0
                assert saved["sends"][t] == (synced if rank == 0 else 0)
                assert saved["bytes"][t] == (synced if rank == 0 else 0) * (width * d + c["extra"]) * 8
            else:
                assert saved["all_reduces"][t] == synced and saved["sends"][t] == 0
                assert saved["bytes"][t] == synced * (width * d + c["extra"]) * 8


def test_multi_worker_diloco_equals_a_serial_loop():
    """Two Adam workers on their own streams and a slow agent with outer Nesterov SGD, written
    serially from the definition: every K steps mixed = x_0 / 2 + x_1 / 2, slow.grad = slow -
    mixed, outer step, every agent <- slow.  Against the co-located simulator, every agent."""
    from agents.flat import load_flat_
    from tests import problems

    steps = 40
    schedule = topology.with_slow_agent(2, k=K, alpha=ALPHA)
    sim, _ = simulation_trajectory(schedule, "adam", "maintain", steps,
                                   outer=OuterOptimizer(sgd_factory(OUTERS["diloco"])))
    models = [problems.make_model(0) for _ in range(2)]
    inners = [problems.OPTIMIZERS["adam"](list(m.parameters())) for m in models]
    streams = [problems.batches(1 + i) for i in range(2)]
    slow = problems.flat_parameters(models[0]).clone()
    slow.grad = torch.zeros_like(slow)
    outer = torch.optim.SGD([slow], **OUTERS["diloco"])
    for t in range(steps):
        for m, opt, data in zip(models, inners, streams):
            opt.zero_grad()
            problems.loss_fn(m, next(data)).backward()
            opt.step()
        if (t + 1) % K == 0:
            with torch.no_grad():
                mixed = 0.5 * problems.flat_parameters(models[0]) + 0.5 * problems.flat_parameters(models[1])
                slow.grad.copy_(slow - mixed)
                outer.step()
                for m in models:
                    load_flat_(m, slow)
        serial = torch.stack([problems.flat_parameters(m) for m in models] + [slow.detach()])
        assert relative_deviation(sim[t], serial) <= TOL, t
