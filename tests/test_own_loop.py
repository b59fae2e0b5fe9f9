"""launch.AgentOptimizer co-located: the user's own loop around the agents equals the same loop
around the serial reference, every agent, every step (float64, <= 1e-12).

The loop (tests.own_loop_cases.train) is a plain PyTorch one: a finite DataLoader over 3 epochs,
gradient clipping, a StepLR stepped per epoch, optionally bfloat16 autocast with a GradScaler and
gradient accumulation.  Multi-process runs: tests/test_own_loop_distributed.py.
"""

import itertools

import pytest
import torch
from torch import nn

import topology
from agents.outer import OuterOptimizer
from agents.reference import MultilayerLookahead
from launch import AgentOptimizer, Simulation
from tests import own_loop_cases as cases
from tests import problems

TOL = 1e-12
#: float32 (the AMP case): the sync is one weighted sum here and a chain of differences in the
#: reference, each rounded to float32 (an ulp is 1.2e-7 relative).
TOL32 = 1e-6

LEVELS = {1: ((5,), (0.5,)), 2: ((3, 2), (0.5, 0.6)), 3: ((2, 2, 2), (0.5, 0.6, 0.7))}


def reference_run(ks, alphas, inner, policy, dtype=torch.float64, **loop):
    """The loop around MultilayerLookahead: (steps, n + 1, d) rows (fast, then slow levels) and
    the evaluations of the slow weights at every epoch's end."""
    net = cases.model(0, dtype)
    la = MultilayerLookahead(cases.INNER[inner](net.parameters()), ks, alphas, state_policy=policy)
    rows, evals = [], []

    def record():
        slow = [torch.cat([s.reshape(-1) for s in la.slow_params(l)]) for l in range(1, len(ks) + 1)]
        rows.append(torch.stack([problems.flat_parameters(net)] + slow))

    def on_epoch():
        for level in range(1, len(ks) + 1):
            with la.swapped_slow_weights(level):
                evals.append(problems.flat_parameters(net).clone())

    cases.train(net, la, cases.loader(dtype=dtype), 3, record, on_epoch=on_epoch, **loop)
    return torch.stack(rows), evals, la


def own_run(ks, alphas, inner, policy, dtype=torch.float64, **loop):
    """The same loop around a co-located AgentOptimizer: rows of every agent, the evaluations
    (level by level), the optimizer and the user's model."""
    net = cases.model(0, dtype)
    params = list(net.parameters())
    opt = AgentOptimizer(cases.INNER[inner](net.parameters()), topology.multilayer(ks, alphas), model=net,
                         state_policy=policy)
    rows, evals = [], []

    def on_epoch():
        for level in range(1, len(ks) + 1):
            with opt.evaluating(level=level):
                evals.append(problems.flat_parameters(net).clone())
                # Bit for bit the slow agent's weights: 1.0 * x_l (+ nothing).
                assert torch.equal(evals[-1], opt.local_parameters()[level])
        assert torch.equal(problems.flat_parameters(net), opt.local_parameters()[0])   # fast weights back

    cases.train(net, opt, cases.loader(dtype=dtype), 3, lambda: rows.append(cases.stack(opt.local_parameters())),
                on_epoch=on_epoch, **loop)
    assert all(p is q for p, q in zip(net.parameters(), params))      # the user's objects, in place
    return torch.stack(rows), evals, opt


def deviation(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("levels,inner,policy", [
    (1, "sgd_momentum", "maintain"), (1, "adam", "pullback"),
    (2, "sgd_momentum", "reset"), (2, "adam", "maintain"),
    (3, "sgd_momentum", "pullback"), (3, "adam", ("reset", "pullback", "maintain")),
])
def test_colocated_equals_reference(levels, inner, policy):
    ks, alphas = LEVELS[levels]
    ref, ref_evals, la = reference_run(ks, alphas, inner, policy)
    own, own_evals, opt = own_run(ks, alphas, inner, policy)
    assert own.shape == ref.shape and own.shape[0] == 45          # 15 batches x 3 epochs
    assert deviation(own, ref) <= TOL
    assert len(own_evals) == len(ref_evals) == 3 * levels
    assert max(deviation(a, b) for a, b in zip(own_evals, ref_evals)) <= TOL
    assert opt.t == la.step_count == 45
    # StepLR stepped the inner optimizer's own groups (0.7 ** 3 after three epochs).
    assert opt.optimizer.param_groups[0]["lr"] == la.optimizer.param_groups[0]["lr"]
    assert opt.param_groups is opt.optimizer.param_groups


def test_amp_and_accumulation_equal_reference():
    """bfloat16 autocast on CPU, GradScaler(enabled=False), 2 micro-batches per step: t counts
    optimizer steps (45 batches -> 22 steps ... the last odd batch is accumulated, not stepped)."""
    ks, alphas = LEVELS[2]
    scaler = lambda: torch.amp.GradScaler("cpu", enabled=False)  # noqa: E731
    loop = dict(amp=True, accumulate=2)
    ref, _, la = reference_run(ks, alphas, "adam", "maintain", torch.float32, scaler=scaler(), **loop)
    own, _, opt = own_run(ks, alphas, "adam", "maintain", torch.float32, scaler=scaler(), **loop)
    assert opt.t == la.step_count == 21 and own.shape == ref.shape
    assert deviation(own, ref) <= TOL32


def test_grad_scaler_skipped_steps_do_not_count():
    """GradScaler(enabled=True) skips opt.step() when the gradients are not finite: t stays, no
    sync, exactly as the reference's counter."""
    def run(make):
        net = cases.model(0, torch.float32)
        opt = make(net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        counts, rows = [], []
        for i, (x, y) in enumerate(cases.loader(dtype=torch.float32)):
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y) * (float("inf") if i in (3, 4, 9) else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            counts.append(opt.t if isinstance(opt, AgentOptimizer) else opt.step_count)
            rows.append(problems.flat_parameters(net).clone())
        return counts, torch.stack(rows)

    ref_counts, ref = run(lambda net, inner: MultilayerLookahead(inner, (2,), (0.5,)))
    own_counts, own = run(lambda net, inner: AgentOptimizer(inner, topology.lookahead(2, 0.5), model=net))
    assert own_counts == ref_counts and own_counts[-1] == 15 - 3
    assert deviation(own, ref) <= TOL32


def simulation_rows(schedule, inner, outer, steps):
    sim = Simulation(problems.make_model(0), problems.loss_fn, problems.batches(1), schedule,
                     problems.OPTIMIZERS[inner], outer=outer(), state_policy="pullback")
    rows = []
    for _ in range(steps):
        sim.step()
        rows.append(cases.stack(sim.local_parameters()))
    return torch.stack(rows)


@pytest.mark.parametrize("rule,inner", [("slowmo", "sgd_momentum"), ("adaptive", "adam")])
def test_slow_rules_equal_simulation(rule, inner):
    """Outer rules (SlowMo's outer SGD with momentum, adaptive alpha*) from the user's loop:
    equal to Simulation on the same data (the same inner steps, the same engine)."""
    from agents.adaptive import AdaptiveAlpha

    outer = {"slowmo": lambda: OuterOptimizer(lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.5)),
             "adaptive": lambda: AdaptiveAlpha(0.2)}[rule]
    schedule, steps = topology.lookahead(4, 0.5), 30
    net = problems.make_model(0)
    opt = AgentOptimizer(problems.OPTIMIZERS[inner](list(net.parameters())), schedule, model=net,
                         outer=outer(), state_policy="pullback")
    rows = []
    for batch in itertools.islice(problems.batches(1), steps):
        opt.zero_grad()
        problems.loss_fn(net, batch).backward()
        opt.step()
        rows.append(cases.stack(opt.local_parameters()))
    assert deviation(torch.stack(rows), simulation_rows(schedule, inner, outer, steps)) <= TOL


def test_state_dict_resumes_bit_for_bit(tmp_path):
    """state_dict after 20 steps, saved and loaded into a fresh AgentOptimizer on a fresh model:
    the remaining steps are the uninterrupted run's, bit for bit (pullback: state slots too)."""
    schedule, loader = topology.multilayer((3, 2), (0.5, 0.6)), cases.loader()
    data = [batch for _ in range(2) for batch in loader]         # two epochs: 30 batches

    def build():
        net = cases.model(0)
        return net, AgentOptimizer(cases.INNER["adam"](net.parameters()), schedule, model=net,
                                   state_policy="pullback")

    def steps(net, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()

    net, opt = build()
    steps(net, opt, data[:20])
    torch.save(opt.state_dict(), tmp_path / "state.pt")
    steps(net, opt, data[20:])
    net2, opt2 = build()
    opt2.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert opt2.t == 20
    steps(net2, opt2, data[20:])
    for i in opt.agents:
        assert torch.equal(opt.agents[i].flat.buffer, opt2.agents[i].flat.buffer)
    assert torch.equal(problems.flat_parameters(net), problems.flat_parameters(net2))
    with pytest.raises(ValueError, match="before the first step"):
        opt2.load_state_dict(opt.state_dict())


def test_frozen_parameters_are_left_alone():
    """Parameters that the inner optimizer does not hold are not the agents': untouched."""
    net = problems.make_model(0)
    frozen = net[0].weight.detach().clone()
    opt = AgentOptimizer(torch.optim.SGD(list(net[0:1].parameters())[1:] + list(net[2].parameters()), lr=0.1),
                         topology.lookahead(2, 0.5), model=net)
    for batch in [next(problems.batches(1))] * 4:
        opt.zero_grad()
        problems.loss_fn(net, batch).backward()
        opt.step()
    assert torch.equal(net[0].weight, frozen) and opt.agents[0].flat.numel == 44 - 24
    assert opt.engine.parameter_names == ["0.bias", "2.weight", "2.bias"]


def test_refusals_colocated():
    net = problems.make_model(0)
    la = topology.lookahead(2, 0.5)
    with pytest.raises(ValueError, match="one dtype and one device"):
        mixed = problems.make_model(0)
        mixed[2].float()
        AgentOptimizer(torch.optim.SGD(mixed.parameters(), lr=0.1), la, model=mixed)
    with pytest.raises(ValueError, match="not parameters of model"):
        AgentOptimizer(torch.optim.SGD(list(net.parameters()) + [nn.Parameter(torch.zeros(2))], lr=0.1), la,
                       model=net)
    opt = AgentOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), la, model=net)
    with pytest.raises(ValueError, match="add_param_group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))]})
    with pytest.raises(ValueError, match="level must be an int in 1..1"):
        with opt.evaluating(level=2):
            pass
    with pytest.raises(ValueError, match="at most one of"):
        with opt.evaluating(level=1, virtual=True):
            pass
    with pytest.raises(RuntimeError, match="serve"):
        opt.serve()
    opt.optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))]})
    with pytest.raises(ValueError, match="added to the inner optimizer"):
        opt.step()
    opt.close()
    with pytest.raises(RuntimeError, match="closed"):
        opt.step()


def test_evaluation_restores_on_exception_and_virtual_iterate():
    net = problems.make_model(0)
    schedule = topology.multilayer((2, 2), (0.5, 0.6))
    opt = AgentOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), schedule, model=net)
    data = problems.batches(1)
    for _ in range(3):
        opt.zero_grad()
        problems.loss_fn(net, next(data)).backward()
        opt.step()
    fast = problems.flat_parameters(net).clone()
    with pytest.raises(KeyError):
        with opt.evaluating():          # default: the outermost level
            assert torch.equal(problems.flat_parameters(net), opt.local_parameters()[2])
            raise KeyError("inside")
    assert torch.equal(problems.flat_parameters(net), fast)
    a = schedule.consensus()
    expected = sum(float(a[i]) * x for i, x in opt.local_parameters().items())
    with opt.evaluating(virtual=True):
        assert deviation(problems.flat_parameters(net), expected) <= TOL


def test_groups_are_created_once_by_every_rank():
    """A second program on the same communicator creates no group again, on members and
    non-members alike (a non-member creating one alone would wait for the members forever)."""
    from launch.comm.base import Communicator

    class Recording(Communicator):
        rank, world_size = 2, 3

        def __init__(self):
            super().__init__()
            self.created = []

        def _new_group(self, ranks):
            self.created.append(ranks)

    comm = Recording()
    comm.init_groups([(0, 1), (0, 1, 2)])
    comm.init_groups([(0, 1), (1, 2)])
    assert comm.created == [(0, 1), (1, 2)]


def test_finiteness_check_stops_at_the_next_sync():
    """NaN in the user's model: the finiteness check raises NonFiniteError at the next sync
    (not before: identity steps check nothing), naming the worker and the iteration."""
    from launch.engine.guard.health import NonFiniteError

    net = problems.make_model(0)
    opt = AgentOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), topology.lookahead(3, 0.5), model=net)
    data = problems.batches(1)
    with torch.no_grad():
        net[2].bias[0] = float("nan")
    for _ in range(2):
        opt.zero_grad()
        problems.loss_fn(net, next(data)).backward()
        opt.step()
    with pytest.raises(NonFiniteError, match=r"agent\(s\) \[0\].*t=2"):
        opt.zero_grad()
        problems.loss_fn(net, next(data)).backward()
        opt.step()
