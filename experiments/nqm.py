r"""The noisy quadratic model of Zhang et al. (Lookahead, section 3.1 and appendix A), and its theory.

The per-sample loss is

    L^(x; c) = 1/2 (x - c)^T A (x - c),     c ~ N(x* = 0, Sigma),     A = diag(h), Sigma = diag(s),

so a mini-batch of B samples has gradient A (x - c_bar) with c_bar ~ N(0, Sigma / B): the
gradient noise of coordinate i has variance h_i^2 s_i / B.  The expected loss (Zhang eq. 5; the
paper writes E[x_i^2] where E[x_i]^2 is meant) is

    L(x) = E_c L^(x; c) = 1/2 sum_i h_i (E[x_i]^2 + V[x_i] + s_i).

Everything is diagonal, so each coordinate evolves on its own; the closed forms below act
coordinate-wise on float64 tensors.  ``replicas`` independent copies of the model are stacked as
rows of one parameter (each row its own noise), so many Monte-Carlo runs go through one simulation:
the training loss sums the replicas' losses, so each row's gradient is exactly its own.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from experiments.base import Problem, agent_generator
from topology.checks import check_positive_int, dtype_from_name


# -- closed forms (Zhang et al., appendix A) --------------------------------------------------------
def _rates(h: torch.Tensor, lr: float) -> torch.Tensor:
    h = torch.as_tensor(h, dtype=torch.float64)
    if not 0 < lr < 2 / float(h.max()):
        raise ValueError(f"lr must be in (0, 2 / max(h)) = (0, {2 / float(h.max()):.6g}) for the NQM to converge; got {lr}")
    return 1 - lr * h


def _check_lookahead(k, alpha) -> None:
    check_positive_int(k, "k")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1]; got {alpha!r}")


def sgd_variance(h, noise, lr: float) -> torch.Tensor:
    r"""Fixed point of SGD's per-coordinate variance (Zhang eq. 6).

    V_{t+1} = (1 - lr h)^2 V_t + lr^2 h^2 noise  (eq. 9), so
    V* = lr^2 h^2 noise / (1 - (1 - lr h)^2).
    ``noise`` is the variance of c_bar per coordinate (Sigma / B).  The paper prints Sigma^2 in
    eq. 6 and gamma for gamma^2 in its proof; eq. 9 gives Sigma and gamma^2, as here.
    """
    h = torch.as_tensor(h, dtype=torch.float64)
    r = _rates(h, lr)
    return lr**2 * h**2 * torch.as_tensor(noise, dtype=torch.float64) / (1 - r**2)


def lookahead_variance(h, noise, lr: float, k: int, alpha: float) -> torch.Tensor:
    r"""Fixed point of the variance of Lookahead's slow weights (Zhang eq. 7), SGD inside.

    Lemma 1: with r = 1 - lr h and phi the slow weights after each sync,
        V[phi_{t+1}] = (1 - alpha + alpha r^k)^2 V[phi_t] + alpha^2 sum_{i<k} r^{2i} lr^2 h^2 noise,
    (the k inner steps add the noise of k SGD steps; cov(phi_t, theta_{t,k}) = r^k V[phi_t]), so
        V* = alpha^2 (1 - r^{2k}) / (1 - r^2) lr^2 h^2 noise / (1 - (1 - alpha + alpha r^k)^2)
           = alpha^2 (1 - r^{2k}) / (alpha^2 (1 - r^{2k}) + 2 alpha (1 - alpha)(1 - r^k)) * V*_SGD,
    using 1 - (1 - alpha + alpha r^k)^2 = alpha^2 (1 - r^{2k}) + 2 alpha (1 - alpha)(1 - r^k).
    """
    _check_lookahead(k, alpha)
    h = torch.as_tensor(h, dtype=torch.float64)
    r = _rates(h, lr)
    rk, r2k = r**k, r ** (2 * k)
    shrink = alpha**2 * (1 - r2k) / (alpha**2 * (1 - r2k) + 2 * alpha * (1 - alpha) * (1 - rk))
    return shrink * sgd_variance(h, noise, lr)


def _times(t) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
    if (t < 0).any():
        raise ValueError("times must be non-negative")
    return t


def sgd_moments(h, noise, lr: float, x0, t) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of SGD's iterate after each of the steps ``t`` (an int or a 1-D sequence),
    shape (len(t), d), from x_0 = x0 (V_0 = 0) (Zhang eqs. 8, 9):
    E[x_{t+1}] = r E[x_t] and V[x_{t+1}] = r^2 V[x_t] + lr^2 h^2 noise, so
    E[x_t] = r^t x0 and V_t = V* (1 - r^{2t}) (a geometric sum)."""
    h = torch.as_tensor(h, dtype=torch.float64)
    r = _rates(h, lr)
    t = _times(t)
    mean = r**t * torch.as_tensor(x0, dtype=torch.float64)
    var = sgd_variance(h, noise, lr) * (1 - r ** (2 * t))
    return mean, var


def lookahead_moments(h, noise, lr: float, k: int, alpha: float, x0, t) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the slow weights after each of the syncs ``t`` (outer steps: an int or
    a 1-D sequence; sync t comes after t k inner steps), shape (len(t), d), from phi_0 = x0
    (Zhang Lemma 1, eqs. 10, 11): with c = 1 - alpha + alpha r^k,
    E[phi_{t+1}] = c E[phi_t] and V[phi_{t+1}] = c^2 V[phi_t] + alpha^2 sum_{i<k} r^{2i} lr^2 h^2 noise,
    so E[phi_t] = c^t x0 and V_t = V*_LA (1 - c^{2t})."""
    _check_lookahead(k, alpha)
    h = torch.as_tensor(h, dtype=torch.float64)
    r = _rates(h, lr)
    c = 1 - alpha + alpha * r**k
    t = _times(t)
    mean = c**t * torch.as_tensor(x0, dtype=torch.float64)
    var = lookahead_variance(h, noise, lr, k, alpha) * (1 - c ** (2 * t))
    return mean, var


def expected_loss(h, sample_noise, mean, var) -> torch.Tensor:
    """Zhang eq. 5: 1/2 sum_i h_i (E[x_i]^2 + V[x_i] + s_i), over the last dimension.
    ``sample_noise`` is Sigma's diagonal s (one sample's c, not the batch mean)."""
    h = torch.as_tensor(h, dtype=torch.float64)
    return 0.5 * (h * (mean**2 + var + torch.as_tensor(sample_noise, dtype=torch.float64))).sum(-1)


# -- the problem ---------------------------------------------------------------------------------------
class QuadraticIterate(nn.Module):
    """The NQM's model: just the iterate, ``x`` of shape (replicas, dim)."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x = nn.Parameter(x0.clone())

    def forward(self) -> torch.Tensor:
        return self.x


@dataclass
class NoisyQuadratic(Problem):
    """A :class:`Problem` that also carries the model's constants (float64 tensors)."""

    curvatures: torch.Tensor = None  # h, the diagonal of A
    noise: torch.Tensor = None  # s, the diagonal of Sigma (one sample)
    batch_size: int = 1
    replicas: int = 1
    x0: torch.Tensor = None  # the initial iterate, shape (dim,), the same in every replica

    @property
    def smoothness(self) -> float:
        """L = max_i h_i: the gradient A x is L-Lipschitz."""
        return float(self.curvatures.max())

    @property
    def gradient_noise(self) -> float:
        """sigma^2 = E||g - grad f||^2 = sum_i h_i^2 s_i / B (an equality here, not just a bound)."""
        return float((self.curvatures**2 * self.noise).sum() / self.batch_size)

    @property
    def minimum(self) -> float:
        """f_inf = min_x L(x) = 1/2 sum_i h_i s_i, at x = x* = 0."""
        return float(0.5 * (self.curvatures * self.noise).sum())


def noisy_quadratic(
    dim: int = 10,
    curvatures=None,
    noise=None,
    batch_size: int = 1,
    replicas: int = 1,
    init: float = 1.0,
    seed: int = 0,
    dtype=torch.float64,
) -> NoisyQuadratic:
    """Zhang et al.'s noisy quadratic model (section 3.1).

    Args:
        dim: number of coordinates d.
        curvatures: the diagonal h of A (d positive numbers); default h_i = 1 / i, i = 1..d.
        noise: the diagonal s of Sigma, per sample; default Sigma = A^{-1} (Zhang appendix A.1).
        batch_size: samples c per step; the gradient uses their mean (noise s / B).
        replicas: independent copies stacked as rows of the parameter (Monte-Carlo runs).
        init: x_0 = init * (1, ..., 1) in every replica.
        seed: worker ``agent`` draws from ``seed + 1000 * (agent + 1)``.

    ``evaluate`` returns, averaged over the replicas, ``loss`` (the exact expected loss L(x) of
    eq. 5), ``excess_loss`` (L(x) - f_inf) and ``grad_norm_sq`` (||A x||^2).
    """
    dim = check_positive_int(dim, "dim")
    batch_size = check_positive_int(batch_size, "batch_size")
    replicas = check_positive_int(replicas, "replicas")
    dtype = dtype_from_name(dtype, "dtype")
    h = torch.tensor([1.0 / i for i in range(1, dim + 1)], dtype=torch.float64) if curvatures is None else \
        torch.as_tensor(list(curvatures), dtype=torch.float64)
    if h.shape != (dim,) or not (h > 0).all() or not torch.isfinite(h).all():
        raise ValueError(f"curvatures must be {dim} positive finite numbers; got {list(map(float, h))}")
    s = 1.0 / h if noise is None else torch.as_tensor(list(noise), dtype=torch.float64)
    if s.shape != (dim,) or not (s >= 0).all() or not torch.isfinite(s).all():
        raise ValueError(f"noise must be {dim} non-negative finite numbers; got {list(map(float, s))}")
    x0 = torch.full((dim,), float(init), dtype=torch.float64)
    h_t, sd_t = h.to(dtype), s.sqrt().to(dtype)

    def model() -> nn.Module:
        return QuadraticIterate(x0.to(dtype).repeat(replicas, 1))

    def loss_fn(module, c):
        # c: (B, replicas, d) samples; sum over replicas of each replica's mean over the batch,
        # so replica r's gradient is A (x_r - mean_b c_{b,r}).
        x = module()
        diff = x - c.to(device=x.device, dtype=x.dtype)
        return 0.5 * (diff**2 * h_t.to(x.device)).sum(-1).mean(0).sum()

    def batches(agent: int = 0):
        g = agent_generator(seed, agent)
        for _ in itertools.count():
            yield torch.randn(batch_size, replicas, dim, generator=g, dtype=dtype) * sd_t

    @torch.no_grad()
    def evaluate(module) -> dict:
        x = module().to(torch.float64).cpu()
        excess = 0.5 * (h * x**2).sum(-1)
        return {
            "loss": float((excess + 0.5 * (h * s).sum()).mean()),
            "excess_loss": float(excess.mean()),
            "grad_norm_sq": float(((h * x) ** 2).sum(-1).mean()),
        }

    return NoisyQuadratic("noisy_quadratic", model, loss_fn, batches, evaluate,
                          curvatures=h, noise=s, batch_size=batch_size, replicas=replicas, x0=x0)
