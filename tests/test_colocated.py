"""Co-located simulation against the serial references, every agent at every step, float64."""

import pytest
import torch

import topology
from launch.engine.simulation import Simulation, simulate
from tests import problems
from tests.trajectories import reference_trajectory, relative_deviation, simulation_trajectory

STEPS = 300
TOL = 1e-12
LEVELS = {"LA-1": (5,), "LA-2": (3, 2), "LA-3": (2, 2, 2)}


def alphas_for(ks):
    return [0.5 + 0.1 * i for i in range(len(ks))]


@pytest.mark.parametrize("name", LEVELS)
@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("policy", ["maintain", "reset", "pullback"])
def test_colocated_equals_serial_reference(name, optimizer, policy):
    ks = LEVELS[name]
    ref = reference_trajectory(ks, alphas_for(ks), optimizer, policy, STEPS)
    sim, agents = simulation_trajectory(topology.multilayer(ks, alphas_for(ks)), optimizer, policy, STEPS)
    assert agents == list(range(len(ks) + 1))
    assert sim.shape == ref.shape == (STEPS, len(ks) + 1, 44)
    deviation = relative_deviation(sim, ref)
    print(f"max deviation co-located vs serial {name} {optimizer} {policy}: {deviation:.3e}")
    assert deviation <= TOL
    # The check has teeth: the trajectory moved, and every slow agent was synced.
    assert (ref[-1] - ref[0]).abs().max() > 1e-3
    assert ((ref[1:, 1:] - ref[:-1, 1:]).abs().amax(dim=(0, 2)) > 0).all()


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_state_policies_give_different_trajectories(optimizer):
    """Each policy changes the run (so the equivalence above tests three different things)."""
    runs = {
        policy: simulation_trajectory(topology.multilayer((3, 2), (0.5, 0.6)), optimizer, policy, 60)[0]
        for policy in ("maintain", "reset", "pullback")
    }
    assert relative_deviation(runs["reset"], runs["maintain"]) > 1e-6
    assert relative_deviation(runs["pullback"], runs["maintain"]) > 1e-6
    assert relative_deviation(runs["pullback"], runs["reset"]) > 1e-6


@pytest.mark.parametrize("ks", LEVELS.values(), ids=list(LEVELS))
def test_virtual_iterate_follows_sgd_with_scaled_step(ks):
    """theta_t = X_t a obeys theta_{t+1} = theta_t - lr * a_0 * g(x_t) (Wang eq. 8)."""
    schedule = topology.multilayer(ks, alphas_for(ks))
    a = schedule.consensus()
    lr = 0.05
    sim = Simulation(problems.make_model(0), problems.loss_fn, problems.batches(1), schedule,
                     problems.OPTIMIZERS["sgd"])
    fast = sim.agents[0]
    theta = torch.stack([sim.agents[i].params for i in range(schedule.num_agents)], 1) @ a
    worst = 0.0
    for _ in range(STEPS):
        sim.step()
        grad = torch.cat([p.grad.reshape(-1) for p in fast.parameters])  # g(x_t), at x_t
        new_theta = torch.stack([sim.agents[i].params for i in range(schedule.num_agents)], 1) @ a
        expected = theta - lr * a[0] * grad
        worst = max(worst, float((new_theta - expected).abs().max() / theta.abs().max()))
        theta = new_theta
    print(f"max deviation of the virtual iterate {ks}: {worst:.3e}")
    assert worst <= TOL


def gossip_matrices(m: int):
    """A time-varying schedule mixing blocks, gossip columns (with snapshots) and identity."""
    ring = torch.zeros(m, m, dtype=torch.float64)
    for j in range(m):
        ring[j, j] = 0.5
        ring[(j + 1) % m, j] = 0.3
        ring[(j - 1) % m, j] = 0.2
    partial = torch.eye(m, dtype=torch.float64)
    partial[:, 0] = partial[:, 2] = torch.tensor([0.25, 0.25, 0.5] + [0.0] * (m - 3), dtype=torch.float64)
    partial[:, 3] = torch.tensor([0.0, 0.6, 0.0, 0.4] + [0.0] * (m - 4), dtype=torch.float64)
    return [torch.eye(m, dtype=torch.float64), ring, partial]


def test_general_schedules_apply_x_times_p_every_step():
    """Blocks, gossip mixes and snapshots together: each sync equals X P_t computed densely."""
    m = 5
    schedule = topology.from_matrices(gossip_matrices(m))
    sim = Simulation(problems.make_model(0), problems.loss_fn, lambda i: problems.batches(1 + i), schedule,
                     problems.OPTIMIZERS["sgd_momentum"])
    for t in range(12):
        for agent in sim.agents.values():
            agent.inner_step(problems.loss_fn)
        before = torch.stack([sim.agents[i].params.clone() for i in range(m)], 1)
        sim.engine.sync(t)
        after = torch.stack([sim.agents[i].params for i in range(m)], 1)
        assert (after - before @ schedule.matrix(t)).abs().max() <= TOL * before.abs().max()


def test_initial_columns_are_equal_and_the_users_model_is_untouched():
    model = problems.make_model(3)
    before = problems.flat_parameters(model).clone()
    result = simulate(model, problems.loss_fn, problems.batches(1), topology.lookahead(3, 0.5),
                      problems.OPTIMIZERS["sgd"], steps=0)
    assert torch.equal(problems.flat_parameters(model), before)
    for agent in result.parameters:
        assert torch.equal(torch.cat([v.reshape(-1) for v in agent.values()]), before)


def test_simulate_returns_every_agents_named_parameters():
    result = simulate(problems.make_model(0), problems.loss_fn, problems.batches(1),
                      topology.multilayer((2, 2), (0.5, 0.5)), problems.OPTIMIZERS["adam"], steps=7)
    assert len(result.parameters) == 3
    assert list(result.parameters[2]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert set(result.losses) == {0}
    ref = reference_trajectory((2, 2), (0.5, 0.5), "adam", "maintain", 7)[-1]
    for i, params in enumerate(result.parameters):
        flat = torch.cat([v.reshape(-1) for v in params.values()])
        assert relative_deviation(flat, ref[i]) <= TOL


def test_pullback_mixes_the_live_state_not_a_copy():
    """After a pullback sync the optimizer's live momentum is the mixed value (alpha * m at the
    first sync, the slow agent's cache being zero) and keeps evolving from there."""
    sim = Simulation(problems.make_model(0), problems.loss_fn, problems.batches(1), topology.lookahead(3, 0.5),
                     problems.OPTIMIZERS["sgd_momentum"], state_policy="pullback")
    fast = sim.agents[0]
    for t in range(2):
        sim.step()
    fast.inner_step(problems.loss_fn)
    m_before = [fast.optimizer.state[p]["momentum_buffer"].clone() for p in fast.parameters]
    sim.engine.end_step({})      # the sync of t = 2 (its inner step was taken by hand), t <- 3
    for p, m in zip(fast.parameters, m_before):
        assert torch.equal(fast.optimizer.state[p]["momentum_buffer"], 0.5 * m)
    cache = sim.agents[1].flat.state.clone()
    assert torch.equal(cache, torch.cat([0.5 * m.reshape(-1) for m in m_before]))
    sim.step()  # the live buffer moves on; the slow agent's cached copy does not
    assert torch.equal(sim.agents[1].flat.state, cache)


# -- bad input -----------------------------------------------------------------------------------------------
def make(**overrides):
    args = dict(model=problems.make_model(0), loss_fn=problems.loss_fn, data=problems.batches(1),
                schedule=topology.lookahead(2, 0.5), optimizer=problems.OPTIMIZERS["sgd"])
    args.update(overrides)
    return Simulation(args.pop("model"), args.pop("loss_fn"), args.pop("data"), args.pop("schedule"),
                      args.pop("optimizer"), **args)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(state_policy="pull"), "state_policy must be one of maintain, reset, pullback"),
        (dict(schedule="lookahead"), "schedule must be a topology.Schedule"),
        (dict(model=torch.zeros(3)), "model must be a torch.nn.Module"),
        (dict(optimizer=3), "optimizer must be a factory"),
        (dict(agents_per_rank=1), "world size 1 does not fit the schedule's 2 agents"),
        (dict(schedule=topology.from_matrices([torch.eye(3)])), "data must be a function agent_index"),
        (dict(model=torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).double())),
         "must share one dtype"),
    ],
)
def test_simulation_rejects_bad_input(overrides, words):
    with pytest.raises(ValueError) as err:
        make(**overrides)
    assert words in str(err.value)


def test_run_rejects_bad_steps_and_reports_exhausted_data():
    sim = make(data=iter([next(problems.batches(1))]))
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        sim.run(-1)
    with pytest.raises(RuntimeError, match="data of agent 0 ran out after 1 batches"):
        sim.run(2)
