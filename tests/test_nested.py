"""Nested Lookahead and the per-level momentum policies: by hand, serial vs co-located, gloo."""

import pytest
import torch

import topology
from agents.level_policy import NAMED, resolve_policy, state_weights
from agents.nested import NestedLookahead
from launch.engine.simulation import Simulation
from tests.spawn import run_torch
from tests.trajectories import reference_trajectory, relative_deviation, simulation_trajectory

TOL = 1e-12
KS, ALPHAS = (3, 2), (0.5, 0.7)


class Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))


def constant_gradient_loss(module, batch):
    return module.w.sum()  # dL/dw = 1 at every step


def ones():
    while True:
        yield None


# Momentum SGD, lr 1, momentum 0.5, gradient 1, k = s = 2, alpha = h = 0.5.  Derived from the
# definitions (torch SGD: buf = g at the first step, then buf = 0.5 buf + g; w -= buf):
#   steps 1, 2: buf 1, 1.5; w -1, -2.5.  Inner sync: phi = 0.5 * -2.5 = -1.25, w = -1.25.
#   With the momentum kept (m = 1.5): steps 3, 4: buf 1.75, 1.875; w -3, -4.875.  Inner + outer
#   sync: phi = -1.25 + 0.5 (-4.875 + 1.25) = -3.0625, omega = 0.5 * phi = -1.53125 = w.
# Then per policy, the momentum after the outer sync (m4) and w after step 5 (w - (0.5 m4 + 1)):
HAND = {
    # level 2 pulls back: cache_2 = 0 + 0.5 (1.875 - 0) = 0.9375.
    "pullback_outer": dict(w4=-1.53125, m4=0.9375, w5=-1.53125 - 1.46875),
    # level 2 resets: m4 = 0, so step 5 has buf = g = 1.
    "reset_outer": dict(w4=-1.53125, m4=0.0, w5=-2.53125),
    "maintain": dict(w4=-1.53125, m4=1.875, w5=-1.53125 - 1.9375),
    # level 1 pulls back at both syncs: m2 = 0.5 * 1.5 = 0.75 (cache_1 = 0.75); steps 3, 4:
    # buf 1.375, 1.6875, w -2.625, -4.3125; phi = -1.25 + 0.5 (-4.3125 + 1.25) = -2.78125,
    # omega = -1.390625; cache_1 = 0.75 + 0.5 (1.6875 - 0.75) = 1.21875, level 2 passes it.
    "pullback_inner": dict(w4=-1.390625, m4=1.21875, w5=-1.390625 - 1.609375),
    # level 1 resets at both syncs: steps 3, 4: buf 1, 1.5, w -2.25, -3.75; phi = -2.5,
    # omega = -1.25.
    "reset_inner": dict(w4=-1.25, m4=0.0, w5=-2.25),
    # pullback at both levels: m2 = 0.75 as above; at step 4 cache_1 = 1.21875 and
    # cache_2 = 0 + 0.5 (1.21875 - 0) = 0.609375; w as pullback_inner.
    "pullback_both": dict(w4=-1.390625, m4=0.609375, w5=-1.390625 - 1.3046875),
}


def momentum(opt, w):
    return float(opt.state[w]["momentum_buffer"])


@pytest.mark.parametrize("policy", HAND)
def test_nested_momentum_policies_by_hand(policy):
    expected = HAND[policy]
    # Serial reference.
    model = Scalar()
    inner = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
    opt = NestedLookahead(inner, k=2, alpha=0.5, s=2, h=0.5, state_policy=policy)
    ws = []
    for step in range(5):
        opt.zero_grad()
        constant_gradient_loss(model, None).backward()
        opt.step()
        ws.append(model.w.item())
        if step == 3:
            assert momentum(inner, model.w) == expected["m4"]
    assert ws[1] == -1.25 and ws[3] == expected["w4"] and ws[4] == expected["w5"]
    assert opt.slow_params(2)[0].item() == expected["w4"]
    # Co-located simulation: every agent.
    sim = Simulation(Scalar(), constant_gradient_loss, ones(), topology.nested(2, 0.5, 2, 0.5),
                     lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.5), state_policy=policy)
    for step in range(5):
        sim.step()
        if step == 3:
            assert [sim.agents[i].params.item() for i in range(3)] == [expected["w4"]] * 3
            fast = sim.agents[0]
            assert momentum(fast.optimizer, fast.parameters[0]) == expected["m4"]
    assert sim.agents[0].params.item() == expected["w5"]


def test_paper_algorithm_literally_equals_multilayer_la2():
    """Gilbert's loops, written out (theta <- phi at each inner cycle, omega's update after s
    inner cycles, then theta and phi <- omega), against MultilayerLookahead((k, s), (alpha, h))."""
    k, s, alpha, h, lr = 3, 2, 0.5, 0.7, 0.05
    torch.manual_seed(0)
    target = torch.randn(6, dtype=torch.float64)
    grads = [torch.randn(6, dtype=torch.float64) for _ in range(40)]

    def grad(theta, n):
        return (theta - target) + 0.1 * grads[n]

    theta = torch.zeros(6, dtype=torch.float64)
    phi, omega, n, literal = theta.clone(), theta.clone(), 0, []
    for _ in range(40 // (k * s) + 1):
        phi = omega.clone()  # theta, phi <- omega (see topology.nested)
        for _ in range(s):
            theta = phi.clone()
            for _ in range(k):
                if n == 40:
                    break
                theta = theta - lr * grad(theta, n)
                n += 1
                literal.append(theta.clone())
            if n == 40 and len(literal) % k:
                break
            phi = phi + alpha * (theta - phi)
            literal[-1] = phi.clone()
        if n == 40 and len(literal) % (k * s):
            break
        omega = omega + h * (phi - omega)
        literal[-1] = omega.clone()
        if n == 40:
            break
    w = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    opt = NestedLookahead(torch.optim.SGD([w], lr=lr), k=k, alpha=alpha, s=s, h=h)
    for step in range(40):
        opt.zero_grad()
        w.grad = grad(w.detach(), step)
        opt.step()
        assert relative_deviation(w.detach(), literal[step]) <= TOL, step




@pytest.mark.parametrize("policy", NAMED)
@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_colocated_nested_equals_serial_reference(policy, optimizer):
    steps = 120
    ref = reference_trajectory(KS, ALPHAS, optimizer, policy, steps)
    sim, _ = simulation_trajectory(topology.nested(KS[0], ALPHAS[0], KS[1], ALPHAS[1]), optimizer, policy, steps)
    assert relative_deviation(sim, ref) <= TOL


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_every_pullback_variant_changes_the_trajectory(optimizer):
    """A pullback that caches the live buffer by reference is a no-op (it equals maintain)."""
    base = reference_trajectory(KS, ALPHAS, optimizer, "maintain", 60)
    for policy in ("pullback_inner", "pullback_outer", "pullback_both", "reset_inner_pullback_outer"):
        run = reference_trajectory(KS, ALPHAS, optimizer, policy, 60)
        assert relative_deviation(run, base) > 1e-6, policy
    inner = reference_trajectory(KS, ALPHAS, optimizer, "pullback_inner", 60)
    outer = reference_trajectory(KS, ALPHAS, optimizer, "pullback_outer", 60)
    assert relative_deviation(inner, outer) > 1e-6


def test_state_weights_and_policy_names():
    assert resolve_policy("pullback_outer", 2) == ("maintain", "pullback")
    assert resolve_policy({2: "reset"}, 3) == ("maintain", "reset", "maintain")
    assert resolve_policy("pullback", 3) == ("pullback",) * 3
    # Every level pulling back gives the parameters' weights.
    schedule = topology.multilayer((2, 2, 2), (0.5, 0.6, 0.7))
    for level in (1, 2, 3):
        assert torch.allclose(torch.tensor(state_weights(("pullback",) * 3, schedule.alphas, level),
                                           dtype=torch.float64), schedule.level_weights(level), rtol=0, atol=1e-15)
    assert state_weights(("maintain", "pullback"), (0.5, 0.7), 2) == (0.7, 0.0, 1 - 0.7)
    assert state_weights(("reset", "maintain"), (0.5, 0.7), 2) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "policy, depth, words",
    [
        ("pull_outer", 2, "state_policy must be one of maintain, reset, pullback, reset_inner"),
        ({3: "reset"}, 2, "state_policy levels must be ints in 1..2"),
        (("reset",), 2, "state_policy must hold 2 per-level policies"),
        ({1: "wipe"}, 2, "state_policy[1] must be one of maintain, reset, pullback"),
        ("reset_inner", None, "names levels, but the schedule has none"),
        ({1: "reset"}, None, "for a schedule without levels"),
    ],
)
def test_bad_policies_are_value_errors(policy, depth, words):
    with pytest.raises(ValueError) as err:
        resolve_policy(policy, depth)
    assert words in str(err.value)


def test_nested_rejects_bad_arguments():
    with pytest.raises(ValueError, match="s must be an integer >= 1"):
        topology.nested(5, 0.5, 0, 0.5)
    with pytest.raises(ValueError, match=r"h must be a real number in \(0, 1\]"):
        NestedLookahead(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), h=1.5)


@pytest.mark.parametrize("policy", ["reset_inner_pullback_outer"])
def test_torch_gloo_nested_equals_colocated(tmp_path, policy):
    steps = 60
    spec = dict(backend="torch", ks=KS, alphas=ALPHAS, optimizer="adam", policy=policy, steps=steps,
                out=str(tmp_path))
    results = run_torch(3, spec)
    assert all(code == 0 for code, _ in results), results
    colocated, _ = simulation_trajectory(topology.multilayer(KS, ALPHAS), "adam", policy, steps)
    schedule = topology.multilayer(KS, ALPHAS)
    for rank in range(3):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert relative_deviation(saved["trajectory"][:, 0], colocated[:, rank]) <= TOL
        # One all-reduce per sync on each rank of the block, parameters and both Adam moments.
        d = colocated.shape[-1]
        for t in range(steps):
            level = schedule.level(t)
            expected = 1 if level >= rank and level > 0 else 0
            assert saved["all_reduces"][t] == expected
            assert saved["bytes"][t] == expected * 3 * d * 8


class AliasingPullback(NestedLookahead):
    """The public implementations' bug: after the pullback the cache *references* the live
    buffer (``cache = state["momentum_buffer"]``) instead of holding a copy."""

    def _sync_state(self, level, params, alphas):
        super()._sync_state(level, params, alphas)
        for i, p in enumerate(params):
            for l in range(level):
                self._cache[l][i]["momentum_buffer"] = self.optimizer.state[p]["momentum_buffer"]


def test_the_aliasing_bug_makes_pullback_a_no_op_and_the_tests_see_it():
    def trajectory(cls, policy):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
        opt = cls(torch.optim.SGD([w], lr=0.1, momentum=0.9), k=2, alpha=0.5, s=2, h=0.5, state_policy=policy)
        rows = []
        for step in range(24):
            opt.zero_grad()
            ((w - torch.arange(4.0, dtype=torch.float64)) ** 2).sum().backward()
            opt.step()
            rows.append(w.detach().clone())
        return torch.stack(rows)

    maintain = trajectory(NestedLookahead, "maintain")
    for policy in ("pullback_inner", "pullback_outer", "pullback_both"):
        # With the alias the cache moves with the live state, so "pulling back" to it does
        # nothing after the first sync of each level ...
        buggy = trajectory(AliasingPullback, policy)
        ours = trajectory(NestedLookahead, policy)
        assert relative_deviation(ours, buggy) > 1e-6, policy
    # ... and with every sync aliased from the start, pullback equals maintain exactly.
    class AlwaysAliased(AliasingPullback):
        def _pull_back(self, level, params, policies, alphas):
            for i, p in enumerate(params):
                for l in range(len(self._cache)):
                    self._cache[l][i]["momentum_buffer"] = self.optimizer.state[p]["momentum_buffer"]
            return super()._pull_back(level, params, policies, alphas)

    assert torch.equal(trajectory(AlwaysAliased, "pullback_both"), maintain)
    assert relative_deviation(trajectory(NestedLookahead, "pullback_both"), maintain) > 1e-6
