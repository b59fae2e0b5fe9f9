"""Schedules, their validation and consensus vectors, and their compilation to plans; the shared
argument checks; compressed schedules (absurd periods, next_sync) and SLRLA's stages."""

import math
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import topology
from topology import checks
from topology.diagnostics import period_product, spectral_gap, vectors_sent_per_agent
from topology.plan import compile_plan
from topology.schedule import MAX_ENUMERATED_PERIOD
from topology.stagewise import Stage
from topology.word import chain, concat, counts, from_indices, product, repeat, reverse, run, segment


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


def test_check_list_refuses_strings_mappings_and_scalars():
    assert checks.check_list((1, 2), "stages", "stages") == [1, 2]
    for bad in ("ab", b"ab", {"a": 1}, 3, None):
        with pytest.raises(ValueError, match="stages must be a list of mappings; got"):
            checks.check_list(bad, "stages", "mappings")


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


# -- SLRLA's stages live beside their schedule ----------------------------------------------------------
def test_stages_are_validated_in_topology_and_reexported_by_agents():
    import agents.slrla
    from launch.cli.topologies import make_schedule
    from topology.stagewise import check_stages

    assert agents.slrla.Stage is Stage and agents.slrla.check_stages is check_stages
    stages = check_stages([{"steps": 4, "lr": 0.1, "alpha": 0.5, "k": 2, "beta": 0.0}, Stage(3, 0.1, 0.5, 3, 1.0)])
    assert [s.k for s in stages] == [2, 3]
    for bad, words in [
        ([{"steps": 4, "lr": 0.1, "alpha": 0.5, "k": 0, "beta": 0.0}], r"stages\[0\]\.k must be an integer >= 1; got 0"),
        ([Stage(2, 0.1, 0.5, 1, 0.0), {"steps": 4, "lr": -1, "alpha": 0.5, "k": 2, "beta": 0.0}],
         r"stages\[1\]\.lr must be a finite real >= 0; got -1"),
        ([{"steps": 4, "lr": 0.1, "alpha": 0.5, "k": 2}], r"stages\[0\] must have exactly the keys .* missing \['beta'\]"),
        ([], "stages must hold at least one Stage"),
        ("abc", "stages must be a list of"),
        ([3], r"stages\[0\] must be a mapping"),
    ]:
        with pytest.raises(ValueError, match=words):
            check_stages(bad)
        with pytest.raises(ValueError, match=words):
            make_schedule("stagewise", stages=bad)


def test_topology_imports_nothing_of_agents_launch_or_experiments():
    import subprocess
    import sys

    code = (
        "import sys, topology, topology.stagewise as sw\n"
        "sw.stagewise_lookahead(sw.check_stages([dict(steps=2, lr=0.1, alpha=0.5, k=1, beta=0.0)]))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('agents', 'launch', 'experiments'))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# -- words: compressed index sequences ------------------------------------------------------------------
@st.composite
def words(draw, depth=3, alphabet=3):
    """A random word and its explicit list of indices."""
    kind = draw(st.sampled_from(["run", "concat", "repeat"] if depth else ["run"]))
    if kind == "run":
        index, count = draw(st.integers(0, alphabet - 1)), draw(st.integers(0, 4))
        return run(index, count), [index] * count
    if kind == "repeat":
        word, items = draw(words(depth - 1, alphabet))
        times = draw(st.integers(0, 3))
        return repeat(word, times), items * times
    parts = draw(st.lists(words(depth - 1, alphabet), max_size=4))
    return concat(*(w for w, _ in parts)), [i for _, items in parts for i in items]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(case=words(), marked=st.frozensets(st.integers(0, 2)), cut=st.integers(0, 60))
def test_word_operations_agree_with_the_explicit_list(case, marked, cut):
    word, items = case
    assert word.length == len(items) and word.tolist() == items
    assert [word.at(t) for t in range(len(items))] == items
    for t in range(len(items)):
        want = next((p for p in range(t, len(items)) if items[p] in marked), None)
        assert word.next_marked(t, marked) == want
    assert word.first(marked) == next((p for p, i in enumerate(items) if i in marked), None)
    n = min(cut, len(items))
    assert word.take(n).tolist() == items[:n]
    assert reverse(word).tolist() == items[::-1]
    assert segment(word, n // 2, n).tolist() == items[n // 2:n]
    assert counts(word) == {i: items.count(i) for i in set(items)}
    if items:
        gen = torch.Generator().manual_seed(len(items))
        mats = [torch.rand(3, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
        want = mats[items[0]]
        for i in items[1:]:
            want = want @ mats[i]
        assert (product(word, mats) - want).abs().max() <= 1e-9 * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("periods", [[1], [2], [2, 6], [3, 3, 12], [1, 4, 8, 24], [5, 10, 10]])
def test_chain_is_the_largest_dividing_period(periods):
    word = chain(periods, range(1, len(periods) + 1), base=0)
    want = [max([0] + [j + 1 for j, q in enumerate(periods) if (t + 1) % q == 0]) for t in range(periods[-1])]
    assert word.tolist() == want
    assert from_indices(want).tolist() == want
    with pytest.raises(ValueError, match="divisibility chain"):
        chain([2, 3], [1, 2], 0)


# -- no work proportional to the period -----------------------------------------------------------------
HUGE = 10**21


@pytest.mark.timeout(1)
def test_lookahead_with_an_absurd_period_builds_and_gives_its_gap_at_once():
    s = topology.lookahead(HUGE, 0.5)
    assert s.period == HUGE and spectral_gap(s) == 1.0 and spectral_gap(s, per_step=True) == 1.0
    assert vectors_sent_per_agent(s) == pytest.approx(1.0 / HUGE)
    assert torch.equal(period_product(s), s.matrix(HUGE - 1))
    assert s.next_sync(0) == HUGE - 1 and s.next_sync(HUGE) == 2 * HUGE - 1
    assert torch.equal(s.matrix(HUGE - 2), torch.eye(2, dtype=torch.float64))


@pytest.mark.timeout(10)
def test_every_generator_builds_absurd_periods_without_enumerating_them():
    dec = topology.decentralized
    builds = {
        "multilayer": lambda: topology.multilayer((HUGE, HUGE, 3), (0.5, 0.5, 0.5)),
        "with_slow_agent": lambda: topology.with_slow_agent(3, HUGE, 0.5),
        "local_sgd": lambda: dec.local_sgd(4, HUGE),
        "lookahead_local_sgd": lambda: dec.lookahead_local_sgd(3, HUGE, 0.5, {HUGE // 10: 3}),
        "hierarchical": lambda: dec.hierarchical(4, {2: 2, HUGE: 4}),
        "ring": lambda: dec.ring(5, every=HUGE),
        "one_peer_exponential": lambda: dec.one_peer_exponential(8, every=HUGE),
        "stagewise": lambda: topology.stagewise_lookahead([Stage(HUGE, 0.1, 0.5, 5, 0.0), Stage(4, 0.1, 0.8, 2, 0.0)]),
    }
    for name, build in builds.items():
        s = build()
        assert s.period >= HUGE, name
        assert 0.0 <= spectral_gap(s) <= 1.0 and vectors_sent_per_agent(s) > 0.0, name
        t = s.next_sync(HUGE // 3)
        assert t is not None and t >= HUGE // 3 and not torch.equal(s.matrix(t), torch.eye(s.num_agents, dtype=torch.float64))


def test_enumerated_periods_are_limited_with_an_error_naming_the_key():
    eye = torch.eye(2, dtype=torch.float64)
    assert topology.from_matrices(lambda t: eye, period=MAX_ENUMERATED_PERIOD).period == MAX_ENUMERATED_PERIOD
    with pytest.raises(ValueError, match=f"period must be at most {MAX_ENUMERATED_PERIOD} when matrices is a function"):
        topology.from_matrices(lambda t: eye, period=MAX_ENUMERATED_PERIOD + 1)
    with pytest.raises(ValueError, match="period_group_sizes must have periods that divide one another, or whose lcm"):
        topology.decentralized.hierarchical(4, {1000: 2, 1001: 4})
    with pytest.raises(ValueError, match="averaging must have periods that divide one another"):
        topology.decentralized.lookahead_local_sgd(2, 1001, 0.5, {1000: 2})


def test_schedules_keep_their_distinct_matrices_in_order_of_first_appearance():
    s = topology.with_slow_agent(2, 3, 0.5)
    assert len(s.distinct_matrices) == 2 and torch.equal(s.distinct_matrices[0], torch.eye(3, dtype=torch.float64))
    assert len(topology.with_slow_agent(2, 1, 0.5).distinct_matrices) == 1
    ring = topology.decentralized.ring(5)  # every step: the identity never occurs
    assert len(ring.distinct_matrices) == 1 and not torch.equal(ring.distinct_matrices[0], torch.eye(5, dtype=torch.float64))
    # The first stage syncs at every step: its matrix comes before the identity (built first).
    st_ = topology.stagewise_lookahead([Stage(2, 0.1, 0.8, 1, 0.0), Stage(4, 0.1, 0.5, 2, 0.0), Stage(2, 0.1, 0.8, 2, 0.0)])
    assert [d[0, 0].item() for d in st_.distinct_matrices] == [0.8, 1.0, 0.5]
    for s in (topology.decentralized.hierarchical(8, {2: 2, 3: 4, 12: 8}), topology.decentralized.local_sgd(3, 4), st_):
        seen = []
        for t in range(s.prefix_length + s.period):
            i = s.matrix_index(t)
            if i not in seen:
                seen.append(i)
        assert seen == list(range(len(s.distinct_matrices)))


# -- next_sync ----------------------------------------------------------------------------------------------
def brute_next_sync(schedule, t):
    """Scan from t over the rest of the prefix and one full period after it."""
    eye = torch.eye(schedule.num_agents, dtype=torch.float64)
    end = max(t, schedule.prefix_length) + schedule.period
    return next((u for u in range(t, end) if not torch.equal(schedule.matrix(u), eye)), None)


def _next_sync_schedules():
    dec = topology.decentralized
    eye = torch.eye(3, dtype=torch.float64)
    avg = torch.full((3, 3), 1 / 3, dtype=torch.float64)
    return {
        "lookahead": lambda k: topology.lookahead(k, 0.5),
        "multilayer": lambda k: topology.multilayer((k, 2, 3), (0.5, 0.6, 0.7)),
        "nested": lambda k: topology.nested(k, 0.5, 3, 0.8),
        "with_slow_agent": lambda k: topology.with_slow_agent(2, k, 0.5),
        "local_sgd": lambda k: dec.local_sgd(3, k),
        "hierarchical": lambda k: dec.hierarchical(4, {2: 2, k + 2: 4}),
        "lookahead_local_sgd": lambda k: dec.lookahead_local_sgd(2, k, 0.5, {2: 2}),
        "ring": lambda k: dec.ring(5, every=k),
        "one_peer": lambda k: dec.one_peer_exponential(4, every=k),
        "stagewise": lambda k: topology.stagewise_lookahead([Stage(2 * k, 0.1, 0.5, k, 0.0), Stage(3, 0.1, 0.8, 3, 0.0)]),
        "identity": lambda k: topology.from_matrices([eye] * k),
        "sequence": lambda k: topology.from_matrices([eye] * k + [avg] + [eye] * (k % 3) + [avg]),
        "function": lambda k: topology.from_matrices(lambda t: avg if t % (k + 1) == k else eye, period=3 * (k + 1)),
        # Periods that do not end with a sync: the next one is in the next period.
        "sync first": lambda k: topology.from_matrices([avg] + [eye] * k),
        "function, sync first": lambda k: topology.from_matrices(lambda t: avg if t % (k + 1) == 1 else eye,
                                                                 period=2 * (k + 1)),
        "stagewise, trailing steps": lambda k: topology.stagewise_lookahead(
            [SimpleNamespace(steps=k + 2, k=2, alpha=0.5), SimpleNamespace(steps=k + 1, k=k + 1, alpha=0.7),
             SimpleNamespace(steps=k, k=k + 1, alpha=0.9)]),
    }


NEXT_SYNC = _next_sync_schedules()


@settings(max_examples=250, deadline=None, derandomize=True, database=None)
@given(name=st.sampled_from(sorted(NEXT_SYNC)), k=st.integers(1, 6), t=st.integers(0, 200))
def test_next_sync_agrees_with_a_brute_force_scan(name, k, t):
    s = NEXT_SYNC[name](k)
    assert s.next_sync(t) == brute_next_sync(s, t), (name, k, t)
    if isinstance(s, topology.MultilayerSchedule):  # the closed form, against the generic words
        assert topology.Schedule.next_sync(s, t) == s.next_sync(t)
        assert s.matrix_index(t) == s.level(t)


def test_next_sync_rejects_negative_iterations():
    for s in (topology.lookahead(3, 0.5), topology.decentralized.ring(4)):
        with pytest.raises(ValueError, match="t must be a non-negative iteration number"):
            s.next_sync(-1)
