"""Shared plumbing of experiments E4-E6 (nested Lookahead, SLRLA, adaptive alpha).

The problem is ``experiments.problems.PROBLEMS["digits_mlp"]`` when that registry has it (branch
issue4-exp), else a small scikit-learn digits problem built here (:func:`digits_problem`, the
same ``Problem`` interface): 8x8 digits, 1437 training / 360 test images, a 64-64-10 tanh MLP,
cross-entropy, minibatches of 32 drawn with a seeded generator.  Every run is the co-located
simulator (the same code as the distributed runs), float32, one thread.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from agents.flat import load_flat_
from experiments.problems import PROBLEMS, Problem
from launch.simulation import Simulation

RESULTS = Path(__file__).resolve().parent / "results"


def digits_problem(seed: int = 0, hidden: int = 64, batch_size: int = 32) -> Problem:
    """scikit-learn's 8x8 digits: a ``64 -> hidden -> 10`` tanh MLP, cross-entropy; metrics on
    the 360-image test split and on the training split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))
    x, y = x[perm], y[perm]
    x_train, y_train, x_test, y_test = x[:1437], y[:1437], x[1437:], y[1437:]

    def model() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))

    def loss_fn(module, batch):
        return nn.functional.cross_entropy(module(batch[0]), batch[1])

    def batches(agent: int = 0):
        g = torch.Generator().manual_seed(seed + 1000 * (agent + 1))
        for _ in itertools.count():
            index = torch.randint(0, len(y_train), (batch_size,), generator=g)
            yield x_train[index], y_train[index]

    @torch.no_grad()
    def evaluate(module) -> dict:
        out = {}
        for name, (xs, ys) in {"": (x_test, y_test), "train_": (x_train, y_train)}.items():
            logits = module(xs)
            out[f"{name}loss"] = float(nn.functional.cross_entropy(logits, ys))
            out[f"{name}accuracy"] = float((logits.argmax(1) == ys).double().mean())
        return out

    return Problem("digits_mlp_sklearn", model, loss_fn, batches, evaluate)


def make_problem(seed: int) -> Problem:
    """``PROBLEMS["digits_mlp"]`` if registered (and accepting ``seed``), else :func:`digits_problem`."""
    factory = PROBLEMS.get("digits_mlp")
    if factory is not None:
        try:
            return factory(seed=seed)
        except TypeError:
            pass
    return digits_problem(seed)


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
