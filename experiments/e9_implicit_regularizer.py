r"""E9: the implicit regularizer of Multilayer Lookahead (Pushkin & Barba, Theorem 3, eq. 27), measured.

    python -m experiments.e9_implicit_regularizer   # writes experiments/results/e9_implicit_regularizer.{md,png}

**The claim.**  LA-n with periods k_1..k_n, step sizes alpha_1..alpha_n and SGD (lr gamma) inside,
run for one epoch of m mini-batches from y_0, ends (averaged over the order of the mini-batches) on
the trajectory of the modified flow  dy/dt = -grad f~(y),  y(0) = y_0,  at time  beta gamma m,
beta = alpha_1 ... alpha_n, up to O(gamma^3), with (eq. 27)

    f~(y) = f(y) + (gamma beta / 4) AN(y)
                 - (gamma / 4) sum_{p=1..n} (1 - alpha_p) alpha_{p-1} ... alpha_1 (k_p ... k_1 - 1) AI(y),

AN(y) = E ||grad f_i(y)||^2 and AI(y) = E <grad f_i(y), grad f_j(y)> (i != j) over the mini-batches.

**Our reading of the epoch.**  Theorem 3 asks that m be a multiple of k_1 ... k_n, the inner steps
of one round; an epoch is r = m / (k_1 ... k_n) rounds, i.e. m inner SGD steps, one per
mini-batch, and y_r is the outermost slow weights after them.  Level 1 is the *innermost* level
(k_1 SGD steps between its syncs): the appendix's recursion (LA-(n+1) is Lookahead with alpha_{n+1},
k_{n+1} around LA-n, LA-0 = SGD) says so, and so does this project (:mod:`agents.reference`); the
prose of the paper's section 2 calls level 1 the outer one, and with that reading eq. 27 is wrong
for n >= 2 (the table shows it).  We run the epoch with :class:`agents.reference.MultilayerLookahead`
around ``torch.optim.SGD`` in float64: after step m every level has just synced, so the parameters
equal y_r.  As in Smith et al. (2021), the m mini-batches are fixed and only their order is random:
the expectation is the exact mean over all m! orderings (one run per ordering, all orderings in the
rows of one parameter tensor: the loss is the sum over rows, so row p's gradient is that of its own
mini-batch), AN = (1/m) sum_a ||g_a||^2, AI = (1/(m(m-1))) sum_{a != b} <g_a, g_b>.

**The problem.**  Least squares: mini-batch a holds (X_a, t_a), f_a(w) = ||X_a w - t_a||^2 / (2 b),
f = (1/m) sum_a f_a; with H_a = X_a^T X_a / b, q_a = X_a^T t_a / b, g_a(w) = H_a w - q_a, so
grad AN = (2/m) sum_a H_a g_a and grad AI = (2/(m(m-1))) sum_{a != b} H_a g_b
= (2/(m(m-1))) (m^2 Hbar grad f - sum_a H_a g_a) are exact (and linear in w).  The flow is solved by
``scipy.integrate.solve_ivp`` (DOP853, rtol 1e-12, atol 1e-14).

**The backward error analysis, redone** (:func:`derived_coefficients`; second order in gamma).
Every sync is linear, so a displacement made by inner step j reaches the fast weights that step
i > j reads multiplied by w(i, j) = (e_0 P_j ... P_{i-1})_0, and the output multiplied by
u_j = (e_0 P_j ... P_{m-1})_n, with P_t the schedule's matrices (:func:`topology.multilayer`;
agent 0 the fast weights, agent n the outermost).  With g_a, H_a at y_0 and sigma the order,
x_i - y_0 = -gamma sum_{j<i} w(i,j) g_{sigma_j} + O(gamma^2), hence

    y_m - y_0 = -gamma sum_i u_i g_{sigma_i} + gamma^2 sum_{j<i} u_i w(i,j) H_{sigma_i} g_{sigma_j} + O(gamma^3).

Over all orderings E g_{sigma_i} = grad f and E H_{sigma_i} g_{sigma_j} = grad AI / 2 (i != j), so
E y_m = y_0 - gamma U grad f + (gamma^2 W / 2) grad AI + O(gamma^3), U = sum_i u_i,
W = sum_{j<i} u_i w(i,j).  The flow dy/dt = -grad f + eps h_1 reaches
y_0 - eps grad f + eps^2 (h_1 + grad ||grad f||^2 / 4) + O(eps^3) at eps = gamma U (the paper's
eq. 19), and grad ||grad f||^2 = (grad AN + (m-1) grad AI) / m (its eq. 25); matching gives

    f~ = f + gamma a AN - gamma b AI,   a = U / (4m),   b = (2W/U - U (m-1) / m) / 4.

For LA-n, u_i = beta (every level syncs at step m), U = beta m, and w(i,j) = alpha_1 ... alpha_{p-1}
where p is the lowest level whose block (k_1 ... k_p steps) holds both steps (beta across rounds).
There are (m/2)(K_p - K_{p-1}) such pairs (K_p = k_1 ... k_p) and (m/2)(m - K_n) across rounds, so
2W/U - beta (m-1) = sum_p (K_p - K_{p-1}) alpha_1 ... alpha_{p-1} (1 - alpha_p ... alpha_n)
= sum_p (1 - alpha_p) alpha_{p-1} ... alpha_1 (K_p - 1) (summation by parts): a = beta / 4 and b
are eq. 27's constants exactly.  The code computes U, W numerically from the matrices, not from
this closed form, and the experiment also *measures* a and b: the gap between the epoch and the
plain gradient flow is D = E y_m - y_GF(eps) = -eps gamma (a grad AN(y_0) - b grad AI(y_0)) + O(gamma^3),
so a least-squares fit of D / (eps gamma) on (-grad AN(y_0), grad AI(y_0)), extrapolated to
gamma = 0 from the two smallest gammas (Richardson), gives them.

**What is measured.**  For gamma over a decade, the error ||E y_m - y(beta gamma m)|| of each flow:
eq. 27 (error O(gamma^3), slope 3 in log-log), the plain gradient flow and eq. 27 with the AI
term's sign flipped (both O(gamma^2), slope 2), and for n >= 2 eq. 27 with the levels read
outermost-first (slope 2 as well).  The slope is the least-squares fit of log(error) on log(gamma).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy.integrate import solve_ivp

import topology
from agents.reference import MultilayerLookahead
from experiments.report import Timer, markdown_table, parser, pyplot, save_figure, write_markdown
from topology.validation import check_levels

NAME = "e9_implicit_regularizer"

#: (label, ks, alphas, m): level 1 first (innermost); m a multiple of k_1 ... k_n (r = 2, 2, 1 rounds).
CONFIGS = (
    ("LA-1", (3,), (0.5,), 6),
    ("LA-2", (2, 2), (0.5, 0.8), 8),
    ("LA-3", (2, 2, 2), (0.5, 0.7, 0.9), 8),
)
#: The ``--tiny`` configurations (CI): fewer orderings for LA-1 and LA-2.
TINY_CONFIGS = (
    ("LA-1", (2,), (0.5,), 4),
    ("LA-2", (2, 2), (0.5, 0.8), 4),
    ("LA-3", (2, 2, 2), (0.5, 0.7, 0.9), 8),
)
#: m! orderings are enumerated: 8! = 40320 rows; 10! would be 3.6 million.
MAX_BATCHES = 9
#: The flows compared; the coefficients of AN and AI are gamma * (a, b) with (a, b) from ``flow_constants``.
FLOWS = ("eq. 27", "gradient flow", "eq. 27, AI sign flipped", "eq. 27, levels read outer-first")


# -- the problem ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LeastSquares:
    """m fixed mini-batches of a least-squares problem, float64: ``features[a]`` (b, d),
    ``targets[a]`` (b,); f_a(w) = ||X_a w - t_a||^2 / (2 b), f = mean_a f_a."""

    features: torch.Tensor
    targets: torch.Tensor

    @property
    def num_batches(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[2]

    @property
    def hessians(self) -> torch.Tensor:
        """H_a = X_a^T X_a / b, shape (m, d, d)."""
        return self.features.transpose(1, 2) @ self.features / self.features.shape[1]

    @property
    def linear(self) -> torch.Tensor:
        """q_a = X_a^T t_a / b, shape (m, d)."""
        return (self.features.transpose(1, 2) @ self.targets.unsqueeze(2)).squeeze(2) / self.features.shape[1]

    def batch_losses(self, w: torch.Tensor) -> torch.Tensor:
        """f_a(w) for every a, shape (m,), by the data (differentiable: the autograd reference)."""
        residual = self.features @ w - self.targets
        return 0.5 * residual.pow(2).mean(1)

    def batch_gradients(self, w: torch.Tensor) -> torch.Tensor:
        """g_a(w) = H_a w - q_a, shape (m, d)."""
        return self.hessians @ w - self.linear

    def gradient(self, w: torch.Tensor) -> torch.Tensor:
        """grad f(w) = mean_a g_a(w)."""
        return self.batch_gradients(w).mean(0)

    def an(self, w: torch.Tensor) -> torch.Tensor:
        """AN(w) = (1/m) sum_a ||g_a(w)||^2."""
        return self.batch_gradients(w).pow(2).sum(1).mean()

    def ai(self, w: torch.Tensor) -> torch.Tensor:
        """AI(w) = (1/(m(m-1))) sum_{a != b} <g_a, g_b> = (||sum_a g_a||^2 - sum_a ||g_a||^2) / (m(m-1))."""
        g, m = self.batch_gradients(w), self.num_batches
        return (g.sum(0).pow(2).sum() - g.pow(2).sum()) / (m * (m - 1))

    def an_gradient(self, w: torch.Tensor) -> torch.Tensor:
        """grad AN(w) = (2/m) sum_a H_a g_a(w) (d/dw ||g_a||^2 = 2 H_a g_a, H_a symmetric)."""
        return 2 * (self.hessians @ self.batch_gradients(w).unsqueeze(2)).squeeze(2).mean(0)

    def ai_gradient(self, w: torch.Tensor) -> torch.Tensor:
        """grad AI(w) = (2/(m(m-1))) sum_{a != b} H_a g_b = (2/(m(m-1))) (m^2 Hbar grad f - sum_a H_a g_a):
        d/dw <g_a, g_b> = H_a g_b + H_b g_a, and the sum over ordered pairs counts each twice."""
        m = self.num_batches
        cross = self.hessians.sum(0) @ self.batch_gradients(w).sum(0)  # sum_{a, b} H_a g_b
        diagonal = (self.hessians @ self.batch_gradients(w).unsqueeze(2)).squeeze(2).sum(0)
        return 2 * (cross - diagonal) / (m * (m - 1))

    def modified_gradient(self, w: torch.Tensor, c_an: float, c_ai: float) -> torch.Tensor:
        """grad f~(w) for f~ = f + c_an AN - c_ai AI."""
        return self.gradient(w) + c_an * self.an_gradient(w) - c_ai * self.ai_gradient(w)


def least_squares(num_batches: int, batch_size: int, dim: int, seed: int = 0) -> LeastSquares:
    """Gaussian features (scaled so that the full-batch Hessian has largest eigenvalue 1), targets
    X w* + noise: the mini-batches' gradients differ (AN != AI), as the experiment needs."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(num_batches, batch_size, dim, generator=g, dtype=torch.float64)
    scale = torch.linalg.eigvalsh((features.transpose(1, 2) @ features).sum(0) / (num_batches * batch_size))[-1]
    features = features / scale.sqrt()
    w_star = torch.randn(dim, generator=g, dtype=torch.float64)
    targets = features @ w_star + 0.5 * torch.randn(num_batches, batch_size, generator=g, dtype=torch.float64)
    return LeastSquares(features, targets)


# -- one epoch of LA-n, every ordering --------------------------------------------------------------
def orderings(m: int) -> torch.Tensor:
    """All m! orderings of the mini-batches 0..m-1, one per row (lexicographic), shape (m!, m).

    >>> orderings(3).tolist()
    [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]]
    """
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_BATCHES:
        raise ValueError(f"m (mini-batches per epoch) must be an int in 1..{MAX_BATCHES} (m! orderings are "
                         f"enumerated); got {m!r}")
    return torch.tensor(list(itertools.permutations(range(m))), dtype=torch.long)


def _check_epoch(ks: Sequence[int], alphas: Sequence[float], m: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    ks, alphas = check_levels(ks, alphas)
    if m % math.prod(ks):
        raise ValueError(f"m (mini-batches per epoch) must be a multiple of k_1 ... k_n = {math.prod(ks)} "
                         f"(Theorem 3: an epoch is whole rounds); got m = {m}")
    return ks, alphas


def lookahead_epochs(problem: LeastSquares, ks, alphas, lr: float, y0: torch.Tensor, order: torch.Tensor
                     ) -> torch.Tensor:
    """The end of one epoch of LA-n (``agents.reference.MultilayerLookahead`` around
    ``torch.optim.SGD(lr)``, float64) from ``y0``, for each ordering in the rows of ``order``
    (shape (P, m)): inner step t of row p uses mini-batch ``order[p, t]``.  Returns (P, d), the
    outermost slow weights after step m (the parameters: every level syncs at step m)."""
    ks, alphas = _check_epoch(ks, alphas, order.shape[1])
    w = torch.nn.Parameter(y0.detach().to(torch.float64).expand(order.shape[0], -1).clone())
    opt = MultilayerLookahead(torch.optim.SGD([w], lr=lr), ks=ks, alphas=alphas)
    for t in range(order.shape[1]):
        batch = order[:, t]
        opt.zero_grad()
        residual = (problem.features[batch] @ w.unsqueeze(2)).squeeze(2) - problem.targets[batch]
        # sum over rows p of f_{order[p, t]}(w_p): row p's gradient is its own mini-batch's.
        (0.5 * residual.pow(2).mean(1)).sum().backward()
        opt.step()
    return w.detach()


def expected_epoch(problem: LeastSquares, ks, alphas, lr: float, y0: torch.Tensor) -> torch.Tensor:
    """E y_r: the mean of :func:`lookahead_epochs` over all m! orderings (exact, m = the problem's batches)."""
    return lookahead_epochs(problem, ks, alphas, lr, y0, orderings(problem.num_batches)).mean(0)


def simulator_epoch(problem: LeastSquares, ks, alphas, lr: float, y0: torch.Tensor, order: Sequence[int]
                    ) -> torch.Tensor:
    """One epoch in ``order`` through the co-located simulator (``launch.simulate``, the
    ``topology.multilayer`` schedule): the outermost agent's weights after m iterations."""
    from launch import simulate

    ks, alphas = _check_epoch(ks, alphas, len(order))
    model = torch.nn.Linear(problem.dim, 1, bias=False).to(torch.float64)
    with torch.no_grad():
        model.weight.copy_(y0.view(1, -1))
    data = itertools.cycle([(problem.features[a], problem.targets[a]) for a in order])

    def loss_fn(module, batch):
        return 0.5 * (module(batch[0]).squeeze(1) - batch[1]).pow(2).mean()

    result = simulate(model, loss_fn, data, topology.multilayer(ks, alphas),
                      lambda params: torch.optim.SGD(params, lr=lr), steps=len(order))
    return result.parameters[len(ks)]["weight"].view(-1)


# -- the modified flow ------------------------------------------------------------------------------
def eq27_constants(ks, alphas) -> tuple[float, float]:
    """(a, b) with eq. 27's f~ = f + gamma a AN - gamma b AI, level 1 the innermost:
    a = alpha_1 ... alpha_n / 4, b = sum_p (1 - alpha_p) alpha_{p-1} ... alpha_1 (k_p ... k_1 - 1) / 4.

    >>> eq27_constants((5,), (0.5,))   # Lookahead, eq. 28: (alpha / 4, (1 - alpha)(k - 1) / 4)
    (0.125, 0.5)
    """
    ks, alphas = check_levels(ks, alphas)
    b = sum((1 - alphas[p]) * math.prod(alphas[:p]) * (math.prod(ks[: p + 1]) - 1) for p in range(len(ks)))
    return math.prod(alphas) / 4, b / 4


def derived_constants(ks, alphas, m: int) -> tuple[float, float]:
    """(a, b) of the modified flow by the second-order backward error analysis of the module
    docstring, from the schedule's matrices: a = U / (4m), b = (2W/U - U (m-1)/m) / 4 with
    u_j = (e_0 P_j ... P_{m-1})_n, w(i, j) = (e_0 P_j ... P_{i-1})_0, U = sum u_j,
    W = sum_{j<i} u_i w(i, j).  The flow's time is gamma U = 4 m a gamma.

    >>> derived_constants((5,), (0.5,), 10)
    (0.125, 0.5)
    """
    ks, alphas = _check_epoch(ks, alphas, m)
    schedule = topology.multilayer(ks, alphas)
    matrices = [schedule.matrix(t) for t in range(m)]
    # reach[j][i] = e_0 P_j ... P_{i-1}: where a unit displacement of the fast weights at step j is at step i.
    reach = []
    for j in range(m):
        row, rows = torch.zeros(len(ks) + 1, dtype=torch.float64), []
        row[0] = 1.0
        for t in range(j, m):
            rows.append(row)
            row = row @ matrices[t]
        rows.append(row)
        reach.append(rows)
    u = [reach[j][m - j][len(ks)].item() for j in range(m)]
    U = sum(u)
    W = sum(u[i] * reach[j][i - j][0].item() for i in range(m) for j in range(i))
    return U / (4 * m), (2 * W / U - U * (m - 1) / m) / 4


def flow_constants(ks, alphas) -> dict[str, tuple[float, float]]:
    """(a, b) of each flow in :data:`FLOWS` (the coefficients of AN and AI over gamma)."""
    a, b = eq27_constants(ks, alphas)
    outer_first = eq27_constants(tuple(ks)[::-1], tuple(alphas)[::-1])
    return dict(zip(FLOWS, ((a, b), (0.0, 0.0), (a, -b), outer_first)))


def flow_endpoint(problem: LeastSquares, y0: torch.Tensor, time: float, c_an: float, c_ai: float) -> torch.Tensor:
    """y(time) for dy/dt = -grad f~(y), f~ = f + c_an AN - c_ai AI, y(0) = y0 (DOP853, rtol 1e-12,
    atol 1e-14)."""
    def field(_t, y):
        return -problem.modified_gradient(torch.from_numpy(y), c_an, c_ai).numpy()

    solution = solve_ivp(field, (0.0, time), y0.numpy(), method="DOP853", rtol=1e-12, atol=1e-14)
    if not solution.success:
        raise RuntimeError(f"the modified flow's integration failed: {solution.message}")
    return torch.from_numpy(solution.y[:, -1].copy())


def fit_slope(gammas: Sequence[float], errors: Sequence[float]) -> float:
    """The least-squares slope of log(error) against log(gamma)."""
    return float(np.polyfit(np.log(gammas), np.log(errors), 1)[0])


# -- one configuration ------------------------------------------------------------------------------
def measure(problem: LeastSquares, ks, alphas, gammas: Sequence[float], y0: torch.Tensor) -> dict:
    """Errors of every flow against the exact E y_r, per gamma; the fitted slopes; the measured
    constants (a, b) (Richardson from the two smallest gammas)."""
    gammas = sorted(gammas)
    constants = flow_constants(ks, alphas)
    beta = math.prod(check_levels(ks, alphas)[1])
    errors = {name: [] for name in constants}
    fitted = []
    basis = torch.stack([-problem.an_gradient(y0), problem.ai_gradient(y0)], 1)  # (d, 2)
    for gamma in gammas:
        time = beta * gamma * problem.num_batches
        mean = expected_epoch(problem, ks, alphas, gamma, y0)
        ends = {name: flow_endpoint(problem, y0, time, gamma * a, gamma * b) for name, (a, b) in constants.items()}
        for name, end in ends.items():
            errors[name].append(float((mean - end).norm()))
        # D = E y_r - y_GF(eps) = -eps gamma (a grad AN - b grad AI) + O(gamma^3): fit (a, b).
        gap = mean - ends[FLOWS[1]]
        fitted.append(torch.linalg.lstsq(basis, (gap / (time * gamma)).unsqueeze(1)).solution.squeeze(1))
    (g1, f1), (g2, f2) = (gammas[0], fitted[0]), (gammas[1], fitted[1])
    measured = (g2 * f1 - g1 * f2) / (g2 - g1)  # a(gamma) = a0 + kappa gamma: the value at 0
    return {
        "gammas": gammas,
        "errors": errors,
        "slopes": {name: fit_slope(gammas, e) for name, e in errors.items()},
        "constants": constants,
        "derived": derived_constants(ks, alphas, problem.num_batches),
        "measured": (float(measured[0]), float(measured[1])),
    }


# -- the report -------------------------------------------------------------------------------------
def arguments(argv):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CI: m = 4, 4, 8 and 3 gammas (seconds)")
    p.add_argument("--gamma-max", type=float, default=0.04, help="largest lr gamma; the smallest is a tenth")
    p.add_argument("--points", type=int, default=6, help="gammas, log-spaced over the decade")
    p.add_argument("--dim", type=int, default=3, help="parameters d")
    p.add_argument("--batch-size", type=int, default=4, help="samples per mini-batch b")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (math.isfinite(args.gamma_max) and args.gamma_max > 0):
        raise ValueError(f"--gamma-max must be a positive finite number; got {args.gamma_max}")
    for option, value, least in (("--points", args.points, 2), ("--dim", args.dim, 2), ("--batch-size", args.batch_size, 1)):
        if value < least:
            raise ValueError(f"{option} must be an integer >= {least}; got {value}")
    if args.tiny:
        args.points = min(args.points, 3)
    return args


def _fmt(x: float) -> str:
    return f"{x:.4g}"


STYLES = dict(zip(FLOWS, ("o-", "s--", "^:", "x-.")))


def shown_flows(result: dict, levels: int) -> list[str]:
    """The flows of ``result`` worth showing: with one level, reading the levels outer-first is eq. 27."""
    return [flow for flow in result["errors"] if not (flow == FLOWS[3] and levels == 1)]


def plot(results: dict, out) -> None:
    """One log-log panel per configuration: each flow's error against gamma, with gamma^2 and gamma^3."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.2), sharey=True, squeeze=False)
    for ax, (label, r) in zip(axes[0], results.items()):
        g = np.array(r["gammas"])
        for flow in shown_flows(r, len(r["ks"])):
            ax.loglog(g, r["errors"][flow], STYLES[flow], label=f"{flow} (slope {r['slopes'][flow]:.2f})")
        # Reference slopes, a factor 3 below the data's last point so as not to hide it.
        ax.loglog(g, r["errors"][FLOWS[1]][-1] / 3 * (g / g[-1]) ** 2, color="grey", lw=0.8, label="∝ gamma^2")
        ax.loglog(g, r["errors"][FLOWS[0]][-1] / 3 * (g / g[-1]) ** 3, color="black", lw=0.8, label="∝ gamma^3")
        ax.set_title(f"{label}: k={r['ks']}, alpha={r['alphas']}, m={r['m']}")
        ax.set_xlabel("gamma (inner lr)")
        ax.set_xticks([g[0], g[-1]], [f"{g[0]:.3g}", f"{g[-1]:.3g}"])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("||E y_r - y(beta gamma m)||")
    save_figure(fig, out, NAME)


def main(argv: Sequence[str] | None = None) -> dict:
    args = arguments(argv)
    torch.set_num_threads(1)
    timer = Timer()
    gammas = np.geomspace(args.gamma_max / 10, args.gamma_max, args.points).tolist()
    results, rows, constant_rows, checks, deviations = {}, [], [], [], []
    for label, ks, alphas, m in TINY_CONFIGS if args.tiny else CONFIGS:
        problem = least_squares(m, args.batch_size, args.dim, args.seed)
        y0 = torch.randn(args.dim, generator=torch.Generator().manual_seed(args.seed + 1), dtype=torch.float64)
        r = results[label] = {**measure(problem, ks, alphas, gammas, y0), "ks": ks, "alphas": alphas, "m": m}
        name = f"{label}: k={ks}, alpha={alphas}, m={m}"
        for flow in shown_flows(r, len(ks)):
            (a, b), e = r["constants"][flow], r["errors"][flow]
            rows.append([name, flow, _fmt(a), _fmt(b), _fmt(e[-1]), _fmt(e[0]), f"{r['slopes'][flow]:.2f}"])
        for constant, printed, ours, fit in zip(("a (AN)", "b (AI)"), r["constants"][FLOWS[0]], r["derived"],
                                                r["measured"]):
            deviation = abs(fit / printed - 1) if printed else abs(fit)  # relative, absolute if eq. 27 says 0
            constant_rows.append([name, constant, _fmt(printed), _fmt(ours), f"{ours - printed:.1e}", _fmt(fit),
                                  f"{deviation:.1e}"])
            deviations.append(deviation)
        order = orderings(m)[-1]
        reference = lookahead_epochs(problem, ks, alphas, gammas[-1], y0, order.unsqueeze(0))[0]
        simulated = simulator_epoch(problem, ks, alphas, gammas[-1], y0, order.tolist())
        checks.append(f"{label}: {float((reference - simulated).abs().max()):.1e}")
    plot(results, args.out)

    body = (
        f"Least squares, d = {args.dim}, m mini-batches of b = {args.batch_size} samples (fixed; the mean over "
        f"all m! orderings is exact), y_0 random; LA-n with SGD inside (the project's serial reference, float64), "
        f"one epoch of m inner steps; the modified flow solved by DOP853 to rtol 1e-12. "
        f"gamma from {gammas[0]:g} to {gammas[-1]:g} ({len(gammas)} points); the flows are "
        "f~ = f + gamma a AN - gamma b AI, at time beta gamma m; the error is ||E y_r - y(beta gamma m)||.\n\n"
        + markdown_table(["configuration", "flow", "a", "b", f"error at gamma={gammas[-1]:g}",
                          f"error at gamma={gammas[0]:g}", "fitted slope"], rows)
        + "\n\nThe constants: eq. 27 as printed (level 1 the innermost), the backward error analysis redone "
        "from the schedule's matrices (module docstring), and measured from the O(gamma^2) gap between the "
        "epoch and the plain gradient flow (Richardson-extrapolated to gamma = 0); the measured constants "
        f"are within {max(deviations):.1e} (relative) of eq. 27's:\n\n"
        + markdown_table(["configuration", "constant", "eq. 27", "derived", "derived - eq. 27", "measured",
                          "abs(measured / eq. 27 - 1)"], constant_rows)
        + f"\n\nOne ordering (the last), gamma = {gammas[-1]:g}, through `launch.simulate` (co-located) vs the "
        "reference: max |difference| " + ", ".join(checks) + f".\n\n![E9]({NAME}.png)\n"
    )
    write_markdown(args.out, NAME, "E9: the implicit regularizer of Multilayer Lookahead (Pushkin & Barba eq. 27)",
                   argv, timer, body)
    return {"results": results, "gammas": gammas, "elapsed": timer.elapsed}


if __name__ == "__main__":
    main()
