"""Decentralized schedules co-located: matrices, spectral gaps in closed form, Lookahead over
workers against the serial reference, push-sum, diagnostics and bad input."""

import math

import pytest
import torch

import topology
from launch.engine.readout import MetricsHook, agent_losses, consensus_distance
from launch.engine.placement import Placement
from launch.engine.simulation import Simulation
from tests import problems
from tests.trajectories import reference_trajectory, relative_deviation
from topology import decentralized as dec
from topology import graphs
from topology.diagnostics import period_product, spectral_gap

TOL = 1e-12


# -- matrices -------------------------------------------------------------------------------------
def hops(n, i, j):
    return (j - i) % n


# (schedule, doubly stochastic?, symmetric?, support(t, i, j) -> bool | None)
TOPOLOGIES = {
    "ring5-mh": (lambda: dec.ring(5), True, True, lambda t, i, j: hops(5, i, j) in (0, 1, 4)),
    "ring2-mh": (lambda: dec.ring(2), True, True, lambda t, i, j: True),
    "ring16-uniform": (lambda: dec.ring(16, "uniform"), True, True, lambda t, i, j: hops(16, i, j) in (0, 1, 15)),
    "torus3x4-mh": (lambda: dec.torus(3, 4), True, True,
                    lambda t, i, j: (i // 4 == j // 4 and hops(4, i % 4, j % 4) in (0, 1, 3))
                    or (i % 4 == j % 4 and hops(3, i // 4, j // 4) in (1, 2))),
    "torus2x3-uniform": (lambda: dec.torus(2, 3, "uniform"), True, True, None),
    "exp8-uniform": (lambda: dec.exponential(8), True, False, lambda t, i, j: hops(8, i, j) in (0, 1, 2, 4)),
    "exp6-uniform": (lambda: dec.exponential(6), True, False, lambda t, i, j: hops(6, i, j) in (0, 1, 2, 4)),
    "exp8-mh": (lambda: dec.exponential(8, "metropolis"), True, True,
                lambda t, i, j: hops(8, i, j) in (0, 1, 2, 4, 6, 7)),
    "onepeer8": (lambda: dec.one_peer_exponential(8), True, False, lambda t, i, j: hops(8, i, j) in (0, 2**t)),
    "onepeer8-mh": (lambda: dec.one_peer_exponential(8, "metropolis"), True, True,
                    lambda t, i, j: hops(8, i, j) in (0, 2**t, 8 - 2**t)),
    "ring6-every3": (lambda: dec.ring(6, every=3), True, True, None),
    "local_sgd": (lambda: dec.local_sgd(6, 4), True, True, None),
    "hierarchical": (lambda: dec.hierarchical(8, {2: 2, 3: 4, 12: 8}), True, True, None),
    "lookahead_local_sgd": (lambda: dec.lookahead_local_sgd(4, 3, 0.7, {1: 2}), False, False, None),
    "multilayer_local_sgd": (lambda: dec.multilayer_local_sgd(3, (2, 2), (0.5, 0.8)), False, False, None),
}


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_every_matrix_is_column_stochastic_and_doubly_stochastic_where_claimed(name):
    build, doubly, symmetric, support = TOPOLOGIES[name]
    s = build()
    assert not s.push_sum
    rounds_seen = 0
    for t in range(s.period):
        p = s.matrix(t)
        assert (p >= 0).all()
        assert (p.sum(0) - 1).abs().max() <= TOL  # column-stochastic: convex combinations
        if doubly:
            assert (p.sum(1) - 1).abs().max() <= TOL
        if symmetric:
            assert torch.equal(p, p.T)
        if support is not None and not torch.equal(p, torch.eye(s.num_agents, dtype=torch.float64)):
            want = torch.tensor([[support(rounds_seen, i, j) for j in range(s.num_agents)]
                                 for i in range(s.num_agents)])
            assert torch.equal(p != 0, want), (t, p)
            rounds_seen += 1
    if not doubly:  # slow agents: column- but not row-stochastic, as Lookahead's P
        assert any((s.matrix(t).sum(1) - 1).abs().max() > 1e-3 for t in range(s.period))


def test_gossip_every_tau_steps_is_identity_in_between():
    s = dec.ring(6, every=3)
    eye = torch.eye(6, dtype=torch.float64)
    assert [torch.equal(s.matrix(t), eye) for t in range(6)] == [True, True, False] * 2


def test_push_sum_matrices_are_row_stochastic_not_column_stochastic():
    g = graphs.random_directed_graph(8, 5, seed=1)
    assert not graphs.is_undirected(g)
    s = dec.push_sum(g)
    p = s.matrix(0)
    assert s.push_sum and (p >= 0).all()
    assert (p.sum(1) - 1).abs().max() <= TOL               # every agent sends out all its mass
    assert (p.sum(0) - 1).abs().max() > 0.1                # this graph is not regular
    out_degree = g.sum(1).to(torch.float64)
    assert torch.equal(p.diagonal(), 1 / (1 + out_degree))  # an equal share to itself and each out-neighbour
    with pytest.raises(ValueError, match="row-stochastic for push-sum"):
        topology.from_matrices([p.T], push_sum=True)


# -- spectral gap ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [5, 16])
def test_ring_gap_in_closed_form(n):
    # Metropolis on a ring: 1/3 on self and both neighbours; circulant eigenvalues
    # 1/3 + 2/3 cos(2 pi k / n), the second largest modulus at k = 1 (n >= 5).
    assert spectral_gap(dec.ring(n)) == pytest.approx(2 / 3 * (1 - math.cos(2 * math.pi / n)), abs=1e-12)


def test_torus_and_exponential_gaps_in_closed_form():
    # 4 x 4 torus, Metropolis: 1/5 each; eigenvalues 1/5 + 2/5 cos(2 pi a / 4) + 2/5 cos(2 pi b / 4).
    moduli = sorted((abs(0.2 + 0.4 * math.cos(math.pi * a / 2) + 0.4 * math.cos(math.pi * b / 2))
                     for a in range(4) for b in range(4)), reverse=True)
    assert spectral_gap(dec.torus(4, 4)) == pytest.approx(1 - moduli[1], abs=1e-12)
    # Static exponential graph, n = 16, uniform 1/5 on hops 0, 1, 2, 4, 8 (circulant).
    n = 16
    lam = sorted((abs(sum(complex(math.cos(2 * math.pi * k * h / n), math.sin(2 * math.pi * k * h / n))
                          for h in (0, 1, 2, 4, 8)) / 5) for k in range(n)), reverse=True)
    assert spectral_gap(dec.exponential(n)) == pytest.approx(1 - lam[1], abs=1e-12)


def test_exact_averaging_schedules_have_gap_one_and_no_mixing_gap_zero():
    # One-peer exponential on 2^k agents: the product over one period is exactly (1/n) 1 1^T.
    q = period_product(dec.one_peer_exponential(16))
    assert (q - 1 / 16).abs().max() <= 1e-15
    assert spectral_gap(dec.one_peer_exponential(16)) == 1.0
    assert spectral_gap(dec.local_sgd(4, 3)) == 1.0
    assert spectral_gap(dec.lookahead_local_sgd(4, 3, 0.5)) == 1.0
    assert spectral_gap(topology.from_matrices([torch.eye(3)])) == 0.0
    halves = torch.block_diag(torch.full((2, 2), 0.5), torch.full((2, 2), 0.5))
    assert spectral_gap(topology.from_matrices([halves])) == pytest.approx(0.0, abs=1e-12)
    # Gossip every 2 steps: the same gap per period, the square root of the rate per step.
    gap = spectral_gap(dec.ring(8))
    assert spectral_gap(dec.ring(8, every=2)) == pytest.approx(gap, abs=1e-14)
    assert spectral_gap(dec.ring(8, every=2), per_step=True) == pytest.approx(1 - (1 - gap) ** 0.5, abs=1e-14)


# -- several workers -------------------------------------------------------------------------------
def sync_only(schedule, values):
    """Set agent i to values[i] (a number), apply P_0 .. P_{T-1}, record after each sync."""
    sim = Simulation(problems.make_model(0), problems.loss_fn, lambda i: problems.batches(1 + i),
                     schedule, problems.OPTIMIZERS["sgd"])
    out = []
    for t in range(schedule.period):
        with torch.no_grad():
            for i, agent in sim.agents.items():
                agent.params.fill_(values[i])
        sim.engine.sync(t)
        out.append([sim.agents[i].params.clone() for i in range(schedule.num_agents)])
    return out


def test_lookahead_over_local_sgd_by_hand():
    # 4 workers holding 0, 1, 2, 3 and the slow agent 10: every k = 3 steps all five get
    # (1 - alpha) * 10 + alpha * 1.5; with averaging {1: 2} the pairs average at other steps.
    alpha = 0.7
    out = sync_only(dec.lookahead_local_sgd(4, 3, alpha, {1: 2}), [0.0, 1.0, 2.0, 3.0, 10.0])
    for t, values in enumerate(out):
        if t == 2:
            want = [(1 - alpha) * 10 + alpha * 1.5] * 5
        else:
            want = [0.5, 0.5, 2.5, 2.5, 10.0]
        for v, w in zip(values, want):
            assert (v - w).abs().max() <= 1e-15, (t, v[0].item(), w)


@pytest.mark.parametrize("policy, averaging", [("maintain", {1: 3}), ("pullback", {1: 3}), ("reset", None)])
def test_multilayer_over_identical_workers_equals_serial_multilayer_lookahead(policy, averaging):
    """W workers on the same data stay identical, so LA-n over them is the serial LA-n (worker
    averaging in between changes nothing then; not with ``reset``, which acts at every sync that
    touches a worker, worker averaging included)."""
    ks, alphas, steps, w = (3, 2), (0.5, 0.6), 60, 3
    ref = reference_trajectory(ks, alphas, "sgd_momentum", policy, steps)
    schedule = dec.multilayer_local_sgd(w, ks, alphas, averaging=averaging)
    sim = Simulation(problems.make_model(0), problems.loss_fn, lambda i: problems.batches(1), schedule,
                     problems.OPTIMIZERS["sgd_momentum"], state_policy=policy)
    for t in range(steps):
        sim.step()
        for i in range(w):
            assert relative_deviation(sim.agents[i].params, ref[t, 0]) <= TOL
        for level in (1, 2):
            assert relative_deviation(sim.agents[w + level - 1].params, ref[t, level]) <= TOL
    assert (ref[-1] - ref[0]).abs().max() > 1e-3


def test_virtual_iterate_of_lookahead_over_local_sgd():
    """theta = X a moves as theta - lr * sum_i a_i g_i over the workers (Wang eq. 8)."""
    schedule = dec.lookahead_local_sgd(4, 3, 0.5, {1: 2})
    a = schedule.consensus()
    assert torch.allclose(a, torch.tensor([0.125] * 4 + [0.5], dtype=torch.float64), atol=1e-14)
    sim = Simulation(problems.make_model(0), problems.loss_fn, lambda i: problems.batches(1 + i), schedule,
                     problems.OPTIMIZERS["sgd"])
    columns = lambda: torch.stack([sim.agents[i].params for i in range(5)], 1)  # noqa: E731
    theta = columns() @ a
    for _ in range(30):
        sim.step()
        grads = [torch.cat([p.grad.reshape(-1) for p in sim.agents[i].parameters]) for i in range(4)]
        new = columns() @ a
        assert (new - (theta - 0.05 * sum(a[i] * g for i, g in enumerate(grads)))).abs().max() <= TOL
        theta = new


# -- push-sum --------------------------------------------------------------------------------------
def test_push_sum_debiased_iterates_reach_the_true_average_on_a_directed_graph():
    g = graphs.random_directed_graph(8, 5, seed=1)
    start = torch.randn(8, 44, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    average = start.mean(0)

    def run(schedule, rounds=400):
        sim = Simulation(problems.make_model(0), problems.loss_fn, lambda i: problems.batches(1 + i),
                         schedule, problems.OPTIMIZERS["sgd"])
        with torch.no_grad():
            for i, agent in sim.agents.items():
                agent.params.copy_(start[i])
        for t in range(rounds):
            sim.engine.sync(t)
            if schedule.push_sum:  # the mass is conserved at every round: sum x = sum x_0, sum w = n
                assert (sum(a.params for a in sim.agents.values()) - start.sum(0)).abs().max() <= 1e-13
                assert abs(sum(float(a.push_weight) for a in sim.agents.values()) - 8) <= 1e-13
        return torch.stack([sim.agents[i].debiased() for i in range(8)])

    z = run(dec.push_sum(g))
    assert (z - average).abs().max() <= TOL * average.abs().max()
    # Teeth: the same graph with receiver-averaging (column-stochastic) weights reaches consensus
    # on a weighted average, not the average; the raw numerators of push-sum do not agree at all.
    pulled = run(topology.from_matrices([graphs.mixing_matrix(g, "uniform")]))
    assert (pulled - pulled[0]).abs().max() <= 1e-10
    assert (pulled[0] - average).abs().max() > 1e-2


def test_push_sum_gradients_are_taken_at_the_debiased_iterate():
    """SGP: x_i <- x_i - lr * grad f_i(x_i / w_i), then [x; w] <- [x; w] P; checked against a
    gradient computed independently on a fresh module holding z_i, and the mean of the
    numerators moving exactly by -lr * the mean gradient."""
    n, lr = 6, 0.05
    schedule = dec.push_sum(graphs.random_directed_graph(n, 4, seed=2))
    sim = Simulation(problems.make_model(0), problems.loss_fn, lambda i: problems.batches(1 + i), schedule,
                     problems.OPTIMIZERS["sgd"])
    streams = [problems.batches(1 + i) for i in range(n)]
    probe = problems.make_model(0)
    mean = sum(a.params for a in sim.agents.values()) / n
    for t in range(25):
        z = [sim.agents[i].debiased().clone() for i in range(n)]
        losses = sim.step()
        grads = []
        for i in range(n):
            from agents.flat import load_flat_
            load_flat_(probe, z[i])
            probe.zero_grad()
            loss = problems.loss_fn(probe, next(streams[i]))
            loss.backward()
            want = torch.cat([p.grad.reshape(-1) for p in probe.parameters()])
            got = torch.cat([p.grad.reshape(-1) for p in sim.agents[i].parameters])
            assert (got - want).abs().max() <= 1e-14 * max(1.0, float(want.abs().max()))
            assert float(losses[i]) == pytest.approx(float(loss.detach()), rel=1e-14)
            grads.append(want)
        new_mean = sum(a.params for a in sim.agents.values()) / n
        assert (new_mean - (mean - lr * sum(grads) / n)).abs().max() <= TOL * mean.abs().max()
        mean = new_mean
    weights = [float(a.push_weight) for a in sim.agents.values()]
    assert max(weights) - min(weights) > 0.05  # the weights really differ: z != x
    gathered = sim.gather_parameters()
    flat = torch.cat([v.reshape(-1) for v in gathered[2].values()])
    assert torch.equal(flat, sim.agents[2].debiased())


# -- diagnostics -----------------------------------------------------------------------------------
def test_consensus_distance_and_metrics_hook():
    schedule = dec.local_sgd(4, 3)
    sim = Simulation(problems.make_model(0), problems.loss_fn, lambda i: problems.batches(1 + i), schedule,
                     problems.OPTIMIZERS["sgd"])
    rows = []
    hook = MetricsHook(rows.append)
    for _ in range(6):
        losses = sim.step()
        hook(sim, losses)
        x = torch.stack([sim.agents[i].params for i in range(4)])
        want = float(((x - x.mean(0)) ** 2).sum(1).mean().sqrt())
        assert consensus_distance(sim) == pytest.approx(want, rel=1e-12)
        assert agent_losses(sim, losses) == {i: float(v) for i, v in losses.items()}
        assert rows[-1]["step"] == sim.t and rows[-1]["consensus_distance"] == consensus_distance(sim)
        assert [rows[-1][f"loss/agent{i}"] for i in range(4)] == [float(losses[i]) for i in range(4)]
    distances = [r["consensus_distance"] for r in rows]
    assert distances[2] <= 1e-15 and distances[5] <= 1e-15 and min(distances[0], distances[3]) > 1e-4
    assert rows[0]["spectral_gap"] == 1.0
    with pytest.raises(ValueError, match="agents must be agent indices"):
        consensus_distance(sim, [7])


# -- placement and bad input -----------------------------------------------------------------------
def test_placement_defaults_to_num_agents_over_world_size():
    assert Placement.make(64, 4).agents_per_rank == 16
    assert Placement.make(8, 1).agents_per_rank == 8
    with pytest.raises(ValueError, match="world size 3 does not fit the schedule's 64 agents"):
        Placement.make(64, 3)
    with pytest.raises(ValueError, match="agents_per_rank must be an integer >= 1"):
        Placement.make(8, 4, agents_per_rank=0)


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda: dec.ring(0), "n must be an integer >= 1"),
        (lambda: dec.ring(4, "push"), "weights must be one of metropolis, uniform"),
        (lambda: dec.torus(3, 0), "cols must be an integer >= 1"),
        (lambda: dec.exponential(8, every=0), "every must be an integer >= 1"),
        (lambda: dec.one_peer_exponential(1), "n must be at least 2"),
        (lambda: graphs.mixing_matrix(graphs.exponential_graph(8), "metropolis"), "needs an undirected graph"),
        (lambda: graphs.mixing_matrix(graphs.ring_graph(4), "max"), "weights must be one of"),
        (lambda: graphs.random_directed_graph(4, 20), "extra_edges must be at most 8"),
        (lambda: dec.push_sum(torch.ones(3, 3)), "graph must be a boolean adjacency matrix"),
        (lambda: dec.local_sgd(4, 0), "tau must be an integer >= 1"),
        (lambda: dec.local_sgd(0, 2), "num_workers must be an integer >= 1"),
        (lambda: dec.hierarchical(8, {2: 3, 4: 8}), r"period_group_sizes\[2\] must be a group size dividing"),
        (lambda: dec.hierarchical(8, {2: 2, 4: 4}), r"period_group_sizes\[4\] \(the largest period\) must be 8"),
        (lambda: dec.hierarchical(8, {}), "must name at least one"),
        (lambda: dec.hierarchical(8, [2, 8]), "must be a mapping"),
        (lambda: dec.lookahead_local_sgd(4, 3, 1.5), r"alphas\[0\] must be a real number in \(0, 1\]"),
        (lambda: dec.multilayer_local_sgd(4), "give averaging periods or slow levels"),
    ],
)
def test_bad_arguments_are_value_errors_naming_them(build, words):
    with pytest.raises(ValueError, match=words):
        build()
