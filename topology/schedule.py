"""Schedules: the map t -> P_t of the multi-agent model.

One iteration t of the model (Wang et al. eq. 4, Pushkin & Barba eq. 1) is

    X_{t+1} = (X_t - lr * G_t) P_t,

with X_t = [x_0 ... x_{m-1}] the agents' parameters as columns and P_t an m x m column-stochastic
matrix: P[i, j] is the weight of agent i's value in agent j's new value, applied *after* the
inner step of iteration t.  Iterations count from 0, so Lookahead's first sync, after exactly k
inner steps, is the one at t = k - 1.

Gradient mixing (Q_t).  The full model is

    X_{t+1} = (X_t - lr * A(G_t Q_t)) P_t,

G_t = [g_0 ... g_{m-1}] the agents' gradients (zero for a passive agent) and Q_t an m x m matrix
that mixes them *before* the inner optimizers A see them: worker j steps on sum_i Q[i, j] g_i.
Q_t is column-stochastic over the workers and zero in the rows and columns of the passive
agents (:func:`topology.validation.check_gradient_matrix`); Q_t = I_W (the identity on the
workers, :func:`topology.validation.worker_identity`) is the default, and every schedule but
:func:`topology.data_parallel`, :func:`from_matrices` with ``gradient_matrices`` and the
:func:`topology.phases` built from them has it at every t.  A schedule indexes its distinct
Q's exactly as its P's (:meth:`Schedule.gradient_index`, words of the same lengths), so that
the identity costs one word node and nothing per iteration.

A schedule is periodic, ``matrix(t) == matrix(t % period)``, or (:func:`topology.phases`)
periodic after a finite prefix.  It stores each distinct matrix once and maps every t to the
index of its matrix (:meth:`Schedule.matrix_index`), so that plans can be compiled once per
distinct matrix and process groups created at start-up.  The map is a compressed word
(:mod:`topology.word`): building a schedule, looking up P_t, finding the next sync
(:meth:`Schedule.next_sync`) and the diagnostics of :mod:`topology.diagnostics` cost time in the
number of distinct matrices and pattern nodes, not in the period, so that ``lookahead(10**21,
0.5)`` is as cheap as ``lookahead(5, 0.5)``.  The one exception is :func:`from_matrices` with a
function of t, which must call it at every t of a period: its period is limited to
:data:`MAX_ENUMERATED_PERIOD`.
"""

from __future__ import annotations

import hashlib

import math
from typing import Callable, Sequence

import torch

from topology.checks import as_list
from topology.validation import (
    as_matrix, check_gradient_matrix, check_levels, check_mixing_matrix, check_period, check_workers, worker_identity,
)
from topology.word import EMPTY, Word, chain, concat, from_indices, order_of_appearance, renumber, repeat, run

#: ``(distinct Q's, cycle, prefix)``: a schedule's gradient matrices and the words that index them.
Gradients = tuple

#: Two eigen-solutions closer than this are taken as the same consensus vector.
CONSENSUS_TOL = 1e-10

#: The largest period of :func:`from_matrices` with a function of t: it is called at every t of
#: the period at construction (about 25 microseconds per t for a function that builds a new
#: tensor each time, 2-3 s at this limit; every other schedule is built without enumerating its
#: period).
MAX_ENUMERATED_PERIOD = 100_000


class Schedule:
    """A sequence t -> P_t of mixing matrices over ``num_agents`` agents, periodic after a prefix.

    The sequence is a finite *prefix* of ``prefix_length`` iterations (empty for every schedule
    but :func:`topology.phases`) followed by a *cycle* of ``period`` iterations repeated forever:

        P_t = distinct[prefix[t]]                                             (t < prefix_length)
        P_t = distinct[cycle[(t - prefix_length) % period]]                   (t >= prefix_length)

    ``prefix`` and ``cycle`` are :class:`topology.word.Word` (compressed index sequences), so
    nothing here costs time or memory proportional to the period.

    Args:
        distinct: the distinct matrices, each validated (float64, m x m).
        cycle: the indices of one period, a word of length >= 1.
        workers: agents that run the inner optimizer; the others are passive (f_i = 0).
        push_sum: the matrices are row-stochastic (mass-preserving) and every agent also carries
            a push-sum weight mixed by the same P_t (see :mod:`topology.decentralized`).
        prefix: the indices of the first ``prefix.length`` iterations (default: none).
        gradients: ``(distinct, cycle, prefix)`` of the gradient matrices Q_t, each validated
            (:func:`topology.validation.check_gradient_matrix`), their words of the same lengths
            as ``cycle`` and ``prefix``; default None: Q_t = I_W at every t.
    """

    def __init__(
        self,
        distinct: Sequence[torch.Tensor],
        cycle: Word,
        workers: Sequence[int],
        push_sum: bool = False,
        prefix: Word = EMPTY,
        gradients: Gradients | None = None,
    ):
        self.push_sum = bool(push_sum)
        self._distinct = tuple(distinct)
        self.cycle, self.prefix = cycle, prefix
        self.period = check_period(cycle.length, name="period")
        self.prefix_length = prefix.length
        self.num_agents = self._distinct[0].shape[0]
        self.workers = check_workers(workers, self.num_agents)
        eye = torch.eye(self.num_agents, dtype=torch.float64)
        #: Indices of the non-identity distinct matrices (the syncs).
        self.sync_indices = frozenset(i for i, p in enumerate(self._distinct) if not torch.equal(p, eye))
        self._set_gradients(gradients)

    def _set_gradients(self, gradients: Gradients | None) -> None:
        """The Q words (module docstring): I_W everywhere when ``gradients`` is None."""
        identity = worker_identity(self.num_agents, self.workers)
        if gradients is None:
            gradients = ((identity,), run(0, self.period), run(0, self.prefix_length) if self.prefix_length else EMPTY)
        distinct, cycle, prefix = gradients
        if (cycle.length, prefix.length) != (self.period, self.prefix_length):
            raise ValueError(f"the gradient matrices' words must have the schedule's period {self.period} and prefix "
                             f"length {self.prefix_length}; got {cycle.length} and {prefix.length}")
        self._gradient_distinct = tuple(distinct)
        self.gradient_cycle, self.gradient_prefix = cycle, prefix
        #: Indices of the distinct Q's that are not I_W (the gradient all-reduces).
        self.gradient_sync_indices = frozenset(
            i for i, q in enumerate(self._gradient_distinct) if not torch.equal(q, identity))
        if self.push_sum and self.gradient_sync_indices:
            raise ValueError("gradient mixing (a Q_t other than the identity) is not defined for push-sum "
                             "schedules: mix the parameters only (push_sum=True), or drop push_sum")

    # -- the map t -> P_t ---------------------------------------------------------------------
    def matrix_index(self, t: int) -> int:
        """Index of P_t among :attr:`distinct_matrices`."""
        return _index_at(self.prefix, self.cycle, t)

    def matrix(self, t: int) -> torch.Tensor:
        """P_t as an m x m float64 tensor (a copy: changing it changes nothing here)."""
        return self._distinct[self.matrix_index(t)].clone()

    def next_sync(self, t: int) -> int | None:
        """The first iteration t' >= t whose P_t' is not the identity (bitwise); None if there is
        none (every later P is the identity).  Costs O(depth * log(size)) of the words, not the
        period: within the prefix, then within the current cycle, then the next cycle's first."""
        if t < 0:
            raise ValueError(f"t must be a non-negative iteration number; got {t}")
        marked = self.sync_indices
        if t < self.prefix_length:
            found = self.prefix.next_marked(t, marked)
            if found is not None:
                return found
            t = self.prefix_length
        local = (t - self.prefix_length) % self.period
        found = self.cycle.next_marked(local, marked)
        if found is not None:
            return t - local + found
        first = self.cycle.first(marked)
        return None if first is None else t - local + self.period + first

    def head(self, steps: int) -> Word:
        """The indices of P_0 ... P_{steps-1} as a word (how :func:`topology.phases` cuts a phase)."""
        return _head(self.prefix, self.cycle, steps)

    # -- the map t -> Q_t -----------------------------------------------------------------------
    def gradient_index(self, t: int) -> int:
        """Index of Q_t among :attr:`distinct_gradient_matrices`."""
        return _index_at(self.gradient_prefix, self.gradient_cycle, t)

    def gradient_matrix(self, t: int) -> torch.Tensor:
        """Q_t as an m x m float64 tensor (a copy), I_W when the schedule mixes no gradients."""
        return self._gradient_distinct[self.gradient_index(t)].clone()

    def gradient_head(self, steps: int) -> Word:
        """The indices of Q_0 ... Q_{steps-1} as a word."""
        return _head(self.gradient_prefix, self.gradient_cycle, steps)

    @property
    def distinct_gradient_matrices(self) -> tuple[torch.Tensor, ...]:
        """Every distinct Q_t, in order of first appearance (just I_W for most schedules)."""
        return self._gradient_distinct

    @property
    def mixes_gradients(self) -> bool:
        """Whether some Q_t is not the identity I_W."""
        return bool(self.gradient_sync_indices)

    @property
    def distinct_matrices(self) -> tuple[torch.Tensor, ...]:
        """Every distinct P_t, in order of first appearance (:class:`MultilayerSchedule`: matrix L
        is the level-L matrix, the identity included even when k_1 = 1 and it never occurs)."""
        return self._distinct

    @property
    def passive(self) -> tuple[int, ...]:
        """Agents that never run the inner optimizer."""
        return tuple(i for i in range(self.num_agents) if i not in self.workers)

    # -- consensus ----------------------------------------------------------------------------
    def consensus(self) -> torch.Tensor | None:
        """The vector a >= 0, sum(a) = 1, with P_t a = a for every t; None if there is no unique one.

        Found as the null space of the stacked (P_d - I) over the distinct matrices (for a phased
        schedule: those of every phase), so that a is a fixed point of *every* P_t, prefix
        included: then the virtual iterate theta_t = X_t a obeys theta_{t+1} = theta_t - lr *
        G_t a at every t (Wang eq. 8).  A unique solution exists when that null space is
        one-dimensional.
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

    def fingerprint(self) -> str:
        """A sha256 hex digest of everything that defines t -> (P_t, Q_t): the distinct matrices
        (shape and bytes), the prefix and cycle words, the workers and push-sum.  Two schedules with the
        same map t -> P_t built the same way have the same fingerprint; a difference anywhere
        changes it (up to a hash collision).  What the ranks of a job compare at start-up."""
        digest = hashlib.sha256(type(self).__name__.encode())
        for matrix in self._distinct + self._gradient_distinct:
            shape, data = _key(matrix)
            digest.update(repr(shape).encode() + data)
        digest.update(repr((self.prefix, self.cycle, self.gradient_prefix, self.gradient_cycle, self.workers,
                            self.push_sum)).encode())
        return digest.hexdigest()

    #: A short description set by the generators of :mod:`topology.decentralized` (shown by repr).
    name: str | None = None

    def __repr__(self) -> str:
        if self.name:
            return self.name
        prefix = f"prefix_length={self.prefix_length}, " if self.prefix_length else ""
        gradients = f", distinct_gradients={len(self._gradient_distinct)}" if self.mixes_gradients else ""
        return (
            f"{type(self).__name__}(num_agents={self.num_agents}, {prefix}period={self.period}, "
            f"workers={self.workers}, distinct={len(self._distinct)}{gradients})"
        )


def _index_at(prefix: Word, cycle: Word, t: int) -> int:
    """The index at iteration t of ``prefix`` followed by ``cycle`` repeated forever."""
    if t < 0:
        raise ValueError(f"t must be a non-negative iteration number; got {t}")
    if t < prefix.length:
        return prefix.at(t)
    return cycle.at((t - prefix.length) % cycle.length)


def _head(prefix: Word, cycle: Word, steps: int) -> Word:
    """The first ``steps`` indices of ``prefix`` followed by ``cycle`` repeated, as a word."""
    if steps <= prefix.length:
        return prefix.take(steps)
    cycles, rest = divmod(steps - prefix.length, cycle.length)
    return concat(prefix, repeat(cycle, cycles), cycle.take(rest))


def _key(matrix: torch.Tensor) -> tuple:
    """Equal exactly when two float64 matrices are ``torch.equal`` (same shape, same values;
    + 0.0 turns -0.0 into 0.0; NaN cannot occur in a validated matrix)."""
    return tuple(matrix.shape), (matrix + 0.0).numpy().tobytes()


def compose(
    matrices: Sequence[torch.Tensor],
    cycle: Word,
    *,
    workers: Sequence[int],
    push_sum: bool = False,
    prefix: Word = EMPTY,
    gradients: Gradients | None = None,
) -> Schedule:
    """A :class:`Schedule` from validated ``matrices`` and the words that index them: bitwise
    equal matrices are merged, matrices that never occur dropped, and the rest numbered in order
    of first appearance (prefix first), as :attr:`Schedule.distinct_matrices` promises; the same
    for ``gradients`` (``(matrices, cycle, prefix)`` of the Q's; default: Q_t = I_W)."""
    distinct, cycle, prefix = canonical(matrices, cycle, prefix)
    if gradients is not None:
        gradients = canonical(*gradients)
    return Schedule(distinct, cycle, workers, push_sum, prefix, gradients)


def canonical(matrices: Sequence[torch.Tensor], cycle: Word, prefix: Word = EMPTY):
    """(distinct, cycle, prefix) of :func:`compose`, for subclasses of :class:`Schedule`."""
    merged: dict[tuple, int] = {}
    first_of = [merged.setdefault(_key(p), i) for i, p in enumerate(matrices)]
    order = order_of_appearance(concat(prefix, cycle))
    number: dict[int, int] = {}
    for i in order:
        number.setdefault(first_of[i], len(number))
    mapping = {i: number[first_of[i]] for i in order}
    distinct = [matrices[i] for i in number]
    return distinct, renumber(cycle, mapping), renumber(prefix, mapping)


class MultilayerSchedule(Schedule):
    """Multilayer Lookahead LA-n as a schedule (Pushkin & Barba, Algorithm 2).

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
        # Distinct matrix L is the level-L matrix, selected by the largest cumulative period
        # dividing t + 1: a divisibility chain (topology.word.chain), 2 nodes per level.
        cycle = chain(self.cumulative_periods, range(1, n + 1), base=0)
        super().__init__(distinct, cycle, workers=(0,))

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

    def next_sync(self, t: int) -> int | None:
        """The first t' >= t with t' + 1 a multiple of k_1 (every level-L >= 1 matrix differs
        from the identity: its columns 0 and 1 are equal), in closed form."""
        if t < 0:
            raise ValueError(f"t must be a non-negative iteration number; got {t}")
        k = self.ks[0]
        return -(-(t + 1) // k) * k - 1

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
    gradient_matrices: Sequence | Callable[[int], object] | None = None,
) -> Schedule:
    """A schedule from explicit matrices.

    Args:
        matrices: a sequence of m x m matrices cycled (P_t = matrices[t % len]), or a function
            t -> matrix, evaluated once for t in [0, period) at construction.
        period: required with a function (the schedule repeats with it; at most
            :data:`MAX_ENUMERATED_PERIOD`, since every t is evaluated); with a sequence it
            defaults to, and must equal, its length.
        workers: agents running the inner optimizer; default: every agent.
        push_sum: the matrices are row-stochastic and run with push-sum weights (validated as
            such instead of column-stochastic; see :mod:`topology.decentralized`).
        gradient_matrices: the gradient-mixing matrices Q_t (module docstring), given as
            ``matrices`` is (a sequence of the same length, Q_t = gradient_matrices[t % len], or a
            function of t over the same period); default: Q_t = I_W at every t.

    Example:
        >>> s = from_matrices([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
        >>> s.period, [round(v, 12) for v in s.consensus().tolist()]
        (2, [0.5, 0.5])
        >>> s = from_matrices([torch.eye(2)], gradient_matrices=[torch.full((2, 2), 0.5)])
        >>> s.mixes_gradients, s.gradient_matrix(7).tolist()
        (True, [[0.5, 0.5], [0.5, 0.5]])
    """
    raw, names = _enumerated(matrices, period, "matrices")
    distinct, indices = _validated(raw, names, lambda value, size, name: check_mixing_matrix(
        value, size, name=name, push_sum=push_sum))
    m = distinct[0].shape[0]
    workers = check_workers(tuple(range(m)) if workers is None else workers, m)
    gradients = None
    if gradient_matrices is not None:
        if callable(gradient_matrices) != callable(matrices):
            raise ValueError("gradient_matrices must be given as matrices is: both sequences, or both functions of t")
        raw, names = _enumerated(gradient_matrices, len(indices), "gradient_matrices")
        if len(raw) != len(indices):
            raise ValueError(f"gradient_matrices must hold one matrix per matrix of matrices ({len(indices)}); "
                             f"got {len(raw)}")
        q_distinct, q_indices = _validated(raw, names, lambda value, size, name: check_gradient_matrix(
            value, m, workers, name=name))
        gradients = (q_distinct, from_indices(q_indices), EMPTY)
    return compose(distinct, from_indices(indices), workers=workers, push_sum=push_sum, gradients=gradients)


def _enumerated(matrices, period: int | None, what: str) -> tuple[list, list[str]]:
    """The values of one period of ``matrices`` (a sequence, or a function of t called at every t
    of ``period``) and their names in messages (``what[t]`` or ``what(t)``)."""
    if callable(matrices):
        if period is None:
            raise ValueError(f"period is required when {what} is a function of t")
        period = check_period(period, name="period")
        if period > MAX_ENUMERATED_PERIOD:
            raise ValueError(f"period must be at most {MAX_ENUMERATED_PERIOD} when {what} is a function "
                             f"of t (it is called at every t of the period); got {period}")
        return [matrices(t) for t in range(period)], [f"{what}({t})" for t in range(period)]
    if isinstance(matrices, torch.Tensor) and matrices.dim() == 2:
        raise ValueError(f"{what} must be a sequence of matrices (wrap a single matrix in a list)")
    raw = as_list(matrices, what, "matrices or a function of t")
    if not raw:
        raise ValueError(f"{what} must hold at least one matrix")
    if period is not None and what == "matrices" and check_period(period, name="period") != len(raw):
        raise ValueError(f"period must equal len(matrices) = {len(raw)} for a sequence; got {period}")
    return raw, [f"{what}[{t}]" for t in range(len(raw))]


def _validated(raw: Sequence, names: Sequence[str], check: Callable) -> tuple[list[torch.Tensor], list[int]]:
    """Validate every matrix (named ``names[t]``) with ``check(value, size, name)`` (size: that of
    the first distinct one, None for it), each distinct one once: the distinct matrices and the
    index of each raw one among them.  A value that is the very object of an earlier one (a
    function returning cached tensors) is not converted again (``raw`` keeps every value alive,
    so no id is reused meanwhile)."""
    distinct: list[torch.Tensor] = []
    seen: dict[tuple, int] = {}
    by_id: dict[int, int] = {}
    indices = []
    for value, name in zip(raw, names):
        if id(value) not in by_id:
            key = _key(as_matrix(value, name=name))
            if key not in seen:
                size = distinct[0].shape[0] if distinct else None
                seen[key] = len(distinct)
                distinct.append(check(value, size, name))
            by_id[id(value)] = seen[key]
        indices.append(by_id[id(value)])
    return distinct, indices
