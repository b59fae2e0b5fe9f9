"""``python -m launch.compare RUN_A RUN_B``: the largest relative deviation per agent between two
recorded runs, its tolerance by dtype, and its exit statuses (0 within, 1 above, 2 for runs that
cannot be compared).  Real runs of the command line, in-process."""

from __future__ import annotations

import re

import pytest
import torch

from launch.cli import app, compare
from tests import plant
from tests.test_app import config, flat

LA2 = ("topology=multilayer", "topology.ks=[3,2]", "topology.alphas=[0.5,0.6]", "agents=adam",
       "agents.optimizer.lr=0.01", "agents.state_policy=pullback", "launch.steps=12", "launch.log_every=1",
       "launch.eval_every=4")
CO = (*LA2, "launch.check_reference=false")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    jobs = {"colocated": CO, "serial": (*LA2, "launch=serial"),
            "float32": (*CO, "launch.dtype=float32"), "float32_serial": (*LA2, "launch=serial", "launch.dtype=float32"),
            "local_sgd": ("topology=local_sgd", "launch.steps=2"),
            "wider": (*CO, "problem.hidden=16", "launch.steps=2")}
    for name, overrides in jobs.items():
        assert app.run(config(*overrides), out / name) == 0
    with pytest.MonkeyPatch.context() as patch:       # agent 1 moved by 1e-9 after iteration t=2
        plant.install(dict(run="colocated", agent=1, step=2, size=1e-9), patch.setattr)
        assert app.run(config(*CO), out / "planted") == 0
    return out


def table(output: str) -> dict[str, list[str]]:
    """The printed table: agent -> its cells."""
    lines = output.strip().splitlines()
    return {line.split()[0]: line.split()[1:] for line in lines[2:-1]}


def largest(output: str) -> float:
    return float(re.search(r"largest (\S+),", output).group(1))


def test_colocated_and_serial_agree_to_float64_rounding(runs, capsys):
    assert compare.main([str(runs / "colocated"), str(runs / "serial")]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("tolerance 1e-12 (float64's default): PASS")
    header = out.splitlines()[1].split()
    assert header[:3] == ["agent", "final", "agents"] and {"loss", "grad_norm", "heldout_loss", "lr"} <= set(header)
    rows = table(out)
    assert list(rows) == ["0", "1", "2", "virtual"]
    a, b = torch.load(runs / "colocated" / "agents.pt"), torch.load(runs / "serial" / "agents.pt")
    for i in range(3):   # the final agents' column, computed here from agents.pt
        expected = float((flat(a[i]) - flat(b[i])).abs().max() / flat(b[i]).abs().max())
        assert float(rows[str(i)][0]) == pytest.approx(expected, rel=1e-3, abs=1e-300)
    assert largest(out) <= 1e-12


def test_a_planted_difference_fails_and_names_the_step(runs, capsys):
    assert compare.main([str(runs / "planted"), str(runs / "serial")]) == 1
    out = capsys.readouterr().out
    assert out.strip().endswith("tolerance 1e-12 (float64's default): FAIL")
    assert 1e-11 < largest(out) < 1e-6
    # Planted after iteration t=2 (step 3): step 3's row is measured before its sync, so before the
    # plant; step 4's is the first to differ.
    assert table(out)["1"][-1] == "4"
    assert compare.main([str(runs / "planted"), str(runs / "serial"), "--tolerance", "1e-3"]) == 0
    assert capsys.readouterr().out.strip().endswith("tolerance 0.001 (--tolerance): PASS")


def test_float32_runs_get_float32s_tolerance(runs, capsys):
    code = compare.main([str(runs / "float32"), str(runs / "float32_serial")])
    out = capsys.readouterr().out
    assert "tolerance 1e-05 (float32's default)" in out and code == (0 if largest(out) <= 1e-5 else 1)
    assert compare.main([str(runs / "float32"), str(runs / "colocated")]) == 1   # float32 vs float64: 1e-5 too
    out = capsys.readouterr().out
    assert "tolerance 1e-05 (float32's default): FAIL" in out


@pytest.mark.parametrize("other, message", [
    ("local_sgd", "has 4 agents and {b} has 3: they are not runs of the same job"),
    ("wider", "the shape of agent 0's '0.weight' is (16, 16) in {a} and (32, 16) in {b}"),
    ("missing", "{a} has no agents.pt (the final agents)"),
    ("garbage", "cannot read {a}/agents.pt"),
])
def test_runs_that_cannot_be_compared_are_one_line_and_status_2(runs, tmp_path, capsys, other, message):
    a = runs / other if other in ("local_sgd", "wider") else tmp_path
    if other == "garbage":
        (tmp_path / "agents.pt").write_bytes(b"not a checkpoint")
    assert compare.main([str(a), str(runs / "colocated")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error [rank 0]: ") and captured.out == ""
    assert message.format(a=a, b=runs / "colocated") in err[0]


def test_relative_deviation_is_scaled_by_the_reference_and_counts_non_finite_entries():
    nan, inf = float("nan"), float("inf")
    vector = lambda *v: torch.tensor(v, dtype=torch.float64)   # noqa: E731
    assert compare.relative(vector(3.0, 0.0), vector(1.0, 0.0)) == (2.0, 0)        # max|x - y| / max|y|
    assert compare.relative(vector(1.0, nan, inf), vector(2.0, nan, inf)) == (0.5, 0)   # same NaN, same Inf: 0
    assert compare.relative(vector(1.0, nan), vector(1.0, 2.0)) == (inf, 1)         # recorded in one run only
    assert compare.relative(vector(0.0), vector(0.0)) == (0.0, 0)
    assert compare.relative(vector(1e-300), vector(0.0)) == (inf, 0)                # nothing to scale by
