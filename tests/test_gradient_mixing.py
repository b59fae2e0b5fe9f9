"""Gradient mixing Q_t beside parameter mixing P_t: validation, data_parallel, phases that chain
them, from_matrices with gradient matrices, their cost (diagnostics, the network model), the
engine's refusal until it runs them, and the serial reference run_model."""

import pytest
import torch

import topology
from agents.matrix_reference import run_model
from launch.engine.simulation import Simulation
from tests import problems
from tests.trajectories import relative_deviation, simulation_trajectory
from topology import decentralized as dec
from topology.data_parallel import gradient_plan
from topology.diagnostics import spectral_gap, vectors_sent_per_agent
from topology.network import Cluster, SimClock, all_reduce_time
from topology.validation import check_gradient_matrix, worker_identity

MEAN2 = [[0.5, 0.5], [0.5, 0.5]]


def mean_over(m, workers):
    q = torch.zeros(m, m, dtype=torch.float64)
    q[[[i] for i in workers], list(workers)] = 1.0 / len(workers)
    return q


# -- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value, message", [
    ([[1.0, 0.0], [0.0, 1.0]], "must be 3 x 3 .* got shape \\(2, 2\\)"),
    ([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], "must be zero in the rows and columns of the "
                                                          "passive agents \\[2\\] .* entry \\[2, 2\\] is 1.0"),
    ([[0.5, 0.5, 0.2], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]], "must be zero .* agents \\[2\\] .* entry \\[0, 2\\] is 0.2"),
    ([[0.5, 0.5, 0.0], [0.4, 0.5, 0.0], [0.1, 0.0, 0.0]], "must be zero .* agents \\[2\\] .* entry \\[2, 0\\] is 0.1"),
    ([[1.5, 0.5, 0.0], [-0.5, 0.5, 0.0], [0.0, 0.0, 0.0]], "must be non-negative; entry \\[1, 0\\] is -0.5"),
    ([[0.5, 0.5, 0.0], [0.4, 0.5, 0.0], [0.0, 0.0, 0.0]], "must be column-stochastic .* column 0 sums to 0.9"),
    ([[float("nan"), 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]], "must be finite; entry \\[0, 0\\] is nan"),
    ("mean", "must be a square matrix of real numbers"),
])
def test_a_gradient_matrix_is_column_stochastic_over_the_workers_and_zero_on_the_passive_agents(value, message):
    with pytest.raises(ValueError, match="^Q " + message):
        check_gradient_matrix(value, 3, (0, 1), name="Q")


def test_the_identity_and_the_mean_are_gradient_matrices():
    assert torch.equal(check_gradient_matrix(worker_identity(3, (0, 1)), 3, (0, 1)), worker_identity(3, (0, 1)))
    assert worker_identity(3, (0, 2)).diagonal().tolist() == [1.0, 0.0, 1.0]
    assert torch.equal(check_gradient_matrix(mean_over(3, (0, 1)), 3, (0, 1)), mean_over(3, (0, 1)))


# -- schedules --------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", [topology.lookahead(3, 0.5), dec.local_sgd(4, 2), dec.ring(5),
                                      topology.phases([(3, dec.local_sgd(2, 1)), (None, dec.local_sgd(2, 5))])])
def test_every_schedule_without_gradient_mixing_has_the_identity_at_every_t(schedule):
    identity = worker_identity(schedule.num_agents, schedule.workers)
    assert not schedule.mixes_gradients and schedule.gradient_sync_indices == frozenset()
    assert len(schedule.distinct_gradient_matrices) == 1
    assert all(torch.equal(schedule.gradient_matrix(t), identity) for t in range(40))
    assert schedule.gradient_cycle.length == schedule.period
    assert schedule.gradient_prefix.length == schedule.prefix_length


def test_data_parallel_mixes_every_gradient_with_the_mean_and_no_parameter():
    s = topology.data_parallel(4)
    assert s.mixes_gradients and s.workers == (0, 1, 2, 3) and s.next_sync(0) is None
    for t in (0, 1, 17, 10**15):
        assert torch.equal(s.gradient_matrix(t), torch.full((4, 4), 0.25, dtype=torch.float64))
        assert torch.equal(s.matrix(t), torch.eye(4, dtype=torch.float64))
    plan = gradient_plan(s, 0)
    assert [(b.members, b.receivers) for b in plan.blocks] == [((0, 1, 2, 3), (0, 1, 2, 3))] and not plan.mixes


def test_data_parallel_with_passive_agents_leaves_them_out():
    s = topology.data_parallel(2, passive=1)
    assert s.workers == (0, 1) and s.passive == (2,) and repr(s) == "data_parallel(2 workers, passive=1)"
    assert torch.equal(s.gradient_matrix(3), mean_over(3, (0, 1)))
    assert gradient_plan(s, 0).blocks[0].members == (0, 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_workers=0), "num_workers must be an integer >= 1; got 0"),
    (dict(num_workers=2, passive=-1), "passive must be an integer >= 0; got -1"),
    (dict(num_workers=2, passive=True), "passive must be an integer >= 0; got True"),
])
def test_data_parallel_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        topology.data_parallel(**kwargs)


def test_post_local_sgd_chains_gradient_mixing_then_parameter_mixing():
    s, tau = 5, 3
    schedule = topology.phases([(s, topology.data_parallel(2)), (None, dec.local_sgd(2, tau))])
    mean, eye = torch.tensor(MEAN2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    for t in range(s + 4 * tau):
        want_q = mean if t < s else eye
        want_p = mean if t >= s and (t - s + 1) % tau == 0 else eye
        assert torch.equal(schedule.gradient_matrix(t), want_q), t
        assert torch.equal(schedule.matrix(t), want_p), t
    assert (schedule.prefix_length, schedule.period) == (s, tau)
    assert [schedule.gradient_index(t) for t in (0, s - 1, s, 10**18)] == [0, 0, 1, 1]
    assert schedule.mixes_gradients and schedule.gradient_sync_indices == frozenset({0})
    assert [t for t in range(20) if schedule.next_sync(t) == t] == [7, 10, 13, 16, 19]


def test_phases_nest_and_cut_gradient_mixing_like_parameter_mixing():
    inner = topology.phases([(2, dec.local_sgd(2, 1)), (None, topology.data_parallel(2))])
    outer = topology.phases([(5, inner), (None, dec.local_sgd(2, 2))])
    mixing = [bool(outer.gradient_matrix(t)[0, 1]) for t in range(8)]
    assert mixing == [False, False, True, True, True, False, False, False]
    assert [outer.matrix(t)[0, 1].item() for t in range(8)] == [0.5, 0.5, 0, 0, 0, 0, 0.5, 0]


def test_phases_refuse_schedules_with_other_workers():
    with pytest.raises(ValueError, match="phases\\[1\\] must have the same agents as phases\\[0\\]: num_agents"):
        topology.phases([(3, topology.data_parallel(2)), (None, dec.lookahead_local_sgd(2, 4, 0.5))])
    # With the slow agent as a passive agent, the chain is allowed.
    chained = topology.phases([(3, topology.data_parallel(2, passive=1)), (None, dec.lookahead_local_sgd(2, 4, 0.5))])
    assert chained.gradient_matrix(2)[:, 2].tolist() == [0.0, 0.0, 0.0]


def test_from_matrices_takes_gradient_matrices_as_it_takes_matrices():
    eye, mean = torch.eye(2, dtype=torch.float64), torch.tensor(MEAN2, dtype=torch.float64)
    by_list = topology.from_matrices([eye, mean], gradient_matrices=[mean, eye])
    by_function = topology.from_matrices(lambda t: [eye, mean][t % 2], period=2,
                                         gradient_matrices=lambda t: [mean, eye][t % 2])
    for s in (by_list, by_function):
        assert [s.gradient_matrix(t)[0, 1].item() for t in range(4)] == [0.5, 0.0, 0.5, 0.0]
        assert [s.matrix(t)[0, 1].item() for t in range(4)] == [0.0, 0.5, 0.0, 0.5]


@pytest.mark.parametrize("kwargs, message", [
    (dict(gradient_matrices=[MEAN2]), "gradient_matrices must hold one matrix per matrix of matrices \\(2\\); got 1"),
    (dict(gradient_matrices=lambda t: MEAN2), "gradient_matrices must be given as matrices is"),
    (dict(gradient_matrices=[MEAN2, [[1.0, 0.0], [1.0, 0.0]]]), "gradient_matrices\\[1\\] must be column-stochastic"),
    (dict(gradient_matrices=[MEAN2, MEAN2], workers=[0]), "gradient_matrices\\[0\\] must be zero in the rows and "
                                                          "columns of the passive agents \\[1\\]"),
    (dict(gradient_matrices=[MEAN2, MEAN2], push_sum=True), "gradient mixing .* is not defined for push-sum"),
])
def test_from_matrices_refuses_bad_gradient_matrices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        topology.from_matrices([torch.eye(2), torch.tensor(MEAN2)], **kwargs)


# -- cost -------------------------------------------------------------------------------------------
def test_a_gradient_all_reduce_costs_what_a_parameter_all_reduce_costs():
    post_local = topology.phases([(4, topology.data_parallel(4)), (None, dec.local_sgd(4, 2))])
    assert vectors_sent_per_agent(topology.data_parallel(4)) == vectors_sent_per_agent(dec.local_sgd(4, 1)) == 1.5
    assert vectors_sent_per_agent(post_local) == 0.75            # the last phase's period
    assert spectral_gap(topology.data_parallel(4)) == 0.0       # Q does not mix the parameters


def test_the_clock_adds_a_gradient_all_reduce_on_every_step_with_a_q():
    cluster = Cluster(2, 2, 1.0, 4.0, 3.0, 2.0)
    clock = SimClock(topology.phases([(2, topology.data_parallel(4)), (None, dec.local_sgd(4, 3))]), cluster, 8, 0.5)
    gradient = all_reduce_time(cluster, [0, 1, 2, 3], 8)          # 2 (4 - 1) (3 + 8 / (4 x 2)) = 24
    assert gradient == 24.0
    assert [clock.advance() for _ in range(6)] == [0.5 + gradient] * 2 + [0.5, 0.5, 0.5 + gradient, 0.5]
    assert clock.gradient_time(0) == gradient and clock.gradient_time(2) == 0.0


# -- the engine -------------------------------------------------------------------------------------
def test_the_engine_refuses_gradient_mixing_until_it_runs_it():
    with pytest.raises(ValueError, match="mixes the workers' gradients .* the engine does not run gradient mixing yet"):
        Simulation(problems.make_model(0), problems.loss_fn, lambda i: problems.batches(1 + i),
                   topology.data_parallel(2), problems.OPTIMIZERS["sgd"])


# -- the serial reference ------------------------------------------------------------------------------
def reference(schedule, optimizer="sgd_momentum", steps=12):
    return run_model(schedule, problems.make_model(0), problems.OPTIMIZERS[optimizer], problems.loss_fn,
                     lambda i: problems.batches(1 + i), steps)


@pytest.mark.parametrize("schedule", [dec.local_sgd(2, 3), dec.lookahead_local_sgd(2, 3, 0.5), dec.ring(3)])
def test_the_reference_without_gradient_mixing_is_the_co_located_engine(schedule):
    ours, _ = simulation_trajectory(schedule, "sgd_momentum", "maintain", 12)
    assert relative_deviation(reference(schedule), ours) <= 1e-13


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_data_parallel_is_one_model_trained_on_the_workers_mean_loss(optimizer):
    """Every worker of data_parallel(2) steps on the mean gradient: the trajectory of one model
    whose loss is the mean of the two workers' losses (to rounding: the mean is taken of the
    gradients there, of the losses here)."""
    steps = 12
    model = problems.make_model(0)
    inner = problems.OPTIMIZERS[optimizer](list(model.parameters()))
    streams = [problems.batches(1), problems.batches(2)]
    rows = []
    for _ in range(steps):
        inner.zero_grad()
        (0.5 * sum(problems.loss_fn(model, next(s)) for s in streams)).backward()
        inner.step()
        rows.append(problems.flat_parameters(model))
    ours = reference(topology.data_parallel(2), optimizer, steps)
    assert torch.equal(ours[:, 0], ours[:, 1])
    assert relative_deviation(ours[:, 0], torch.stack(rows)) <= 1e-13
