"""E5: stagewise locally-regularized Lookahead (SLRLA) vs Lookahead.

Zhou et al.'s Algorithm 3 on the digits problem (:mod:`experiments.variants`), inner SGD with
momentum 0.9, k 5, alpha 0.5, 900 inner steps in 3 stages of 300: SLRLA with lr (0.1, 0.05, 0.02)
and beta (0.001, 0.01, 0.1); Lookahead with the same stagewise lr and beta = 0 (isolates the
regularizer); Lookahead with a constant lr 0.1.  3 seeds; test and training metrics of the slow
weights, and the generalization gap (training minus test accuracy).

    python -m experiments.e5_slrla           # writes experiments/results/e5_slrla.{md,png}
"""

from __future__ import annotations

import time

import torch

import topology
from agents.slrla import SLRLAController, Stage, proximal
from experiments.variants import RESULTS, fmt, make_problem, run, setup_matplotlib, write_markdown

SEEDS = (0, 1, 2)
LRS, BETAS = (0.1, 0.05, 0.02), (0.001, 0.01, 0.1)


def inner(p):
    return torch.optim.SGD(p, lr=0.1, momentum=0.9)


def stages(betas):
    return [Stage(steps=300, lr=lr, alpha=0.5, k=5, beta=beta) for lr, beta in zip(LRS, betas)]


CONFIGS = {
    "SLRLA": stages(BETAS),
    "LA, stagewise lr (beta = 0)": stages((0.0, 0.0, 0.0)),
    "LA, lr 0.1": [Stage(steps=900, lr=0.1, alpha=0.5, k=5, beta=0.0)],
}


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = {}
    for name, st in CONFIGS.items():
        results[name] = []
        for seed in SEEDS:
            controller = SLRLAController(st)
            results[name].append(run(make_problem(seed), topology.stagewise_lookahead(controller.stages),
                                     proximal(inner), controller.total_steps, controller=controller,
                                     eval_every=50))
        print(name, fmt([r["final"]["accuracy"] for r in results[name]], 100))
    seconds = time.perf_counter() - start
    lines = ["Digits (64-64-10 ReLU MLP), SGD momentum 0.9 inside Lookahead (k 5, alpha 0.5), 900 steps,",
             "3 seeds (mean ± std), slow weights at the end.", "",
             "| method | test acc. (%) | test loss | train loss | gap (train - test acc., %) |",
             "|---|---|---|---|---|"]
    for name, runs in results.items():
        finals = [r["final"] for r in runs]
        gap = [f.get("train_accuracy", float("nan")) - f["accuracy"] for f in finals]
        lines.append(f"| {name} | {fmt([f['accuracy'] for f in finals], 100)} | {fmt([f['loss'] for f in finals], 1, 3)} | "
                     f"{fmt([f.get('train_loss', float('nan')) for f in finals], 1, 3)} | {fmt(gap, 100)} |")
    write_markdown("e5_slrla", "E5: SLRLA vs Lookahead", lines, seconds, "python -m experiments.e5_slrla")

    plt = setup_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in results.items():
        steps = [c["step"] for c in runs[0]["curve"]]
        for ax, key in zip(axes, ("loss", "train_loss")):
            values = [sum(r["curve"][i].get(key, float("nan")) for r in runs) / len(runs) for i in range(len(steps))]
            ax.plot(steps, values, label=name)
    for ax, title in zip(axes, ("test loss", "training loss")):
        ax.set_yscale("log")
        ax.set_xlabel("inner step")
        ax.set_title(f"{title} (mean of 3 seeds)")
        for boundary in (300, 600):
            ax.axvline(boundary, color="grey", lw=0.5)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "e5_slrla.png", dpi=120)
    print(f"wrote {RESULTS / 'e5_slrla.md'} and .png in {seconds:.0f} s")


if __name__ == "__main__":
    main()
