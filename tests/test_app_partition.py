"""Heterogeneous data on the command line: ``problem.partition`` gets the schedule's number of
workers as ``num_workers`` and the run directory gets every worker's label histogram."""

import csv

from hydra import compose, initialize_config_module

from experiments.digits import digits_split
from launch.cli import app

FAST = ["problem=digits_logistic", "launch.steps=4", "launch.dtype=float32", "launch.check_reference=false"]


def config(*overrides):
    with initialize_config_module(config_module="launch.cli.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_partition_uses_the_schedules_workers_and_writes_their_histograms(tmp_path):
    overrides = [*FAST, "topology=ring", "topology.n=4", "+problem.partition=dirichlet", "+problem.beta=0.5"]
    assert app.run(config(*overrides), tmp_path) == 0
    with open(tmp_path / "label_histograms.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["worker"]) for r in rows] == [0, 1, 2, 3]            # num_workers = the ring's 4 workers
    labels = digits_split().y_train
    totals = [sum(int(r[f"label_{c}"]) for r in rows) for c in range(10)]
    assert totals == [int((labels == c).sum()) for c in range(10)]    # every example to exactly one worker
    assert sum(int(r["total"]) for r in rows) == len(labels)


def test_iid_runs_write_the_whole_set_for_every_worker(tmp_path):
    assert app.run(config(*FAST, "topology=local_sgd", "topology.num_workers=2"), tmp_path) == 0
    with open(tmp_path / "label_histograms.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and rows[0]["total"] == rows[1]["total"] == str(len(digits_split().y_train))


def test_a_split_needs_workers_numbered_from_zero(tmp_path, capsys):
    overrides = [*FAST, "topology=matrices", "topology.matrices=[[[1.0,0.0],[0.0,1.0]]]", "topology.workers=[1]",
                 "+problem.partition=shards"]
    assert app.run(config(*overrides), tmp_path) == 2
    err = capsys.readouterr().err
    assert "problem.partition=shards splits the data among workers 0 .. W - 1" in err and "[1]" in err
