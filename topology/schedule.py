"""Schedules: the map t -> P_t of the multi-agent model.

One iteration t of the model (DESIGN section 1; Wang et al. eq. 4, Pushkin & Barba eq. 1) is

    X_{t+1} = (X_t - lr * G_t) P_t,

with X_t = [x_0 ... x_{m-1}] the agents' parameters as columns and P_t an m x m column-stochastic
matrix: P[i, j] is the weight of agent i's value in agent j's new value, applied *after* the
inner step of iteration t.  Iterations count from 0, so Lookahead's first sync, after exactly k
inner steps, is the one at t = k - 1.

A schedule is periodic: ``matrix(t) == matrix(t % period)``.  It stores each distinct matrix once
and maps every t to the index of its matrix (:meth:`Schedule.matrix_index`), so that plans can be
compiled once per distinct matrix and process groups created at start-up.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from topology.validation import check_levels, check_mixing_matrix, check_period, check_workers

#: Two eigen-solutions closer than this are taken as the same consensus vector.
CONSENSUS_TOL = 1e-10


class Schedule:
    """A periodic sequence of column-stochastic mixing matrices over ``num_agents`` agents.

    Args:
        distinct: the distinct matrices, each validated (float64, m x m).
        index_of: maps t in [0, period) to the index of P_t in ``distinct``.
        period: the schedule's period.
        workers: agents that run the inner optimizer; the others are passive (f_i = 0).
        push_sum: the matrices are row-stochastic (mass-preserving) and every agent also carries
            a push-sum weight mixed by the same P_t (see :mod:`topology.decentralized`).
    """

    def __init__(
        self,
        distinct: Sequence[torch.Tensor],
        index_of: Callable[[int], int],
        period: int,
        workers: Sequence[int],
        push_sum: bool = False,
    ):
        self.push_sum = bool(push_sum)
        self._distinct = tuple(distinct)
        self._index_of = index_of
        self.period = check_period(period, name="period")
        self.num_agents = self._distinct[0].shape[0]
        self.workers = check_workers(workers, self.num_agents)

    # -- the map t -> P_t ---------------------------------------------------------------------
    def matrix_index(self, t: int) -> int:
        """Index of P_t among :attr:`distinct_matrices`."""
        if t < 0:
            raise ValueError(f"t must be a non-negative iteration number; got {t}")
        return self._index_of(t % self.period)

    def matrix(self, t: int) -> torch.Tensor:
        """P_t as an m x m float64 tensor (a copy: changing it changes nothing here)."""
        return self._distinct[self.matrix_index(t)].clone()

    @property
    def distinct_matrices(self) -> tuple[torch.Tensor, ...]:
        """Every distinct P_t of one period, in order of first appearance."""
        return self._distinct

    @property
    def passive(self) -> tuple[int, ...]:
        """Agents that never run the inner optimizer."""
        return tuple(i for i in range(self.num_agents) if i not in self.workers)

    # -- consensus ----------------------------------------------------------------------------
    def consensus(self) -> torch.Tensor | None:
        """The vector a >= 0, sum(a) = 1, with P_t a = a for every t; None if there is no unique one.

        Found as the null space of the stacked (P_d - I) over the distinct matrices: a unique
        solution exists when that null space is one-dimensional.  With it the virtual iterate
        theta_t = X_t a obeys theta_{t+1} = theta_t - lr * G_t a (Wang eq. 8).
        """
        m = self.num_agents
        eye = torch.eye(m, dtype=torch.float64)
        stacked = torch.cat([p - eye for p in self._distinct], dim=0)
        _, singular, vh = torch.linalg.svd(stacked, full_matrices=True)
        padded = torch.zeros(m, dtype=torch.float64)
        padded[: singular.numel()] = singular
        null = vh[padded <= CONSENSUS_TOL * max(1.0, float(singular.max()))]
        if null.shape[0] != 1:
            return None
        a = null[0] / null[0].sum()
        if (a < -CONSENSUS_TOL).any():
            return None
        return a.clamp_min(0.0)

    #: A short description set by the generators of :mod:`topology.decentralized` (shown by repr).
    name: str | None = None

    def __repr__(self) -> str:
        if self.name:
            return self.name
        return (
            f"{type(self).__name__}(num_agents={self.num_agents}, period={self.period}, "
            f"workers={self.workers}, distinct={len(self._distinct)})"
        )


class MultilayerSchedule(Schedule):
    """Multilayer Lookahead LA-n as a schedule (Pushkin & Barba; DESIGN section 1).

    m = n + 1 agents: agent 0 is the fast worker, agent l (1..n) holds the slow weights of level l,
    level 1 being the innermost.  After the inner step of iteration t, let L be the largest l with
    (t + 1) divisible by k_1 k_2 ... k_l (0 if none).  Agents 0..L all receive sum_j a_j x_j with

        a_0 = alpha_1 ... alpha_L,   a_j = (1 - alpha_j) alpha_{j+1} ... alpha_L  (1 <= j <= L),

    which unrolls the recursive updates y_l <- (1 - alpha_l) y_l + alpha_l y_{l-1}, l = 1..L,
    followed by y_{L-1}, ..., y_0 <- y_L.  Agents above L are untouched (identity columns).
    """

    def __init__(self, ks: Sequence[int], alphas: Sequence[float]):
        self.ks, self.alphas = check_levels(ks, alphas)
        n = len(self.ks)
        self.cumulative_periods = tuple(math.prod(self.ks[: l + 1]) for l in range(n))
        distinct = [self._level_matrix(level) for level in range(n + 1)]
        super().__init__(distinct, self.level, self.cumulative_periods[-1], workers=(0,))

    @property
    def depth(self) -> int:
        """The number n of slow levels."""
        return len(self.ks)

    def level(self, t: int) -> int:
        """L(t): the highest level synchronized after the inner step of iteration t (0: none)."""
        level = 0
        for period in self.cumulative_periods:
            if (t + 1) % period:
                break
            level += 1
        return level

    def level_weights(self, level: int) -> torch.Tensor:
        """The weights (a_0, ..., a_L) of a level-L sync, in float64."""
        weights = torch.zeros(level + 1, dtype=torch.float64)
        for j in range(level + 1):
            w = 1.0 if j == 0 else 1.0 - self.alphas[j - 1]
            for alpha in self.alphas[j:level]:
                w *= alpha
            weights[j] = w
        return weights

    def _level_matrix(self, level: int) -> torch.Tensor:
        m = len(self.ks) + 1
        matrix = torch.eye(m, dtype=torch.float64)
        if level:
            matrix[: level + 1, : level + 1] = self.level_weights(level).unsqueeze(1)
        return check_mixing_matrix(matrix, m, name=f"level-{level} matrix")

    def consensus(self) -> torch.Tensor:
        """a = (a_0, ..., a_n) of the outermost sync, in closed form (Pushkin & Barba eq. 2)."""
        return self.level_weights(self.depth)

    def __repr__(self) -> str:
        return f"MultilayerSchedule(ks={self.ks}, alphas={self.alphas})"


def multilayer(ks: Sequence[int], alphas: Sequence[float]) -> MultilayerSchedule:
    """Multilayer Lookahead LA-n with periods ``ks`` and step sizes ``alphas`` (level 1 first).

    Example:
        >>> s = multilayer((3, 2), (0.5, 0.8))
        >>> s.num_agents, s.period, s.level(2), s.level(5)
        (3, 6, 1, 2)
    """
    return MultilayerSchedule(ks, alphas)


def lookahead(k: int, alpha: float) -> MultilayerSchedule:
    """Lookahead (LA-1): a fast worker and a slow agent, synced every ``k`` inner steps.

    Example:
        >>> s = lookahead(5, 0.5)
        >>> s.matrix(4).tolist()
        [[0.5, 0.5], [0.5, 0.5]]
    """
    return MultilayerSchedule((k,), (alpha,))


def from_matrices(
    matrices: Sequence | Callable[[int], object],
    *,
    period: int | None = None,
    workers: Sequence[int] | None = None,
    push_sum: bool = False,
) -> Schedule:
    """A schedule from explicit matrices.

    Args:
        matrices: a sequence of m x m matrices cycled (P_t = matrices[t % len]), or a function
            t -> matrix, evaluated once for t in [0, period) at construction.
        period: required with a function (the schedule repeats with it); with a sequence it
            defaults to, and must equal, its length.
        workers: agents running the inner optimizer; default: every agent.
        push_sum: the matrices are row-stochastic and run with push-sum weights (validated as
            such instead of column-stochastic; see :mod:`topology.decentralized`).

    Example:
        >>> s = from_matrices([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
        >>> s.period, [round(v, 12) for v in s.consensus().tolist()]
        (2, [0.5, 0.5])
    """
    if callable(matrices):
        if period is None:
            raise ValueError("period is required when matrices is a function of t")
        period = check_period(period, name="period")
        raw = [matrices(t) for t in range(period)]
        names = [f"matrices({t})" for t in range(period)]
    else:
        if isinstance(matrices, torch.Tensor) and matrices.dim() == 2:
            raise ValueError("matrices must be a sequence of matrices (wrap a single matrix in a list)")
        try:
            raw = list(matrices)
        except TypeError as err:
            raise ValueError(f"matrices must be a sequence of matrices or a function of t; got {matrices!r}") from err
        if not raw:
            raise ValueError("matrices must hold at least one matrix")
        if period is not None and check_period(period, name="period") != len(raw):
            raise ValueError(f"period must equal len(matrices) = {len(raw)} for a sequence; got {period}")
        period = len(raw)
        names = [f"matrices[{t}]" for t in range(period)]
    first = check_mixing_matrix(raw[0], None, name=names[0], push_sum=push_sum)
    m = first.shape[0]
    checked = [first] + [check_mixing_matrix(p, m, name=n, push_sum=push_sum) for p, n in zip(raw[1:], names[1:])]
    distinct: list[torch.Tensor] = []
    index = []
    for p in checked:
        for d, q in enumerate(distinct):
            if torch.equal(p, q):
                index.append(d)
                break
        else:
            index.append(len(distinct))
            distinct.append(p)
    workers = tuple(range(m)) if workers is None else workers
    return Schedule(distinct, index.__getitem__, period, workers, push_sum=push_sum)
