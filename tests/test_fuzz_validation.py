"""Property-based tests: random invalid configurations and matrices thrown at every validator
(schedules, mixing matrices, Simulation arguments, state policies, placement).  Each must raise
ValueError with a message naming the argument; never another exception, never a hang.

1,180 examples in all (max_examples below), each bounded by hypothesis' deadline.
"""

from decimal import Decimal

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import topology
from agents.state_policy import validate_policy
from launch.engine.store.checkpoint import Checkpointer
from launch.engine.placement import Placement
from launch.engine.simulation import Simulation
from tests import problems
from topology.validation import check_mixing_matrix

# deadline: a generous bound per example (the machine is shared); it is what makes a hang fail.
FUZZ = settings(deadline=10_000, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None)

# Values that are no valid integer >= 1 / no valid alpha in (0, 1] / no valid anything.
junk = st.one_of(
    st.none(), st.text(max_size=3), st.binary(max_size=3), st.complex_numbers(allow_nan=True),
    st.just([1]), st.just({}), st.just(object()), st.just(Decimal("0.5")), st.just(np.array([1, 2])),
    st.just(torch.tensor([0.5, 0.5])), st.just(float("nan")), st.just(float("inf")),
)
bad_periods = st.one_of(
    junk, st.integers(max_value=0), st.booleans(), st.floats(allow_nan=True),
    st.just(np.int64(0)), st.just(torch.tensor(3)), st.just(2.0),
)
bad_alphas = st.one_of(
    junk, st.booleans(), st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
    st.integers(max_value=0), st.integers(min_value=2), st.just(np.float64(1.5)),
)
good_periods = st.integers(1, 5)
good_alphas = st.floats(0.01, 1.0)


def raises_value_error(fn, *words):
    """fn() raises ValueError (nothing else) whose message contains each of ``words``."""
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert message, "empty message"
    for word in words:
        assert word in message, (word, message)
    return message


# -- schedules -----------------------------------------------------------------------------------
@settings(FUZZ, max_examples=150)
@given(k=bad_periods, alpha=good_alphas)
def test_lookahead_bad_k(k, alpha):
    raises_value_error(lambda: topology.lookahead(k, alpha), "k")


@settings(FUZZ, max_examples=100)
@given(k=good_periods, alpha=bad_alphas)
def test_lookahead_bad_alpha(k, alpha):
    raises_value_error(lambda: topology.lookahead(k, alpha), "alpha")


@st.composite
def bad_levels(draw):
    n = draw(st.integers(1, 4))
    ks = draw(st.lists(good_periods, min_size=n, max_size=n))
    alphas = draw(st.lists(good_alphas, min_size=n, max_size=n))
    kind = draw(st.sampled_from(["k", "alpha", "length", "empty", "not a sequence"]))
    if kind == "k":
        i = draw(st.integers(0, n - 1))
        ks[i] = draw(bad_periods)
        return ks, alphas, f"ks[{i}]"
    if kind == "alpha":
        i = draw(st.integers(0, n - 1))
        alphas[i] = draw(bad_alphas)
        return ks, alphas, f"alphas[{i}]"
    if kind == "length":
        alphas = alphas + [0.5] * draw(st.integers(1, 2))
        return ks, alphas, "same length"
    if kind == "empty":
        return [], [], "ks"
    return draw(st.one_of(st.none(), st.integers(), st.floats())), alphas, "ks"


@settings(FUZZ, max_examples=150)
@given(case=bad_levels())
def test_multilayer_bad_levels(case):
    ks, alphas, word = case
    raises_value_error(lambda: topology.multilayer(ks, alphas), word)


# -- mixing matrices -----------------------------------------------------------------------------
@st.composite
def column_stochastic(draw, m=None):
    m = m or draw(st.integers(1, 5))
    raw = draw(st.lists(st.lists(st.floats(0.0, 1.0), min_size=m, max_size=m), min_size=m, max_size=m))
    p = torch.tensor(raw, dtype=torch.float64) + 1e-3
    return p / p.sum(0, keepdim=True)


@st.composite
def bad_matrices(draw):
    """(matrix, words the message must contain): a valid P corrupted in one known way."""
    p = draw(column_stochastic())
    m = p.shape[0]
    i, j = draw(st.integers(0, m - 1)), draw(st.integers(0, m - 1))
    kind = draw(st.sampled_from([
        "negative", "nan", "inf", "column sum", "not square", "empty", "vector", "3-d", "ragged",
        "strings", "complex", "object", "none", "huge",
    ]))
    if kind == "negative":
        p[i, j] = -draw(st.floats(1e-6, 1e6))
        return p, ["non-negative", f"[{i}, {j}]"]
    if kind in ("nan", "inf"):
        p[i, j] = float(kind) * draw(st.sampled_from([1, -1]))
        return p, ["finite", f"[{i}, {j}]"]
    if kind == "column sum":
        p[i, j] += draw(st.sampled_from([1e-9, 1e-3, 0.5, 7.0]))
        return p, ["column-stochastic", f"column {j}"]
    if kind == "not square":
        return torch.rand(m, m + draw(st.integers(1, 3)), dtype=torch.float64).tolist(), ["square"]
    if kind == "empty":
        return draw(st.sampled_from([[], [[]], torch.zeros(0, 0), np.zeros((0, 3))])), ["square"]
    if kind == "vector":
        return draw(st.sampled_from([p[0], p[0].tolist(), 1.0, torch.tensor(1.0)])), ["square"]
    if kind == "3-d":
        return p.unsqueeze(0).tolist(), ["square"]
    if kind == "ragged":
        rows = p.tolist()
        rows[i] = rows[i][:-1] + [0.1, 0.2]
        return rows, ["matrix"]
    if kind == "strings":
        rows = p.tolist()
        rows[i][j] = draw(st.sampled_from(["a", "0.5", b"1", None, [1], {}]))
        return rows, ["matrix"]
    if kind == "complex":
        imaginary = 1j * draw(st.floats(1e-3, 1.0))
        return draw(st.sampled_from([p.to(torch.complex128) + imaginary, p.numpy() + imaginary])), ["real"]
    if kind == "object":
        return np.array(p.tolist(), dtype=object).tolist() + [object()], ["matrix"]
    if kind == "none":
        return None, ["matrix"]
    rows = p.tolist()
    rows[i][j] = 10 ** 400
    return rows, ["matrix"]


@settings(FUZZ, max_examples=250)
@given(case=bad_matrices())
def test_check_mixing_matrix_rejects(case):
    matrix, words = case
    raises_value_error(lambda: check_mixing_matrix(matrix, None, name="P"), "P", *words)


@settings(FUZZ, max_examples=50)
@given(p=column_stochastic(), extra=st.integers(1, 3))
def test_check_mixing_matrix_wrong_size(p, extra):
    m = p.shape[0]
    raises_value_error(lambda: check_mixing_matrix(p, m + extra, name="P"), f"{m + extra} x {m + extra}")


@st.composite
def bad_from_matrices(draw):
    p = draw(column_stochastic())
    m = p.shape[0]
    kind = draw(st.sampled_from(["bad matrix", "period", "workers", "not a sequence", "empty", "sizes", "function"]))
    if kind == "bad matrix":
        bad, _ = draw(bad_matrices())
        return dict(matrices=[p, bad]), "matrices[1]"
    if kind == "period":
        period = draw(st.one_of(bad_periods.filter(lambda v: v is not None), st.integers(3, 9)))
        return dict(matrices=[p, p], period=period), "period"
    if kind == "workers":
        workers = draw(st.one_of(
            st.just([]), st.lists(st.integers(m, m + 5), min_size=1, max_size=3),
            st.lists(st.integers(-5, -1), min_size=1, max_size=3), st.just([0, 0]),
            st.lists(st.one_of(st.floats(), st.booleans(), st.text(max_size=2), st.just([0])), min_size=1, max_size=3),
            st.integers(), st.none(), st.just(np.array([[0]])),
        ))
        if workers is None:
            return dict(matrices=[p], workers=object()), "workers"
        return dict(matrices=[p], workers=workers), "workers"
    if kind == "not a sequence":
        return dict(matrices=draw(st.one_of(st.integers(), st.floats(), st.none()))), "matrices"
    if kind == "empty":
        return dict(matrices=[]), "matrices"
    if kind == "sizes":
        q = torch.eye(m + 1, dtype=torch.float64)
        return dict(matrices=[p, q]), "matrices[1]"
    function = draw(st.sampled_from([lambda t: None, lambda t: "x", lambda t: [[-1.0]], lambda t: torch.eye(2) * 2]))
    return dict(matrices=function, period=draw(st.one_of(st.none(), bad_periods, st.integers(1, 4)))), "matrices"


@settings(FUZZ, max_examples=150)
@given(case=bad_from_matrices())
def test_from_matrices_rejects(case):
    kwargs, word = case
    message = raises_value_error(lambda: topology.from_matrices(**kwargs))
    assert word in message or "period" in message, (word, message)


# -- state policies, placement, checkpointer -----------------------------------------------------
@settings(FUZZ, max_examples=80)
@given(policy=st.one_of(junk, st.text(max_size=12), st.sampled_from(["Maintain", "pull back", " reset"])))
def test_validate_policy_rejects(policy):
    raises_value_error(lambda: validate_policy(policy), "state_policy")


@settings(FUZZ, max_examples=100)
@given(num_agents=st.integers(1, 8), world_size=st.integers(1, 8),
       per_rank=st.one_of(st.none(), st.integers(-3, 9), st.floats(-2, 9), st.booleans(), junk))
def test_placement_rejects_what_does_not_fit(num_agents, world_size, per_rank):
    fits = (
        isinstance(per_rank, int) and not isinstance(per_rank, bool) and per_rank >= 1
        and per_rank * world_size == num_agents
    ) or (per_rank is None and (world_size == 1 or world_size == num_agents))
    if fits:
        placement = Placement.make(num_agents, world_size, per_rank)
        assert sorted(i for r in range(world_size) for i in placement.agents_on(r)) == list(range(num_agents))
    else:
        raises_value_error(lambda: Placement.make(num_agents, world_size, per_rank))


# -- Simulation arguments ------------------------------------------------------------------------
MODEL = problems.make_model(0)


@st.composite
def bad_simulation_arguments(draw):
    kwargs = dict(model=MODEL, loss_fn=problems.loss_fn, data=problems.batches(1),
                  schedule=topology.lookahead(2, 0.5), optimizer=problems.OPTIMIZERS["sgd"])
    kind = draw(st.sampled_from([
        "model", "loss_fn", "optimizer", "schedule", "data", "state_policy", "agents_per_rank",
        "dtype", "device", "check_finite",
    ]))
    if kind in ("model", "loss_fn", "optimizer", "schedule"):
        kwargs[kind] = draw(st.one_of(st.none(), st.integers(), st.text(max_size=3), st.just([])))
        if kind == "schedule":
            kwargs[kind] = draw(st.one_of(st.just(torch.eye(2)), st.just("lookahead"), st.none()))
        return kwargs, kind
    if kind == "data":
        kwargs["data"] = draw(st.one_of(st.none(), st.integers(), st.floats()))
        return kwargs, "data"
    if kind == "state_policy":
        # ({} is a valid per-level mapping: every level "maintain")
        kwargs["state_policy"] = draw(st.one_of(junk.filter(lambda v: not isinstance(v, dict)), st.text(max_size=5)))
        return kwargs, "state_policy"
    if kind == "agents_per_rank":
        kwargs["agents_per_rank"] = draw(st.one_of(st.integers(-3, 1), st.integers(3, 9), st.floats(),
                                                   junk.filter(lambda v: v is not None)))
        return kwargs, "agents_per_rank"
    if kind == "dtype":
        kwargs["dtype"] = draw(st.one_of(
            st.sampled_from([torch.int64, torch.bool, torch.uint8, torch.complex64, torch.int8]),
            st.text(max_size=5), st.integers(), st.just(np.float64)))
        return kwargs, "dtype"
    if kind == "device":
        kwargs["device"] = draw(st.one_of(st.sampled_from(["gpu", "cuda:99", "tpu", "cpu:x", ""]), st.integers(-5, -1), st.just([])))
        return kwargs, "device"
    kwargs["check_finite"] = draw(st.one_of(st.integers(), st.text(max_size=2), st.none()))
    return kwargs, "check_finite"


@settings(FUZZ, max_examples=120)
@given(case=bad_simulation_arguments())
def test_simulation_rejects_bad_arguments(case):
    kwargs, word = case
    raises_value_error(lambda: Simulation(**kwargs), word)


@pytest.fixture(scope="module")
def sim():
    return Simulation(MODEL, problems.loss_fn, problems.batches(1), topology.lookahead(2, 0.5),
                      problems.OPTIMIZERS["sgd"])


@settings(FUZZ, max_examples=30)
@given(steps=st.one_of(st.integers(max_value=-1), st.floats(), st.booleans(), junk),
       every=bad_periods.filter(lambda v: v is not None))
def test_run_and_checkpointer_reject(sim, steps, every):
    raises_value_error(lambda: sim.run(steps), "steps")
    raises_value_error(lambda: Checkpointer("unused", every=every), "every")
    raises_value_error(lambda: Checkpointer("unused", keep=every), "keep")
