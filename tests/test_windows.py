"""The finiteness windows in closed form (launch.engine.guard.windows): the same table as the
enumeration of every sync of a window for periodic schedules, the promised properties on phased
ones (each phase's own windows, tails joined), and no work proportional to the period."""

from __future__ import annotations

import pytest
import torch

import topology
from launch.engine.guard.windows import Windows, sync_flow
from launch.engine.placement import Placement
from launch.engine.sync.compile import overlap_hubs
from topology import decentralized as dec
from topology.plan import compile_plan
from topology.slow import with_slow_agent

BIG = 10 ** 21


def compose(a, b):
    return (a.to(torch.float32) @ b.to(torch.float32)) > 0


def layout(schedule, world, agents_per_rank=None, overlap=False):
    """(plans, placement, hubs as Windows.build takes them, flow of each plan)."""
    placement = Placement.make(schedule.num_agents, world, agents_per_rank)
    plans = [compile_plan(p) for p in schedule.distinct_matrices]
    hubs = overlap_hubs(schedule, plans, placement, overlap, 8)
    hub = (lambda i, b: hubs.get((plans[i], b))) if hubs else None
    flows = [sync_flow(plan, placement, (lambda b, i=i: hub(i, b)) if hub else None, schedule.workers)
             for i, plan in enumerate(plans)]
    return plans, placement, hub, flows


def enumerated(schedule, plans, flows, world):
    """The windows by enumeration (the definition, iteration by iteration): L, and the table of
    one window of a periodic schedule, {position: (held rows, born rows, decides)}."""
    syncs = [(t, flows[schedule.matrix_index(t)]) for t in range(schedule.period)
             if not plans[schedule.matrix_index(t)].is_identity]
    origins = sorted(set().union(*(f.origins for _, f in syncs)))
    reach = torch.eye(world, dtype=torch.bool)
    for periods in range(1, world + 1):
        for _, flow in syncs:
            reach = compose(reach, flow.held)
        if bool(reach[origins].all()):
            break
    else:
        return None, None
    window = [(t + j * schedule.period, flow) for j in range(periods) for t, flow in syncs]
    table, after = {}, torch.eye(world, dtype=torch.bool)
    for t, flow in reversed(window):
        held, born = compose(flow.held, after), compose(flow.born, after)
        table[t] = (held.all(dim=1).tolist(), born.all(dim=1).tolist(), t == window[-1][0])
        after = held
    return periods, table


def periodic_cases():
    rng = torch.Generator().manual_seed(0)
    sparse = [torch.eye(6, dtype=torch.float64) for _ in range(3)]
    for matrix in sparse:                         # random pairs averaged: a time-varying gossip
        i, j = torch.randperm(6, generator=rng)[:2].tolist()
        matrix[[i, j], i] = matrix[[i, j], j] = 0.5
    return {
        "LA-1 on 2": (topology.lookahead(3, 0.5), 2, None, False),
        "LA-2 on 3": (topology.multilayer((3, 2), (0.5, 0.6)), 3, None, False),
        "LA-2 on 3 overlapped": (topology.multilayer((3, 2), (0.5, 0.6)), 3, None, True),
        "LA-3 on 2 overlapped": (topology.multilayer((2, 2, 2), (0.5,) * 3), 2, 2, True),
        "LA-4 on 5, k_1 = 1": (topology.multilayer((1, 2, 1, 3), (0.5,) * 4), 5, None, False),
        "ring(8)": (dec.ring(8), 8, None, False),
        "ring(8) on 4": (dec.ring(8), 4, 2, False),
        "ring(6) every 4": (dec.ring(6, every=4), 6, None, False),
        "local SGD": (dec.local_sgd(4, 3), 4, None, False),
        "hierarchical": (dec.hierarchical(4, {2: 2, 6: 4}), 4, None, False),
        "one-peer exponential": (dec.one_peer_exponential(8), 8, None, False),
        "lookahead local SGD": (dec.lookahead_local_sgd(3, 2, 0.5), 4, None, True),
        "slow agent": (with_slow_agent(3, 2, 0.5), 4, None, False),
        "random pairs": (topology.from_matrices(sparse), 6, None, False),
        "disconnected": (topology.from_matrices([sparse[0]]), 6, None, False),
    }


PERIODIC = periodic_cases()


@pytest.mark.parametrize("name", PERIODIC)
def test_closed_form_equals_the_enumeration(name):
    schedule, world, per_rank, overlap = PERIODIC[name]
    plans, placement, hubs, flows = layout(schedule, world, per_rank, overlap)
    periods, table = enumerated(schedule, plans, flows, world)
    windows = Windows.build(schedule, plans, placement, hubs)
    if periods is None:
        assert windows is None
        return
    assert windows.periods == periods
    length = periods * schedule.period
    for t in range(3 * length):
        got = [windows.at(t, rank) for rank in range(world)]
        row = table.get(t % length)
        want = [None] * world if row is None else [(row[0][r], row[1][r], row[2]) for r in range(world)]
        assert got == want, (name, t)
        assert windows.decision(t) == t - t % length + max(table)


# ----------------------------------------------------------------- phased: the properties
def phased_cases():
    la, ml, mls = topology.lookahead, topology.multilayer, dec.multilayer_local_sgd
    return {
        # Two workers averaged every 2 steps (the slow levels never reached), then LA-2 over them.
        "local SGD then LA-2": topology.phases([(5, mls(2, (50, 2), (0.5, 0.5), {2: 2})),
                                                (None, mls(2, (2, 3), (0.5, 0.6)))]),
        # LA-1 (level 2 never reached in 7 steps), then LA-2.
        "LA-1 then LA-2": topology.phases([(7, ml((3, 100), (0.5, 0.5))), (None, ml((2, 3), (0.5, 0.6)))]),
        "a ring's tail joins local SGD": topology.phases([(5, dec.ring(4)), (3, dec.local_sgd(4, 2)),
                                                          (None, dec.local_sgd(4, 4))]),
        "short phases": topology.phases([(2, dec.ring(4)), (1, dec.local_sgd(4, 1)), (3, dec.ring(4)),
                                         (None, dec.ring(4, every=2))]),
        "nested": topology.phases([(4, la(2, 0.6)), (11, topology.phases([(3, la(1, 0.5)), (None, la(4, 0.9))])),
                                   (None, topology.phases([(5, la(5, 0.3)), (None, la(2, 0.6))]))]),
    }


PHASED = phased_cases()


def windows_by_decision(windows, schedule, horizon):
    """The syncs of the windows decided before ``horizon``, by window (the same decision sync)."""
    groups: dict[int, list[int]] = {}
    for t in range(horizon):
        if schedule.next_sync(t) == t and windows.decision(t) < horizon:
            groups.setdefault(windows.decision(t), []).append(t)
    return groups


@pytest.mark.parametrize("name", PHASED)
def test_phased_windows_tile_the_syncs_and_reach_every_rank(name):
    """On every number of ranks the agents fit (overlapped where a block qualifies): each window
    ends at its decision sync, its last; what the origins know at its start reaches every rank by
    then; the table says, at each sync, exactly which ranks' findings reach every rank by the
    decision sync (composed sync by sync here)."""
    schedule = PHASED[name]
    for world in [w for w in (2, 3, 4) if schedule.num_agents % w == 0]:
        plans, placement, hubs, flows = layout(schedule, world, schedule.num_agents // world, overlap=True)
        windows = Windows.build(schedule, plans, placement, hubs)
        origins = sorted(set().union(*(f.origins for f, p in zip(flows, plans) if not p.is_identity)))
        previous = -1
        for decision, members in sorted(windows_by_decision(windows, schedule, 60).items()):
            assert members[0] > previous and members[-1] == decision, (name, world, members)
            reach = torch.eye(world, dtype=torch.bool)
            for t in members:
                reach = compose(reach, flows[schedule.matrix_index(t)].held)
            assert bool(reach[origins].all()), (name, world, decision)
            check_table(windows, schedule, flows, members, world)
            previous = decision


def check_table(windows, schedule, flows, members, world):
    """Each sync of one window (``members``) against the composition of the later ones."""
    after = torch.eye(world, dtype=torch.bool)
    for t in reversed(members):
        flow = flows[schedule.matrix_index(t)]
        want = [(bool(h), bool(b), t == members[-1]) for h, b in
                zip(compose(flow.held, after).all(dim=1), compose(flow.born, after).all(dim=1))]
        assert [windows.at(t, r) for r in range(world)] == want, t
        after = compose(flow.held, after)


def test_each_phase_keeps_its_own_windows_and_a_tail_joins_the_next_phase():
    """LA-2 (3, 2) for 10 steps: a window [0, 6) decided at t = 5, then the tail [6, 10) with the
    level-1 sync at 8; LA-2 (2, 3) from t = 10 on its own counter: syncs at 11, 13, 15 (level 2),
    so the tail joins that first window, then windows of 6 steps decided at 21, 27."""
    ml = topology.multilayer
    schedule = topology.phases([(10, ml((3, 2), (0.5, 0.6))), (None, ml((2, 3), (0.5, 0.6)))])
    plans, placement, hubs, _ = layout(schedule, 3)
    windows = Windows.build(schedule, plans, placement, hubs)
    groups = windows_by_decision(windows, schedule, 28)
    assert groups == {5: [2, 5], 15: [8, 11, 13, 15], 21: [17, 19, 21], 27: [23, 25, 27]}
    # The level-1 sync at 8 misses rank 2, and so does what follows until the level-2 sync at 15.
    assert windows.at(8, 2) == (True, True, False) and windows.at(8, 0) == (True, True, False)


def test_a_tail_that_nothing_closes_has_no_windows():
    """A phase cut mid-window followed by identities only: the tail's findings could never be
    decided, so the check runs before every sync instead."""
    schedule = topology.phases([(3, dec.ring(4)), (None, topology.from_matrices([torch.eye(4, dtype=torch.float64)]))])
    plans, placement, hubs, _ = layout(schedule, 4)
    assert Windows.build(schedule, plans, placement, hubs) is None


# ----------------------------------------------------------------- absurd periods
@pytest.mark.parametrize("schedule, world, sync", [
    (topology.lookahead(BIG, 0.5), 2, BIG - 1),
    (topology.multilayer((10 ** 9,) * 3, (0.5,) * 3), 2, 10 ** 27 - 1),
    (dec.local_sgd(2, BIG), 2, BIG - 1),
    (dec.ring(4, every=BIG), 4, BIG - 1),
    (topology.phases([(BIG + 5, topology.multilayer((BIG, BIG), (0.5,) * 2)),
                      (None, topology.multilayer((BIG, 2), (0.5,) * 2))]), 3, BIG + 5 + 2 * BIG - 1),
])
def test_absurd_periods_are_laid_out_without_enumerating_them(schedule, world, sync):
    """The windows of periods of 10^21 and more: built at once, their decision syncs where the
    schedule's syncs are."""
    plans, placement, hubs, _ = layout(schedule, world, schedule.num_agents // world, overlap=True)
    windows = Windows.build(schedule, plans, placement, hubs)
    assert windows.at(sync - 1, 0) is None and windows.at(sync, 0) is not None
    assert windows.decision(sync) >= sync and schedule.next_sync(windows.decision(sync)) == windows.decision(sync)
