"""Agents that span ranks: the arithmetic of GroupPlacement (groups, lanes, what each rank holds,
the process groups of every lane) and the shard schedule it runs (topology.data_parallel.shard_schedule)."""

import itertools

import pytest
import torch

import topology
from launch.engine.placement import GroupPlacement, Placement
from topology import decentralized as dec
from topology.data_parallel import shard_schedule


def test_two_agents_of_two_ranks():
    p = GroupPlacement.make(2, 4, 2)
    assert (p.num_groups, p.world_size, p.ranks_per_agent) == (2, 4, 2)
    assert [p.group_ranks(g) for g in range(2)] == [(0, 1), (2, 3)]
    assert [p.lane_ranks(lane) for lane in range(2)] == [(0, 2), (1, 3)]
    assert [p.agents_on(r) for r in range(4)] == [(0,), (0,), (1,), (1,)]
    assert [p.ranks_holding(a) for a in range(2)] == [(0, 1), (2, 3)]
    assert [p.shard_of(r // 2, r) for r in range(4)] == [0, 1, 2, 3]
    # The sync of both agents (slots 0 and 1) runs on each lane: rank 0 with 2, rank 1 with 3.
    assert p.lane_groups([(0, 1)]) == [(0, 2), (1, 3)]


def test_passive_agents_replicated_on_a_workers_group_or_on_a_group_of_their_own():
    la = topology.lookahead(3, 0.5)          # worker 0, slow agent 1
    together = GroupPlacement.make(la.num_agents, 2, 2)
    assert together.agents_on(0) == together.agents_on(1) == (0, 1)     # the slow agent replicated on the group
    assert together.lane_groups([(0,)]) == [(0,), (1,)]                 # each lane syncs locally
    apart = GroupPlacement.make(la.num_agents, 4, 2)
    assert apart.ranks_holding(0) == (0, 1) and apart.ranks_holding(1) == (2, 3)
    assert apart.lane_groups([(0, 1)]) == [(0, 2), (1, 3)]
    # Lookahead over local SGD: 2 workers and their slow agent, 3 groups of 4 ranks.
    over = GroupPlacement.make(dec.lookahead_local_sgd(2, 4, 0.5).num_agents, 12, 4)
    assert over.ranks_holding(2) == (8, 9, 10, 11) and over.lane_ranks(3) == (3, 7, 11)


@pytest.mark.parametrize("groups, size, per_group", list(itertools.product((1, 2, 3), (1, 2, 4), (1, 2))))
def test_every_rank_is_one_lane_of_one_group(groups, size, per_group):
    num_agents = groups * per_group
    p = GroupPlacement.make(num_agents, groups * size, size, per_group)
    ranks = range(p.world_size)
    assert sorted(r for g in range(groups) for r in p.group_ranks(g)) == list(ranks)
    assert sorted(r for lane in range(size) for r in p.lane_ranks(lane)) == list(ranks)
    for r in ranks:
        group, lane = p.group_of(r), p.lane_of(r)
        assert set(p.group_ranks(group)) & set(p.lane_ranks(lane)) == {r} == {p.lane_rank(group, lane)}
        assert p.agents_on(r) == p.slots.agents_on(group)
        assert all(r in p.ranks_holding(a) for a in p.agents_on(r))
    # Every agent's shards are numbered agent x size + lane, each once.
    shards = sorted(p.shard_of(a, r) for r in ranks for a in p.agents_on(r))
    assert shards == list(range(num_agents * size))


def test_one_rank_per_agent_is_the_ordinary_placement():
    p, q = GroupPlacement.make(6, 3, 1), Placement.make(6, 3)
    assert all(p.agents_on(r) == q.agents_on(r) for r in range(3))
    assert p.lane_groups([(0, 2), (1, 2)]) == [(0, 2), (1, 2)]


@pytest.mark.parametrize("args, message", [
    ((2, 4, 0), "ranks_per_agent must be an integer >= 1; got 0"),
    ((2, 4, True), "ranks_per_agent must be an integer >= 1; got True"),
    ((2, 6, 4), "world size 6 is not a multiple of ranks_per_agent=4: .* start a multiple of 4 processes"),
    ((3, 4, 2), "2 groups of 2 ranks \\(world size 4, ranks_per_agent=2\\) do not fit the schedule's 3 agents"),
    ((3, 4, 2, 2), "with agents_per_group=2: groups x agents per group must equal the number of agents"),
    ((2, 4, 2, 0), "agents_per_group must be an integer >= 1; got 0"),
])
def test_group_placements_that_do_not_fit_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        GroupPlacement.make(*args)


def test_shard_of_refuses_an_agent_the_rank_does_not_hold():
    with pytest.raises(ValueError, match="rank 3 does not hold agent 0; it holds \\[1\\]"):
        GroupPlacement.make(2, 4, 2).shard_of(0, 3)


# -- the shard schedule ---------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", [dec.local_sgd(2, 3), topology.lookahead(2, 0.5),
                                      topology.phases([(3, topology.data_parallel(2)), (None, dec.local_sgd(2, 2))])])
def test_the_shard_schedule_is_the_kronecker_lift_with_the_same_words(schedule):
    size = 2
    sharded = shard_schedule(schedule, size)
    mean = torch.full((size, size), 0.5, dtype=torch.float64)
    assert sharded.workers == tuple(w * size + lane for w in schedule.workers for lane in range(size))
    for t in range(12):
        assert torch.equal(sharded.matrix(t), torch.kron(schedule.matrix(t), torch.eye(size, dtype=torch.float64)))
        assert torch.equal(sharded.gradient_matrix(t), torch.kron(schedule.gradient_matrix(t), mean))
        assert sharded.matrix_index(t) == schedule.matrix_index(t)
        assert sharded.next_sync(t) == schedule.next_sync(t)
    assert sharded.mixes_gradients           # every agent all-reduces its shards' gradients


def test_passive_replicas_take_no_gradient_and_one_rank_per_agent_changes_nothing():
    sharded = shard_schedule(topology.lookahead(2, 0.5), 3)
    assert sharded.passive == (3, 4, 5) and not sharded.gradient_matrix(0)[:, 3:].any()
    same = shard_schedule(dec.local_sgd(2, 3), 1)
    assert all(torch.equal(same.matrix(t), dec.local_sgd(2, 3).matrix(t)) for t in range(6))
    assert not same.mixes_gradients


@pytest.mark.parametrize("schedule, size, message", [
    (dec.local_sgd(2, 3), 0, "ranks_per_agent must be an integer >= 1; got 0"),
    (dec.push_sum(topology.graphs.ring_graph(3)), 2, "does not spread push-sum schedules"),
])
def test_the_shard_schedule_refuses_what_it_cannot_spread(schedule, size, message):
    with pytest.raises(ValueError, match=message):
        shard_schedule(schedule, size)
