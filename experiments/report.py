"""What the experiments share: running a problem through the simulator, and writing results.

Every experiment is a module with ``main(argv=None)``: it parses its options (``--out`` the folder,
default ``experiments/results``), runs through :class:`launch.Simulation`, and writes
``<name>.md`` (the tables, the command that made them and its wall and CPU time) and
``<name>.png``.  E4-E6 (nested Lookahead, SLRLA, adaptive alpha) run
:func:`digits_with_train_metrics` through :func:`run_and_evaluate`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

import topology
from agents.flat import load_flat_
from experiments.base import Problem, classification_metrics
from experiments.digits import digits_split
from experiments.problems import PROBLEMS
from launch import Simulation

RESULTS = Path(__file__).resolve().parent / "results"


# -- running ------------------------------------------------------------------------------------------
def sgd_schedule() -> topology.Schedule:
    """Plain SGD (or any inner optimizer alone) as a schedule: one worker agent, P_t = I."""
    return topology.from_matrices([torch.eye(1, dtype=torch.float64)])


def simulation(problem: Problem, schedule: topology.Schedule, optimizer, **options) -> Simulation:
    """A co-located :class:`Simulation` of ``schedule`` on ``problem`` (worker i reads
    ``problem.batches(i)``)."""
    return Simulation(problem.model(), problem.loss_fn, problem.batches, schedule, optimizer, **options)


def agent_module(problem: Problem, sim: Simulation, agent: int) -> torch.nn.Module:
    """A module holding agent ``agent``'s current parameters: the worker's own module, or for a
    passive agent a fresh ``problem.model()`` loaded with its flat buffer."""
    held = sim.agents[agent]
    if held.is_worker:
        return held.module
    module = problem.model()
    dtype = held.params.dtype
    return load_flat_(module.to(dtype=dtype, device=held.params.device), held.params)


def digits_with_train_metrics(seed: int) -> Problem:
    """``PROBLEMS["digits_mlp"](seed=seed)`` (:func:`experiments.digits.digits_mlp`: 8x8 digits,
    standardized, a stratified 80/20 split, a 64-64-10 ReLU MLP, cross-entropy, shuffled epochs in
    minibatches of 32), whose ``evaluate`` also reports ``train_loss`` and ``train_accuracy`` on
    the training split (E5's generalization gap): E4-E6's problem."""
    problem = PROBLEMS["digits_mlp"](seed=seed)
    split = digits_split()

    def evaluate(module) -> dict:
        train = classification_metrics(module, split.x_train, split.y_train)
        return {**problem.evaluate(module), **{f"train_{k}": v for k, v in train.items()}}

    return dataclasses.replace(problem, evaluate=evaluate)


def run_and_evaluate(problem: Problem, schedule: topology.Schedule, optimizer: Callable, steps: int, *,
                     policy="maintain", outer=None, controller=None, eval_every: int = 50,
                     evaluate_agent: int | None = None) -> dict:
    """``steps`` iterations of a co-located :func:`simulation`, evaluating the outermost slow agent
    (the last agent, or ``evaluate_agent``) at step 0, every ``eval_every`` steps and at the end.

    ``controller`` (SLRLA's :class:`agents.slrla.SLRLAController`) is started on the simulation
    and called after every step.  Returns ``{"curve": [{"step", **metrics}], "final": the last
    entry, "seconds": wall time, "sim": the simulation}``.
    """
    sim = simulation(problem, schedule, optimizer, state_policy=policy, outer=outer)
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


# -- statistics -----------------------------------------------------------------------------------------
def mean_se(samples: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error (sample std / sqrt(n)) of independent samples along ``dim``."""
    n = samples.shape[dim]
    return samples.mean(dim), samples.std(dim) / math.sqrt(n)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value) of the values that are not NaN
    (NaN, NaN when none is)."""
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return mean, math.sqrt(var)


def fmt(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± std"`` (:func:`mean_std`) of ``values * scale`` with ``digits`` decimals."""
    m, s = mean_std([v * scale for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


# -- writing ------------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; a ``|`` inside a cell is escaped."""
    def cells(values):
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    return "\n".join([cells(headers), "|" + "|".join("---" for _ in headers) + "|", *map(cells, rows)])


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .png (default %(default)s)")
    return p


def run_arguments(description: str, argv: Sequence[str] | None, steps_flag: str = "--steps",
                  steps_help: str = "inner steps per run", steps_default: int = 900) -> argparse.Namespace:
    """E4-E6's options: ``--out`` (:func:`parser`), ``steps_flag`` (a positive int, default
    ``steps_default``) and ``--seeds`` (runs seeds 0 .. n - 1; default 3)."""
    p = parser(description)
    p.add_argument(steps_flag, type=int, default=steps_default, help=f"{steps_help} (default %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. SEEDS - 1 (default %(default)s)")
    args = p.parse_args(argv)
    steps = getattr(args, steps_flag.lstrip("-").replace("-", "_"))
    if steps < 1 or args.seeds < 1:
        p.error(f"{steps_flag} and --seeds must be positive integers; got {steps} and {args.seeds}")
    return args


def command_line(name: str, argv: Sequence[str] | None) -> str:
    """The command that reruns experiment ``name`` with these arguments."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python -m", f"experiments.{name}", *map(shlex.quote, args)])


def write_markdown(out: Path, name: str, title: str, argv: Sequence[str] | None, timer: "Timer", body: str) -> None:
    """``out/name.md``: ``# title``, the command and its run time (``timer``, stopped here: runs,
    plot and tables), then ``body``."""
    timer.stop()
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"# {title}\n\n"
        f"Generated by `{command_line(name, argv)}` in {timer.elapsed:.0f} s wall time, {timer.cpu:.0f} s CPU time "
        f"({torch.get_num_threads()} torch thread, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}).\n\n"
    )
    (out / f"{name}.md").write_text(header + body.rstrip() + "\n")


def save_figure(fig, out: Path, name: str, dpi: int = 110) -> None:
    """``out/name.png`` (tight layout, ``dpi``); the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=dpi)
    plt.close(fig)


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Timer:
    """Wall time (``elapsed``) and this process's CPU time (``cpu``) from construction to :meth:`stop`."""

    def __init__(self):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def stop(self) -> "Timer":
        self.elapsed = time.perf_counter() - self.start
        self.cpu = time.process_time() - self.cpu_start
        return self
