"""Results a researcher can look at: eval.csv, summary.json, TensorBoard, buffers
in results; and the silent misuses that now fail loudly (resume past the steps, a co-located
launch under torchrun, NaN).

In-process calls of :func:`launch.cli.app.run` where no process of its own is needed; torchrun runs
with 2 processes, bounded in time (tests/spawn.py).
"""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
from torch import nn

import topology
from experiments.problems import PROBLEMS
from launch import Checkpointer, simulate
from launch.cli import app
from launch.cli.build import build_job
from launch.engine.record.evaluation import VIRTUAL, read_eval
from launch.engine.record.metrics import read_metrics
from launch.engine.record.summary import flat_summary, parse_summary_line
from launch.engine.simulation import ConvertedStream
from tests import plant
from tests.bn_app import teacher_student_bn
from tests.spawn import ROOT, run_command, run_mpiexec, run_torchrun
from tests.test_app import LA2, config, flat

TOL = 1e-12
EVAL = [*LA2, "launch.steps=33", "launch.eval_every=5"]  # LA-2, 33 steps: evaluated at 5, 10, ..., 30 and 33
EVALUATED = [5, 10, 15, 20, 25, 30, 33]


def close(a: float, b: float, tol: float = TOL) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


def evaluate_state(job, state: dict) -> dict:
    """``problem.evaluate`` on a fresh model holding ``state`` (parameters and buffers)."""
    model = job.model()
    model.load_state_dict(state)
    return job.evaluate(model)


def virtual_state(job, states: list[dict]) -> dict:
    """theta = X a from agents.pt (parameters), with the lowest worker's buffers."""
    a = job.schedule.consensus()
    names = [n for n, _ in job.model().named_parameters()]
    theta = dict(states[min(job.schedule.workers)])
    for name in names:
        theta[name] = sum(float(a[i]) * states[i][name] for i in range(len(states)))
    return theta


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """LA-2 co-located, evaluated every 5 steps (and checked against the serial reference)."""
    out = tmp_path_factory.mktemp("evaluated")
    assert app.run(config(*EVAL), out) == 0
    return out


# -- eval.csv --------------------------------------------------------------------------------------


def test_eval_rows_at_the_end_equal_problem_evaluate_on_agents_pt(evaluated):
    job = build_job(config(*EVAL))
    states = torch.load(evaluated / "agents.pt")
    rows = [r for r in read_eval(evaluated / "eval.csv") if r["step"] == 33]
    assert [r["agent"] for r in rows] == [0, 1, 2, VIRTUAL]
    for i, row in enumerate(rows[:3]):
        assert close(row["heldout_loss"], evaluate_state(job, states[i])["loss"]), (i, row)
    # The virtual iterate X a, with a = consensus(), from the agents' final parameters.
    assert close(rows[3]["heldout_loss"], evaluate_state(job, virtual_state(job, states))["loss"])
    # t = 33 ends a level-1 period (k = 3) but not a level-2 one (3 x 2): agents 0 and 1 are
    # equal, agent 2 and X a differ.
    assert len({round(r["heldout_loss"], 9) for r in rows}) == 3


def test_eval_rows_in_the_middle_equal_a_run_stopped_there(evaluated, tmp_path):
    """The step-10 rows of the 33-step run are the final evaluation of a 10-step run."""
    assert app.run(config(*LA2, "launch.steps=10"), tmp_path) == 0
    job = build_job(config(*LA2, "launch.steps=10"))
    states = torch.load(tmp_path / "agents.pt")
    rows = [r for r in read_eval(evaluated / "eval.csv") if r["step"] == 10]
    for i in range(3):
        assert close(rows[i]["heldout_loss"], evaluate_state(job, states[i])["loss"]), i
    assert close(rows[3]["heldout_loss"], evaluate_state(job, virtual_state(job, states))["loss"])


def test_eval_csv_columns_steps_and_learning_rate(evaluated):
    with open(evaluated / "eval.csv") as f:
        assert f.readline().strip() == "step,agent,lr,heldout_loss"
    rows = read_eval(evaluated / "eval.csv")
    # Every logged step (log_every=1) has the three agents; evaluated steps add X a.
    assert sorted({r["step"] for r in rows}) == list(range(1, 34))
    assert sorted({r["step"] for r in rows if not math.isnan(r["heldout_loss"])}) == EVALUATED
    assert [r["step"] for r in rows if r["agent"] == VIRTUAL] == EVALUATED
    for r in rows:
        if r["agent"] == 0:
            assert r["lr"] == 0.01           # agents.optimizer.lr of LA2 (Adam), the worker
        else:
            assert math.isnan(r["lr"])       # passive agents and X a take no inner step


def test_evaluation_does_not_change_the_trajectory(evaluated, tmp_path):
    assert app.run(config(*LA2, "launch.steps=33"), tmp_path) == 0
    for a, b in zip(torch.load(tmp_path / "agents.pt"), torch.load(evaluated / "agents.pt")):
        assert torch.equal(flat(a), flat(b))
    # launch.eval_every=auto, below 100 steps: only the last step is evaluated.
    assert sorted({r["step"] for r in read_eval(tmp_path / "eval.csv") if not math.isnan(r["heldout_loss"])}) == [33]


def test_stagewise_lr_column_follows_the_stages(tmp_path):
    """SLRLA's stages change the inner learning rate: the column shows the stage of each iteration."""
    stages = "topology.stages=[{steps:4,lr:0.1,alpha:0.5,k:2,beta:0.0},{steps:4,lr:0.02,alpha:0.5,k:2,beta:0.0}]"
    assert app.run(config("topology=stagewise", stages, "launch.steps=8", "launch.log_every=1", "problem.dim=4", "problem.hidden=4"),
                   tmp_path) == 0
    lrs = {r["step"]: r["lr"] for r in read_eval(tmp_path / "eval.csv") if r["agent"] == 0}
    assert lrs == {s: (0.1 if s <= 4 else 0.02) for s in range(1, 9)}


# -- buffers ---------------------------------------------------------------------------------------


def bn_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1)).double()


def bn_batches():
    gen = torch.Generator().manual_seed(1)
    while True:
        x = torch.randn(16, 3, generator=gen, dtype=torch.float64) * 3 + 1
        yield x, x.sum(1, keepdim=True)


def mse(module, batch):
    return ((module(batch[0]) - batch[1]) ** 2).mean()


def test_simulation_result_has_every_agents_state_dict_with_buffers():
    model = bn_model()
    result = simulate(model, mse, bn_batches(), topology.lookahead(3, 0.5), lambda p: torch.optim.SGD(p, lr=0.05),
                      steps=7)
    worker = result.simulation.agents[0].module.state_dict()
    assert list(result.state_dicts[0]) == list(model.state_dict())  # parameters and buffers, in order
    for i, state in enumerate(result.state_dicts):
        fresh = bn_model()
        fresh.load_state_dict(state)  # strict: every key
        for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
            assert torch.equal(state[name], worker[name]), (i, name)  # a passive agent: the worker's
        for name, value in result.parameters[i].items():
            assert torch.equal(state[name], value)
    assert int(result.state_dicts[1]["1.num_batches_tracked"]) == 7
    # The slow weights evaluated with the worker's statistics differ from evaluating them with
    # the initial (zero-mean, unit-variance) statistics: parameters alone are not enough.
    x, y = next(bn_batches())
    with_buffers, without = bn_model(), bn_model()
    with_buffers.load_state_dict(result.state_dicts[1])
    without.load_state_dict(result.parameters[1], strict=False)
    with_buffers.eval(), without.eval()
    assert not torch.allclose(with_buffers(x), without(x))


def test_eval_and_agents_pt_carry_the_workers_buffers(tmp_path, monkeypatch):
    monkeypatch.setitem(PROBLEMS, "teacher_student_bn", teacher_student_bn)
    overrides = ["topology=lookahead", "problem.name=teacher_student_bn", "problem.dim=6", "problem.hidden=8",
                 "launch.steps=9", "launch.eval_every=3", "launch.check_reference=false"]
    assert app.run(config(*overrides), tmp_path) == 0
    job = build_job(config(*overrides))
    states = torch.load(tmp_path / "agents.pt")
    assert torch.equal(states[1]["1.running_mean"], states[0]["1.running_mean"])
    assert float(states[0]["1.running_mean"].abs().sum()) > 0
    rows = [r for r in read_eval(tmp_path / "eval.csv") if r["step"] == 9]
    for i in range(2):
        assert close(rows[i]["heldout_loss"], evaluate_state(job, states[i])["loss"])
    assert close(rows[2]["heldout_loss"], evaluate_state(job, virtual_state(job, states))["loss"])


def test_torchrun_evaluates_each_ranks_agents_with_the_workers_buffers(tmp_path, monkeypatch):
    """2 processes, one agent each: rank 1's slow agent is evaluated with worker 0's statistics
    (gathered from rank 0), and every row equals the co-located run's."""
    overrides = ["topology=lookahead", "problem.name=teacher_student_bn", "problem.dim=6", "problem.hidden=8",
                 "launch.steps=9", "launch.eval_every=3", "launch.log_every=2", "launch.dtype=float64"]
    code, output = run_torchrun(2, [ROOT / "tests" / "bn_app.py", *overrides, "launch=torch",
                                    f"hydra.run.dir={tmp_path / 'torch'}"], timeout=150, cwd=ROOT)
    assert code == 0, output
    code, output = run_command([sys.executable, ROOT / "tests" / "bn_app.py", *overrides,
                                "launch.check_reference=false", f"hydra.run.dir={tmp_path / 'colocated'}"],
                               timeout=120, cwd=ROOT)
    assert code == 0, output
    got, want = read_eval(tmp_path / "torch" / "eval.csv"), read_eval(tmp_path / "colocated" / "eval.csv")
    assert [(r["step"], r["agent"]) for r in got] == [(r["step"], r["agent"]) for r in want]
    assert sorted({r["step"] for r in got}) == [2, 3, 4, 6, 8, 9]  # logged and evaluated steps
    for a, b in zip(got, want):
        for key in ("lr", "heldout_loss"):
            assert (math.isnan(a[key]) and math.isnan(b[key])) or close(a[key], b[key]), (a, b)
    monkeypatch.setitem(PROBLEMS, "teacher_student_bn", teacher_student_bn)
    job = build_job(config(*overrides))
    states = torch.load(tmp_path / "torch" / "agents.pt")
    final = [r for r in got if r["step"] == 9]
    for i in range(2):
        assert close(final[i]["heldout_loss"], evaluate_state(job, states[i])["loss"])


# -- summary.json ----------------------------------------------------------------------------------


def test_summary_json_round_trips_every_summary_figure(evaluated):
    record = json.loads((evaluated / "summary.json").read_text())
    line = (evaluated / "summary.txt").read_text().strip()
    parsed = parse_summary_line(line)
    expected = flat_summary(record)
    assert list(parsed) == list(expected)
    assert len(line.split()) == len(expected) + 1  # "summary:" and one token per figure
    for key, value in expected.items():
        got = parsed[key]
        if isinstance(value, float):
            assert math.isclose(got, value, rel_tol=1e-3 if key == "max_deviation" else 1e-5, abs_tol=0.06), key
        elif isinstance(value, list):
            assert len(got) == len(value) and all(
                math.isclose(g, v, rel_tol=1e-5) if isinstance(v, float) else g == v for g, v in zip(got, value)), key
        else:
            assert got == value, key
    assert record["topology"] == {"name": "multilayer", "options": {"ks": [3, 2], "alphas": [0.5, 0.6]},
                                  "repr": "MultilayerSchedule(ks=(3,2),alphas=(0.5,0.6))"}
    assert record["status"] == "ok" and record["resumed_from"] is None and record["steps"] == 33
    final = [r for r in read_eval(evaluated / "eval.csv") if r["step"] == 33]
    assert record["heldout"]["loss"] == [r["heldout_loss"] for r in final[:3]]
    assert record["virtual_heldout"]["loss"] == final[3]["heldout_loss"]
    assert record["max_deviation"] <= record["tolerance"] == 1e-12
    assert json.loads(json.dumps(record)) == record


def test_failed_check_is_status_failed_in_both_files(tmp_path, monkeypatch):
    plant.install(dict(run="colocated", agent=1, step=2, size=1e-9), monkeypatch.setattr)
    assert app.run(config(*LA2, "launch.steps=8"), tmp_path) == 1
    assert "status=FAILED" in (tmp_path / "summary.txt").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "FAILED"


# -- TensorBoard -----------------------------------------------------------------------------------


def test_tensorboard_without_the_package_is_a_clear_configuration_error(tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the tensorboard package is installed here")
    assert app.run(config(*LA2, "launch.steps=3", "launch.tensorboard=true"), tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "launch.tensorboard=true needs the tensorboard package, which is not installed: pip install tensorboard" in err


def test_tensorboard_logs_the_csv_rows(tmp_path, monkeypatch):
    """With a stand-in for ``torch.utils.tensorboard``: the scalars of metrics.csv and eval.csv."""
    scalars = []

    class SummaryWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            scalars.append(("closed", self.log_dir, None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    assert app.run(config(*LA2, "launch.steps=6", "launch.eval_every=3", "launch.tensorboard=true"), tmp_path) == 0
    tags = {(tag, step) for tag, _, step in scalars}
    assert ("train/loss/agent_0", 6) in tags and ("distance_to_virtual/agent_2", 6) in tags
    assert ("heldout_loss/agent_1", 3) in tags and ("heldout_loss/virtual", 6) in tags
    assert ("lr/agent_0", 1) in tags and ("train/loss/agent_1", 1) not in tags  # passive: no loss
    assert scalars[-1] == ("closed", str(tmp_path / "tensorboard"), None)
    final = {r["agent"]: r["heldout_loss"] for r in read_eval(tmp_path / "eval.csv") if r["step"] == 6}
    assert next(v for tag, v, s in scalars if tag == "heldout_loss/virtual" and s == 6) == final[VIRTUAL]


# -- resume past the steps -------------------------------------------------------------------------


RESUME = ("topology=multilayer", "agents=adam", "launch.check_reference=false", "launch.log_every=5")


def test_resume_from_a_checkpoint_past_the_steps_is_status_2(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert app.run(config(*RESUME, "launch.steps=7", "launch.checkpoint_every=3",
                          f"launch.checkpoint_dir={ckpt}"), tmp_path / "first") == 0
    capsys.readouterr()
    assert app.run(config(*RESUME, "launch.steps=5", "launch.resume=true", f"launch.checkpoint_dir={ckpt}"),
                   tmp_path / "second") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "launch.steps=5 is before the checkpoint" in err and "at t=7" in err
    assert not (tmp_path / "second" / "agents.pt").exists()
    # Resuming to a later total says where it resumed from, and the summary records it.
    assert app.run(config(*RESUME, "launch.steps=9", "launch.resume=true", f"launch.checkpoint_dir={ckpt}"),
                   tmp_path / "third") == 0
    assert "note: resumed from the checkpoint at t=7" in capsys.readouterr().err
    assert json.loads((tmp_path / "third" / "summary.json").read_text())["resumed_from"] == 7


def test_simulate_with_a_checkpoint_past_the_steps_raises(tmp_path):
    def run(steps):
        return simulate(bn_model(), mse, bn_batches(), topology.lookahead(3, 0.5),
                        lambda p: torch.optim.SGD(p, lr=0.05), steps=steps, checkpoint=Checkpointer(tmp_path, every=5))

    run(7)
    with pytest.raises(ValueError, match=r"steps=5 is before the checkpoint in .* which is at t=7"):
        run(5)
    assert run(7).simulation.t == 7  # exactly at the checkpoint: nothing to do, no error


# -- simulate(dtype=...) ---------------------------------------------------------------------------


def test_simulate_converts_batches_to_the_runs_dtype():
    def float32_batches():
        gen = torch.Generator().manual_seed(3)
        while True:
            x = torch.randn(8, 3, generator=gen)
            yield x, x.sum(1, keepdim=True)

    torch.manual_seed(0)
    model = nn.Linear(3, 1)  # float32, as are the batches
    with pytest.raises(RuntimeError):  # without conversion float64 weights meet float32 batches
        simulate(model.double(), lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), float32_batches(),
                 topology.lookahead(2, 0.5), lambda p: torch.optim.SGD(p, lr=0.1), steps=3)
    seen = []

    def loss(module, batch):
        seen.append(batch[0].dtype)
        return ((module(batch[0]) - batch[1]) ** 2).mean()

    result = simulate(nn.Linear(3, 1), loss, float32_batches(), topology.lookahead(2, 0.5),
                      lambda p: torch.optim.SGD(p, lr=0.1), steps=3, dtype=torch.float64)
    assert seen == [torch.float64] * 3
    assert result.state_dicts[1]["weight"].dtype == torch.float64


def test_converted_stream_keeps_a_stateful_streams_checkpoint_methods():
    class Stream:
        def __init__(self):
            self.i = 0

        def __iter__(self):
            return self

        def __next__(self):
            self.i += 1
            return torch.tensor([float(self.i)])

        def state_dict(self):
            return {"i": self.i}

        def load_state_dict(self, state):
            self.i = state["i"]

    inner = Stream()
    stream = ConvertedStream(inner, torch.float64, None)
    assert next(stream).dtype == torch.float64 and stream.state_dict() == {"i": 1}
    stream.load_state_dict({"i": 5})
    assert float(next(stream)) == 6.0
    assert not hasattr(ConvertedStream(iter([]), None, None), "state_dict")


# -- NaN, and launches that ran the whole job in every process ---------------------------------------


def test_a_diverging_run_is_one_line_and_status_3(tmp_path, capsys):
    assert app.run(config(*LA2, "launch.steps=40", "agents.optimizer.lr=1e12", "agents=sgd",
                          "launch.check_reference=false"), tmp_path) == 3
    err = capsys.readouterr().err  # the progress bar, then the line
    assert "Traceback" not in err and err.endswith("\n") and err.count("error [rank 0]:") == 1
    assert err.splitlines()[-1].startswith("error [rank 0]: non-finite values (NaN or Inf)")
    assert read_metrics(tmp_path / "metrics.csv")  # the rows written before it stay


def no_traceback_of_ours(output: str) -> bool:
    """torchrun prints its own traceback (ChildFailedError); none may come from this project."""
    return "/launch/cli/" not in output and "/launch/engine/" not in output and "/experiments/" not in output


def test_torchrun_diverging_run_is_one_line_per_rank_and_status_3(tmp_path):
    code, output = run_torchrun(2, ["-m", "launch", "topology=lookahead", "launch=torch", "launch.steps=40",
                                    "agents=sgd", "agents.optimizer.lr=1e12", f"hydra.run.dir={tmp_path}"],
                                timeout=150, cwd=ROOT)
    assert code != 0
    for rank in (0, 1):
        assert output.count(f"error [rank {rank}]: non-finite values") == 1, output
    assert "exitcode  : 3" in output and no_traceback_of_ours(output), output


def test_torchrun_without_launch_torch_fails_on_every_rank(tmp_path):
    code, output = run_torchrun(2, ["-m", "launch", "topology=lookahead", "launch.steps=3",
                                    f"hydra.run.dir={tmp_path}"], timeout=150, cwd=ROOT)
    assert code != 0
    for rank in (0, 1):
        assert (f"error [rank {rank}]: launch=colocated runs the whole job in one process, but torchrun started "
                f"2 processes (WORLD_SIZE=2): add launch=torch") in output, output
    assert "exitcode  : 2" in output and no_traceback_of_ours(output)
    assert not (tmp_path / "agents.pt").exists()


def test_mpiexec_without_launch_mpi_fails_on_every_rank(tmp_path):
    code, output = run_mpiexec(2, [sys.executable, "-m", "launch", "topology=lookahead", "launch=serial",
                                   "launch.steps=3", f"hydra.run.dir={tmp_path}"], timeout=150, cwd=ROOT)
    assert code != 0
    for rank in (0, 1):
        assert f"error [rank {rank}]: launch=serial runs the whole job in one process, but mpiexec started 2" in output
        assert "add launch=mpi" in output
    assert no_traceback_of_ours(output)


def test_torchrun_default_run_directory_is_one_folder_per_job(tmp_path):
    """Without hydra.run.dir both ranks name the same outputs/<date>/<time>-p<pid> folder."""
    code, output = run_torchrun(2, ["-m", "launch", "topology=lookahead", "launch=torch", "launch.steps=3"],
                                timeout=150, cwd=tmp_path)
    assert code == 0, output
    folders = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(folders) == 1, folders
    assert (folders[0] / "summary.json").exists() and "-p" in folders[0].name


def test_agents_per_rank_is_a_launch_key_passed_to_the_simulation(tmp_path):
    """launch.agents_per_rank=2 on 2 processes for Lookahead's 2 agents: the placement refuses it,
    naming the key (so it reached the Simulation); a colocated launch does not take it."""
    code, output = run_torchrun(2, ["-m", "launch", "topology=lookahead", "launch=torch", "launch.steps=3",
                                    "launch.agents_per_rank=2", f"hydra.run.dir={tmp_path}"], timeout=150, cwd=ROOT)
    assert code != 0
    for rank in (0, 1):
        assert (f"error [rank {rank}]: world size 2 does not fit the schedule's 2 agents with "
                f"launch.agents_per_rank=2: start 1 processes") in output, output


# -- on a GPU (skipped without one) ------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_simulate_on_cuda_moves_the_batches_and_returns_cpu_state_dicts():
    result = simulate(bn_model(), mse, bn_batches(), topology.lookahead(3, 0.5), lambda p: torch.optim.SGD(p, lr=0.05),
                      steps=4, device="cuda")
    assert all(v.device.type == "cpu" for state in result.state_dicts for v in state.values())
    assert int(result.state_dicts[1]["1.num_batches_tracked"]) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eval_rows_on_cuda_match_the_cpu_run(evaluated, tmp_path):
    assert app.run(config(*EVAL, "launch.device=cuda"), tmp_path) == 0
    got, want = read_eval(tmp_path / "eval.csv"), read_eval(evaluated / "eval.csv")
    assert [(r["step"], r["agent"]) for r in got] == [(r["step"], r["agent"]) for r in want]
    for a, b in zip(got, want):
        assert (math.isnan(a["heldout_loss"]) and math.isnan(b["heldout_loss"])) or close(
            a["heldout_loss"], b["heldout_loss"], 1e-6), (a, b)
