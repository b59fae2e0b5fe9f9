"""Phased schedules (topology.phases): each phase's own counter, the union of matrices, next_sync,
validation, the registry entry, and the step counters of PyTorch's model averagers."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import topology
from topology import decentralized as dec
from topology.diagnostics import period_product, spectral_gap, vectors_sent_per_agent
from launch.cli.topologies import make_schedule
from topology.stagewise import Stage

EYE3 = torch.eye(3, dtype=torch.float64)


def local_counter_view(spec, t):
    """The schedule and counter that phase semantics promise for iteration t."""
    start = 0
    for steps, schedule in spec:
        if steps is None or t < start + steps:
            return schedule, t - start
        start += steps
    raise AssertionError("the last phase must be open-ended")


def _phase_cases():
    return {
        "post-local SGD": [(5, dec.local_sgd(3, 1)), (None, dec.local_sgd(3, 4))],
        "cut mid-period": [(7, dec.local_sgd(3, 3)), (2, dec.ring(3)), (None, dec.local_sgd(3, 5))],
        "lookahead k changes": [(10, topology.lookahead(4, 0.5)), (6, topology.lookahead(3, 0.8)),
                                (None, topology.lookahead(2, 0.5))],
        "phase shorter than its first sync": [(2, topology.lookahead(5, 0.5)), (None, topology.lookahead(3, 0.7))],
        "hierarchical then gossip": [(13, dec.hierarchical(4, {2: 2, 3: 4})),
                                     (None, dec.gossip(dec.ring(4).matrix(0), every=3))],
        "stagewise inside": [(9, topology.stagewise_lookahead([Stage(4, 0.1, 0.5, 2, 0.0), Stage(3, 0.1, 0.8, 3, 0.0)])),
                             (None, topology.lookahead(2, 0.5))],
        "single phase": [(None, topology.multilayer((2, 3), (0.5, 0.6)))],
        "last phase syncs first": [(3, dec.local_sgd(3, 2)),
                                   (None, topology.from_matrices([dec.local_sgd(3, 1).matrix(0), EYE3, EYE3]))],
        "nested phases": [(4, topology.lookahead(2, 0.6)),
                          (11, topology.phases([(3, topology.lookahead(1, 0.5)), (None, topology.lookahead(4, 0.9))])),
                          (None, topology.phases([(5, topology.lookahead(5, 0.3)), (None, topology.lookahead(2, 0.6))]))],
    }


PHASES = _phase_cases()


@pytest.mark.parametrize("name", PHASES)
def test_every_phase_runs_its_own_schedule_from_its_own_counter(name):
    spec = PHASES[name]
    s = topology.phases(spec)
    starts = [sum(steps for steps, _ in spec[:i]) for i in range(len(spec))]
    assert s.prefix_length >= starts[-1] and s.period == spec[-1][1].period
    for t in range(starts[-1] + 3 * s.period + 5):
        schedule, u = local_counter_view(spec, t)
        assert torch.equal(s.matrix(t), schedule.matrix(u)), (t, u)
        assert torch.equal(s.distinct_matrices[s.matrix_index(t)], s.matrix(t))
        i, u2 = s.phase(t)
        assert spec[i][1] is schedule and u2 == u


@pytest.mark.parametrize("name", PHASES)
def test_distinct_matrices_are_the_bitwise_union_of_those_that_occur(name):
    s = topology.phases(PHASES[name])
    horizon = s.prefix_length + s.period
    occurring = []
    for t in range(horizon):
        p = s.matrix(t)
        if not any(torch.equal(p, q) for q in occurring):
            occurring.append(p)
    assert len(s.distinct_matrices) == len(occurring)
    assert all(torch.equal(p, q) for p, q in zip(s.distinct_matrices, occurring))  # order of first appearance


def test_a_matrix_of_a_phase_cut_before_it_occurs_is_left_out():
    s = topology.phases([(2, topology.lookahead(5, 0.5)), (None, topology.lookahead(3, 0.7))])
    assert [p[0, 0].item() for p in s.distinct_matrices] == [1.0, 0.7]


def test_post_local_sgd_syncs_every_step_then_every_tau():
    warmup, tau = 6, 4
    s = topology.phases([(warmup, dec.local_sgd(4, 1)), (None, dec.local_sgd(4, tau))])
    syncs = [t for t in range(40) if not torch.equal(s.matrix(t), torch.eye(4, dtype=torch.float64))]
    assert syncs == list(range(warmup)) + list(range(warmup + tau - 1, 40, tau))
    assert repr(s) == "phases([(6, local_sgd(4 workers, tau=1)), (None, local_sgd(4 workers, tau=4))])"


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(name=st.sampled_from(sorted(PHASES)), t=st.integers(0, 120))
def test_phased_next_sync_agrees_with_a_brute_force_scan(name, t):
    s = topology.phases(PHASES[name])
    eye = torch.eye(s.num_agents, dtype=torch.float64)
    end = max(t, s.prefix_length) + s.period
    assert s.next_sync(t) == next((u for u in range(t, end) if not torch.equal(s.matrix(u), eye)), None)


def test_next_sync_is_none_once_only_identities_remain():
    s = topology.phases([(3, dec.local_sgd(3, 2)), (None, topology.from_matrices([EYE3]))])
    assert [s.next_sync(t) for t in range(5)] == [1, 1, None, None, None]
    # The phase is cut one step before its 10th sync (u = 10^21 - 1); the next phase syncs at u = 1.
    cut = topology.phases([(10**21 - 1, dec.local_sgd(3, 10**20)), (None, dec.local_sgd(3, 2))])
    assert cut.next_sync(10**21 - 5) == 10**21 and cut.next_sync(10**20 - 1) == 10**20 - 1


def test_diagnostics_are_those_of_the_last_phase_and_consensus_of_every_phase():
    ring, avg = dec.ring(8), dec.local_sgd(8, 3)
    a = topology.phases([(7, ring), (None, avg)])
    b = topology.phases([(7, avg), (None, ring)])
    assert spectral_gap(a) == spectral_gap(avg) == 1.0
    assert spectral_gap(b) == spectral_gap(ring) < 0.5
    assert torch.equal(period_product(b), period_product(ring))
    assert vectors_sent_per_agent(a) == vectors_sent_per_agent(avg)
    assert torch.allclose(a.consensus(), torch.full((8,), 1 / 8, dtype=torch.float64), atol=1e-14)
    # Two phases whose fixed points differ: no vector is fixed by every P_t, so no consensus.
    p = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], dtype=torch.float64)
    assert topology.from_matrices([p]).consensus() is not None and topology.from_matrices([q]).consensus() is not None
    assert topology.phases([(3, topology.from_matrices([p])), (None, topology.from_matrices([q]))]).consensus() is None


@pytest.mark.timeout(5)
def test_absurd_phase_lengths_cost_nothing():
    s = topology.phases([(10**21, topology.lookahead(7, 0.5)), (10**20 + 3, topology.lookahead(1, 0.5)),
                         (None, topology.lookahead(10**21, 0.5))])
    assert s.prefix_length == 11 * 10**20 + 3 and spectral_gap(s) == 1.0
    t = 10**21 + 10**20 + 2
    assert s.phase(t) == (1, 10**20 + 2) and s.phase(t + 1) == (2, 0)
    assert s.next_sync(t + 1) == t + 10**21


@pytest.mark.parametrize(
    "spec, words",
    [
        ([], "phases must hold at least one"),
        ("ring", r"phases must be a list of \(steps, schedule\) pairs"),
        ([(None,)], r"phases\[0\] must be a pair \(steps, schedule\)"),
        ([(None, "ring")], r"phases\[0\]'s schedule must be a topology.Schedule"),
        ([(5, topology.lookahead(2, 0.5))], r"phases\[0\] steps must be None: the last phase runs until the end"),
        ([(None, topology.lookahead(2, 0.5)), (None, topology.lookahead(2, 0.5))],
         r"phases\[0\] steps must be an integer >= 1: only the last phase may be open-ended"),
        ([(0, topology.lookahead(2, 0.5)), (None, topology.lookahead(2, 0.5))], r"phases\[0\] steps must be an integer >= 1; got 0"),
        ([(True, topology.lookahead(2, 0.5)), (None, topology.lookahead(2, 0.5))], r"phases\[0\] steps must be an integer >= 1; got True"),
        ([(2.5, topology.lookahead(2, 0.5)), (None, topology.lookahead(2, 0.5))], r"phases\[0\] steps must be an integer >= 1; got 2.5"),
        ([(3, dec.local_sgd(3, 1)), (None, dec.local_sgd(4, 2))], r"phases\[1\] must have the same agents as phases\[0\]: num_agents"),
        ([(3, topology.with_slow_agent(2, 2, 0.5)), (None, dec.local_sgd(3, 2))], r"phases\[1\] .* workers is \(0, 1, 2\)"),
        ([(3, dec.ring(4)), (4, dec.ring(4)), (None, dec.push_sum(topology.graphs.ring_graph(4)))],
         r"phases\[2\] must have the same agents as phases\[0\]: push_sum"),
    ],
)
def test_bad_phases_are_value_errors_naming_the_phase(spec, words):
    with pytest.raises(ValueError, match=words):
        topology.phases(spec)


# -- registry ----------------------------------------------------------------------------------------------
def test_registry_round_trip_matches_the_python_api():
    cfg = [
        {"steps": 6, "topology": {"name": "lookahead", "k": 2, "alpha": 0.5}},
        {"steps": 7, "topology": {"name": "phases", "phases": [
            {"steps": 3, "topology": {"name": "lookahead", "k": 1, "alpha": 0.9}},
            {"steps": None, "topology": {"name": "with_slow_agent", "num_workers": 1, "k": 3, "alpha": 0.5}}]}},
        {"steps": None, "topology": {"name": "multilayer", "ks": [2], "alphas": [0.25]}},
    ]
    s = make_schedule("phases", phases=cfg)
    want = topology.phases([
        (6, topology.lookahead(2, 0.5)),
        (7, topology.phases([(3, topology.lookahead(1, 0.9)), (None, topology.with_slow_agent(1, 3, 0.5))])),
        (None, topology.multilayer((2,), (0.25,))),
    ])
    assert repr(s) == repr(want)
    assert all(torch.equal(s.matrix(t), want.matrix(t)) for t in range(40))
    cfg_post_local = [{"steps": 10, "topology": {"name": "local_sgd", "num_workers": 4, "tau": 1}},
                      {"steps": None, "topology": {"name": "local_sgd", "num_workers": 4, "tau": 8}}]
    post_local = make_schedule("phases", phases=cfg_post_local)
    direct = topology.phases([(10, dec.local_sgd(4, 1)), (None, dec.local_sgd(4, 8))])
    assert all(torch.equal(post_local.matrix(t), direct.matrix(t)) for t in range(60))


@pytest.mark.parametrize(
    "phases, words",
    [
        ({"steps": 1}, "topology.phases must be a list of {steps, topology} mappings"),
        ([{"steps": 1}], r"topology.phases\[0\] must be a mapping with exactly the keys steps, topology"),
        ([{"steps": None, "topology": {"name": "lookahead", "k": 2, "alpha": 0.5}, "extra": 1}],
         r"topology.phases\[0\] must be a mapping with exactly the keys"),
        ([{"steps": None, "topology": {"name": "lookahed", "k": 2, "alpha": 0.5}}],
         r"topology.phases\[0\]\.topology\.name must be one of"),
        ([{"steps": None, "topology": {"name": "lookahead", "k": 2, "alpah": 0.5}}],
         r"topology.phases\[0\]\.topology has option\(s\) \['alpah'\] that topology 'lookahead' does not take"),
        ([{"steps": None, "topology": {"name": "lookahead", "k": 2}}], r"topology.phases\[0\]\.topology\.alpha must be set"),
        ([{"steps": None, "topology": {"name": "lookahead", "k": 0, "alpha": 0.5}}],
         r"topology.phases\[0\]\.topology: ks\[0\] must be an integer >= 1; got 0"),
        ([{"steps": None, "topology": "ring"}], r"topology.phases\[0\]\.topology must be a mapping"),
        ([{"steps": "5", "topology": {"name": "lookahead", "k": 2, "alpha": 0.5}},
          {"steps": None, "topology": {"name": "lookahead", "k": 2, "alpha": 0.5}}],
         r"topology.phases\[0\]\.steps must be an integer >= 1; got '5'"),
        ([{"steps": 3, "topology": {"name": "lookahead", "k": 2, "alpha": 0.5}}],
         r"topology.phases\[0\]\.steps must be null: the last phase runs until the end; got 3"),
        ([{"steps": 3, "topology": {"name": "lookahead", "k": 2, "alpha": 0.5}},
          {"steps": None, "topology": {"name": "ring", "n": 2}}],
         r"topology.phases: phases\[1\] must have the same agents as phases\[0\]: workers"),
        ([{"steps": None, "topology": {"name": "phases", "phases": [
            {"steps": None, "topology": {"name": "ring", "m": 4}}]}}],
         r"topology.phases\[0\]\.topology\.phases\[0\]\.topology has option\(s\) \['m'\] that topology 'ring'"),
        ([{"steps": None, "topology": {"name": "phases", "phases": [
            {"steps": None, "topology": {"name": "ring", "n": 0}}]}}],
         r"topology.phases\[0\]\.topology\.phases\[0\]\.topology: n must be an integer >= 1; got 0"),
    ],
)
def test_registry_rejects_bad_phases_naming_the_key(phases, words):
    with pytest.raises(ValueError, match=words):
        make_schedule("phases", phases=phases)


def test_make_schedule_checks_options_against_the_factory():
    with pytest.raises(ValueError, match=r"topology has option\(s\) \['kk'\] that topology 'lookahead' does not take"):
        make_schedule("lookahead", kk=2, alpha=0.5)
    with pytest.raises(ValueError, match="topology.k must be set: topology 'lookahead' has no default for it"):
        make_schedule("lookahead", alpha=0.5)
    with pytest.raises(ValueError, match="topology.name must be one of"):
        make_schedule("no such")


# -- PyTorch's model averagers: which of their steps is which of our iterations -----------------------------
AVERAGERS = textwrap.dedent("""
    import json, sys, warnings
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.model_averaging import averagers, hierarchical_model_averager, utils

    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    record = []
    # The averagers call utils.average_parameters_or_parameter_groups(params, group) exactly when
    # they average: record the caller's step counter and group instead of averaging.
    utils.average_parameters_or_parameter_groups = lambda params, group: record.append((current.step, group))
    params = [torch.nn.Parameter(torch.zeros(1))]

    def steps(averager, n, start=None):
        global current
        current, record[:] = averager, []
        if start is not None:
            averager.step = start
        for _ in range(n):  # one call per iteration t, after the optimizer's step
            averager.average_parameters(params)
        return [(s, g) for s, g in record]

    n = int(sys.argv[2])
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tau in (1, 3, 5):
            out[f"periodic tau={tau} warmup=tau-1"] = [s for s, _ in steps(averagers.PeriodicModelAverager(tau, tau - 1), n)]
            out[f"periodic tau={tau} default"] = [s for s, _ in steps(averagers.PeriodicModelAverager(tau), n)]
            out[f"periodic tau={tau} counter from 1"] = [s - 1 for s, _ in steps(averagers.PeriodicModelAverager(tau), n, 1)]
        for w in (0, 1, 4):
            out[f"post-local w={w}"] = [s for s, _ in steps(averagers.PeriodicModelAverager(3, warmup_steps=w), n)]
        hma = hierarchical_model_averager.HierarchicalModelAverager({2: 1, 3: 1, 12: 1})
        hma.period_process_group_dict = {2: "2", 3: "3", 12: "12"}  # which period won, not a real group
        out["hierarchical default"] = [[s, int(g)] for s, g in steps(hma, n)]
        hma.step = 0
        out["hierarchical counter from 1"] = [[s - 1, int(g)] for s, g in steps(hma, n, 1)]
    dist.destroy_process_group()
    print(json.dumps(out))
""")


def syncs(schedule, n):
    eye = torch.eye(schedule.num_agents, dtype=torch.float64)
    return [t for t in range(n) if not torch.equal(schedule.matrix(t), eye)]


@pytest.mark.timeout(120)
def test_pytorch_averagers_step_counters_against_our_iterations(tmp_path):
    n = 40
    done = subprocess.run([sys.executable, "-c", AVERAGERS, str(tmp_path / "store"), str(n)],
                          capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    torch_steps = json.loads(done.stdout.strip().splitlines()[-1])
    for tau in (1, 3, 5):
        ours = syncs(dec.local_sgd(4, tau), n)
        # local_sgd(W, tau) averages exactly on PeriodicModelAverager(tau, warmup_steps=tau - 1)'s steps ...
        assert torch_steps[f"periodic tau={tau} warmup=tau-1"] == ours
        # ... or on the default averager's steps with its counter started at 1 (s = t + 1) ...
        assert torch_steps[f"periodic tau={tau} counter from 1"] == ours
        # ... while with the defaults it averages at s = 0, tau, 2 tau (after the very first step).
        assert torch_steps[f"periodic tau={tau} default"] == list(range(0, n, tau))
        assert (torch_steps[f"periodic tau={tau} default"] == ours) == (tau == 1)
    for w in (0, 1, 4):
        # PyTorch's recipe: gradients all-reduced for s < w (PostLocalSGDState(start_localSGD_iter=w)),
        # then PeriodicModelAverager(3, warmup_steps=w): phases([(w + 1, every step), (None, every 3)]).
        pytorch = sorted(set(range(w)) | set(torch_steps[f"post-local w={w}"]))
        assert pytorch == syncs(topology.phases([(w + 1, dec.local_sgd(4, 1)), (None, dec.local_sgd(4, 3))]), n)
    # HierarchicalModelAverager: the largest period dividing its counter; started at 1 it is ours.
    ours = dec.hierarchical(12, {2: 2, 3: 4, 12: 12})
    sizes = {2: 2, 3: 4, 12: 12}
    chosen = [[t, sizes[g]] for t, g in torch_steps["hierarchical counter from 1"]]
    want = [[t, int((ours.matrix(t)[:, 0] != 0).sum())] for t in syncs(ours, n)]
    assert chosen == want
    assert torch_steps["hierarchical default"][0] == [0, 12]  # counter from 0: a global average after step 0
    assert 0 not in syncs(ours, n)
