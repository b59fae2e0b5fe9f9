"""Shared plumbing of experiments E4-E6 (nested Lookahead, SLRLA, adaptive alpha).

The problem is the registered ``experiments.problems.PROBLEMS["digits_mlp"]``
(:mod:`experiments.digits`: 8x8 digits, standardized, a stratified 80/20 split, a 64-64-10 ReLU
MLP, cross-entropy, shuffled epochs in minibatches of 32), with training-split metrics added.
Every run is the co-located simulator (the same code as the distributed runs), float32, one
thread.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable

import torch

from agents.flat import load_flat_
from experiments.base import classification_metrics
from experiments.digits import digits_split
from experiments.problems import PROBLEMS, Problem
from launch import Simulation

RESULTS = Path(__file__).resolve().parent / "results"


def make_problem(seed: int) -> Problem:
    """``PROBLEMS["digits_mlp"](seed=seed)`` (:func:`experiments.digits.digits_mlp`), whose
    ``evaluate`` also reports ``train_loss`` and ``train_accuracy`` on the training split (E5's
    generalization gap)."""
    problem = PROBLEMS["digits_mlp"](seed=seed)
    split = digits_split()

    def evaluate(module) -> dict:
        train = classification_metrics(module, split.x_train, split.y_train)
        return {**problem.evaluate(module), **{f"train_{k}": v for k, v in train.items()}}

    return Problem(problem.name, problem.model, problem.loss_fn, problem.batches, evaluate)


def run(problem: Problem, schedule, optimizer: Callable, steps: int, *, policy="maintain", outer=None,
        controller=None, eval_every: int = 50, evaluate_agent: int | None = None) -> dict:
    """One co-located run; evaluates the outermost slow agent (the last agent, or
    ``evaluate_agent``) every ``eval_every`` steps.  Returns curves and final metrics."""
    sim = Simulation(problem.model(), problem.loss_fn, problem.batches(0), schedule, optimizer,
                     state_policy=policy, outer=outer)
    if controller is not None:
        controller.start(sim)
    agent = schedule.num_agents - 1 if evaluate_agent is None else evaluate_agent
    probe = copy.deepcopy(problem.model())
    curve = []

    def evaluate(t):
        load_flat_(probe, sim.agents[agent].params)
        curve.append({"step": t, **problem.evaluate(probe)})

    start = time.perf_counter()
    evaluate(0)
    for t in range(1, steps + 1):
        sim.step()
        if controller is not None:
            controller(sim)
        if t % eval_every == 0 or t == steps:
            evaluate(t)
    return {"curve": curve, "final": curve[-1], "seconds": time.perf_counter() - start, "sim": sim}


def single_agent():
    """Plain inner optimizer: one worker, P_t = I."""
    import topology

    return topology.from_matrices([[[1.0]]])


def mean_std(values) -> tuple[float, float]:
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return mean, math.sqrt(var)


def fmt(values, scale=1.0, digits=2) -> str:
    m, s = mean_std([v * scale for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def write_markdown(name: str, title: str, lines: list[str], seconds: float, command: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    text = [f"# {title}", "", f"Command: `{command}` ({seconds:.0f} s on this machine).", ""] + lines
    path.write_text("\n".join(text) + "\n")
    return path


def setup_matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
