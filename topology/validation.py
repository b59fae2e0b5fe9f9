"""Validation of mixing matrices and schedule arguments.

Every check raises ``ValueError`` with a message that names the argument, what is wrong and what
is allowed.  The checks are pure functions of their arguments, so every rank that builds the same
schedule raises the same error before any collective is entered.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from topology.checks import as_list, check_integer, check_step_size, is_integer

#: Largest allowed deviation of a column sum from 1.
COLUMN_SUM_TOL = 1e-12


def check_period(k, *, name: str = "k") -> int:
    """A synchronization period: an integer >= 1 (bool is refused); :func:`topology.checks.check_integer`."""
    return check_integer(k, name, minimum=1)


def check_alpha(alpha, *, name: str = "alpha") -> float:
    """A slow step size: a finite real number in (0, 1]; :func:`topology.checks.check_step_size`."""
    return check_step_size(alpha, name)


def check_levels(ks: Sequence, alphas: Sequence) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Periods and step sizes of a multilayer Lookahead: equal, non-zero lengths."""
    for name, value in (("ks", ks), ("alphas", alphas)):
        if isinstance(value, (str, bytes)):   # a string is a sequence of characters, not of numbers
            raise ValueError(f"{name} must be a sequence of numbers, one per level; got the string {value!r}")
    try:
        ks, alphas = tuple(ks), tuple(alphas)
    except TypeError as err:
        raise ValueError(f"ks and alphas must be sequences; got ks={ks!r}, alphas={alphas!r}") from err
    if len(ks) == 0:
        raise ValueError("ks must name at least one level (a non-empty sequence of periods)")
    if len(ks) != len(alphas):
        raise ValueError(
            f"ks and alphas must have the same length (one period and one step size per level); "
            f"got {len(ks)} periods and {len(alphas)} step sizes"
        )
    ks = tuple(check_period(k, name=f"ks[{i}]") for i, k in enumerate(ks))
    alphas = tuple(check_alpha(a, name=f"alphas[{i}]") for i, a in enumerate(alphas))
    return ks, alphas


def as_matrix(value, *, name: str) -> torch.Tensor:
    """Convert ``value`` to a float64 CPU tensor, or raise ``ValueError`` naming ``name``.

    Real (float, integer or bool) entries only: complex entries are refused rather than having
    their imaginary part dropped; ragged rows, strings, objects and integers too large for a
    float are refused too.  Lists go through numpy, which keeps Python floats in float64.
    """
    try:
        raw = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise ValueError(f"{name} must be a square matrix of real numbers; got {_short(value)}") from err
    if raw.is_complex():
        raise ValueError(f"{name} must be a square matrix of real numbers; got complex entries")
    try:
        matrix = raw.to(device="cpu", dtype=torch.float64)
    except (RuntimeError, NotImplementedError) as err:  # e.g. a meta tensor: no values to check
        raise ValueError(f"{name} must be a square matrix of real numbers; got {_short(value)}") from err
    return matrix.clone()


def _short(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_mixing_matrix(
    value, num_agents: int | None, *, name: str = "matrix", push_sum: bool = False
) -> torch.Tensor:
    """Validate one mixing matrix P and return it as a float64 CPU tensor.

    Allowed: an ``m x m`` matrix (``m = num_agents`` when given) of finite, non-negative reals
    whose every column sums to 1 within :data:`COLUMN_SUM_TOL` (every new value is a convex
    combination of old ones).  With ``push_sum``, every *row* must sum to 1 instead (every agent
    sends out all of its mass: the matrix push-sum mixes numerators and weights with).
    """
    matrix = as_matrix(value, name=name)
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix; got shape {tuple(matrix.shape)}")
    if num_agents is not None and matrix.shape[0] != num_agents:
        raise ValueError(
            f"{name} must be {num_agents} x {num_agents} (one row and column per agent); "
            f"got shape {tuple(matrix.shape)}"
        )
    if not torch.isfinite(matrix).all():
        i, j = (~torch.isfinite(matrix)).nonzero()[0].tolist()
        raise ValueError(f"{name} must be finite; entry [{i}, {j}] is {matrix[i, j].item()}")
    if (matrix < 0).any():
        i, j = (matrix < 0).nonzero()[0].tolist()
        raise ValueError(f"{name} must be non-negative; entry [{i}, {j}] is {matrix[i, j].item()}")
    sums = matrix.sum(dim=1 if push_sum else 0)
    kind, line = ("row-stochastic for push-sum", "row") if push_sum else ("column-stochastic", "column")
    bad = ((sums - 1.0).abs() > COLUMN_SUM_TOL).nonzero()
    if len(bad):
        j = bad[0].item()
        raise ValueError(
            f"{name} must be {kind} (every {line} sums to 1 within {COLUMN_SUM_TOL:g}); "
            f"{line} {j} sums to {sums[j].item()!r}"
        )
    return matrix


def passive_identity(num_agents: int, workers: Sequence[int]) -> torch.Tensor:
    """1 on the diagonal entries of the passive agents (those not in ``workers``), 0 elsewhere:
    added to a gradient matrix Q it gives the column-stochastic m x m matrix that mixes the
    gradients as Q does and leaves the passive agents alone (what :func:`topology.compile_plan`
    compiles)."""
    diagonal = torch.ones(num_agents, dtype=torch.float64)
    diagonal[list(workers)] = 0.0
    return torch.diag(diagonal)


def worker_identity(num_agents: int, workers: Sequence[int]) -> torch.Tensor:
    """The gradient-mixing identity I_W: 1 on the workers' diagonal entries, 0 elsewhere (a
    passive agent's gradient is zero, so ``G I_W = G``: what Q_t = I means)."""
    return torch.eye(num_agents, dtype=torch.float64) - passive_identity(num_agents, workers)


def check_gradient_matrix(value, num_agents: int, workers: Sequence[int], *,
                          name: str = "gradient matrix") -> torch.Tensor:
    """Validate one gradient-mixing matrix Q and return it as a float64 CPU tensor.

    Allowed: an ``m x m`` matrix (``m = num_agents``) of finite, non-negative reals, zero in every
    row and column of a passive agent (one not in ``workers``: it has no gradient to give and
    takes no inner step), whose every worker column sums to 1 within :data:`COLUMN_SUM_TOL`
    (worker j's inner optimizer sees the convex combination sum_i Q[i, j] g_i of the workers'
    gradients).  Its identity is :func:`worker_identity` (``torch.eye`` when every agent is a
    worker).
    """
    matrix = as_matrix(value, name=name)
    if matrix.dim() != 2 or tuple(matrix.shape) != (num_agents, num_agents):
        raise ValueError(f"{name} must be {num_agents} x {num_agents} (one row and column per agent); "
                         f"got shape {tuple(matrix.shape)}")
    completion = passive_identity(num_agents, workers)
    passive = [i for i in range(num_agents) if completion[i, i]]
    outside = torch.zeros(num_agents, num_agents, dtype=torch.bool)
    outside[passive, :] = True
    outside[:, passive] = True
    offending = (outside & (matrix != 0)).nonzero()
    if len(offending):
        i, j = offending[0].tolist()
        raise ValueError(f"{name} must be zero in the rows and columns of the passive agents {passive} (they "
                         f"have no gradient and take no inner step); entry [{i}, {j}] is {matrix[i, j].item()!r}")
    check_mixing_matrix(matrix + completion, num_agents, name=name)
    return matrix


def check_workers(workers, num_agents: int) -> tuple[int, ...]:
    """Agent indices that run the inner optimizer: distinct, in [0, num_agents), at least one."""
    workers = tuple(as_list(workers, "workers", "agent indices"))
    if not workers:
        raise ValueError("workers must name at least one agent")
    for w in workers:
        if not is_integer(w) or not 0 <= w < num_agents:
            raise ValueError(f"workers must be agent indices in [0, {num_agents}); got {w!r}")
    if len(set(workers)) != len(workers):
        raise ValueError(f"workers must be distinct; got {workers}")
    return tuple(sorted(int(w) for w in workers))
