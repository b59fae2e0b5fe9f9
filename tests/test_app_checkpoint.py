"""Checkpoints from the command line: launch.checkpoint_every, checkpoint_dir, resume."""

import torch

from launch.cli import app
from launch.engine.record.metrics import read_metrics
from tests.test_app import config, flat

BASE = ("topology=multilayer", "agents=adam", "agents.state_policy=pullback", "launch.log_every=5",
        "launch.check_reference=false")


def agents(path):
    return [flat(state) for state in torch.load(path / "agents.pt")]


def test_resume_from_the_command_line_is_bit_for_bit(tmp_path):
    whole = tmp_path / "whole"
    assert app.run(config(*BASE, "launch.steps=17"), whole) == 0
    first, second = tmp_path / "first", tmp_path / "second"
    ckpt = tmp_path / "ckpt"
    # 7 steps (mid-round: LA-2 syncs at 5 and 10), checkpointed every 3 and at the end.
    assert app.run(config(*BASE, "launch.steps=7", "launch.checkpoint_every=3",
                          f"launch.checkpoint_dir={ckpt}"), first) == 0
    assert (ckpt / "latest.json").exists()
    assert app.run(config(*BASE, "launch.steps=17", "launch.resume=true",
                          f"launch.checkpoint_dir={ckpt}"), second) == 0
    for a, b in zip(agents(second), agents(whole)):
        assert torch.equal(a, b)
    # The second run took only the 10 remaining iterations (its first logged step is 10).
    assert min(row["step"] for row in read_metrics(second / "metrics.csv")) == 10
    # The interrupted run really stopped elsewhere.
    assert not all(torch.equal(a, b) for a, b in zip(agents(first), agents(whole)))


def test_bad_checkpoint_settings_are_configuration_errors(tmp_path, capsys):
    assert app.run(config(*BASE, "launch.steps=3", "launch.checkpoint_every=0"), tmp_path / "a") == 2
    assert "launch.checkpoint_every must be null or an integer >= 1" in capsys.readouterr().err
    assert app.run(config(*BASE, "launch.steps=3", "launch.resume=true",
                          f"launch.checkpoint_dir={tmp_path / 'none'}"), tmp_path / "b") == 2
    assert capsys.readouterr().err.count("error [rank 0]") == 1
