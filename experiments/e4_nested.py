"""E4: nested Lookahead vs Lookahead vs the plain inner optimizer, with each momentum policy.

The first experiment of Gilbert's "Nested Lookahead: A Lookahead Optimizer that Uses Lookahead"
on the digits problem (see :func:`experiments.report.digits_with_train_metrics`): SGD (momentum
0.9, lr 0.1) and Adam (lr 3e-3) alone, inside Lookahead (k 5, alpha 0.5) with maintain / reset /
pullback, and inside nested Lookahead (k 5, alpha 0.5, s 3, h 0.5) with every per-level momentum
policy; 900 inner steps (about 20 epochs of
1437 images in batches of 32), 3 seeds; test accuracy and loss of the outermost slow weights
(equal to the fast weights at the end: 900 is a multiple of k * s).

    python -m experiments.e4_nested          # writes experiments/results/e4_nested.{md,png}

``--steps`` and ``--seeds`` (seeds 0 .. n - 1) shrink it (the tests run 15 steps, 2 seeds).
"""

from __future__ import annotations

from typing import Sequence

import torch

import topology
from experiments.report import (
    Timer, digits_with_train_metrics, fmt, mean_std, pyplot, run_and_evaluate, run_arguments, save_figure, sgd_schedule,
    write_markdown,
)

NAME = "e4_nested"
INNER = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=3e-3),
}
LA_POLICIES = ("maintain", "reset", "pullback")
NESTED_POLICIES = ("maintain", "reset_inner", "reset_outer", "reset_both", "pullback_inner", "pullback_outer",
                   "pullback_both")


def configs():
    yield "alone", "-", sgd_schedule
    for policy in LA_POLICIES:
        yield "Lookahead", policy, lambda: topology.lookahead(5, 0.5)
    for policy in NESTED_POLICIES:
        yield "Nested", policy, lambda: topology.nested(5, 0.5, 3, 0.5)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs every (inner optimizer, method, policy) from each seed; returns ``{"results":
    {(inner, method, policy): [final metrics per seed]}}``."""
    args = run_arguments(__doc__.splitlines()[0], argv)
    torch.set_num_threads(1)
    timer = Timer()
    results = {}
    for inner_name, inner in INNER.items():
        for method, policy, schedule in configs():
            runs = [run_and_evaluate(digits_with_train_metrics(seed), schedule(), inner, args.steps,
                                     policy="maintain" if policy == "-" else policy, eval_every=args.steps)
                    for seed in range(args.seeds)]
            results[inner_name, method, policy] = [r["final"] for r in runs]
            print(inner_name, method, policy, fmt([f["accuracy"] for f in results[inner_name, method, policy]], 100))
    lines = [f"Digits (64-64-10 ReLU MLP), {args.steps} inner steps, batch 32, {args.seeds} seeds (mean ± std); "
             "test accuracy (%)",
             "and test cross-entropy of the outermost slow weights.", "",
             "| method | momentum policy | SGD acc. | SGD loss | Adam acc. | Adam loss |",
             "|---|---|---|---|---|---|"]
    for method, policy, _ in configs():
        cells = []
        for inner_name in INNER:
            finals = results[inner_name, method, policy]
            cells += [fmt([f["accuracy"] for f in finals], 100), fmt([f["loss"] for f in finals], 1, 3)]
        lines.append(f"| {method} | {policy} | " + " | ".join(cells) + " |")

    plt = pyplot()
    labels = [f"{m}\n{p}" if p != "-" else m for m, p, _ in configs()]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), sharey=True)
    for ax, inner_name in zip(axes, INNER):
        stats = [mean_std([100 * f["accuracy"] for f in results[inner_name, method, policy]])
                 for method, policy, _ in configs()]
        means, stds = [m for m, _ in stats], [s for _, s in stats]
        colors = ["grey"] + ["tab:blue"] * len(LA_POLICIES) + ["tab:orange"] * len(NESTED_POLICIES)
        ax.bar(range(len(labels)), means, yerr=stds, color=colors, capsize=3)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"inner optimizer: {inner_name}")
        ax.set_ylim(min(means) - 3, 100)
    axes[0].set_ylabel("test accuracy (%)")
    save_figure(fig, args.out, NAME, dpi=120)
    write_markdown(args.out, NAME, "E4: nested Lookahead, Lookahead and the inner optimizer, per momentum policy",
                   argv, timer, "\n".join(lines))
    print(f"wrote {args.out / NAME}.md and .png in {timer.elapsed:.0f} s")
    return {"results": results}


if __name__ == "__main__":
    main()
