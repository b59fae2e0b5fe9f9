"""E1: SGD and Lookahead on Zhang et al.'s noisy quadratic model (section 3.1, appendix A).

    python -m experiments.e1_noisy_quadratic          # writes experiments/results/e1_noisy_quadratic.{md,png}

1. Steady state (Proposition 2).  ``--replicas`` independent runs (rows of one parameter, see
   :mod:`experiments.nqm`) of SGD (the one-agent schedule P_t = I) and of Lookahead
   (``topology.lookahead(k, alpha)``, SGD inside, same lr) start at x* = 0, so E[x_t] = 0 exactly.
   After ``--burn-in`` iterations, each replica's x_i^2 is averaged over a window of
   ``--window`` iterations (SGD: every iterate; Lookahead: the slow weights after each sync, the
   quantity of Lemma 1); the mean over replicas estimates the steady-state variance V_i and its
   standard error is the replicas' standard deviation / sqrt(replicas) (replicas are independent,
   the window average inside a replica needs no independence).  Beside it: the closed forms
   V*_SGD (eq. 6) and V*_LA (eq. 7), and the expected loss 1/2 sum_i h_i (V_i + s_i) (eq. 5).
   "agrees" means |simulated - closed form| <= 3 standard errors.
2. Convergence at equal steady-state loss (Figure 3).  (a) As in Zhang appendix A.1, computed from
   the exact moment recursions: L_T - L* after T iterations against L*, for SGD over a grid of
   learning rates and for Lookahead (k = 5) over the same grid for each of ``--fig-alphas`` values
   of alpha in (0, 1].  (b) Simulated: Lookahead at (lr, alpha, k) and SGD at the learning rate
   whose steady-state loss is the same (found by bisection on eq. 6), on the model of (a) from
   x_0 = (1, ..., 1): the simulated L_t - L* (mean over ``--match-replicas`` runs) against the
   recursions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

import topology
from experiments import nqm
from experiments.report import (
    Timer, markdown_table, mean_se, parser, pyplot, save_figure, sgd_schedule, simulation, write_markdown,
)

NAME = "e1_noisy_quadratic"
AGREE_SE = 3.0


def arguments(argv):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=5, help="coordinates d (h_i = 1 / i, Sigma = A^-1)")
    p.add_argument("--lr", type=float, default=0.6)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--replicas", type=int, default=4000)
    p.add_argument("--burn-in", type=int, default=1000)
    p.add_argument("--window", type=int, default=3000)
    p.add_argument("--match-steps", type=int, default=400)
    p.add_argument("--match-replicas", type=int, default=2000)
    p.add_argument("--fig-dim", type=int, default=100, help="coordinates of the Figure 3 model")
    p.add_argument("--fig-steps", type=int, default=1000, help="T of Figure 3")
    p.add_argument("--fig-lrs", type=int, default=60, help="learning rates in the Figure 3 grid")
    p.add_argument("--fig-alphas", type=int, default=100, help="alphas in the Figure 3 grid")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sgd_optimizer(lr):
    return lambda params: torch.optim.SGD(params, lr=lr)


# -- part 1: steady state -------------------------------------------------------------------------------
def steady_second_moments(problem: nqm.NoisyQuadratic, schedule: topology.Schedule, lr: float,
                          burn_in: int, window: int) -> torch.Tensor:
    """Per replica, the average of x_i^2 of the schedule's last agent after the syncs (every
    ``schedule.period`` iterations) in iterations [burn_in, burn_in + window): shape (replicas, d)."""
    sim = simulation(problem, schedule, sgd_optimizer(lr))
    agent = schedule.num_agents - 1
    x = sim.agents[agent].params.view(problem.replicas, -1)
    total, count = torch.zeros_like(x, dtype=torch.float64), 0
    for t in range(burn_in + window):
        sim.step()
        if t >= burn_in and (t + 1) % schedule.period == 0:
            total += x.to(torch.float64) ** 2
            count += 1
    return total / count


def steady_state_rows(args) -> tuple[list, list]:
    problem = nqm.noisy_quadratic(dim=args.dim, replicas=args.replicas, init=0.0, seed=args.seed)
    h, s, noise = problem.curvatures, problem.noise, problem.noise / problem.batch_size
    runs = {
        "SGD": (sgd_schedule(), nqm.sgd_variance(h, noise, args.lr)),
        f"LA (k={args.k}, alpha={args.alpha})": (
            topology.lookahead(args.k, args.alpha), nqm.lookahead_variance(h, noise, args.lr, args.k, args.alpha)),
    }
    rows, checks = [], []
    for label, (schedule, theory) in runs.items():
        z = steady_second_moments(problem, schedule, args.lr, args.burn_in, args.window)
        per_replica_loss = 0.5 * (h * (z + s)).sum(1)
        quantities = [(f"V_{i + 1} (h={float(h[i]):.3g})", z[:, i], float(theory[i])) for i in range(len(h))]
        quantities.append(("expected loss", per_replica_loss, float(nqm.expected_loss(h, s, 0.0, theory))))
        for name, samples, closed in quantities:
            mean, se = (float(v) for v in mean_se(samples))
            score = (mean - closed) / se
            agrees = abs(score) <= AGREE_SE
            checks.append(agrees)
            rows.append([label, name, f"{closed:.6f}", f"{mean:.6f} ± {se:.6f}", f"{score:+.2f}",
                         "yes" if agrees else "**no**"])
    return rows, checks


# -- part 2: Figure 3 ----------------------------------------------------------------------------------
def steady_loss_sgd(h, s, batch, lr):
    return float(nqm.expected_loss(h, s, 0.0, nqm.sgd_variance(h, s / batch, lr)))


def matched_sgd_lr(h, s, batch, target: float) -> float:
    """The SGD learning rate whose steady-state loss (eq. 6 in eq. 5) is ``target`` (bisection:
    V*_SGD = lr h s / (2 - lr h) grows with lr)."""
    lo, hi = 0.0, 2 / float(h.max()) * (1 - 1e-9)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if steady_loss_sgd(h, s, batch, mid) < target else (lo, mid)
    return (lo + hi) / 2


def figure3_grid(args):
    """Analytic L_T - L* and L* - f_inf: SGD over the lr grid, Lookahead over lr x alpha."""
    problem = nqm.noisy_quadratic(dim=args.fig_dim)
    h, s, x0 = problem.curvatures, problem.noise, problem.x0
    f_inf = problem.minimum
    lrs = torch.logspace(-3, 0, args.fig_lrs, dtype=torch.float64).tolist()
    alphas = [(i + 1) / args.fig_alphas for i in range(args.fig_alphas)]
    T = args.fig_steps

    def gap(mean, var, var_star):
        final = float(nqm.expected_loss(h, s, 0.0, var_star))
        return final - f_inf, float(nqm.expected_loss(h, s, mean[-1], var[-1])) - final

    sgd = [gap(*nqm.sgd_moments(h, s, lr, x0, T), nqm.sgd_variance(h, s, lr)) for lr in lrs]
    la = {
        alpha: [gap(*nqm.lookahead_moments(h, s, lr, args.k, alpha, x0, T // args.k),
                    nqm.lookahead_variance(h, s, lr, args.k, alpha)) for lr in lrs]
        for alpha in alphas
    }
    return sgd, la


def ratio_to_sgd(sgd, la, floor: float = 1e-12):
    """For each Lookahead point (L* - f_inf, gap) whose L* lies in SGD's range: its gap over SGD's
    gap at the same L* (log-log interpolation along SGD's curve); points where SGD's gap is below
    ``floor`` (converged to round-off) are left out.  Returns {alpha: [(x, ratio), ...]}."""
    xs, ys = (np.array(v) for v in zip(*sorted(sgd)))
    keep = ys > floor
    xs, ys = np.log(xs[keep]), np.log(ys[keep])
    out = {}
    for alpha, points in la.items():
        pts = []
        for x, y in points:
            if xs[0] <= np.log(x) <= xs[-1] and y > 0:
                pts.append((x, y / float(np.exp(np.interp(np.log(x), xs, ys)))))
        out[alpha] = pts
    return out


def matched_runs(args):
    problem = nqm.noisy_quadratic(dim=args.fig_dim, replicas=args.match_replicas, init=1.0, seed=args.seed + 1)
    h, s, B, x0 = problem.curvatures, problem.noise, problem.batch_size, problem.x0
    target = float(nqm.expected_loss(h, s, 0.0, nqm.lookahead_variance(h, s / B, args.lr, args.k, args.alpha)))
    lr_sgd = matched_sgd_lr(h, s, B, target)
    T = args.match_steps
    curves = {}
    for label, schedule, lr in (("SGD", sgd_schedule(), lr_sgd), ("LA", topology.lookahead(args.k, args.alpha), args.lr)):
        sim = simulation(problem, schedule, sgd_optimizer(lr))
        agent = schedule.num_agents - 1
        x = sim.agents[agent].params.view(problem.replicas, -1)
        steps, means, ses = [0], [], []

        def record():
            excess = 0.5 * (h * x.to(torch.float64) ** 2).sum(1) + problem.minimum - target
            m, e = mean_se(excess)
            means.append(float(m))
            ses.append(float(e))

        record()
        for t in range(T):
            sim.step()
            if (t + 1) % schedule.period == 0:
                steps.append(t + 1)
                record()
        if label == "SGD":
            mean, var = nqm.sgd_moments(h, s / B, lr, x0, steps)
        else:
            mean, var = nqm.lookahead_moments(h, s / B, lr, args.k, args.alpha, x0, [t // args.k for t in steps])
        theory = (nqm.expected_loss(h, s, mean, var) - target).tolist()
        curves[label] = dict(lr=lr, steps=steps, mean=means, se=ses, theory=theory)
    return target - problem.minimum, curves


# -- main ----------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict:
    args = arguments(argv)
    torch.set_num_threads(1)
    timer = Timer()
    steady_rows, checks = steady_state_rows(args)
    excess_target, curves = matched_runs(args)
    sgd_grid, la_grid = figure3_grid(args)

    ratios = ratio_to_sgd(sgd_grid, la_grid)
    all_ratios = [r for pts in ratios.values() for _, r in pts]
    better = sum(r < 1 for r in all_ratios)

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    ax = axes[0]
    cmap = plt.get_cmap("viridis")
    for alpha, points in la_grid.items():
        ax.loglog(*zip(*points), color=cmap(alpha), lw=0.6, alpha=0.7)
    ax.loglog(*zip(*sgd_grid), color="red", lw=2.5, label="SGD")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=ax, label=f"Lookahead alpha (k={args.k})")
    ax.set_xlabel("steady-state excess loss L* - f_inf")
    ax.set_ylabel(f"L_T - L*  (T = {args.fig_steps})")
    ax.set_title(f"(a) Figure 3: NQM d={args.fig_dim}, exact recursions")
    ax.legend()
    ax = axes[1]
    for alpha, points in ratios.items():
        if points:
            ax.semilogx(*zip(*points), color=cmap(alpha), lw=0.8)
    ax.axhline(1.0, color="red", lw=2, label="SGD (same L*)")
    fig.colorbar(sm, ax=ax, label=f"Lookahead alpha (k={args.k})")
    ax.set_xlabel("steady-state excess loss L* - f_inf")
    ax.set_ylabel("(L_T - L*) Lookahead / SGD at the same L*")
    ax.set_title("(a') the same, as a ratio to SGD")
    ax.legend()
    ax = axes[2]
    for (label, c), color in zip(curves.items(), ("red", "tab:blue")):
        name = f"SGD lr={c['lr']:.4f}" if label == "SGD" else f"LA lr={c['lr']}, alpha={args.alpha}, k={args.k}"
        mean, se = torch.tensor(c["mean"]), torch.tensor(c["se"])
        ax.plot(c["steps"], c["theory"], color=color, lw=1, label=f"{name}: recursion")
        ax.errorbar(c["steps"], mean, yerr=2 * se, fmt="o" if label == "LA" else ".", ms=3, color=color,
                    alpha=0.6, label=f"{name}: simulated (± 2 SE)")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xlabel("iteration t")
    ax.set_ylabel("L_t - L*")
    ax.set_title(f"(b) simulated at equal L* (L* - f_inf = {excess_target:.4f}), {args.match_replicas} runs")
    ax.legend(fontsize=7)
    save_figure(fig, args.out, NAME)

    marks = [t for t in (25, 50, 100, 200, 400, 800) if t <= args.match_steps and t % args.k == 0]
    match_rows = []
    for label, c in curves.items():
        for t in marks:
            i = c["steps"].index(t)
            match_rows.append([label, f"{c['lr']:.4f}", t, f"{c['theory'][i]:.5f}", f"{c['mean'][i]:.5f} ± {c['se'][i]:.5f}"])
    body = (
        f"Noisy quadratic model: d = {args.dim}, h_i = 1/i, Sigma = A^-1, batch 1; lr = {args.lr}, "
        f"Lookahead k = {args.k}, alpha = {args.alpha}; {args.replicas} independent runs, burn-in "
        f"{args.burn_in} iterations, window {args.window} iterations.\n\n"
        "## Steady state: simulated vs Proposition 2\n\n"
        + markdown_table(["optimizer", "quantity", "closed form", "simulated ± SE", "z", f"agrees (abs(z) ≤ {AGREE_SE:g})"],
                         steady_rows)
        + f"\n\n{sum(checks)} of {len(checks)} quantities agree within {AGREE_SE:g} standard errors.\n\n"
        "## Convergence at equal steady-state loss (Figure 3)\n\n"
        f"SGD's learning rate is chosen so that its steady-state loss equals Lookahead's "
        f"(L* - f_inf = {excess_target:.5f}), on the d = {args.fig_dim} model of panel (a); both start at "
        f"x_0 = (1, ..., 1), {args.match_replicas} runs. "
        "L_t - L* (Lookahead: slow weights after the sync at t):\n\n"
        + markdown_table(["optimizer", "lr", "t", "recursion", "simulated ± SE"], match_rows)
        + f"\n\nIn the exact-recursion grid of panel (a), {better} of the {len(all_ratios)} Lookahead settings "
        f"(lr, alpha) whose L* lies in SGD's range reach a smaller L_T - L* than SGD at the same L* "
        f"(ratio to SGD: min {min(all_ratios, default=float('nan')):.3f}, max {max(all_ratios, default=float('nan')):.3g}; "
        "panel (a')).\n\n"
        f"![E1]({NAME}.png)\n\n"
        f"(a): L_T - L* against L* - f_inf from the exact moment recursions (eqs. 8-11) on d = {args.fig_dim}, "
        f"T = {args.fig_steps}, x_0 = (1, ..., 1), {args.fig_lrs} learning rates in [1e-3, 1] for SGD (red) and "
        f"Lookahead (k = {args.k}) with {args.fig_alphas} values of alpha in (0, 1] (coloured). "
        "(a'): each Lookahead point's L_T - L* divided by SGD's at the same L*. "
        "(b): the matched pair above, simulated (markers, ± 2 SE) against the recursions (lines).\n"
    )
    write_markdown(args.out, NAME, "E1: Lookahead on the noisy quadratic model", argv, timer, body)
    return {"steady_rows": steady_rows, "agree": checks, "curves": curves, "ratios": ratios, "elapsed": timer.elapsed}


if __name__ == "__main__":
    main()
