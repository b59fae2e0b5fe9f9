"""E8: time to accuracy at cluster scale -- the tiny main, the simulated clock of a run against
hand-computed step costs, the time-to-target rule, and the generated classification problem."""

import argparse

import pytest

from experiments import e8_cluster_time as e8
from experiments.teacher_classification import first_valid_split_seed, teacher_classification
from tests.test_experiments import check_outputs
from topology.network import Cluster


def test_tiny_main_writes_table_and_plot(tmp_path):
    out = e8.main(["--tiny", "--out", str(tmp_path), "--targets", "0.2"])
    text = check_outputs(tmp_path, e8.NAME)
    for preset in e8.PRESET_NAMES:
        assert f"## Simulated ms to 0.2 held-out accuracy, {preset}" in text
    assert "**" in text  # some schedule reached 20 % (from ~10 % at iteration 0)
    results = out["results"]
    assert len(results) == len(e8.SPLITS) * 2 * len(e8.SCHEDULES)   # --tiny: 4 and 8 workers
    for curve in results.values():
        assert [p["step"] for p in curve] == [0, 8, 16]
        assert curve[0]["time"] == {name: 0.0 for name in e8.PRESET_NAMES}
    assert set(out["split_seeds"]) == {(s, w) for s in e8.SPLITS for w in (4, 8)}


# A toy cluster: 2 nodes x 2 GPUs; intra-node 1 s and 1000 B/s, inter-node 3 s and 100 B/s.
TOY = Cluster(2, 2, 1.0, 1000.0, 3.0, 100.0)
N = 874 * 4        # the student's float32 vector, bytes
COMPUTE = 0.5
# Ring all-reduce over GPUs 0-3 (two nodes of two: slowest link 3 s, 100 B/s): 2 (g - 1) (alpha + n / (g beta)).
ALL_REDUCE = 2 * 3 * (3.0 + N / (4 * 100.0))
INTRA_MSG, INTER_MSG = 1.0 + N / 1000.0, 3.0 + N / 100.0


@pytest.mark.parametrize("label, step_costs", [
    # Every step: compute + one all-reduce over the 4 GPUs.
    ("all-reduce every step", lambda t: COMPUTE + ALL_REDUCE),
    # Lookahead k=8: the slow agent sits on GPU 0, so its syncs (t = 7, 15) are the same all-reduce.
    ("Lookahead over local SGD, k=8, alpha=0.5", lambda t: COMPUTE + (ALL_REDUCE if t % 8 == 7 else 0.0)),
    # Ring 0-1-2-3-0: every GPU sends (and receives) one intra-node and one inter-node message.
    ("ring gossip", lambda t: COMPUTE + INTRA_MSG + INTER_MSG),
    # One peer.  Hop 1 (t even): every GPU sends one message and receives one, GPU 0 receiving
    # from GPU 3 over the inter-node link.  Hop 2 (t odd): pairs {0, 2} and {1, 3} average, which
    # the plan compiles to two 2-GPU all-reduces across the nodes, run at once: 2 (alpha + n / (2 beta)).
    ("one-peer exponential gossip", lambda t: COMPUTE + (INTER_MSG if t % 2 == 0 else 2 * (3.0 + N / 200.0))),
])
def test_simulated_time_is_the_sum_of_hand_computed_step_costs(label, step_costs):
    problem = teacher_classification(train_size=512, test_size=64, batch_size=4, num_workers=4)
    curve = e8.run(problem, e8.SCHEDULES[label](4), {"toy": TOY}, steps=16, eval_every=8, lr=0.1,
                   compute_s=COMPUTE)
    assert [p["step"] for p in curve] == [0, 8, 16]
    for point in curve:
        expected = sum(step_costs(t) for t in range(point["step"]))
        assert point["time"]["toy"] == pytest.approx(expected, rel=1e-12)


def test_time_to_target_takes_the_first_evaluation_at_or_above_it_without_interpolating():
    curve = [{"step": s, "accuracy": a, "time": {"a": 10.0 * s, "b": 1.0 * s}}
             for s, a in [(0, 0.1), (8, 0.5), (16, 0.79), (24, 0.85), (32, 0.7), (40, 0.9)]]
    # 0.79 -> 0.85 crosses 0.8 between iterations 16 and 24: charged iteration 24's time.
    assert e8.time_to_target(curve, 0.8, "a") == (24, 240.0)
    assert e8.time_to_target(curve, 0.8, "b") == (24, 24.0)
    assert e8.time_to_target(curve, 0.79, "a") == (16, 160.0)    # equal counts as reached
    assert e8.time_to_target(curve, 0.1, "a") == (0, 0.0)
    assert e8.time_to_target(curve, 0.95, "a") is None


def test_headline_bolds_the_fastest_and_bounds_the_runs_that_miss():
    def curve(accuracies, ms_per_step):
        return [{"step": 8 * j, "accuracy": a, "time": {p: 8 * j * ms_per_step * 1e-3 for p in e8.PRESET_NAMES}}
                for j, a in enumerate(accuracies)]

    args = argparse.Namespace(agents=[4])
    results = {}
    for split in e8.SPLITS:
        for i, label in enumerate(e8.SCHEDULES):
            # Schedule i reaches 0.8 at iteration 8 (i even) or never (i odd), at 1 + i ms per step.
            results[split, 4, label] = curve([0.1, 0.9 if i % 2 == 0 else 0.5, 0.6], 1.0 + i)
    table = e8.headline(results, args, e8.PRESET_NAMES[0], 0.8)
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in table.splitlines()[2:]}
    labels = list(e8.SCHEDULES)
    assert rows[labels[0]][0] == "**8**"                 # 8 iterations x 1 ms, the fastest
    assert rows[labels[2]][0] == "24"                     # 8 x 3 ms
    assert rows[labels[1]][0] == "> 32"                   # never: the run's 16 x 2 ms
    assert table.count("**") == 2 * len(e8.SPLITS)


def test_first_valid_split_seed_is_the_smallest_that_gives_every_worker_a_batch():
    options = {"train_size": 2048, "test_size": 64}
    seed = first_valid_split_seed(16, 0.1, 16, **options)
    assert seed > 0   # here seed 0 leaves some worker short: the search did something
    for smaller in range(seed):
        with pytest.raises(ValueError, match="fewer than batch_size=16"):
            teacher_classification(partition="dirichlet", num_workers=16, beta=0.1, split_seed=smaller, **options)
    problem = teacher_classification(partition="dirichlet", num_workers=16, beta=0.1, split_seed=seed, **options)
    assert min(len(p) for p in problem.partition.parts) >= 16
    with pytest.raises(ValueError, match="no split_seed below 3"):
        first_valid_split_seed(256, 0.1, 16, limit=3, **options)


def test_teacher_labels_are_fixed_by_data_seed_and_every_class_occurs():
    a = teacher_classification(train_size=4096, test_size=64)
    b = teacher_classification(train_size=4096, test_size=64, seed=3)
    data = a.partition.labels
    assert data.equal(b.partition.labels)       # seed changes the student and batch order only
    assert not data.equal(teacher_classification(train_size=4096, test_size=64, data_seed=1).partition.labels)
    assert data.bincount(minlength=10).min() > 0
    assert a.evaluate(a.model())["accuracy"] < 0.5   # an untrained student is far from the teacher


def test_seed_curves_are_averaged_point_by_point_keeping_steps_and_times():
    def curve(accuracies):
        return [{"step": 8 * j, "accuracy": a, "loss": 1 - a, "consensus": 2 * a, "time": {"c": 3.0 * j}}
                for j, a in enumerate(accuracies)]

    mean = e8.average_curves([curve([0.1, 0.5]), curve([0.3, 0.9])])
    assert mean == [{"step": 0, "accuracy": pytest.approx(0.2), "loss": pytest.approx(0.8),
                     "consensus": pytest.approx(0.4), "time": {"c": 0.0}},
                    {"step": 8, "accuracy": pytest.approx(0.7), "loss": pytest.approx(0.3),
                     "consensus": pytest.approx(1.4), "time": {"c": 3.0}}]
