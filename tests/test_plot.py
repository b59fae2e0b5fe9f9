"""``python -m launch.plot``: the panels a run and a sweep get, each rule that leaves a panel out,
the x axes, log scale, smoothing, mean +- std over seeds, the sweep table of what varies, and a
warning (or one error line) for everything left out.

Real runs of the command line (in-process :func:`launch.cli.app.run`); the panels are read where
they are drawn (``launch.cli.plot.draw`` wrapped; PNGs drawn only where a test looks at them).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics

import pytest
from omegaconf import OmegaConf

from launch.cli import app, plot
from launch.cli.plotting import panels as panel_rules
from launch.cli.plotting.panels import ROUNDING_UNITS, why_empty
from launch.cli.run_files import read_rows
from launch.cli.plotting.series import smooth
from tests.test_app import config

EPS = 2.0 ** -52
LA2 = ("topology=multilayer", "topology.ks=[3,2]", "agents=adam", "agents.optimizer.lr=0.01", "launch.steps=18",
       "launch.log_every=1", "launch.eval_every=4")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real runs: LA-2 logged every step (distances vary) and evaluated every 4 steps; local SGD
    with 3 workers logged at its averages (distances measured before them); LA-1 on a simulated
    cluster, evaluated at steps that are not logged."""
    out = tmp_path_factory.mktemp("plot")
    jobs = {"la2": LA2,
            "lsgd": ("topology=local_sgd", "topology.num_workers=3", "launch.steps=15", "launch.log_every=5"),
            "cluster": ("topology=lookahead", "launch.cluster=nvlink_8", "launch.compute_s=0.001", "launch.steps=12",
                        "launch.log_every=2", "launch.eval_every=3")}
    for name, overrides in jobs.items():
        assert app.run(config(*overrides), out / name) == 0
    return out


@pytest.fixture
def drawn(monkeypatch):
    """The panels of each figure: {file name: [Panel, ...]}; the PNG is drawn only when the test
    sets ``drawn["png"] = True`` (drawing takes seconds)."""
    seen = {}

    def spy(panels, path, **kwargs):
        seen[path.name] = panels
        return panel_rules.draw(panels, path, **kwargs) if seen.get("png") else path

    monkeypatch.setattr(plot, "draw", spy)
    return seen


def titles(panels) -> list[str]:
    return [p.title for p in panels]


def curve_of(panels, title: str, label: str):
    panel = next(p for p in panels if p.title == title)
    return next(c for c in panel.curves if c.label == label)


def is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# -- the panel rules -------------------------------------------------------------------------------


def test_rule_no_finite_value():
    assert why_empty([], EPS) == "it has no finite value"
    assert why_empty([math.nan, math.inf], EPS) == "it has no finite value"


def test_rule_constant_to_rounding_at_its_bound():
    top = 0.75
    assert why_empty([top, top], EPS).startswith("its values are constant")
    assert why_empty([top - ROUNDING_UNITS * EPS * top, top], EPS) is not None     # at the bound: constant
    assert why_empty([top - 2 * ROUNDING_UNITS * EPS * top, top], EPS) is None     # twice the bound: kept
    assert why_empty([0.0, 0.0, 0.0], EPS) is not None                             # all exactly 0
    assert why_empty([0.5, 0.5], 2.0 ** -23) is not None and why_empty([0.5, 0.5 + 1e-6], EPS) is None


def test_rule_distances_zero_to_rounding_need_the_models_scale():
    noise = [0.0, 1e-16, 2e-16]
    assert why_empty(noise, EPS) is None                       # without a scale: drawn
    assert why_empty(noise, EPS, scale=3.0).startswith("its values are 0 to rounding")
    bound = ROUNDING_UNITS * EPS * 3.0
    assert why_empty([0.0, bound], EPS, scale=3.0) is not None
    assert why_empty([0.0, 2 * bound], EPS, scale=3.0) is None


def test_run_panels_and_the_notes_of_those_left_out(runs, drawn, tmp_path, capsys):
    drawn["png"] = True
    assert plot.main([str(runs / "la2"), "--out", str(tmp_path)]) == 0
    assert is_png(tmp_path / "curves.png")
    err = capsys.readouterr().err
    assert titles(drawn["curves.png"]) == ["training loss (workers)", "held-out loss", "distance to X a (||z_i - X a||)"]
    assert "panel 'inner learning rate' left out: its values are constant to rounding (0.01 .. 0.01)" in err
    loss = curve_of(drawn["curves.png"], "training loss (workers)", "agent 0")
    rows = [r for r in read_rows(runs / "la2" / "metrics.csv") if r["agent"] == 0]
    assert loss.x == [float(r["step"]) for r in rows] and loss.y == [r["loss"] for r in rows]
    heldout = next(p for p in drawn["curves.png"] if p.title == "held-out loss")
    assert [c.label for c in heldout.curves] == ["agent 0", "agent 1", "agent 2", "X a (virtual)"]
    assert heldout.curves[-1].dashed and heldout.curves[0].x == [4.0, 8.0, 12.0, 16.0, 18.0]


def test_distances_that_are_rounding_noise_are_left_out(runs, drawn, tmp_path, capsys):
    """Local SGD over 3 workers logged at its averages: measured before the average, the distances
    are the workers' real spread, and drawn.  The same run's file with the distances replaced by
    1e-16 .. 3e-16 (what a distance measured right after an average is: X a = (z + z + z) / 3
    rounds) leaves
    the panel out, with a note; without agents.pt (no scale to judge rounding by) it is drawn."""
    distances = [r["distance_to_virtual"] for r in read_rows(runs / "lsgd" / "metrics.csv")]
    assert min(distances) > 1e-6
    assert plot.main([str(runs / "lsgd"), "--out", str(tmp_path)]) == 0
    assert "distance to X a (||z_i - X a||)" in titles(drawn["curves.png"])
    noise = tmp_path / "noise"
    noise.mkdir()
    for name in ("eval.csv", "summary.json", "agents.pt"):
        shutil.copy(runs / "lsgd" / name, noise / name)
    header, *lines = (runs / "lsgd" / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("distance_to_virtual")
    rows = [line.split(",") for line in lines]
    for k, row in enumerate(rows):
        row[column] = repr((1 + k % 3) * 1e-16)
    (noise / "metrics.csv").write_text("\n".join([header, *(",".join(row) for row in rows)]) + "\n")
    capsys.readouterr()
    assert plot.main([str(noise), "--out", str(tmp_path)]) == 0
    assert "distance to X a (||z_i - X a||)" not in titles(drawn["curves.png"])
    assert "its values are 0 to rounding" in capsys.readouterr().err
    (noise / "agents.pt").unlink()
    assert plot.main([str(noise)]) == 0
    assert "distance to X a (||z_i - X a||)" in titles(drawn["curves.png"])


def test_distance_to_virtual_and_the_old_name_consensus_distance_are_read(runs, drawn, tmp_path):
    text = (runs / "la2" / "metrics.csv").read_text()
    header, _, body = text.partition("\n")
    for column in ("distance_to_virtual", "consensus_distance"):
        run = tmp_path / column
        run.mkdir()
        (run / "metrics.csv").write_text(",".join(column if c in ("distance_to_virtual", "consensus_distance") else c
                                                  for c in header.split(",")) + "\n" + body)
        assert plot.main([str(run)]) == 0
        distance = curve_of(drawn["curves.png"], "distance to X a (||z_i - X a||)", "agent 1")
        assert distance.y == [r["distance_to_virtual"] for r in read_rows(run / "metrics.csv") if r["agent"] == 1]
        assert max(distance.y) > 0


# -- x axes, log scale, smoothing ------------------------------------------------------------------


def test_x_wall_and_sim_time_join_eval_rows_by_step(runs, drawn, tmp_path, capsys):
    metrics = read_rows(runs / "cluster" / "metrics.csv")
    sim = {r["step"]: r["sim_time"] for r in metrics}
    assert plot.main([str(runs / "cluster"), "--x", "sim_time", "--out", str(tmp_path)]) == 0
    loss = curve_of(drawn["curves.png"], "training loss (workers)", "agent 0")
    assert loss.x == [sim[s] for s in range(2, 13, 2)]
    heldout = curve_of(drawn["curves.png"], "held-out loss", "X a (virtual)")
    assert heldout.x == [sim[6], sim[12]]                     # evaluated at 3, 6, 9, 12; logged at even steps
    assert "eval.csv's step(s) 3, 9 have no sim_time in metrics.csv" in capsys.readouterr().err
    assert plot.main([str(runs / "cluster"), "--x", "wall", "--out", str(tmp_path)]) == 0
    wall = curve_of(drawn["curves.png"], "training loss (workers)", "agent 0")
    assert wall.x == [r["wall_time"] for r in metrics if r["agent"] == 0]


def test_x_sim_time_of_a_run_without_a_cluster_is_one_line_naming_the_option(runs, capsys):
    assert plot.main([str(runs / "la2"), "--x", "sim_time"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error [rank 0]: --x sim_time:") and "launch.cluster" in err[0]


def test_smooth_is_a_trailing_mean_of_the_training_curves_only(runs, drawn, tmp_path):
    assert plot.main([str(runs / "la2"), "--smooth", "3", "--out", str(tmp_path)]) == 0
    losses = [r["loss"] for r in read_rows(runs / "la2" / "metrics.csv") if r["agent"] == 0]
    got = curve_of(drawn["curves.png"], "training loss (workers)", "agent 0").y
    assert got[0] == losses[0] and got[1] == pytest.approx((losses[0] + losses[1]) / 2, rel=1e-15)
    assert got[10] == pytest.approx(sum(losses[8:11]) / 3, rel=1e-15)
    assert smooth([4.0, 2.0, 6.0, 1.0], 3) == [4.0, 3.0, 4.0, 3.0]
    heldout = [r["heldout_loss"] for r in read_rows(runs / "la2" / "eval.csv")
               if r["agent"] == 0 and r["heldout_loss"] is not None]
    assert curve_of(drawn["curves.png"], "held-out loss", "agent 0").y == heldout   # as recorded


def test_logy_warns_of_values_it_cannot_draw(runs, drawn, tmp_path, capsys):
    """LA-2's metrics with the distances of every third step set to 0 (as a file written when
    distances were measured after the syncs has them): those are left out of the log scale, with
    a warning that counts them."""
    run = tmp_path / "zeros"
    run.mkdir()
    header, *lines = (runs / "la2" / "metrics.csv").read_text().splitlines()
    step, column = header.split(",").index("step"), header.split(",").index("distance_to_virtual")
    rows = [line.split(",") for line in lines]
    for row in rows:
        if int(row[step]) % 3 == 0:
            row[column] = "0"
    (run / "metrics.csv").write_text("\n".join([header, *(",".join(row) for row in rows)]) + "\n")
    assert plot.main([str(run), "--logy", "--out", str(tmp_path)]) == 0
    distances = [r["distance_to_virtual"] for r in read_rows(run / "metrics.csv") if r["agent"] == 0]
    zeros = sum(d == 0 for d in distances)
    assert zeros > 0 and f"{zeros} value(s) <= 0 of agent 0 are not drawn on the log scale (--logy)" in (
        capsys.readouterr().err)
    drawn_distances = curve_of(drawn["curves.png"], "distance to X a (||z_i - X a||)", "agent 0").y
    assert drawn_distances == [d for d in distances if d > 0]


# -- agents, silent drops, errors ------------------------------------------------------------------


def test_agents_found_only_in_eval_csv_are_drawn_with_a_warning(runs, drawn, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / "la2", run)
    lines = (run / "metrics.csv").read_text().splitlines()
    (run / "metrics.csv").write_text("\n".join(l for l in lines if l.split(",")[1] != "2") + "\n")
    assert plot.main([str(run)]) == 0
    assert f"{run}: agent 2 has no row in metrics.csv: it is drawn in the held-out panels only" in capsys.readouterr().err
    assert curve_of(drawn["curves.png"], "held-out loss", "agent 2").x == [4.0, 8.0, 12.0, 16.0, 18.0]


def test_non_finite_values_are_named(drawn, tmp_path, capsys):
    assert app.run(config("topology=lookahead", "launch.steps=8", "launch.log_every=1", "agents.optimizer.lr=1e30"),
                   tmp_path) == 3
    capsys.readouterr()
    assert plot.main([str(tmp_path)]) == 0
    assert "panel 'training loss (workers)': 3 NaN or infinite value(s) of agent(s) 0 are not drawn (the first " \
           "at step 6)" in capsys.readouterr().err


def test_unreadable_files_are_warnings_then_status_2(runs, drawn, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / "la2", run)
    (run / "eval.csv").write_text("step,agent,heldout_loss\n3,0,0.5\nfour,0,0.25\n")
    assert plot.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert f"warning: cannot read {run / 'eval.csv'}: invalid literal for int() with base 10: 'four'; the held-out " \
           f"panels are left out" in err
    assert err.strip().splitlines()[-1].startswith("error [rank 0]: 1 file(s) could not be read")
    assert titles(drawn["curves.png"])[0] == "training loss (workers)"          # the rest is drawn


def test_out_that_cannot_be_written_is_one_line(runs, capsys):
    assert plot.main([str(runs / "la2"), "--out", "/proc/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error [rank 0]: --out /proc/x: cannot write curves.png there: No such file or directory"
    assert "Traceback" not in "\n".join(err)


def test_something_else_is_one_line_and_status_2(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a run directory" in err


# -- sweeps ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A multirun directory as hydra writes it (``python -m launch -m agents.optimizer.lr=0.01,0.1
    launch.seed=0,1``): jobs 0..3, each with the overrides that made it in .hydra/overrides.yaml
    (run in-process: a hydra multirun in a subprocess takes half a minute here)."""
    out = tmp_path_factory.mktemp("sweep") / "multirun"
    shared = ["launch.steps=8", "launch.eval_every=4", "launch.log_every=2", "launch.check_reference=false"]
    for job, (lr, seed) in enumerate([(0.01, 0), (0.01, 1), (0.1, 0), (0.1, 1)]):
        overrides = [*shared, f"agents.optimizer.lr={lr}", f"launch.seed={seed}"]
        assert app.run(config(*overrides), out / str(job)) == 0
        (out / str(job) / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create(overrides), out / str(job) / ".hydra" / "overrides.yaml")
    return out


def test_seed_sweeps_are_mean_and_std_bands_with_n(sweep, drawn, tmp_path):
    assert plot.main([str(sweep), "--out", str(tmp_path)]) == 0
    panels = drawn["sweep.png"]
    band = curve_of(panels, "training loss (mean over workers)", "agents.optimizer.lr=0.1 (mean \u00b1 std, n=2)")
    runs = [read_rows(sweep / job / "metrics.csv") for job in ("2", "3")]   # lr=0.1, seeds 0 and 1
    first = [next(r["loss"] for r in rows if r["step"] == 2 and r["agent"] == 0) for rows in runs]
    assert band.x[0] == 2.0 and band.y[0] == pytest.approx(statistics.mean(first), rel=1e-15)
    assert band.std[0] == pytest.approx(statistics.stdev(first), rel=1e-12) and band.n == 2
    assert [c.label for c in panels[0].curves] == ["agents.optimizer.lr=0.01 (mean \u00b1 std, n=2)",
                                                   "agents.optimizer.lr=0.1 (mean \u00b1 std, n=2)"]


def test_sweep_table_shows_what_varies(sweep, drawn, tmp_path, capsys):
    assert plot.main([str(sweep), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = (tmp_path / "sweep.md").read_text().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:3] == ["run", "agents.optimizer.lr", "launch.seed"] and "final_loss" in header
    for constant in ("steps", "dtype", "status", "problem", "versions.torch", "optimizer.momentum"):
        assert constant not in header
    assert "seed" not in header and "optimizer.lr" not in header                 # equal to a column shown
    assert any(line.startswith("same in every run: ") and "steps=8" in line for line in table)
    assert table[0] in out
    with open(tmp_path / "sweep.csv", newline="") as f:                          # sweep.csv: every column
        rows = list(csv.DictReader(f))
    assert {"steps", "status", "dtype", "optimizer.momentum", "versions.torch"} <= set(rows[0])
    assert [(r["run"], r["agents.optimizer.lr"], r["launch.seed"]) for r in rows] == [
        ("0", "0.01", "0"), ("1", "0.01", "1"), ("2", "0.1", "0"), ("3", "0.1", "1")]
    for job, row in zip("0123", rows):
        record = json.loads((sweep / job / "summary.json").read_text())
        assert float(row["final_loss"]) == pytest.approx(record["final_loss"]["mean"], rel=1e-5)


def test_sweep_drops_are_warnings_and_a_summary_list_is_one_line(sweep, drawn, tmp_path, capsys):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    (copy / "4").mkdir()                                          # a job that wrote nothing
    (copy / "1" / "summary.json").write_text("[1, 2]\n")          # issue: AttributeError before
    (copy / "2" / "eval.csv").unlink()
    (copy / "3" / "summary.json").unlink()
    assert plot.main([str(copy), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"warning: {copy / '4'} has no metrics.csv: left out of the sweep" in err
    assert f"warning: {copy / '2'} has no eval.csv: no held-out metric or learning rate is drawn for it" in err
    assert f"warning: {copy / '3'} has no summary.json (the run did not finish): its figures are not in the table" in err
    assert f"warning: cannot read {copy / '1' / 'summary.json'}: it holds a JSON list, not an object" in err
    assert "Traceback" not in err and "sweep.png" in drawn
