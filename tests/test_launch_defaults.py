"""The defaults of each launch (launch/cli/conf/launch/*.yaml, launch.cli.build): launch=torch is
set up for training (device auto, float32, torch's threads, overlap where it applies), the
co-located default job for equivalence checks (CPU, float64, the reference check); every launch
logs metrics.csv every period of its topology unless asked otherwise."""

import pytest
import torch
from hydra import compose, initialize_config_module

from launch.cli.build import build_job


def config(*overrides):
    with initialize_config_module(config_module="launch.cli.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_torch_launch_defaults_are_for_training(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = config("launch=torch")
    job = build_job(cfg)
    assert job.launch.dtype == torch.float32 and job.launch.overlap == "auto" and cfg.launch.num_threads is None
    assert cfg.launch.device == "auto"
    assert job.launch.device == ("cuda:1" if torch.cuda.is_available() else "cpu")   # one GPU per local rank
    assert job.log_every == job.schedule.period == 10                           # LA-2, ks (5, 2)


def test_colocated_default_job_is_the_equivalence_setting():
    cfg = config()
    job = build_job(cfg)
    assert job.launch.mode == "colocated" and job.launch.dtype == torch.float64 and job.launch.device == "cpu"
    assert cfg.launch.check_reference is True and cfg.launch.num_threads == 1
    assert job.log_every == 10


@pytest.mark.parametrize("overrides, every", [(["topology=ring"], 1), (["topology=local_sgd"], None),
                                              (["launch.log_every=7"], 7)])
def test_log_every_follows_the_period_unless_given(overrides, every):
    job = build_job(config(*overrides))
    assert job.log_every == (every if every is not None else job.schedule.period)


@pytest.mark.parametrize("overrides, every", [([], 30), (["launch.steps=100"], 5), (["launch.steps=99"], None),
                                              (["launch=torch", "launch.steps=1000"], 50),
                                              (["launch.eval_every=7"], 7), (["launch.eval_every=null"], None)])
def test_held_out_metrics_make_a_curve_by_default(overrides, every):
    """launch.eval_every=auto (every launch's default): 20 evaluations over a run of 100 steps or
    more (the demo's 600 steps: every 30), at the end only below; a number or null as given."""
    assert build_job(config(*overrides)).launch.eval_every == every
