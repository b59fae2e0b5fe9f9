r"""E3: the bound of Wang et al. Theorem 2 beside the measured average squared gradient norm.

    python -m experiments.e3_convergence_bound        # writes experiments/results/e3_convergence_bound.{md,png}

Theorem 2 (Lookahead with SGD inside, constant lr gamma, slow step alpha, period tau, started at
y_0 = x_0 = z_0, under the step-size condition (13)  alpha gamma L + (1 - alpha)^2 gamma^2 L^2
tau (tau - 1) <= 1):

    (1/K) sum_{k<K} E||grad f(y_k)||^2
        <= 2 (f(y_0) - f_inf) / (alpha gamma K) + alpha gamma L sigma^2
           + (1 - alpha)^2 gamma^2 L^2 sigma^2 (tau - 1),                                    (14)

with y_k = X_k a = alpha x_k + (1 - alpha) z_k the virtual iterate (Wang eq. 8; here
``schedule.consensus()`` gives a).  The problem is the noisy quadratic model
(:mod:`experiments.nqm`), whose constants are known exactly: f(x) = 1/2 sum_i h_i (x_i^2 + s_i),
grad f(x) = A x, L = max_i h_i, f_inf = 1/2 sum_i h_i s_i, and the stochastic gradient
A (x - c_bar) has E||g - grad f||^2 = sum_i h_i^2 s_i / B = sigma^2 (assumption (3) holds with
equality).  Each configuration runs ``--replicas`` independent copies through the simulator; the
measured value is the mean over replicas of (1/K) sum_{k<K} ||A y_k||^2 (y_k read from the agents'
parameters before iteration k), with its standard error over replicas.
"""

from __future__ import annotations

from typing import Sequence

import torch

import topology
from experiments import nqm
from experiments.report import (
    Timer, markdown_table, mean_se, parser, pyplot, save_figure, simulation, write_markdown,
)

NAME = "e3_convergence_bound"

#: (lr gamma, alpha, tau): the first three satisfy (13), the last three do not.
CONFIGS = ((0.1, 0.5, 5), (0.2, 0.8, 10), (0.05, 0.2, 20), (0.5, 0.5, 5), (1.0, 0.5, 5), (1.9, 0.9, 2))


def arguments(argv):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=10, help="coordinates d (h_i = 1 / i, Sigma = A^-1)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=2000, help="K")
    p.add_argument("--replicas", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def step_size_condition(lr: float, alpha: float, tau: int, L: float) -> float:
    """The left-hand side of (13): alpha gamma L + (1 - alpha)^2 gamma^2 L^2 tau (tau - 1)."""
    return alpha * lr * L + (1 - alpha) ** 2 * lr**2 * L**2 * tau * (tau - 1)


def theorem2_bound(K, lr: float, alpha: float, tau: int, L: float, sigma2: float, gap: float):
    """The right-hand side of (14), term by term: (initial-gap term, alpha gamma L sigma^2,
    (1 - alpha)^2 gamma^2 L^2 sigma^2 (tau - 1)); ``K`` may be a tensor."""
    return (2 * gap / (alpha * lr * K), alpha * lr * L * sigma2, (1 - alpha) ** 2 * lr**2 * L**2 * sigma2 * (tau - 1))


def measure(problem: nqm.NoisyQuadratic, lr: float, alpha: float, tau: int, steps: int) -> torch.Tensor:
    """||grad f(y_k)||^2 = ||A y_k||^2 for k = 0..steps-1, per replica: shape (steps, replicas)."""
    schedule = topology.lookahead(tau, alpha)
    a = schedule.consensus()
    sim = simulation(problem, schedule, lambda params: torch.optim.SGD(params, lr=lr))
    h = problem.curvatures
    views = [sim.agents[i].params.view(problem.replicas, -1) for i in range(schedule.num_agents)]
    out = torch.empty(steps, problem.replicas, dtype=torch.float64)
    for k in range(steps):
        y = sum(float(a[i]) * v.to(torch.float64) for i, v in enumerate(views))  # y_k = X_k a
        out[k] = ((h * y) ** 2).sum(1)
        sim.step()
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    args = arguments(argv)
    torch.set_num_threads(1)
    timer = Timer()
    problem = nqm.noisy_quadratic(dim=args.dim, batch_size=args.batch_size, replicas=args.replicas, init=1.0,
                                  seed=args.seed)
    L, sigma2 = problem.smoothness, problem.gradient_noise
    gap = float(nqm.expected_loss(problem.curvatures, problem.noise, problem.x0, 0.0)) - problem.minimum
    K = args.steps
    rows, results = [], []
    for lr, alpha, tau in CONFIGS:
        norms = measure(problem, lr, alpha, tau, K)
        running = norms.cumsum(0) / torch.arange(1, K + 1, dtype=torch.float64).unsqueeze(1)
        mean, se = (float(v) for v in mean_se(running[-1]))
        terms = theorem2_bound(K, lr, alpha, tau, L, sigma2, gap)
        bound = sum(terms)
        lhs = step_size_condition(lr, alpha, tau, L)
        results.append(dict(lr=lr, alpha=alpha, tau=tau, condition=lhs, bound=bound, measured=mean, se=se,
                            running=running.mean(1)))
        rows.append([
            f"{lr:g}", f"{alpha:g}", tau, f"{lhs:.3f}", "holds" if lhs <= 1 else "**fails**",
            " + ".join(f"{t:.4f}" for t in terms), f"{bound:.4f}", f"{mean:.4f} ± {se:.4f}",
            f"{mean / bound:.3f}", "yes" if mean <= bound else "**no**",
        ])

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    ks = torch.arange(1, K + 1, dtype=torch.float64)
    for r, color in zip(results, plt.get_cmap("tab10").colors):
        label = f"lr={r['lr']:g}, alpha={r['alpha']:g}, tau={r['tau']}" + ("" if r["condition"] <= 1 else " ((13) fails)")
        ax.loglog(ks, r["running"], color=color, label=label)
        ax.loglog(ks, sum(theorem2_bound(ks, r["lr"], r["alpha"], r["tau"], L, sigma2, gap)), color=color, ls="--", lw=1)
    ax.set_xlabel("K")
    ax.set_ylabel("(1/K) sum_{k<K} E||grad f(y_k)||^2")
    ax.set_title(f"Wang et al. Theorem 2 (dashed) vs measured (solid), NQM d={args.dim}, {args.replicas} runs")
    ax.legend(fontsize=7)
    save_figure(fig, args.out, NAME)

    body = (
        f"Noisy quadratic model: d = {args.dim}, h_i = 1/i, Sigma = A^-1, batch {args.batch_size}, "
        f"x_0 = (1, ..., 1); L = {L:g}, sigma^2 = {sigma2:.4f}, f(y_0) - f_inf = {gap:.4f}; "
        f"K = {K} iterations, {args.replicas} independent runs per configuration (mean ± standard error).\n\n"
        + markdown_table(
            ["lr", "alpha", "tau", "(13) LHS", "(13)", "bound terms (gap + variance + drift)", "bound (14)",
             "measured", "measured / bound", "measured ≤ bound"],
            rows,
        )
        + f"\n\n![E3]({NAME}.png)\n\nSolid: the running average (1/K) sum_{{k<K}} ||grad f(y_k)||^2 (mean over runs) "
        "against K; dashed: the bound (14) at that K.  Theorem 2 promises the bound only where (13) holds.\n"
    )
    write_markdown(args.out, NAME, "E3: Wang et al. Theorem 2 on the noisy quadratic model", argv, timer, body)
    return {"results": results, "L": L, "sigma2": sigma2, "gap": gap, "elapsed": timer.elapsed}


if __name__ == "__main__":
    main()
