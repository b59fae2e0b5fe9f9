"""E5: stagewise locally-regularized Lookahead (SLRLA) vs Lookahead.

Zhou et al.'s Algorithm 3 on the digits problem
(:func:`experiments.report.digits_with_train_metrics`), inner SGD with momentum 0.9, k 5, alpha
0.5, 900 inner steps in 3 stages of 300 (``--stage-steps``): SLRLA with lr (0.1, 0.05, 0.02)
and beta (0.001, 0.01, 0.1); Lookahead with the same stagewise lr and beta = 0 (isolates the
regularizer); Lookahead with a constant lr 0.1.  3 seeds; test and training metrics of the slow
weights, and the generalization gap (training minus test accuracy).

    python -m experiments.e5_slrla           # writes experiments/results/e5_slrla.{md,png}

``--stage-steps`` and ``--seeds`` (seeds 0 .. n - 1) shrink it (the tests run 3 stages of 10
steps, 2 seeds).
"""

from __future__ import annotations

from typing import Sequence

import torch

import topology
from agents.slrla import SLRLAController, Stage, proximal
from experiments.report import (
    Timer, digits_with_train_metrics, fmt, pyplot, run_and_evaluate, run_arguments, save_figure, write_markdown,
)

NAME = "e5_slrla"
LRS, BETAS = (0.1, 0.05, 0.02), (0.001, 0.01, 0.1)


def inner(p):
    return torch.optim.SGD(p, lr=0.1, momentum=0.9)


def configs(stage_steps: int) -> dict[str, list[Stage]]:
    """SLRLA, its beta = 0 ablation and constant-lr Lookahead, over 3 stages of ``stage_steps``."""
    def stages(betas):
        return [Stage(steps=stage_steps, lr=lr, alpha=0.5, k=5, beta=beta) for lr, beta in zip(LRS, betas)]

    return {
        "SLRLA": stages(BETAS),
        "LA, stagewise lr (beta = 0)": stages((0.0, 0.0, 0.0)),
        "LA, lr 0.1": [Stage(steps=3 * stage_steps, lr=0.1, alpha=0.5, k=5, beta=0.0)],
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs every configuration from each seed; returns ``{"results": {name: [run per seed]}}``
    (:func:`experiments.report.run_and_evaluate`'s dicts)."""
    args = run_arguments(__doc__.splitlines()[0], argv, "--stage-steps", "inner steps per stage (3 stages)", 300)
    torch.set_num_threads(1)
    timer = Timer()
    results = {}
    for name, st in configs(args.stage_steps).items():
        results[name] = []
        for seed in range(args.seeds):
            controller = SLRLAController(st)
            results[name].append(run_and_evaluate(
                digits_with_train_metrics(seed), topology.stagewise_lookahead(controller.stages), proximal(inner),
                controller.total_steps, controller=controller, eval_every=50))
        print(name, fmt([r["final"]["accuracy"] for r in results[name]], 100))
    lines = [f"Digits (64-64-10 ReLU MLP), SGD momentum 0.9 inside Lookahead (k 5, alpha 0.5), {3 * args.stage_steps} "
             "steps,",
             f"{args.seeds} seeds (mean ± std), slow weights at the end.", "",
             "| method | test acc. (%) | test loss | train loss | gap (train - test acc., %) |",
             "|---|---|---|---|---|"]
    for name, runs in results.items():
        finals = [r["final"] for r in runs]
        gap = [f["train_accuracy"] - f["accuracy"] for f in finals]
        lines.append(f"| {name} | {fmt([f['accuracy'] for f in finals], 100)} | {fmt([f['loss'] for f in finals], 1, 3)} | "
                     f"{fmt([f['train_loss'] for f in finals], 1, 3)} | {fmt(gap, 100)} |")

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in results.items():
        steps = [c["step"] for c in runs[0]["curve"]]
        for ax, key in zip(axes, ("loss", "train_loss")):
            values = [sum(r["curve"][i][key] for r in runs) / len(runs) for i in range(len(steps))]
            ax.plot(steps, values, label=name)
    for ax, title in zip(axes, ("test loss", "training loss")):
        ax.set_yscale("log")
        ax.set_xlabel("inner step")
        ax.set_title(f"{title} (mean of {args.seeds} seeds)")
        for boundary in (args.stage_steps, 2 * args.stage_steps):
            ax.axvline(boundary, color="grey", lw=0.5)
    axes[0].legend()
    save_figure(fig, args.out, NAME, dpi=120)
    write_markdown(args.out, NAME, "E5: SLRLA vs Lookahead", argv, timer, "\n".join(lines))
    print(f"wrote {args.out / NAME}.md and .png in {timer.elapsed:.0f} s")
    return {"results": results}


if __name__ == "__main__":
    main()
