"""Schedules, their validation and consensus vectors, and their compilation to plans."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import topology
from topology import checks
from topology.plan import compile_plan


# -- multilayer schedules ---------------------------------------------------------------------------
def unrolled_recursion(level: int, alphas, columns: torch.Tensor) -> torch.Tensor:
    """The recursive pseudocode of Pushkin & Barba: y_l <- (1 - a_l) y_l + a_l y_{l-1}, l = 1..L,
    then y_{L-1}, ..., y_0 <- y_L.  ``columns`` is d x (n + 1); returns the new columns."""
    y = [columns[:, j].clone() for j in range(columns.shape[1])]
    for l in range(1, level + 1):
        y[l] = (1 - alphas[l - 1]) * y[l] + alphas[l - 1] * y[l - 1]
    for l in range(level):
        y[l] = y[level].clone()
    return torch.stack(y, dim=1)


@pytest.mark.parametrize("ks", [(5,), (3, 2), (2, 2, 2), (2, 3, 1, 2)])
def test_multilayer_matrices_match_the_recursive_pseudocode(ks):
    alphas = [0.3 + 0.15 * i for i in range(len(ks))]
    s = topology.multilayer(ks, alphas)
    assert s.num_agents == len(ks) + 1 and s.period == math.prod(ks) and s.workers == (0,)
    columns = torch.randn(7, s.num_agents, dtype=torch.float64)
    for t in range(2 * s.period):
        level = s.level(t)
        expected_level = max([l for l in range(len(ks) + 1) if (t + 1) % math.prod(ks[:l]) == 0])
        assert level == expected_level
        got = columns @ s.matrix(t)
        want = unrolled_recursion(level, alphas, columns)
        assert (got - want).abs().max() < 1e-15


def test_first_lookahead_sync_is_after_exactly_k_inner_steps():
    s = topology.lookahead(4, 0.5)
    identity = torch.eye(2, dtype=torch.float64)
    assert [torch.equal(s.matrix(t), identity) for t in range(8)] == [True, True, True, False] * 2


@pytest.mark.parametrize("ks", [(5,), (3, 2), (2, 2, 2)])
def test_consensus_is_a_fixed_point_of_every_matrix(ks):
    s = topology.multilayer(ks, [0.5, 0.7, 0.9][: len(ks)])
    a = s.consensus()
    assert abs(a.sum().item() - 1) < 1e-15 and (a >= 0).all()
    for t in range(s.period):
        assert (s.matrix(t) @ a - a).abs().max() < 1e-15
    # The generic null-space solver finds the same vector as the closed form.
    generic = topology.from_matrices(s.distinct_matrices, workers=(0,)).consensus()
    assert (generic - a).abs().max() < 1e-14


def test_consensus_is_none_when_not_unique():
    eye = torch.eye(3, dtype=torch.float64)
    assert topology.from_matrices([eye]).consensus() is None


def test_from_matrices_cycles_sequences_and_functions():
    a = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    s = topology.from_matrices([eye, eye, a])
    assert s.period == 3 and len(s.distinct_matrices) == 2
    assert torch.equal(s.matrix(5), a) and torch.equal(s.matrix(3), eye)
    f = topology.from_matrices(lambda t: a if t % 2 else eye, period=2)
    assert torch.equal(f.matrix(7), a) and torch.equal(f.matrix(8), eye)
    assert f.workers == (0, 1)


def test_matrix_returns_a_copy():
    s = topology.lookahead(2, 0.5)
    s.matrix(1).fill_(7.0)
    assert s.matrix(1)[0, 0] == 0.5


# -- validation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(k=0, alpha=0.5), "k must be an integer >= 1"),
        (dict(k=2.5, alpha=0.5), "k must be an integer >= 1"),
        (dict(k=True, alpha=0.5), "k must be an integer >= 1"),
        (dict(k=5, alpha=0.0), "alpha must be a real number in (0, 1]"),
        (dict(k=5, alpha=1.5), "alpha must be a real number in (0, 1]"),
        (dict(k=5, alpha=float("nan")), "alpha must be a real number in (0, 1]"),
        (dict(k=5, alpha="0.5"), "alpha must be a real number in (0, 1]"),
    ],
)
def test_lookahead_rejects_bad_arguments(kwargs, words):
    with pytest.raises(ValueError) as err:
        topology.lookahead(**kwargs)
    assert words.replace("k must", "ks[0] must").replace("alpha must", "alphas[0] must") in str(err.value)


def test_multilayer_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="ks and alphas must have the same length"):
        topology.multilayer((2, 3), (0.5,))
    with pytest.raises(ValueError, match="ks must name at least one level"):
        topology.multilayer((), ())
    with pytest.raises(ValueError, match=r"alphas\[1\] must be a real number in \(0, 1\]"):
        topology.multilayer((2, 3), (0.5, -0.1))


@pytest.mark.parametrize(
    "matrix, words",
    [
        ([[0.5, 0.5], [0.4, 0.5]], "column-stochastic"),
        ([[1.5, 0.5], [-0.5, 0.5]], "non-negative"),
        ([[float("nan"), 0.5], [0.5, 0.5]], "finite"),
        ([[float("inf"), 0.5], [0.5, 0.5]], "finite"),
        ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], "square"),
        ([1.0, 0.0], "square"),
        ([["a"]], "square matrix of real numbers"),
    ],
)
def test_from_matrices_rejects_bad_matrices(matrix, words):
    with pytest.raises(ValueError) as err:
        topology.from_matrices([matrix])
    assert words in str(err.value) and "matrices[0]" in str(err.value)


def test_from_matrices_rejects_inconsistent_shapes_and_bad_periods():
    with pytest.raises(ValueError, match=r"matrices\[1\] must be 2 x 2"):
        topology.from_matrices([torch.eye(2), torch.eye(3)])
    with pytest.raises(ValueError, match="period is required"):
        topology.from_matrices(lambda t: torch.eye(2))
    with pytest.raises(ValueError, match="period must equal len"):
        topology.from_matrices([torch.eye(2)], period=3)
    with pytest.raises(ValueError, match="workers must be agent indices"):
        topology.from_matrices([torch.eye(2)], workers=(2,))
    with pytest.raises(ValueError, match="at least one matrix"):
        topology.from_matrices([])


def test_column_sum_tolerance_is_1e_12():
    ok = torch.tensor([[0.5, 0.5], [0.5 + 5e-13, 0.5]], dtype=torch.float64)
    topology.from_matrices([ok])
    bad = torch.tensor([[0.5, 0.5], [0.5 + 5e-12, 0.5]], dtype=torch.float64)
    with pytest.raises(ValueError, match="column 0 sums to"):
        topology.from_matrices([bad])


# -- plans -------------------------------------------------------------------------------------------------
def test_identity_compiles_to_nothing():
    plan = compile_plan(torch.eye(4, dtype=torch.float64))
    assert plan.is_identity and plan.num_all_reduces == 0 and plan.touched == ()


def test_multilayer_sync_is_one_block_with_the_level_weights():
    s = topology.multilayer((3, 2), (0.5, 0.8))
    plan = compile_plan(s.matrix(2))  # a level-1 sync: agents 0, 1
    assert len(plan.blocks) == 1 and not plan.mixes
    assert plan.blocks[0].members == (0, 1) and plan.blocks[0].receivers == (0, 1)
    assert plan.blocks[0].weights == (0.5, 0.5)
    plan = compile_plan(s.matrix(5))  # a level-2 sync: every agent
    assert plan.blocks[0].receivers == (0, 1, 2)
    assert plan.blocks[0].weights == pytest.approx((0.4, 0.4, 0.2), abs=1e-16)
    assert plan.snapshot == ()


def random_column_stochastic(m: int, seed: int, density: float = 0.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(m, m, generator=gen, dtype=torch.float64) * (torch.rand(m, m, generator=gen) < density)
    p += torch.eye(m, dtype=torch.float64)
    return p / p.sum(0, keepdim=True)


@pytest.mark.parametrize("seed", range(5))
def test_plan_applies_the_matrix(seed):
    m = 6
    p = random_column_stochastic(m, seed)
    # Make a block: columns 1 and 4 equal, and an identity column 2.
    p[:, 4] = p[:, 1]
    p[:, 2] = 0.0
    p[2, 2] = 1.0
    plan = compile_plan(p)
    assert [b.receivers for b in plan.blocks] == [(1, 4)]
    assert 2 not in plan.touched
    x = torch.randn(5, m, dtype=torch.float64)
    assert (plan.apply(x) - x @ p).abs().max() < 1e-14


def test_plan_snapshots_agents_read_by_another_operation():
    # Agent 0 takes (x0 + x1) / 2; agent 1 takes (x1 + x2) / 2: x1 is read by agent 0's mix.
    p = torch.tensor([[0.5, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.5, 1.0]], dtype=torch.float64)
    plan = compile_plan(p)
    assert plan.blocks == () and [m.receiver for m in plan.mixes] == [0, 1]
    assert plan.snapshot == (1,)


# -- shared argument checks (topology.checks) ----------------------------------------------------------
@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.int8(2), 10**30])
def test_check_integer_accepts_integers_and_returns_int(value):
    got = checks.check_integer(value, "k", minimum=1)
    assert got == value and type(got) is int


@pytest.mark.parametrize(
    "value, bounds, words",
    [
        (True, dict(minimum=1), "k must be an integer >= 1; got True of type bool"),
        (np.bool_(True), dict(minimum=1), "k must be an integer >= 1; got"),
        (2.0, dict(minimum=1), "k must be an integer >= 1; got 2.0 of type float"),
        ("3", dict(), "k must be an integer; got '3' of type str"),
        (torch.tensor(3), dict(minimum=1), "k must be an integer >= 1"),
        (0, dict(minimum=1), "k must be an integer >= 1; got 0"),
        (5, dict(minimum=0, maximum=4), "k must be an integer in [0, 4]; got 5"),
        (5, dict(maximum=4), "k must be an integer <= 4; got 5"),
    ],
)
def test_check_integer_rejects(value, bounds, words):
    with pytest.raises(ValueError) as err:
        checks.check_integer(value, "k", **bounds)
    assert words in str(err.value)


@pytest.mark.parametrize("value", [0.0, 0.5, 1, Fraction(1, 3), np.float32(0.25)])
def test_check_real_accepts_finite_reals_in_range(value):
    got = checks.check_real(value, "lr", minimum=0.0, maximum=1.0)
    assert got == float(value) and type(got) is float


@pytest.mark.parametrize(
    "value, bounds, words",
    [
        (float("nan"), dict(), "lr must be a finite real; got nan"),
        (float("inf"), dict(minimum=0.0), "lr must be a finite real >= 0; got inf"),
        (-0.1, dict(minimum=0.0), "lr must be a finite real >= 0; got -0.1"),
        (0.0, dict(minimum=0.0, min_open=True), "lr must be a finite real > 0; got 0.0"),
        (1.0, dict(minimum=0.0, maximum=1.0, max_open=True), "lr must be a finite real in [0, 1); got 1.0"),
        (2.0, dict(maximum=1.5), "lr must be a finite real <= 1.5; got 2.0"),
        (True, dict(), "lr must be a finite real; got True"),
        ("0.1", dict(), "lr must be a finite real; got '0.1'"),
        (10**400, dict(), "lr must be a finite real; got 1000"),
        (1j, dict(), "lr must be a finite real; got 1j"),
    ],
)
def test_check_real_rejects(value, bounds, words):
    with pytest.raises(ValueError) as err:
        checks.check_real(value, "lr", **bounds)
    assert words in str(err.value)


def test_check_step_size_is_the_half_open_unit_interval():
    assert checks.check_step_size(1, "alpha") == 1.0 and checks.check_step_size(1e-300, "alpha") == 1e-300
    for bad in (0, 0.0, -1e-300, 1.0000001, float("nan"), None, True):
        with pytest.raises(ValueError, match=r"alpha must be a real number in \(0, 1\]; got"):
            checks.check_step_size(bad, "alpha")


def test_check_bool_and_check_choice():
    assert checks.check_bool(True, "launch.overlap") is True and checks.check_bool(np.bool_(False), "x") is False
    for bad in (0, 1, "true", None):
        with pytest.raises(ValueError, match="launch.overlap must be true or false; got"):
            checks.check_bool(bad, "launch.overlap")
    assert checks.check_choice("ring", ("ring", "torus"), "name") == "ring"
    for bad in ("Ring", None, torch.tensor([1, 2]), True):
        with pytest.raises(ValueError, match="name must be one of ring, torus; got"):
            checks.check_choice(bad, ("ring", "torus"), "name")
    with pytest.raises(ValueError, match="x must be one of 1, 2; got True"):
        checks.check_choice(True, (1, 2), "x")  # True == 1, but a bool is no choice among integers


def test_one_dtype_table():
    assert set(checks.DTYPES) == {"float16", "bfloat16", "float32", "float64"}
    for name, dtype in checks.DTYPES.items():
        assert dtype.is_floating_point and str(dtype) == f"torch.{name}"
        assert checks.dtype_from_name(name, "launch.dtype") is dtype
        assert checks.dtype_from_name(f"torch.{name}", "launch.dtype") is dtype
        assert checks.dtype_from_name(dtype, "launch.dtype") is dtype
    for bad in ("float8", "int32", torch.int32, None, 32):
        with pytest.raises(ValueError, match="launch.dtype must be one of float16, bfloat16, float32, float64; got"):
            checks.dtype_from_name(bad, "launch.dtype")
