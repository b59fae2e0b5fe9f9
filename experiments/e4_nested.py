"""E4: nested Lookahead vs Lookahead vs the plain inner optimizer, with each momentum policy.

Gilbert's first experiment (nested-lookahead.md) on the digits problem (see
:mod:`experiments.variants`): SGD (momentum 0.9, lr 0.1) and Adam (lr 3e-3) alone, inside
Lookahead (k 5, alpha 0.5) with maintain / reset / pullback, and inside nested Lookahead (k 5,
alpha 0.5, s 3, h 0.5) with every per-level momentum policy; 900 inner steps (about 20 epochs of
1437 images in batches of 32), 3 seeds; test accuracy and loss of the outermost slow weights
(equal to the fast weights at the end: 900 is a multiple of k * s).

    python -m experiments.e4_nested          # writes experiments/results/e4_nested.{md,png}
"""

from __future__ import annotations

import time

import torch

import topology
from experiments.variants import RESULTS, fmt, make_problem, run, setup_matplotlib, single_agent, write_markdown

STEPS, SEEDS = 900, (0, 1, 2)
INNER = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=3e-3),
}
LA_POLICIES = ("maintain", "reset", "pullback")
NESTED_POLICIES = ("maintain", "reset_inner", "reset_outer", "reset_both", "pullback_inner", "pullback_outer",
                   "pullback_both")


def configs():
    yield "alone", "-", single_agent
    for policy in LA_POLICIES:
        yield "Lookahead", policy, lambda: topology.lookahead(5, 0.5)
    for policy in NESTED_POLICIES:
        yield "Nested", policy, lambda: topology.nested(5, 0.5, 3, 0.5)


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = {}
    for inner_name, inner in INNER.items():
        for method, policy, schedule in configs():
            runs = [run(make_problem(seed), schedule(), inner, STEPS,
                        policy="maintain" if policy == "-" else policy, eval_every=STEPS) for seed in SEEDS]
            results[inner_name, method, policy] = [r["final"] for r in runs]
            print(inner_name, method, policy, fmt([f["accuracy"] for f in results[inner_name, method, policy]], 100))
    seconds = time.perf_counter() - start
    lines = ["Digits (64-64-10 ReLU MLP), 900 inner steps, batch 32, 3 seeds (mean ± std); test accuracy (%)",
             "and test cross-entropy of the outermost slow weights.", "",
             "| method | momentum policy | SGD acc. | SGD loss | Adam acc. | Adam loss |",
             "|---|---|---|---|---|---|"]
    for method, policy, _ in configs():
        cells = []
        for inner_name in INNER:
            finals = results[inner_name, method, policy]
            cells += [fmt([f["accuracy"] for f in finals], 100), fmt([f["loss"] for f in finals], 1, 3)]
        lines.append(f"| {method} | {policy} | " + " | ".join(cells) + " |")
    write_markdown("e4_nested", "E4: nested Lookahead, Lookahead and the inner optimizer, per momentum policy",
                   lines, seconds, "python -m experiments.e4_nested")

    plt = setup_matplotlib()
    labels = [f"{m}\n{p}" if p != "-" else m for m, p, _ in configs()]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), sharey=True)
    for ax, inner_name in zip(axes, INNER):
        means, stds = [], []
        for method, policy, _ in configs():
            accs = [100 * f["accuracy"] for f in results[inner_name, method, policy]]
            m = sum(accs) / len(accs)
            means.append(m)
            stds.append((sum((a - m) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5)
        colors = ["grey"] + ["tab:blue"] * len(LA_POLICIES) + ["tab:orange"] * len(NESTED_POLICIES)
        ax.bar(range(len(labels)), means, yerr=stds, color=colors, capsize=3)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"inner optimizer: {inner_name}")
        ax.set_ylim(min(means) - 3, 100)
    axes[0].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(RESULTS / "e4_nested.png", dpi=120)
    print(f"wrote {RESULTS / 'e4_nested.md'} and .png in {seconds:.0f} s")


if __name__ == "__main__":
    main()
