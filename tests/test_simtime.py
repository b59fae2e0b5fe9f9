"""Simulated time on the command line (``launch.cluster``, ``launch.compute_s``): the ``sim_time``
column of metrics.csv and the summary's figures, against cases worked out by hand from the
alpha-beta formulas of :mod:`topology.network` and the preset's link figures."""

from __future__ import annotations

import json
import math

import pytest

from agents.flat import parameter_region
from launch.cli import app
from launch.cli.build import build_job
from launch.engine.record.metrics import MetricsWriter, read_metrics
from launch.engine.record.clock import MEASURED_STEPS
from tests.spawn import ROOT, run_torchrun
from tests.test_app import config

NVLINK = dict(alpha=3e-6, beta=450e9)   # preset nvlink_8: one node, NVLink 4 (topology/network.py)


def nbytes(*overrides) -> int:
    """Bytes of one agent's synchronized buffer of the configuration (float64 parameters): its
    parameter region, each parameter aligned to 16 bytes (agents.flat), which a sync sends whole."""
    job = build_job(config(*overrides))
    return parameter_region(job.model().to(job.launch.dtype)) * job.launch.dtype.itemsize


def sim_times(out) -> dict[int, float]:
    """metrics.csv's sim_time per logged step (equal across the step's rows)."""
    by_step: dict[int, set] = {}
    for row in read_metrics(out / "metrics.csv"):
        by_step.setdefault(row["step"], set()).add(row["sim_time"])
    assert all(len(v) == 1 for v in by_step.values()), by_step
    return {step: v.pop() for step, v in by_step.items()}


def run_app(tmp_path, *overrides) -> tuple[dict, dict]:
    assert app.run(config(*overrides), tmp_path) == 0
    return sim_times(tmp_path), json.loads((tmp_path / "summary.json").read_text())


LA1 = ["topology=lookahead", "topology.k=4", "launch.steps=10", "launch.log_every=1", "launch.cluster=nvlink_8",
       "launch.compute_s=0.5"]


@pytest.mark.parametrize("overlap", [False, True])
def test_lookahead_sim_time_is_the_hand_computed_one(tmp_path, overlap):
    # LA-1, k = 4: syncs after iterations t = 3 and 7 (steps 4 and 8), agents 0 and 1 on GPUs 0 and
    # 1 of the NVLink node.  Plain: one all-reduce of 2 GPUs, 2 (g - 1) (alpha + n / (g beta)).
    # Overlapped (the worker's GPU is the hub): the reduce, (g - 1) alpha + n / beta, started k
    # inner steps (2 s) before the sync, is long done; the broadcast, alpha + n / beta, is charged.
    n = nbytes(*LA1)
    a, b = NVLINK["alpha"], NVLINK["beta"]
    comm = (a + n / b) if overlap else 2 * (a + n / (2 * b))
    got, summary = run_app(tmp_path, *LA1, f"launch.overlap={str(overlap).lower()}")
    for step in range(1, 11):
        want = 0.5 * step + comm * (step // 4)
        assert got[step] == pytest.approx(want, rel=1e-12, abs=0), (step, got[step], want)
    assert summary["cluster"] == "nvlink_8" and summary["compute_s"] == 0.5 and summary["compute_measured"] is False
    assert summary["sim_time_s"] == pytest.approx(got[10], rel=1e-15)
    assert summary["sim_time_per_step_s"] == pytest.approx(got[10] / 10, rel=1e-15)
    assert "sim_time_per_step_s=" in (tmp_path / "summary.txt").read_text()


def test_measured_compute_fixes_after_the_first_iterations(tmp_path):
    # compute_s measured: rows from step MEASURED_STEPS on use the summary's estimate for every
    # iteration from t = 0 (LA-1, k = 4, plain all-reduces as above).
    overrides = [o for o in LA1 if not o.startswith("launch.compute_s")] + ["launch.overlap=false"]
    n = nbytes(*overrides)
    comm = 2 * (NVLINK["alpha"] + n / (2 * NVLINK["beta"]))
    got, summary = run_app(tmp_path, *overrides)
    c = summary["compute_s"]
    assert summary["compute_measured"] is True and c > 0
    for step in range(MEASURED_STEPS, 11):
        assert got[step] == pytest.approx(c * step + comm * (step // 4), rel=1e-12), step
    # From MEASURED_STEPS on the estimate is fixed, so the column only grows.  (Before, each row
    # uses the median of the wall times so far, which may fall as the first, slower iterations are
    # outvoted: those rows depend on this machine's timings and are not asserted.)
    assert all(got[s] < got[s + 1] for s in range(MEASURED_STEPS, 10))


def test_no_cluster_leaves_the_column_empty(tmp_path):
    got, summary = run_app(tmp_path, "topology=lookahead", "launch.steps=4")
    assert all(math.isnan(v) for v in got.values())
    assert summary["sim_time_s"] is None and summary["cluster"] is None
    assert "sim_time" not in (tmp_path / "summary.txt").read_text()


def test_resume_replays_the_clock(tmp_path):
    # A run checkpointed at t = 6, resumed to 10: the same sim_time column as the uninterrupted run.
    whole = tmp_path / "whole"
    want, _ = run_app(whole, *LA1)
    part = tmp_path / "part"
    common = [o for o in LA1 if not o.startswith("launch.steps")] + ["launch.checkpoint_every=3"]
    assert app.run(config(*common, "launch.steps=6"), part) == 0
    assert app.run(config(*common, "launch.steps=10", "launch.resume=true"), part) == 0
    got = sim_times(part)
    assert got.keys() == want.keys()
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-12), step


def test_torchrun_placement_with_two_agents_per_rank(tmp_path):
    # Local SGD of 4 workers on 2 processes, 2 agents each: the average is one all-reduce over
    # the 2 GPUs (agents sharing a rank share its GPU), 2 (alpha + n / (2 beta)); co-located, the
    # same run stands for 4 GPUs: 2 x 3 (alpha + n / (4 beta)).  tau = 3, 7 steps: syncs at steps 3, 6.
    overrides = ["topology=local_sgd", "topology.tau=3", "launch.steps=7", "launch.log_every=1",
                 "launch.cluster=nvlink_8", "launch.compute_s=0.25", "launch.dtype=float64", "launch.device=cpu"]
    n = nbytes(*overrides)
    a, b = NVLINK["alpha"], NVLINK["beta"]
    out = tmp_path / "torch"
    code, output = run_torchrun(2, ["-m", "launch", *overrides, "launch=torch", "launch.agents_per_rank=2",
                                    f"hydra.run.dir={out}"], timeout=180, cwd=ROOT)
    assert code == 0, output
    got = sim_times(out)
    colocated, _ = run_app(tmp_path / "colocated", *overrides)
    for step in range(1, 8):
        syncs = step // 3
        assert got[step] == pytest.approx(0.25 * step + syncs * 2 * (a + n / (2 * b)), rel=1e-12), step
        assert colocated[step] == pytest.approx(0.25 * step + syncs * 6 * (a + n / (4 * b)), rel=1e-12), step


@pytest.mark.parametrize("overrides, words", [
    (["launch.cluster=nvlink_9"], ["launch.cluster", "nvlink_8", "infiniband_400g_1024"]),
    (["launch.compute_s=0.1"], ["launch.compute_s needs launch.cluster"]),
    (["launch.cluster=nvlink_8", "launch.compute_s=-1"], ["launch.compute_s"]),
    (["launch.cluster=nvlink_8", "topology=local_sgd", "topology.num_workers=16"],
     ["launch.cluster=nvlink_8 has 8 GPUs", "16 agents"]),
    (["launch.cluster=nvlink_8", "topology=lookahead", "agents.outer={name:sgd,lr:1.0,momentum:0.5}"],
     ["launch.cluster=nvlink_8 does not model a slow rule", "agents.outer"]),
    (["launch=serial", "+launch.cluster=nvlink_8"], ["launch=serial does not take", "cluster"]),
])
def test_bad_cluster_options_are_one_line_and_status_2(tmp_path, capsys, overrides, words):
    assert app.run(config("launch.steps=2", *overrides), tmp_path) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)


def test_resumed_history_keeps_rows_written_before_the_column_and_drops_a_cut_line(tmp_path):
    # A metrics.csv of a run before the sim_time column (6 fields a row), its last line cut short by
    # a crash (no newline; 6 fields too, so only the missing newline tells it apart).
    path = tmp_path / "metrics.csv"
    path.write_text("step,agent,loss,grad_norm,distance_to_virtual,wall_time\r\n"
                    "5,0,0.5,0.25,0.0,1.000000\r\n5,1,,,0.0,1.000000\r\n"
                    "10,0,0.4,0.2,0.0,2.000000\r\n10,1,,,0.0,2.0")
    writer = MetricsWriter(path, workers=[0], resume_at=10)
    writer.write(15, [{"agent": 0, "loss": 0.3, "grad_norm": 0.1, "distance_to_virtual": 0.0}], wall=0.5, sim_time=7.0)
    writer.close()
    rows = read_metrics(path)
    assert [(r["step"], r["agent"]) for r in rows] == [(5, 0), (5, 1), (10, 0), (15, 0)]
    assert all(math.isnan(r["sim_time"]) for r in rows[:3]) and rows[3]["sim_time"] == 7.0
    assert rows[2]["loss"] == 0.4 and rows[3]["wall_time"] == 2.5   # the wall clock continues from 2.0
