"""E7: decentralized averaging at an equal communication budget, and Lookahead over local SGD.

    python -m experiments.e7_decentralized            # a few minutes on 2 cores (see the README)
    python -m experiments.e7_decentralized --steps 200 --seeds 1   # a quick look

16 workers, each with its own data stream of the teacher-student regression
(:func:`experiments.problems.teacher_student`, float64), plain SGD inside, co-located.

Part 1, equal budget: every schedule sends about one parameter vector per agent per step
(:func:`topology.diagnostics.vectors_sent_per_agent`, one agent per rank; an all-reduce of g ranks
counted as a ring all-reduce, 2 (g - 1) / g vectors per member): all-reduce averaging every 2 steps
(local SGD, 2 * 15/16 / 2 = 0.94), ring every 2 steps (degree 2), 4 x 4 torus and static
exponential graph every 4 steps (degree 4), one-peer exponential every step (degree 1).

Part 2: local SGD (averaging every 8 steps) against Lookahead over local SGD (every 8 steps the
slow agent and all workers get (1 - alpha) z + alpha * mean(workers)), alpha = 0.5: the same
communication.

Logged through :class:`launch.engine.readout.MetricsHook`: the consensus distance of the workers and
their training losses at every step; every 40 steps (a sync step of every schedule here) the
held-out loss of the workers' mean and the mean held-out loss of the workers.  Writes
``e7_decentralized.md`` (the table) and ``e7_decentralized.png`` (the curves, mean over seeds)
under ``--out`` (default ``experiments/results``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from agents.flat import load_flat_
from experiments.problems import teacher_student
from launch import Simulation
from launch.engine.readout import MetricsHook
from topology import decentralized as dec
from topology.diagnostics import spectral_gap, vectors_sent_per_agent

AGENTS = 16
EVAL_EVERY = 40

BUDGET = {
    "all-reduce (local SGD, tau=2)": lambda: dec.local_sgd(AGENTS, 2),
    "ring, every 2": lambda: dec.ring(AGENTS, every=2),
    "torus 4x4, every 4": lambda: dec.torus(4, 4, every=4),
    "exponential, every 4": lambda: dec.exponential(AGENTS, every=4),
    "one-peer exponential": lambda: dec.one_peer_exponential(AGENTS),
}
LOOKAHEAD = {
    "local SGD, tau=8": lambda: dec.local_sgd(AGENTS, 8),
    "Lookahead over local SGD, k=8, alpha=0.5": lambda: dec.lookahead_local_sgd(AGENTS, 8, 0.5),
}


def run(schedule, seed: int, steps: int, lr: float) -> list[dict]:
    """One co-located run; the rows of :class:`MetricsHook` (held-out losses every EVAL_EVERY)."""
    problem = teacher_student(seed=seed)
    workers = schedule.workers
    sim = Simulation(problem.model(), problem.loss_fn, problem.batches, schedule,
                     lambda params: torch.optim.SGD(params, lr=lr))
    template = copy.deepcopy(problem.model())

    def held_out(s) -> dict:
        if s.t % EVAL_EVERY:
            return {}
        values = [s.agents[i].debiased() for i in workers]
        mean = torch.stack(values).mean(0)
        per_agent = [problem.evaluate(load_flat_(template, v))["loss"] for v in values]
        return {"heldout_mean_model": problem.evaluate(load_flat_(template, mean))["loss"],
                "heldout_agents": sum(per_agent) / len(per_agent)}

    rows: list[dict] = []
    sim.run(steps, MetricsHook(rows.append, extra=held_out))
    return rows


def summarize(label, schedule, runs: list[list[dict]], steps: int, baseline: list[list[dict]]) -> dict:
    """The table row; ``baseline``: the group's first schedule, for differences paired by seed
    (a seed changes the teacher, the initial model and the streams, so compare within a seed)."""
    tail = max(1, steps // 4)

    def over_seeds(fn):
        values = [fn(rows) for rows in runs]
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    def final(key):
        return lambda rows: [r[key] for r in rows if key in r][-1]

    return {
        "label": label,
        "gap": spectral_gap(schedule),
        "gap_step": spectral_gap(schedule, per_step=True),
        "vectors": vectors_sent_per_agent(schedule),
        "consensus": over_seeds(lambda rows: statistics.mean(r["consensus_distance"] for r in rows[-tail:])),
        "train": over_seeds(lambda rows: statistics.mean(r["loss_mean"] for r in rows[-tail:])),
        "heldout_mean_model": over_seeds(final("heldout_mean_model")),
        "heldout_agents": over_seeds(final("heldout_agents")),
        "paired": statistics.mean(final("heldout_agents")(r) - final("heldout_agents")(b)
                                  for r, b in zip(runs, baseline)),
    }


def curves(runs: list[list[dict]], key: str) -> tuple[list[int], list[float]]:
    steps = [r["step"] for r in runs[0] if key in r]
    values = [statistics.mean(v) for v in zip(*[[r[key] for r in rows if key in r] for rows in runs])]
    return steps, values


def smooth(values: list[float], width: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - width] if i >= width else 0.0)
        out.append(acc / min(i + 1, width))
    return out


def table(summaries: list[dict], steps: int) -> str:
    lines = [
        "| schedule | spectral gap (period) | gap per step | vectors / agent / step | "
        f"consensus distance (last {steps // 4} steps) | training loss (last {steps // 4} steps) | "
        "held-out loss, workers' mean | held-out loss, mean of workers | same, minus first row's (paired by seed) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        def pm(key, fmt="{:.4f}"):
            mean, std = s[key]
            return f"{fmt.format(mean)} ± {fmt.format(std)}"
        lines.append(
            f"| {s['label']} | {s['gap']:.4f} | {s['gap_step']:.4f} | {s['vectors']:.3f} | "
            f"{pm('consensus', '{:.2e}')} | {pm('train')} | {pm('heldout_mean_model')} | {pm('heldout_agents')} | "
            f"{s['paired']:+.2e} |"
        )
    return "\n".join(lines)


def plot(groups, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for row, (title, results) in enumerate(groups):
        for label, runs in results.items():
            steps, values = curves(runs, "consensus_distance")
            axes[row, 0].plot(steps, smooth(values), label=label, lw=1.2)
            steps, values = curves(runs, "heldout_agents")
            axes[row, 1].plot(steps, values, label=label, lw=1.2)
        axes[row, 0].set(yscale="log", xlabel="step", ylabel="consensus distance (workers, 10-step mean)",
                         title=f"{title}: consensus distance")
        axes[row, 1].set(yscale="log", xlabel="step", ylabel="mean held-out loss of the workers",
                         title=f"{title}: held-out loss")
        axes[row, 0].legend(fontsize=8)
        axes[row, 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", default="experiments/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    groups, sections = [], []
    for title, configs in (("Equal communication budget", BUDGET), ("Lookahead over local SGD", LOOKAHEAD)):
        results, summaries = {}, []
        for label, build in configs.items():
            schedule = build()
            results[label] = [run(schedule, seed, args.steps, args.lr) for seed in range(args.seeds)]
            first = next(iter(results.values()))
            summaries.append(summarize(label, schedule, results[label], args.steps, first))
            print(f"{title} / {label}: done ({time.perf_counter() - start:.0f} s)", flush=True)
        groups.append((title, results))
        sections.append(f"### {title}\n\n{table(summaries, args.steps)}\n")
    elapsed = time.perf_counter() - start
    plot(groups, out / "e7_decentralized.png")

    command = "python -m experiments.e7_decentralized" + (
        "" if argv is None else " " + " ".join(argv))
    text = (
        "## E7: decentralized averaging at an equal communication budget; Lookahead over local SGD\n\n"
        f"`{command}` ({args.steps} steps, {args.seeds} seeds, {AGENTS} workers, SGD lr {args.lr}, "
        f"teacher-student regression in float64, co-located; {elapsed:.0f} s).  Mean ± standard "
        "deviation over seeds.  Spectral gap: 1 - |lambda_2| of the product of one period's matrices "
        "(per step: 1 - |lambda_2|^(1/period)); vectors / agent / step: parameter vectors sent per "
        "agent per step with one agent per rank (ring all-reduce for averaging).\n\n"
        + "\n".join(sections)
        + "\n![E7 curves](e7_decentralized.png)\n"
    )
    (out / "e7_decentralized.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
