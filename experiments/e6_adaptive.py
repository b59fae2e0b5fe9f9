"""E6: adaptive slow step size alpha* (Zhang et al., Proposition 1) vs fixed alpha.

Digits (:func:`experiments.report.digits_with_train_metrics`), Adam inside Lookahead (k 5) at two
learning rates (3e-3 and 1e-2, as the paper compares two): fixed alpha 0.5 and 0.8, adaptive
alpha* clipped to [alpha_low, 1] with alpha_low 0.2, and Adam alone; 900 steps, 3 seeds; test loss and accuracy of
the slow weights, and the alpha* taken at each sync.

    python -m experiments.e6_adaptive        # writes experiments/results/e6_adaptive.{md,png}

``--steps`` and ``--seeds`` (seeds 0 .. n - 1) shrink it (the tests run 20 steps, 2 seeds).
"""

from __future__ import annotations

from typing import Sequence

import torch

import topology
from agents.adaptive import AdaptiveAlpha
from experiments.report import (
    Timer, digits_with_train_metrics, fmt, pyplot, run_and_evaluate, run_arguments, save_figure, sgd_schedule,
    write_markdown,
)

NAME = "e6_adaptive"
LRS = (3e-3, 1e-2)
CONFIGS = ("Adam alone", "LA alpha 0.5", "LA alpha 0.8", "LA adaptive (alpha_low 0.2)")


def one(config, lr, seed, steps):
    """One run of ``config`` at Adam learning rate ``lr``: (the run, alpha* per sync or None)."""
    def inner(p):
        return torch.optim.Adam(p, lr=lr)

    problem = digits_with_train_metrics(seed)
    if config == "Adam alone":
        return run_and_evaluate(problem, sgd_schedule(), inner, steps, eval_every=50), None
    if config.startswith("LA alpha"):
        return run_and_evaluate(problem, topology.lookahead(5, float(config.split()[-1])), inner, steps,
                                eval_every=50), None
    rule = AdaptiveAlpha(0.2)
    return run_and_evaluate(problem, topology.lookahead(5, 0.5), inner, steps, outer=rule, eval_every=50), rule.history


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs every (lr, configuration) from each seed; returns ``{"results": {(lr, config): [run per
    seed]}, "alphas": {lr: [alpha* history per seed]}}``."""
    args = run_arguments(__doc__.splitlines()[0], argv)
    torch.set_num_threads(1)
    timer = Timer()
    results, alphas = {}, {}
    for lr in LRS:
        for config in CONFIGS:
            out = [one(config, lr, seed, args.steps) for seed in range(args.seeds)]
            results[lr, config] = [r for r, _ in out]
            if out[0][1] is not None:
                alphas[lr] = [h for _, h in out]
            print(lr, config, fmt([r["final"]["accuracy"] for r in results[lr, config]], 100))
    lines = [f"Digits (64-64-10 ReLU MLP), Adam inside Lookahead (k 5), {args.steps} steps, {args.seeds} seeds "
             "(mean ± std);",
             f"slow weights at the end; alpha* over all syncs of the {args.seeds} seeds.", "",
             "| Adam lr | method | test acc. (%) | test loss | train loss | mean alpha* | share of syncs at the clips (low / 1) |",
             "|---|---|---|---|---|---|---|"]
    for lr in LRS:
        for config in CONFIGS:
            finals = [r["final"] for r in results[lr, config]]
            extra = "| - | - |"
            if config.startswith("LA adaptive"):
                every = [a for h in alphas[lr] for a in h]
                low = sum(a == 0.2 for a in every) / len(every)
                high = sum(a == 1.0 for a in every) / len(every)
                extra = f"| {sum(every) / len(every):.3f} | {100 * low:.0f}% / {100 * high:.0f}% |"
            lines.append(f"| {lr:g} | {config} | {fmt([f['accuracy'] for f in finals], 100)} | "
                         f"{fmt([f['loss'] for f in finals], 1, 3)} | {fmt([f['train_loss'] for f in finals], 1, 3)} {extra}")

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, lr in zip(axes, LRS):
        for config in CONFIGS:
            runs = results[lr, config]
            steps = [c["step"] for c in runs[0]["curve"]]
            ax.plot(steps, [sum(r["curve"][i]["loss"] for r in runs) / len(runs) for i in range(len(steps))], label=config)
        ax.set_yscale("log")
        ax.set_title(f"test loss, Adam lr {lr:g} (mean of {args.seeds} seeds)")
        ax.set_xlabel("inner step")
    axes[0].legend(fontsize=8)
    for lr in LRS:
        history = alphas[lr][0]
        axes[2].plot([5 * (i + 1) for i in range(len(history))], history, ".", ms=3, label=f"lr {lr:g} (seed 0)")
    axes[2].set_title("alpha* at each sync")
    axes[2].set_xlabel("inner step")
    axes[2].legend(fontsize=8)
    save_figure(fig, args.out, NAME, dpi=120)
    write_markdown(args.out, NAME, "E6: adaptive vs fixed slow step size", argv, timer, "\n".join(lines))
    print(f"wrote {args.out / NAME}.md and .png in {timer.elapsed:.0f} s")
    return {"results": results, "alphas": alphas}


if __name__ == "__main__":
    main()
