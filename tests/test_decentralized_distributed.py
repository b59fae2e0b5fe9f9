"""Decentralized schedules on 4 gloo processes, with 1 and with several agents per process,
against the same schedules co-located: every agent's whole flat buffer (parameters, pullback
state, push-sum weight) at every step, float64, <= 1e-12 relative; hierarchical averaging against
values computed by hand; point-to-point messages and bytes per step against the graph's degrees.

All cases run in one spawn of 4 processes (tests/decentralized_worker.py), to pay the start-up of
torch and gloo once.
"""

import math

import pytest
import torch

from launch.engine.placement import Placement
from tests.decentralized_cases import build_schedule, run_case
from tests.spawn import ROOT, run_torch
from tests.trajectories import relative_deviation

NPROCS = 4
TOL = 1e-12
D = 44  # parameters of tests.problems.make_model

CASES = {
    "ring8_2pr": dict(build=["ring", [8], {}], agents_per_rank=2, optimizer="sgd_momentum", steps=20),
    "ring4_1pr": dict(build=["ring", [4], {"weights": "uniform"}], agents_per_rank=1, optimizer="adam", steps=20),
    "torus16_4pr": dict(build=["torus", [4, 4], {}], agents_per_rank=4, optimizer="sgd", steps=12),
    "exp8_2pr": dict(build=["exponential", [8], {"weights": "metropolis"}], agents_per_rank=2,
                     optimizer="adam", steps=20),
    "exp4_1pr": dict(build=["exponential", [4], {}], agents_per_rank=1, optimizer="sgd", steps=12),
    "exp64_16pr": dict(build=["exponential", [64], {}], agents_per_rank=16, optimizer="sgd", steps=6),
    "onepeer8_2pr": dict(build=["one_peer_exponential", [8], {}], agents_per_rank=2,
                         optimizer="sgd_momentum", steps=18),
    "pushsum8_2pr": dict(build=["push_sum_random", [8, 5, 1], {}], agents_per_rank=2,
                         optimizer="sgd_momentum", steps=20),
    "pushsum4_1pr": dict(build=["push_sum_random", [4, 2, 3], {}], agents_per_rank=1, optimizer="sgd", steps=20),
    "localsgd8_2pr": dict(build=["local_sgd", [8, 3], {}], agents_per_rank=2, optimizer="adam", steps=18),
    "la_local3_1pr": dict(build=["lookahead_local_sgd", [3, 4, 0.5], {"averaging": {"2": 3}}],
                          agents_per_rank=1, optimizer="sgd_momentum", policy="pullback", steps=24),
    "la2_local6_2pr": dict(build=["multilayer_local_sgd", [6, [2, 3], [0.5, 0.6]], {"averaging": {"1": 2}}],
                           agents_per_rank=2, optimizer="sgd_momentum", policy="reset", steps=24),
    "hier8_2pr_hand": dict(build=["hierarchical", [8, {"3": 2, "4": 4, "6": 8}], {}], agents_per_rank=2,
                           mode="hand", steps=24),
    "hier4_1pr_hand": dict(build=["hierarchical", [4, {"2": 2, "4": 4}], {}], agents_per_rank=1,
                           mode="hand", steps=8),
}
GOSSIP = ["ring8_2pr", "ring4_1pr", "torus16_4pr", "exp8_2pr", "exp4_1pr", "exp64_16pr", "pushsum8_2pr",
          "pushsum4_1pr"]
TRAIN = [name for name, case in CASES.items() if case.get("mode", "train") == "train"]


def _build(name):
    """The schedule of a case (build_schedule on a copy: JSON-style specs are not mutated)."""
    kind, args, kwargs = CASES[name]["build"]
    return build_schedule([kind, list(args), dict(kwargs)])


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out = tmp_path_factory.mktemp("decentralized")
    spec = {"cases": CASES, "out": str(out), "timeout_s": 60}
    results = run_torch(NPROCS, spec, timeout=150, worker=ROOT / "tests" / "decentralized_worker.py")
    assert all(code == 0 for code, _ in results), results
    return [torch.load(out / f"rank{r}.pt") for r in range(NPROCS)]


@pytest.mark.parametrize("name", TRAIN)
def test_distributed_equals_colocated_every_agent_every_step(distributed, name):
    case = {k: v for k, v in CASES[name].items() if k != "agents_per_rank"}
    colocated = run_case(case)
    m = colocated["buffers"].shape[1]
    seen = []
    for rank, saved in enumerate(distributed):
        got = saved[name]
        assert got["agents"] == list(range(rank * m // NPROCS, (rank + 1) * m // NPROCS))
        assert relative_deviation(got["buffers"], colocated["buffers"][:, got["agents"]]) <= TOL
        # The diagnostic is a collective: every rank computes the same consensus distance.
        want = torch.tensor(colocated["distances"])
        assert (torch.tensor(got["distances"]) - want).abs().max() <= TOL * want.abs().max()
        seen += got["agents"]
    assert seen == list(range(m))
    # Teeth: the agents moved and disagreed (a sync that did nothing would not pass unnoticed).
    buffers = colocated["buffers"]
    assert (buffers[-1] - buffers[0]).abs().max() > 1e-3
    assert max(colocated["distances"]) > 1e-4


# Hand-computed: with every agent holding its own index i before each sync, a group of size g
# that averages gives each member the mean of its indices, g * (i // g) + (g - 1) / 2.
# hierarchical(8, {3: 2, 4: 4, 6: 8}): t + 1 = 3, 9 -> pairs; 4, 8 -> quads (4 beats nothing);
# 6, 12 -> all 8 (6 beats 3 and 4 at 12); other steps: no averaging.
HAND = {
    "hier8_2pr_hand": {3: 2, 4: 4, 6: 8, 8: 4, 9: 2, 12: 8},
    "hier4_1pr_hand": {2: 2, 4: 4, 6: 2, 8: 4},
}


@pytest.mark.parametrize("name", list(HAND))
def test_hierarchical_averaging_by_hand(distributed, name):
    period = 12 if name.startswith("hier8") else 8
    for saved in distributed:
        got = saved[name]
        for t in range(CASES[name]["steps"]):
            g = HAND[name].get((t % period) + 1)
            for column, i in enumerate(got["agents"]):
                want = float(i) if g is None else g * (i // g) + (g - 1) / 2
                assert torch.all(got["buffers"][t, column] == want), (name, t, i)
            # A group inside one rank is local math; a group across ranks is one all-reduce.
            per_rank = CASES[name]["agents_per_rank"]
            assert got["counts"][t][0] == (0 if g is None or g <= per_rank else 1), (name, t)
            assert got["counts"][t][2] == 0


def expected_messages(matrix: torch.Tensor, placement: Placement, rank: int) -> int:
    """Messages a rank sends to apply a gossip matrix: one per (local agent i, other rank holding
    some j with P[i, j] != 0), however many agents of that rank read x_i."""
    pairs = set()
    for i in placement.agents_on(rank):
        for j in range(matrix.shape[0]):
            if j != i and matrix[i, j] != 0 and placement.rank_of(j) != rank:
                pairs.add((i, placement.rank_of(j)))
    return len(pairs)


@pytest.mark.parametrize("name", GOSSIP)
def test_messages_and_bytes_per_step_match_the_degree(distributed, name):
    schedule = _build(name)
    m = schedule.num_agents
    placement = Placement.make(m, NPROCS)
    size = D + (1 if schedule.push_sum else 0)  # the push-sum weight travels with the parameters
    p = schedule.matrix(0)
    off = (p != 0) & ~torch.eye(m, dtype=torch.bool)
    for rank, saved in enumerate(distributed):
        counts = saved[name]["counts"]
        want = expected_messages(p, placement, rank)
        if placement.agents_per_rank == 1:
            assert want == int(off[rank].sum())  # one message per out-neighbour: the degree
        for t in range(CASES[name]["steps"]):
            all_reduces, all_reduce_bytes, sends, send_bytes = counts[t]
            assert (all_reduces, all_reduce_bytes) == (0, 0), (name, rank, t)
            assert sends == want and send_bytes == want * size * 8, (name, rank, t, sends, want)
    # Proportional to the degree, not to the number of agents: 64 agents on 4 ranks with
    # exponential hops 1..32 send at most 16 agents x 6 hops, not 16 x 63.
    if name == "exp64_16pr":
        assert max(expected_messages(p, placement, r) for r in range(NPROCS)) <= 16 * int(math.log2(m))
