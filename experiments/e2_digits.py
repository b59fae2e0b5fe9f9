"""E2: SGD against Lookahead LA-1 .. LA-4 on scikit-learn's digits (the form of Table 1 of
Pushkin & Barba, Multilayer Lookahead).

    python -m experiments.e2_digits                   # writes experiments/results/e2_digits.{md,png}

Each optimizer trains each problem from ``--seeds`` seeds (seed s: initialization and batch order;
the train/test split is fixed) for ``--steps`` iterations through the simulator: SGD is the
one-agent schedule P_t = I, LA-n is ``topology.multilayer(ks, alphas)`` with the periods and slow
step sizes of the paper's CIFAR-10 Table 1 (LA-1: k = 10, alpha = 0.5; LA-n: k_i = 5 with the
table's alphas), SGD with momentum inside for all, at one learning rate (constant: no decay).
Every ``--eval-every`` iterations the fast weights (agent 0) are evaluated on the test split:
with the defaults that is right after a sync of at least level 1 for every optimizer (the
evaluation after the sync, as in the paper's epoch-end evaluation).  The default ``--steps``
(1250) is a multiple of every period, so at the end every agent of every schedule holds the same
weights: the final accuracy is that of the model each optimizer returns.
The table reports mean ± sample standard deviation (n - 1) over seeds.
"""

from __future__ import annotations

from typing import Sequence

import torch

import topology
from experiments.digits import digits_split
from experiments.problems import PROBLEMS
from experiments.report import (
    Timer, markdown_table, mean_std, parser, pyplot, save_figure, sgd_schedule, simulation, write_markdown,
)

NAME = "e2_digits"

#: name -> (ks, alphas) of Pushkin & Barba's Table 1 (CIFAR-10); None: the inner optimizer alone.
OPTIMIZERS = {
    "SGD": None,
    "LA-1": ((10,), (0.5,)),
    "LA-2": ((5, 5), (0.7, 0.7)),
    "LA-3": ((5, 5, 5), (0.6, 0.8, 0.8)),
    "LA-4": ((5, 5, 5, 5), (0.6, 0.75, 0.85, 0.85)),
}
DIGITS = ("digits_logistic", "digits_mlp", "digits_cnn")


def arguments(argv):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--problems", nargs="+", choices=DIGITS, default=["digits_mlp", "digits_cnn"])
    p.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1250)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=3e-4)
    args = p.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1 or args.steps % args.eval_every:
        p.error(f"--steps must be a positive multiple of --eval-every; got {args.steps} and {args.eval_every}")
    if args.seeds < 1:
        p.error(f"--seeds must be positive; got {args.seeds}")
    return args


def schedule_of(name: str) -> topology.Schedule:
    levels = OPTIMIZERS[name]
    return sgd_schedule() if levels is None else topology.multilayer(*levels)


def describe(name: str) -> str:
    levels = OPTIMIZERS[name]
    if levels is None:
        return "-"
    ks, alphas = levels
    return f"{alphas[0]:g} (k={ks[0]})" if len(ks) == 1 else f"({', '.join(f'{a:g}' for a in alphas)}), k=({', '.join(map(str, ks))})"


def train(problem_name: str, optimizer: str, seed: int, args) -> list[tuple[int, float, float]]:
    """(iteration, test accuracy, test loss) of agent 0 at 0 and every ``eval_every`` iterations."""
    problem = PROBLEMS[problem_name](batch_size=args.batch_size, seed=seed)
    sim = simulation(problem, schedule_of(optimizer), lambda params: torch.optim.SGD(
        params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay))
    fast = sim.agents[0].module
    curve = []
    for t in range(args.steps + 1):
        if t % args.eval_every == 0:
            metrics = problem.evaluate(fast)
            curve.append((t, metrics["accuracy"], metrics["loss"]))
        if t < args.steps:
            sim.step()
    return curve


def main(argv: Sequence[str] | None = None) -> dict:
    args = arguments(argv)
    torch.set_num_threads(1)
    curves: dict[str, dict[str, list]] = {}
    timer = Timer()
    for problem_name in args.problems:
        curves[problem_name] = {
            opt: [train(problem_name, opt, seed, args) for seed in range(args.seeds)] for opt in args.optimizers
        }

    plt = pyplot()
    fig, axes = plt.subplots(1, len(args.problems), figsize=(6.5 * len(args.problems), 4.6), squeeze=False)
    sections = []
    for ax, problem_name in zip(axes[0], args.problems):
        rows = []
        for opt, runs in curves[problem_name].items():
            steps = [t for t, _, _ in runs[0]]
            acc = torch.tensor([[a for _, a, _ in run] for run in runs])
            mean, std = acc.mean(0), (acc.std(0) if len(runs) > 1 else torch.zeros(acc.shape[1]))
            line, = ax.plot(steps, mean, label=opt)
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
            final_acc = mean_std([run[-1][1] for run in runs])
            final_loss = mean_std([run[-1][2] for run in runs])
            rows.append([opt, f"{args.lr:g}", describe(opt), f"{final_acc[0]:.4f} ± {final_acc[1]:.4f}",
                         f"{final_loss[0]:.4f} ± {final_loss[1]:.4f}"])
        ax.set_ylim(0.85, 1.0)
        ax.set_xlabel("iteration")
        ax.set_ylabel("test accuracy (fast weights)")
        ax.set_title(f"{problem_name}: mean ± std over {args.seeds} seeds")
        ax.legend()
        sections.append(f"### {problem_name}\n\n" + markdown_table(
            ["Opt", "lr", "alpha", f"test accuracy (step {args.steps})", "test loss"], rows))
    save_figure(fig, args.out, NAME)

    split = digits_split()
    body = (
        f"SGD with momentum {args.momentum}, weight decay {args.weight_decay:g}, lr {args.lr:g} (constant), "
        f"batch {args.batch_size}, {args.steps} iterations; {args.seeds} seeds (initialization and batch order; "
        f"the stratified split into {len(split.y_train)} training and {len(split.y_test)} test images is fixed); "
        "mean ± sample std over seeds.\n\n"
        + "\n\n".join(sections)
        + f"\n\n![E2]({NAME}.png)\n\nAnytime test accuracy of the fast weights every {args.eval_every} iterations "
        "(mean ± std over seeds, shaded).\n"
    )
    write_markdown(args.out, NAME, "E2: SGD vs Multilayer Lookahead on the digits", argv, timer, body)
    return {"curves": curves, "elapsed": timer.elapsed}


if __name__ == "__main__":
    main()
