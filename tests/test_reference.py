"""Tests of the serial reference optimizers (agents/reference.py)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch_optimizer

from agents.reference import Lookahead, MultilayerLookahead

F64 = torch.float64


# --------------------------------------------------------------------------- helpers


def _mlp(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(5, 16, dtype=dtype), torch.nn.Tanh(), torch.nn.Linear(16, 1, dtype=dtype)
    )


def _batches(n: int, dtype: torch.dtype = torch.float32, size: int = 16) -> list:
    """``n`` random minibatches from a fixed data set: random inputs, targets from a random
    one-layer teacher plus noise (a learnable problem, so rounding differences do not blow up)."""
    gen = torch.Generator().manual_seed(1234)
    inputs = torch.randn(256, 5, generator=gen, dtype=dtype)
    teacher = torch.randn(5, 1, generator=gen, dtype=dtype)
    targets = torch.tanh(inputs @ teacher) + 0.1 * torch.randn(256, 1, generator=gen, dtype=dtype)
    batches = []
    for _ in range(n):
        index = torch.randint(0, 256, (size,), generator=gen)
        batches.append((inputs[index], targets[index]))
    return batches


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch) -> torch.Tensor:
    x, y = batch
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss


def _sgd_momentum(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2)


INNERS = {"sgd_momentum": _sgd_momentum, "adam": _adam}


def _snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------- 1. torch-optimizer


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _deviation_from_torch_optimizer(inner, k, alpha, dtype) -> float:
    """max over 199 steps of max|ours - theirs| / max|theirs| (over all parameters).

    torch_optimizer.Lookahead takes its slow copy after the first inner step and syncs after
    steps 1, 1 + k, 1 + 2k, ...; ours, constructed after one plain inner step (so slow weights =
    the parameters after that step), syncs k, 2k, ... steps later: the same trajectory, up to
    the rounding of the slow-update forms (``alpha * x + (1 - alpha) * z`` against ours,
    ``z + alpha * (x - z)``).
    """
    torch.manual_seed(0)
    model_a = _mlp(dtype)
    model_b = copy.deepcopy(model_a)
    batches = _batches(200, dtype)

    theirs = torch_optimizer.Lookahead(INNERS[inner](model_a.parameters()), k=k, alpha=alpha)
    inner_b = INNERS[inner](model_b.parameters())
    _train_step(model_a, theirs, batches[0])
    _train_step(model_b, inner_b, batches[0])
    ours = Lookahead(inner_b, k=k, alpha=alpha)

    worst = 0.0
    for batch in batches[1:]:
        _train_step(model_a, theirs, batch)
        _train_step(model_b, ours, batch)
        a, b = _flat(model_a), _flat(model_b)
        worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
    assert ours.step_count == 199
    print(f"max relative deviation vs torch_optimizer ({inner}, {k=}, {alpha=}, {dtype}):", worst)
    return worst


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_matches_torch_optimizer_lookahead_float32(inner):
    assert _deviation_from_torch_optimizer(inner, 5, 0.5, torch.float32) <= 1e-6


@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize("k, alpha", [(5, 0.5), (3, 0.8)])
def test_matches_torch_optimizer_lookahead_float64(inner, k, alpha):
    """In float64 the rounding difference is ~1e-16: a tight check of the step semantics."""
    assert _deviation_from_torch_optimizer(inner, k, alpha, F64) <= 1e-12


# --------------------------------------------------------------------------- 2. by hand

# A linear loss (g * x).sum() has the constant gradient g; with plain SGD every inner step
# subtracts u = lr * g.  All numbers below are dyadic, so every arithmetic form is exact and the
# values are compared with equality.
X0 = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
G = torch.tensor([0.5, 0.25, -1.0], dtype=F64)
LR = 0.25
U = LR * G


def _run_constant_gradient(make_opt, n_steps):
    x = torch.nn.Parameter(X0.clone())
    opt = make_opt(torch.optim.SGD([x], lr=LR))
    history = []
    for _ in range(n_steps):
        opt.zero_grad()
        (G * x).sum().backward()
        opt.step()
        slow = [opt.slow_params(l)[0].clone() for l in range(1, opt.num_levels + 1)]
        history.append((x.detach().clone(), *slow))
    return history


def test_lookahead_by_hand():
    a = 0.5
    history = _run_constant_gradient(lambda inner: Lookahead(inner, k=2, alpha=a), 6)
    # (fast, slow) after each step, from the definition: slow <- slow + a * (fast - slow) after
    # steps 2, 4, 6, then fast <- slow.
    s2 = X0 + a * ((X0 - 2 * U) - X0)                  # = X0 - 2aU
    s4 = s2 + a * ((s2 - 2 * U) - s2)                  # = X0 - 4aU
    s6 = s4 + a * ((s4 - 2 * U) - s4)                  # = X0 - 6aU
    expected = [
        (X0 - U, X0),
        (s2, s2),
        (s2 - U, s2),
        (s4, s4),
        (s4 - U, s4),
        (s6, s6),
    ]
    assert torch.equal(s6, X0 - 6 * a * U)
    for t, (got, want) in enumerate(zip(history, expected), start=1):
        for g, w in zip(got, want):
            assert torch.equal(g, w), f"step {t}: {g} != {w}"


@pytest.mark.parametrize("a1, a2", [(0.5, 0.5), (0.5, 0.25)])
def test_multilayer_by_hand(a1, a2):
    history = _run_constant_gradient(
        lambda inner: MultilayerLookahead(inner, ks=(2, 2), alphas=(a1, a2)), 8
    )
    # (fast, slow_1, slow_2) after each step.  Level 1 syncs after steps 2, 6 (L = 1) and
    # 4, 8 (L = 2, then level 2 too, and everything is set to slow_2).
    y2 = X0 + a1 * ((X0 - 2 * U) - X0)                 # step 2: slow_1
    y4 = y2 + a1 * ((y2 - 2 * U) - y2)                 # step 4: slow_1 first ...
    z4 = X0 + a2 * (y4 - X0)                           # ... then slow_2 = X0 - 4 a1 a2 U
    y6 = z4 + a1 * ((z4 - 2 * U) - z4)
    y8 = y6 + a1 * ((y6 - 2 * U) - y6)
    z8 = z4 + a2 * (y8 - z4)                           # = X0 - 8 a1 a2 U
    expected = [
        (X0 - U, X0, X0),
        (y2, y2, X0),
        (y2 - U, y2, X0),
        (z4, z4, z4),
        (z4 - U, z4, z4),
        (y6, y6, z4),
        (y6 - U, y6, z4),
        (z8, z8, z8),
    ]
    assert torch.equal(z8, X0 - 8 * a1 * a2 * U)
    for t, (got, want) in enumerate(zip(history, expected), start=1):
        for g, w in zip(got, want):
            assert torch.equal(g, w), f"step {t}: {g} != {w}"


def test_slow_update_is_bitwise_the_documented_form():
    """slow <- slow + alpha * (fast - slow), three separately rounded ops, bit for bit (random
    float32 values, where the form alpha * fast + (1 - alpha) * slow differs in the last bit)."""
    gen = torch.Generator().manual_seed(13)
    x = torch.nn.Parameter(torch.randn(1000, generator=gen))
    slow0 = x.detach().clone()
    alpha = 0.3
    inner = torch.optim.SGD([x], lr=0.7)
    captured = []  # the fast weights after the inner step, before the sync
    inner.register_step_post_hook(lambda o, args, kwargs: captured.append(x.detach().clone()))
    opt = Lookahead(inner, k=1, alpha=alpha)
    x.grad = torch.randn(1000, generator=gen)
    opt.step()
    (fast,) = captured
    expected = slow0 + alpha * (fast - slow0)
    other_form = alpha * fast + (1 - alpha) * slow0
    assert not torch.equal(expected, other_form)  # the test can tell the forms apart
    assert torch.equal(opt.slow_params(1)[0], expected)
    assert torch.equal(x.detach(), expected)


# --------------------------------------------------------------------------- 3. virtual iterate


@pytest.mark.parametrize(
    "ks, alphas", [((4,), (0.6,)), ((3, 2), (0.5, 0.7)), ((2, 2, 2), (0.8, 0.5, 0.3))]
)
def test_virtual_iterate(ks, alphas):
    """theta = a_0 x + sum_l a_l slow_l obeys theta' = theta - lr * a_0 * grad(x) exactly."""
    torch.manual_seed(3)
    model = _mlp(F64)
    lr = 0.05
    opt = MultilayerLookahead(torch.optim.SGD(model.parameters(), lr=lr), ks, alphas)
    n = len(ks)
    a = [math.prod(alphas)] + [(1 - alphas[l]) * math.prod(alphas[l + 1 :]) for l in range(n)]
    assert math.isclose(sum(a), 1.0)

    def theta():
        levels = [list(model.parameters())] + [opt.slow_params(l) for l in range(1, n + 1)]
        return [
            sum(a[l] * levels[l][i].detach() for l in range(n + 1)) for i in range(len(levels[0]))
        ]

    batches = _batches(300, F64, size=4)  # small batches: noisy gradients
    for batch in batches:
        before = theta()
        x, y = batch
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for th, th0, g in zip(theta(), before, grads):
            torch.testing.assert_close(th, th0 - lr * a[0] * g, rtol=0, atol=1e-12)
    assert opt.step_count == 300


# --------------------------------------------------------------------------- 4. checkpoints


@pytest.mark.parametrize("policy", ["maintain", "reset", "pullback"])
@pytest.mark.parametrize("inner", sorted(INNERS))
def test_state_dict_resume_mid_round_is_bitwise(policy, inner):
    batches = _batches(20)
    torch.manual_seed(5)
    model = _mlp()
    opt = Lookahead(INNERS[inner](model.parameters()), k=5, alpha=0.5, state_policy=policy)
    for batch in batches[:7]:
        _train_step(model, opt, batch)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)

    reference = []
    for batch in batches[7:]:
        _train_step(model, opt, batch)
        reference.append((_snapshot(model), [s.clone() for s in opt.slow_params(1)]))

    # A fresh model and optimizer, with a different init and a few steps of their own.
    torch.manual_seed(6)
    model2 = _mlp()
    opt2 = Lookahead(INNERS[inner](model2.parameters()), k=5, alpha=0.5, state_policy=policy)
    for batch in _batches(3)[::-1]:
        _train_step(model2, opt2, batch)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model2.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    assert opt2.step_count == 7
    assert opt2.param_groups is opt2.optimizer.param_groups

    n_params = len(list(model.parameters()))
    saved = checkpoint["opt"]["lookahead"]
    assert sorted(saved["slow_weights"]) == list(range(n_params))
    assert sorted(saved["pullback_state"]) == list(range(n_params))
    assert sorted(checkpoint["opt"]["state"]) == list(range(n_params))

    for batch, (params, slow) in zip(batches[7:], reference):
        _train_step(model2, opt2, batch)
        for p, q in zip(model2.parameters(), params):
            assert torch.equal(p, q)
        for s, q in zip(opt2.slow_params(1), slow):
            assert torch.equal(s, q)


def test_load_state_dict_copies_and_adopts_hyperparameters():
    torch.manual_seed(7)
    model = _mlp()
    opt = MultilayerLookahead(
        _adam(model.parameters()), ks=(2, 3), alphas=(0.5, 0.7), state_policy="pullback"
    )
    for batch in _batches(7):
        _train_step(model, opt, batch)
    sd = opt.state_dict()
    # state_dict is a snapshot: nothing in it aliases live tensors.
    assert sd["lookahead"]["slow_weights"][0][0].data_ptr() != opt.slow_params(1)[0].data_ptr()

    model2 = _mlp()
    opt2 = MultilayerLookahead(_adam(model2.parameters()), ks=(4, 4), alphas=(0.9, 0.9))
    opt2.load_state_dict(sd)
    assert (opt2.ks, opt2.alphas, opt2.state_policy) == ((2, 3), (0.5, 0.7), "pullback")
    assert opt2.defaults["ks"] == (2, 3)
    slow = [s.clone() for s in opt2.slow_params(2)]
    cache = [{k: t.clone() for k, t in c.items()} for c in opt2.pullback_state(1)]
    inner = {p: {k: v.clone() for k, v in s.items()} for p, s in opt2.optimizer.state.items()}
    assert all(c for c in cache)  # pullback caches came along

    # Scribble over every tensor of the given dict: the loaded optimizer must not change.
    def scribble(obj):
        if isinstance(obj, torch.Tensor):
            obj.fill_(float("nan"))
        elif isinstance(obj, dict):
            for v in obj.values():
                scribble(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                scribble(v)

    scribble(sd)
    assert all(torch.equal(a, b) for a, b in zip(opt2.slow_params(2), slow))
    for live, saved in zip(opt2.pullback_state(1), cache):
        assert all(torch.equal(live[k], t) for k, t in saved.items())
    for p, s in opt2.optimizer.state.items():
        assert all(torch.equal(v, inner[p][k]) for k, v in s.items())


def test_load_state_dict_rejects_wrong_shapes():
    model = _mlp()
    opt = Lookahead(_adam(model.parameters()))
    sd = opt.state_dict()
    sd["lookahead"]["slow_weights"][0] = [torch.zeros(1)]
    with pytest.raises(ValueError, match="shape"):
        Lookahead(_adam(_mlp().parameters())).load_state_dict(sd)


def test_lr_scheduler_and_hooks_drive_the_inner_optimizer():
    model = _mlp()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=1.0), k=2)
    assert opt.param_groups is opt.optimizer.param_groups
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(o.step_count))
    for batch in _batches(4):
        _train_step(model, opt, batch)
        scheduler.step()
    assert calls == [1, 2, 3, 4]
    assert opt.optimizer.param_groups[0]["lr"] == 0.25

    # After load_state_dict the inner optimizer has a new list; we still share it.
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert opt.param_groups is opt.optimizer.param_groups
    for batch in _batches(2):
        _train_step(model, opt, batch)
        scheduler.step()
    assert opt.optimizer.param_groups[0]["lr"] == 0.125


def test_step_returns_the_closure_loss():
    model = _mlp()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.requires_grad


# --------------------------------------------------------------------------- 5./6. state policies


def _momentum_capture(inner: torch.optim.Optimizer, key: str) -> list:
    """Record the inner state ``key`` right after every inner step, i.e. before any sync."""
    captured = []
    inner.register_step_post_hook(
        lambda o, args, kwargs: captured.append(
            [o.state[p][key].clone() for g in o.param_groups for p in g["params"]]
        )
    )
    return captured


def test_pullback_changes_the_trajectory():
    def run(policy):
        torch.manual_seed(8)
        model = _mlp(F64)
        opt = Lookahead(_sgd_momentum(model.parameters()), k=5, alpha=0.5, state_policy=policy)
        traj = []
        for batch in _batches(12, F64):
            _train_step(model, opt, batch)
            traj.append(_snapshot(model))
        return traj

    maintain, pullback = run("maintain"), run("pullback")
    for t in range(5):  # identical up to and including the first sync (state not used yet)
        assert all(torch.equal(a, b) for a, b in zip(maintain[t], pullback[t]))
    for t in range(5, 12):
        assert not all(torch.equal(a, b) for a, b in zip(maintain[t], pullback[t]))


@pytest.mark.parametrize("inner, key", [("sgd_momentum", "momentum_buffer"), ("adam", "exp_avg")])
def test_pullback_first_sync_by_hand_and_cache_is_a_copy(inner, key):
    torch.manual_seed(9)
    model = _mlp(F64)
    alpha = 0.75
    base = INNERS[inner](model.parameters())
    captured = _momentum_capture(base, key)
    opt = Lookahead(base, k=4, alpha=alpha, state_policy="pullback")
    params = list(model.parameters())
    for t, batch in enumerate(_batches(4, F64), start=1):
        _train_step(model, opt, batch)
        live = [base.state[p][key] for p in params]
        if t < 4:  # no sync: state untouched, no cache yet
            assert all(torch.equal(m, c) for m, c in zip(live, captured[-1]))
            assert all(not c for c in opt.pullback_state(1))
    # First sync, cache zero: cache <- 0 + alpha * (m - 0) = alpha * m, live <- cache.
    cache = [c[key] for c in opt.pullback_state(1)]
    for m, c, before in zip(live, cache, captured[-1]):
        assert torch.equal(m, alpha * before)
        assert torch.equal(c, alpha * before)
        assert c.data_ptr() != m.data_ptr()
    if inner == "adam":  # the step counter is not mixed
        assert all(base.state[p]["step"].item() == 4 for p in params)
    # The cache is a copy: changing the live buffer leaves it alone.
    expected = [c.clone() for c in cache]
    for m in live:
        m.add_(1.0)
    assert all(torch.equal(c, e) for c, e in zip(cache, expected))


def test_pullback_two_levels_by_hand():
    """ks = (2, 2): the momentum is mixed like the parameters, level 2 included."""
    a1, a2 = 0.5, 0.25
    x = torch.nn.Parameter(X0.clone())
    sgd = torch.optim.SGD([x], lr=LR, momentum=0.9)
    captured = _momentum_capture(sgd, "momentum_buffer")
    opt = MultilayerLookahead(sgd, ks=(2, 2), alphas=(a1, a2), state_policy="pullback")
    c1 = c2 = torch.zeros_like(X0)  # the caches start at zero
    for t in range(1, 9):
        opt.zero_grad()
        (G * x * x).sum().backward()  # a gradient that changes, so the momentum does too
        opt.step()
        (m,) = captured[-1]  # live momentum before the sync
        if t % 4 == 0:  # L = 2
            c1 = c1 + a1 * (m - c1)
            c2 = c2 + a2 * (c1 - c2)
            c1 = live = c2
        elif t % 2 == 0:  # L = 1
            c1 = live = c1 + a1 * (m - c1)
        else:
            live = m
        assert torch.equal(sgd.state[x]["momentum_buffer"], live), f"step {t}"
        if t >= 2:
            assert torch.equal(opt.pullback_state(1)[0]["momentum_buffer"], c1), f"step {t}"
            assert torch.equal(opt.pullback_state(2)[0]["momentum_buffer"], c2), f"step {t}"


def test_reset_zeroes_state_at_sync_only():
    torch.manual_seed(10)
    model = _mlp()
    adam = _adam(model.parameters())
    opt = Lookahead(adam, k=3, state_policy="reset")
    params = list(model.parameters())
    batches = _batches(4)
    for t, batch in enumerate(batches[:3], start=1):
        _train_step(model, opt, batch)
        states = [adam.state[p] for p in params]
        if t < 3:
            assert all(s["step"].item() == t for s in states)
            assert all(s["exp_avg_sq"].abs().sum() > 0 for s in states)
    for s in states:
        assert s["step"].item() == 0
        assert not s["exp_avg"].any() and not s["exp_avg_sq"].any()
    # The next step behaves like a fresh Adam from the synced weights.
    fresh_model = copy.deepcopy(model)
    fresh = _adam(fresh_model.parameters())
    _train_step(model, opt, batches[3])
    _train_step(fresh_model, fresh, batches[3])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters()))


def test_reset_zeroes_sgd_momentum():
    torch.manual_seed(11)
    model = _mlp()
    sgd = _sgd_momentum(model.parameters())
    opt = Lookahead(sgd, k=2, state_policy="reset")
    batches = _batches(2)
    _train_step(model, opt, batches[0])
    assert all(sgd.state[p]["momentum_buffer"].any() for p in model.parameters())
    _train_step(model, opt, batches[1])
    assert all(not sgd.state[p]["momentum_buffer"].any() for p in model.parameters())


# --------------------------------------------------------------------------- 7. swapping


def test_swapped_slow_weights_restores_fast_weights():
    torch.manual_seed(12)
    model = _mlp()
    opt = MultilayerLookahead(_adam(model.parameters()), ks=(2, 3), alphas=(0.5, 0.5))
    for batch in _batches(9):
        _train_step(model, opt, batch)
    fast = _snapshot(model)
    for level in (None, 1, 2):
        slow = opt.slow_params(2 if level is None else level)
        assert not all(torch.equal(f, s) for f, s in zip(fast, slow))
        with opt.swapped_slow_weights(level):
            assert all(torch.equal(p, s) for p, s in zip(model.parameters(), slow))
        assert all(torch.equal(p, f) for p, f in zip(model.parameters(), fast))

    with pytest.raises(RuntimeError, match="boom"):
        with opt.swapped_slow_weights():
            raise RuntimeError("boom")
    assert all(torch.equal(p, f) for p, f in zip(model.parameters(), fast))

    with pytest.raises(ValueError, match="level"):
        with opt.swapped_slow_weights(3):
            pass


# --------------------------------------------------------------------------- 8. bad input


def _params():
    return [torch.nn.Parameter(torch.zeros(2))]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"ks": (), "alphas": ()}, "ks"),
        ({"ks": 5, "alphas": (0.5,)}, "ks"),
        ({"ks": (5,), "alphas": ()}, "alphas"),
        ({"ks": (5, 2), "alphas": (0.5,)}, "ks and alphas"),
        ({"ks": (0,), "alphas": (0.5,)}, "ks"),
        ({"ks": (-1,), "alphas": (0.5,)}, "ks"),
        ({"ks": (True,), "alphas": (0.5,)}, "ks"),
        ({"ks": (2.0,), "alphas": (0.5,)}, "ks"),
        ({"ks": (2,), "alphas": (0.0,)}, "alphas"),
        ({"ks": (2,), "alphas": (-0.5,)}, "alphas"),
        ({"ks": (2,), "alphas": (1.5,)}, "alphas"),
        ({"ks": (2,), "alphas": (float("nan"),)}, "alphas"),
        ({"ks": (2,), "alphas": (float("inf"),)}, "alphas"),
        ({"ks": (2,), "alphas": ("0.5",)}, "alphas"),
        ({"ks": (2,), "alphas": (0.5,), "state_policy": "interpolate"}, "state_policy"),
    ],
)
def test_multilayer_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MultilayerLookahead(torch.optim.SGD(_params(), lr=0.1), **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"k": 0}, "k"),
        ({"k": True}, "k"),
        ({"k": 2.5}, "k"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.01}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"state_policy": "none"}, "state_policy"),
    ],
)
def test_lookahead_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} "):
        Lookahead(torch.optim.SGD(_params(), lr=0.1), **kwargs)


def test_rejects_non_optimizer():
    with pytest.raises(TypeError, match="optimizer"):
        Lookahead(_params())


def test_slow_params_rejects_bad_level():
    opt = Lookahead(torch.optim.SGD(_params(), lr=0.1))
    for level in (0, 2, True, 1.0):
        with pytest.raises(ValueError, match="level"):
            opt.slow_params(level)
