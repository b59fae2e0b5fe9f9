"""Every invalid command line is one line naming the key as typed, and exit status 2.

The table holds the command lines that used to fail otherwise (a traceback and status 1, hydra's
multi-line report, a run that went on with a zero-width layer, a message naming an internal
argument): each now runs through :func:`launch.cli.app.main`, the entry point of
``python -m launch`` (in this process, hydra included), and must print exactly one line
``error [rank 0]: ...`` containing the expected words (and none of the forbidden ones), write no
results, and return 2.  A few run under torchrun with 2 processes: one line per rank.
"""

from __future__ import annotations

import sys

import pytest

from launch.cli import app
from tests.spawn import ROOT, run_torchrun

MISSING = "/nonexistent/cifar"

# (overrides, words the line must contain, words it must not contain)
CASES = [
    # values of the wrong type or range (they were tracebacks)
    (["agents.optimizer.lr=abc"], "agents.optimizer.lr must be a finite number; got 'abc'", ()),
    (["agents.optimizer.momentum=abc"], "agents.optimizer.momentum must be a finite number; got 'abc'", ()),
    (["agents.optimizer.lr=nan"], "agents.optimizer.lr must be a finite number; got nan", ()),
    (["agents.optimizer.lr=inf"], "agents.optimizer.lr must be a finite number; got inf", ()),
    (["agents.optimizer.lr=-1"], "agents.optimizer: torch.optim.SGD refuses", ()),
    (["agents=adam", "+agents.optimizer.betas=abc"], "agents.optimizer.betas must be a list of 2 finite numbers", ()),
    (["agents=adam", "+agents.optimizer.foo=1"], "agents.optimizer has option(s) ['foo'] that torch.optim.Adam",
     ("'params'", "'self'")),
    (["launch.num_threads=-1"], "launch.num_threads must be null (torch's default) or an integer >= 1; got -1", ()),
    (["launch.num_threads=abc"], "launch.num_threads must be null (torch's default) or an integer >= 1", ()),
    (["launch.seed=1e20"], "launch.seed must be an integer in [0, 4294967295]", ()),
    (["launch.seed=100000000000000000000"], "launch.seed must be an integer in [0, 4294967295]", ("Overflow",)),
    (["launch.eval_every=0"], "launch.eval_every must be null (only at the end) or an integer >= 1; got 0 (or auto, "
                              "the default: 20 evaluations over a run of 100 steps or more)", ()),
    (["launch.tensorboard=yes"], "launch.tensorboard must be true or false; got 'yes'", ()),
    (["launch=torch", "launch.agents_per_rank=0"], "launch.agents_per_rank must be null", ()),
    (["problem.dim=-1"], "problem.dim must be a positive integer; got -1", ()),
    (["problem.dim=1e11"], "problem.dim must be a positive integer", ()),
    (["problem.dim=100000000000"], "problem.dim=100000000000 is too large", ("allocate",)),
    (["problem.hidden=0"], "problem.hidden must be a positive integer; got 0", ()),
    (["problem.batch_size=0"], "problem.batch_size must be a positive integer; got 0", ()),
    (["problem.noise=abc"], "problem.noise must be a finite number >= 0; got 'abc'", ()),
    (["topology=ring", "topology.n=100000"], "topology.n=100000 asks for more agents than the command line runs", ()),
    (["topology=lookahead", "topology.alpha=2"], "topology.alpha must be a real number in (0, 1]; got 2", ("alphas",)),
    (["topology=lookahead", "topology.k=0"], "topology.k must be an integer >= 1", ("ks[0]",)),
    (["topology=ring", "topology.weights=foo"], "topology.weights must be one of metropolis, uniform", ()),
    # hydra's own errors (they were its multi-line report and status 1)
    (["topology=foo"], "topology=foo: there is no topology configuration 'foo'; available: exponential,", ()),
    (["agents=foo"], "agents=foo: there is no agents configuration 'foo'; available: adam, sgd, sgd_momentum", ()),
    (["launch=foo"], "launch=foo: there is no launch configuration 'foo'; available: colocated, mpi, serial, torch", ()),
    (["launch.foo=1"], "launch.foo: there is no such key (launch has name, device", ()),
    (["agents.optimizer.foo=1"], "agents.optimizer.foo: there is no such key", ()),
    (["agents.optimizer.betas=abc"], "agents.optimizer.betas: there is no such key (agents.optimizer has name, lr, "
                                     "momentum; a key it does not have is added as +agents.optimizer.betas=abc)", ()),
    (["lauch.steps=3"], "lauch.steps: there is no such key; did you mean launch.steps?", ()),
    (["launch.stpes=3"], "launch.stpes: there is no such key; did you mean launch.steps?", ()),
    (["launch.steps=[1,2"], "cannot parse the override launch.steps=[1,2", ()),
    # keys that were silently ignored
    (["+launch.agents_per_rank=2"], "launch.agents_per_rank is a key of launch=torch and launch=mpi", ()),
    (["+foo=1"], "unknown top-level key(s) ['foo']", ()),
    # data
    (["problem=cifar10_resnet18"], "problem.root must be set", ()),
    (["problem=cifar10_resnet18", f"problem.root={MISSING}"], f"problem.root={MISSING}: CIFAR-10 not found", ()),
]


@pytest.mark.parametrize("overrides, words, forbidden", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_invalid_command_line_is_one_line_and_status_2(overrides, words, forbidden, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["launch", f"hydra.run.dir={tmp_path}", "launch.steps=3", *overrides])
    assert app.main() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error [rank 0]: "), err
    assert words in err, err
    for word in forbidden:
        assert word not in err, err
    assert not (tmp_path / "agents.pt").exists()


@pytest.mark.parametrize("overrides, words", [
    (["topology=foo"], "topology=foo: there is no topology configuration 'foo'"),
    (["problem=cifar10_resnet18", f"problem.root={MISSING}"], f"problem.root={MISSING}: CIFAR-10 not found"),
], ids=["hydra", "missing-data"])
def test_invalid_command_line_under_torchrun_is_one_line_per_rank(overrides, words, tmp_path):
    code, output = run_torchrun(2, ["-m", "launch", "launch=torch", "topology=lookahead", *overrides,
                                    f"hydra.run.dir={tmp_path}"], timeout=150, cwd=ROOT)
    assert code != 0
    for rank in (0, 1):
        lines = [line for line in output.splitlines() if line.startswith(f"error [rank {rank}]: ")]
        assert len(lines) == 1 and words in lines[0], output
    assert "exitcode  : 2" in output
    assert "/launch/cli/" not in output and "/experiments/" not in output  # no traceback of ours


def test_equivalence_command_reports_hydra_errors_the_same_way(tmp_path, monkeypatch, capsys):
    from launch.cli import equivalence

    monkeypatch.setattr(sys, "argv", ["launch.equivalence", f"hydra.run.dir={tmp_path}", "topology=foo"])
    assert equivalence.main() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "topology=foo: there is no topology configuration 'foo'" in err


def test_a_lost_rank_is_one_line_and_status_4(tmp_path, monkeypatch, capsys):
    """A RankFailureError (raised by the engine when a peer dies) ends the run with status 4."""
    from launch.engine.guard.health import RankFailureError

    def lost(*args):
        raise RankFailureError("rank 0: the sync of iteration t=3 failed; rank 1 seems lost")

    monkeypatch.setattr(app, "open_run", lost)
    monkeypatch.setattr(sys, "argv", ["launch", f"hydra.run.dir={tmp_path}", "launch.steps=3"])
    assert app.main() == 4
    err = capsys.readouterr().err
    assert err == "error [rank 0]: rank 0: the sync of iteration t=3 failed; rank 1 seems lost\n"
