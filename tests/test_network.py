"""The simulated network time (topology.network): hand-computed alpha-beta costs.

Every expected value is worked out here from the formulas of the module docstring with simple
numbers (latencies and bandwidths of a few seconds and bytes per second), never taken from the
code's output.
"""

import math

import pytest
import torch

import topology
from topology import decentralized
from topology.network import (
    PRESETS,
    Cluster,
    RankCounts,
    SimClock,
    all_reduce_time,
    chain_time,
    exchange_time,
    place_agents,
    plan_counts,
    plan_time,
    preset,
    schedule_counts,
)


def unit_cluster(nodes, gpus_per_node, intra=(1.0, 1.0), inter=(1.0, 1.0)):
    """A cluster with (latency s, bandwidth bytes/s) of each link kind."""
    return Cluster(nodes, gpus_per_node, intra[0], intra[1], inter[0], inter[1])


def sync_plan(schedule, t):
    return topology.compile_plan(schedule.matrix(t))


# -- hand-computed plans -----------------------------------------------------------------------
def test_lookahead_on_two_gpus_of_one_node_is_one_intra_node_all_reduce():
    # intra: 1 s, 2 bytes/s; inter (never used here): 10 s, 0.5 bytes/s; 8-byte vectors.
    cluster = unit_cluster(1, 2, intra=(1.0, 2.0), inter=(10.0, 0.5))
    plan = sync_plan(topology.lookahead(3, 0.5), 2)
    # g = 2: 2 (g - 1) (alpha + n / (g beta)) = 2 x 1 x (1 + 8 / 4) = 6
    assert plan_time(plan, cluster, 8) == 6.0
    each = RankCounts(all_reduces=1, all_reduce_bytes=8)
    assert plan_counts(plan, 8) == {0: each, 1: each}


def test_local_sgd_across_two_nodes_waits_for_the_slowest_link():
    # 2 nodes x 2 GPUs, 4 workers averaging: the ring uses both link kinds.
    plan = sync_plan(decentralized.local_sgd(4, 2), 1)
    cluster = unit_cluster(2, 2, intra=(1.0, 4.0), inter=(3.0, 1.0))
    # slowest: alpha = max(1, 3) = 3, beta = min(4, 1) = 1; 2 (4 - 1) (3 + 8 / (4 x 1)) = 6 x 5
    assert plan_time(plan, cluster, 8) == 30.0
    # Latency and bandwidth are taken separately: inter has the smaller latency here.
    cluster = unit_cluster(2, 2, intra=(2.0, 4.0), inter=(1.0, 1.0))
    # alpha = max(2, 1) = 2, beta = min(4, 1) = 1: 6 (2 + 8 / 4) = 24
    assert plan_time(plan, cluster, 8) == 24.0
    assert all(c == RankCounts(all_reduces=1, all_reduce_bytes=8) for c in plan_counts(plan, 8).values())


def test_a_group_with_one_gpu_per_node_uses_only_the_inter_node_link():
    plan = sync_plan(topology.lookahead(3, 0.5), 2)
    cluster = unit_cluster(2, 2, intra=(100.0, 0.01), inter=(1.0, 2.0))
    # agents on GPUs 0 and 2 (nodes 0 and 1): 2 (2 - 1) (1 + 8 / (2 x 2)) = 6; intra never used
    assert plan_time(plan, cluster, 8, agent_gpus=[0, 2]) == 6.0
    # both agents on GPU 3: nothing moves
    assert plan_time(plan, cluster, 8, agent_gpus=[3, 3]) == 0.0
    assert plan_counts(plan, 8, agent_gpus=[3, 3]) == {3: RankCounts()}


def test_ring_gossip_sends_one_message_per_neighbour_and_serializes_a_gpus_messages():
    plan = sync_plan(decentralized.ring(4), 0)
    # one node: every message 1 + 2 / 1 = 3 s; each GPU sends 2 and receives 2: 2 x 3 = 6
    assert plan_time(plan, unit_cluster(1, 4), 2) == 6.0
    # 2 nodes x 2 GPUs: the ring 0-1-2-3-0 has intra links 0-1, 2-3 and inter links 1-2, 3-0, so
    # every GPU sends one intra (1 + 2 / 1 = 3 s) and one inter (5 + 2 / 0.5 = 9 s) message: 12
    cluster = unit_cluster(2, 2, intra=(1.0, 1.0), inter=(5.0, 0.5))
    assert plan_time(plan, cluster, 2) == 12.0
    assert all(c == RankCounts(sends=2, send_bytes=4) for c in plan_counts(plan, 2).values())


def test_exchange_time_is_the_busiest_port():
    cluster = unit_cluster(1, 4)
    # GPU 0 receives three 1 + 1 = 2 s messages: 6; every sender is busy 2
    assert exchange_time(cluster, [(1, 0), (2, 0), (3, 0)], 1) == 6.0
    # GPU 0 sends three: 6; every receiver is busy 2
    assert exchange_time(cluster, [(0, 1), (0, 2), (0, 3)], 1) == 6.0
    # a permutation: every port carries one message
    assert exchange_time(cluster, [(0, 1), (1, 2), (2, 3), (3, 0)], 1) == 2.0
    assert exchange_time(cluster, [], 1) == 0.0


def two_blocks_plan(third_source_weight):
    """Blocks {0, 1} (receivers 0, 1) and, on receivers 2, 3, a block over {2, 3} plus agent 1
    when ``third_source_weight`` > 0 (agent 1 is then in both blocks)."""
    w = third_source_weight
    rest = (1.0 - w) / 2
    matrix = [[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, w, w], [0.0, 0.0, rest, rest], [0.0, 0.0, rest, rest]]
    return topology.compile_plan(topology.check_mixing_matrix(matrix, 4))


def test_blocks_on_disjoint_gpus_run_in_parallel_and_blocks_sharing_a_gpu_in_turn():
    cluster = unit_cluster(1, 4)
    disjoint = two_blocks_plan(0.0)
    assert [b.members for b in disjoint.blocks] == [(0, 1), (2, 3)]
    # each 2 (2 - 1) (1 + 4 / 2) = 6, at the same time
    assert plan_time(disjoint, cluster, 4) == 6.0
    sharing = two_blocks_plan(0.5)
    assert [b.members for b in sharing.blocks] == [(0, 1), (1, 2, 3)]
    # GPU 1 is in both: 6, then 2 (3 - 1) (1 + 6 / 3) = 12 for the three-GPU block with n = 6
    assert plan_time(sharing, cluster, 6) == 2 * (1 + 6 / 2) + 2 * 2 * (1 + 6 / 3)
    assert plan_counts(sharing, 6)[1] == RankCounts(all_reduces=2, all_reduce_bytes=12)


def test_an_overlapped_hub_block_pays_only_the_part_of_the_reduce_not_hidden_by_compute():
    plan = sync_plan(topology.lookahead(3, 0.5), 2)
    cluster = unit_cluster(1, 2, intra=(1.0, 2.0))
    hub = lambda block, plan: 0                     # noqa: E731
    # reduce = broadcast = (g - 1) alpha + n / beta = 1 + 8 / 2 = 5
    assert chain_time(cluster, [0, 1], 8) == 5.0
    assert plan_time(plan, cluster, 8, hub_of=hub, head_start_s=1.5) == (5 - 1.5) + 5
    assert plan_time(plan, cluster, 8, hub_of=hub, head_start_s=7.0) == 5.0     # fully hidden
    counts = plan_counts(plan, 8, hub_of=hub)
    each = RankCounts(reduces=1, reduce_bytes=8, block_broadcasts=1, block_broadcast_bytes=8)
    assert counts == {0: each, 1: each}


def test_a_hub_block_over_three_gpus_pipelines_its_chain():
    # LA-2's outer sync: agents 0, 1, 2, hub 0 (the worker's GPU); 6-byte vectors.
    schedule = topology.multilayer((2, 2), (0.5, 0.5))
    plan = sync_plan(schedule, 3)
    cluster = unit_cluster(1, 3)
    # reduce = broadcast = (3 - 1) x 1 + 6 / 1 = 8: the latency once per hop, the bytes once
    assert chain_time(cluster, [0, 1, 2], 6) == 8.0
    # the reduce started 3 s early: (8 - 3) + 8
    assert plan_time(plan, cluster, 6, hub_of=lambda block, plan: 0, head_start_s=3.0) == 13.0
    assert plan_counts(plan, 6, hub_of=lambda block, plan: 0)[2] == RankCounts(
        reduces=1, reduce_bytes=6, block_broadcasts=1, block_broadcast_bytes=6)


def test_the_clock_overlaps_a_hub_reduce_with_every_inner_step_since_the_previous_sync():
    # Period 4, sync at t = 1, 5, 9, ...: the first reduce runs under the steps t = 0, 1 (2 steps),
    # every later one under the 4 steps since the previous sync.
    eye = [[1.0, 0.0], [0.0, 1.0]]
    avg = [[0.5, 0.5], [0.5, 0.5]]
    schedule = topology.from_matrices([eye, avg, eye, eye], workers=(0,))
    cluster = unit_cluster(1, 2)                     # reduce = broadcast = 1 + 4 / 1 = 5
    clock = SimClock(schedule, cluster, 4, 1.0, hub_of=lambda block, plan: 0)
    durations = [clock.advance() for _ in range(10)]
    # t = 1: 1 + (5 - 2) + 5 = 9;  t = 5, 9: 1 + (5 - 4) + 5 = 7;  other steps: 1
    assert durations == [1, 9, 1, 1, 1, 7, 1, 1, 1, 7]
    assert [clock.previous_sync(t) for t in (0, 1, 2, 5, 6, 9)] == [-1, -1, 1, 1, 5, 5]
    # Without overlap every sync is an all-reduce: 2 (2 - 1) (1 + 4 / 2) = 6
    plain = SimClock(schedule, cluster, 4, 1.0)
    assert [plain.advance() for _ in range(6)] == [1, 7, 1, 1, 1, 7]


def test_the_clock_over_periods_sums_the_hand_computed_step_times():
    # LA-2, ks = (2, 2), on 3 GPUs of one node: level-1 sync (agents 0, 1) at t = 1, level-2 sync
    # (agents 0, 1, 2) at t = 3; 6-byte vectors, 1 s latency, 1 byte/s, 0.25 s inner steps.
    clock = SimClock(topology.multilayer((2, 2), (0.5, 0.5)), unit_cluster(1, 3), 6, 0.25)
    level1 = 2 * (2 - 1) * (1 + 6 / 2)               # 8
    level2 = 2 * (3 - 1) * (1 + 6 / 3)               # 12
    period = [0.25, 0.25 + level1, 0.25, 0.25 + level2]
    assert [clock.step_time(t) for t in range(4)] == period
    for _ in range(8):
        clock.advance()
    assert clock.t == 8 and clock.time == 2 * sum(period) == 42.0
    clock.compute_s = 1.0                             # applies from the next step on
    assert clock.advance() == 1.0 and clock.time == 43.0


def test_schedule_counts_sum_the_plans_of_the_iterations_run():
    # LA-2 (2, 2), 10 iterations: level-1 syncs at t = 1, 5, 9 (agents 0, 1), level-2 syncs at
    # t = 3, 7 (agents 0, 1, 2).
    counts = schedule_counts(topology.multilayer((2, 2), (0.5, 0.5)), 8, 10)
    assert counts[0] == counts[1] == RankCounts(all_reduces=5, all_reduce_bytes=40)
    assert counts[2] == RankCounts(all_reduces=2, all_reduce_bytes=16)
    assert schedule_counts(decentralized.ring(4), 8, 0) == {q: RankCounts() for q in range(4)}
    assert schedule_counts(decentralized.ring(4), 8, 3)[2] == RankCounts(sends=6, send_bytes=48)
    # Counted on the schedule's words: a period of 10^21, and a phased schedule's prefix (syncs
    # at t = 0, 1, 2, then every 4 from its own start: 6, 10).
    assert schedule_counts(topology.lookahead(10**21, 0.5), 8, 10**22)[1] == RankCounts(all_reduces=10,
                                                                                       all_reduce_bytes=80)
    phased = topology.phases([(3, decentralized.local_sgd(2, 1)), (None, decentralized.local_sgd(2, 4))])
    assert schedule_counts(phased, 8, 11)[0] == RankCounts(all_reduces=5, all_reduce_bytes=40)


# -- presets -----------------------------------------------------------------------------------
def test_presets_are_the_documented_nominal_figures():
    assert set(PRESETS) == {"nvlink_8", "ethernet_100g_64", "infiniband_400g_1024"}
    nvlink, ethernet, infiniband = (preset(n) for n in ("nvlink_8", "ethernet_100g_64", "infiniband_400g_1024"))
    assert (nvlink.num_gpus, ethernet.num_gpus, infiniband.num_gpus) == (8, 64, 1024)
    assert all(c.gpus_per_node == 8 for c in PRESETS.values())
    # NVLink 4: 900 GB/s both directions together; 100 Gb/s and 400 Gb/s in bytes
    assert all(c.intra_bytes_per_s == 900e9 / 2 for c in PRESETS.values())
    assert ethernet.inter_bytes_per_s == 100e9 / 8 and infiniband.inter_bytes_per_s == 400e9 / 8
    assert infiniband.inter_latency_s < ethernet.inter_latency_s
    # A 1 GB all-reduce over 64 GPUs on Ethernet: 2 x 63 x (20 us + 1e9 / (64 x 12.5e9)) s
    assert math.isclose(all_reduce_time(ethernet, range(64), 10**9), 2 * 63 * (20e-6 + 1e9 / (64 * 12.5e9)))


def test_more_agents_than_gpus_is_refused():
    with pytest.raises(ValueError, match="9 agents but the cluster has 8 GPUs"):
        SimClock(decentralized.ring(9), preset("nvlink_8"), 8, 1.0)
    # with an explicit mapping several agents may share a GPU
    assert place_agents(preset("nvlink_8"), 9, [0] * 9) == (0,) * 9


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("nodes", 0, "nodes must be an integer >= 1"),
        ("gpus_per_node", 2.0, "gpus_per_node must be an integer >= 1"),
        ("intra_latency_s", -1.0, "intra_latency_s must be a finite real number >= 0"),
        ("inter_latency_s", float("nan"), "inter_latency_s must be a finite real number >= 0"),
        ("intra_bytes_per_s", 0, "intra_bytes_per_s must be a finite real number > 0"),
        ("inter_bytes_per_s", float("inf"), "inter_bytes_per_s must be a finite real number > 0"),
        ("inter_bytes_per_s", True, "inter_bytes_per_s must be a finite real number > 0"),
        ("intra_latency_s", "1us", "intra_latency_s must be a finite real number >= 0"),
    ],
)
def test_cluster_fields_are_validated_by_name(field, value, message):
    good = dict(nodes=1, gpus_per_node=2, intra_latency_s=1.0, intra_bytes_per_s=1.0,
                inter_latency_s=1.0, inter_bytes_per_s=1.0)
    with pytest.raises(ValueError, match=message):
        Cluster(**{**good, field: value})


def test_other_arguments_are_validated_by_name():
    cluster, plan = unit_cluster(1, 2), sync_plan(topology.lookahead(3, 0.5), 2)
    with pytest.raises(ValueError, match="cluster must be one of nvlink_8, ethernet_100g_64"):
        preset("nvlink8")
    with pytest.raises(ValueError, match="nbytes must be an integer >= 0"):
        plan_time(plan, cluster, -1)
    with pytest.raises(ValueError, match="compute_s must be a finite real number >= 0"):
        SimClock(topology.lookahead(3, 0.5), cluster, 8, -0.5)
    with pytest.raises(ValueError, match=r"agent_gpus\[1\] must be a GPU index in \[0, 2\)"):
        plan_time(plan, cluster, 8, agent_gpus=[0, 2])
    with pytest.raises(ValueError, match=r"agent_gpus must give one GPU per agent \(2\); got 3"):
        plan_counts(plan, 8, agent_gpus=[0, 1, 1])
    with pytest.raises(ValueError, match=r"hub_of must return one of the block's GPUs \(0, 1\)"):
        plan_time(plan, cluster, 8, hub_of=lambda block, plan: 5)
    with pytest.raises(ValueError, match="iterations must be an integer >= 0"):
        schedule_counts(topology.lookahead(3, 0.5), 8, -1)


@pytest.mark.timeout(20)
def test_the_clock_costs_nothing_proportional_to_the_period_and_follows_phases():
    """previous_sync over a phased schedule equals a brute-force scan; a period of 10**21 is free."""
    huge = SimClock(topology.lookahead(10**21, 0.5), Cluster(1, 2, 1.0, 1.0, 1.0, 1.0), 4, 0.5)
    assert [huge.advance() for _ in range(3)] == [0.5, 0.5, 0.5] and huge.previous_sync(10**20) == -1
    from topology import decentralized as dec

    phased = topology.phases([(5, dec.local_sgd(2, 1)), (3, dec.local_sgd(2, 2)), (None, dec.local_sgd(2, 3))])
    clock = SimClock(phased, Cluster(1, 2, 1.0, 1.0, 1.0, 1.0), 4, 0.5)
    syncs = [t for t in range(40) if not torch.equal(phased.matrix(t), torch.eye(2, dtype=torch.float64))]
    for t in range(40):
        assert clock.previous_sync(t) == max((s for s in syncs if s < t), default=-1), t
