"""Decentralized schedules: several workers, hierarchical periods, slow levels over workers, gossip.

Every function returns a :class:`topology.Schedule` (the model of the README's "Design" section): P_t is applied after the
inner step of iteration t, counting from 0, and "every p steps" means at the t with (t + 1) % p ==
0, so the first averaging comes after exactly p inner steps.  Workers read their own data streams
(``data(agent_index)`` in :class:`launch.Simulation`).

Several workers (agents 0 .. W-1), optionally with slow agents W .. W+n-1 (level l at W + l - 1):

* :func:`local_sgd`: the W workers average every ``tau`` steps, P = (1/W) 1 1^T.
* :func:`hierarchical`: ``{period: group_size}``, as PyTorch's ``HierarchicalModelAverager``: at
  a step, the *largest* period dividing t + 1 wins, and consecutive groups of ``group_size``
  workers average (block-diagonal (1/g) 1 1^T).
* :func:`lookahead_local_sgd` and :func:`multilayer_local_sgd`: Lookahead (LA-n) whose fast
  weights are the mean of the workers.  At a level-L sync (the largest L with t + 1 divisible by
  k_1 ... k_L) the workers and slow levels 1..L all receive

      a_0 * mean(workers) + sum_{j=1..L} a_j * y_j,

  the LA-n weights (:meth:`MultilayerSchedule.level_weights`).  For one level: slow agent and every
  worker get (1 - alpha) z + alpha * mean(workers), i.e. P = v 1^T on the W + 1 agents with
  v = (alpha / W, ..., alpha / W, 1 - alpha).  With W = 1 this is exactly LA-n.  Between slow
  syncs the workers average as ``averaging`` says ({period: group_size}, largest period wins).

Gossip (every agent a worker), one gossip round every ``every`` steps, identity otherwise:

* :func:`ring`, :func:`torus`: undirected graphs, Metropolis-Hastings or uniform weights
  (both doubly stochastic there).
* :func:`exponential`: static exponential graph, i -> i + 2^k; uniform weights 1 / (1 + ceil(log2
  n)) (doubly stochastic, not symmetric); ``metropolis`` uses the undirected version i <-> i +- 2^k.
* :func:`one_peer_exponential`: time-varying, round r uses only hop 2^(r mod tau); with n a power
  of two the product over one period is exactly (1/n) 1 1^T (Ying et al. 2021).
* :func:`push_sum`: any directed graph with push weights (each agent splits its value equally
  between itself and its out-neighbours).

Push-sum (Kempe et al. 2003; SGP, Assran et al. 2019).  A column-stochastic P (this project's
convention: x_j' = sum_i P[i, j] x_i) on a directed graph drives the agents to the weighted
average X v with P v = v, not to the plain average.  Push-sum instead mixes with a *row*-stochastic
P (mass-preserving: sum_j P[i, j] = 1, "column-stochastic W = P^T" in the x' = W x notation) and
each agent carries a scalar weight w_i (w_0 = 1) mixed by the same P_t, in the same collective as
the parameters (one extra entry at the end of the agent's flat buffer).  The buffer holds the
numerator x_i; the agent's model is the de-biased z_i = x_i / w_i.  Since P 1 = 1, the sums X 1
and w 1 = n are preserved, and on a strongly connected graph (with self loops) P^t -> 1 pi^T, so
x_i -> (X 1) pi_i, w_i -> n pi_i and x_i / w_i -> (1/n) X 1, the plain average.  As in SGP, the
gradient is evaluated at z_i and the inner optimizer's update is applied to the numerator:
x_i <- x_i - lr * A(grad f_i(z_i)); then [x; w] <- [x; w] P_t.  The mean of the numerators
therefore moves exactly as (1/n) sum_i x_i <- that minus lr * mean of the updates (the virtual
iterate of the consensus vector 1/n, which :meth:`Schedule.consensus` finds since P 1 = 1).

Example:
    >>> s = hierarchical(4, {2: 2, 4: 4})
    >>> s.matrix(1)[:, 0].tolist(), s.matrix(3)[:, 0].tolist()
    ([0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25])
    >>> ring(8).period, exponential(8).matrix(0)[:, 0].tolist().count(0.25)
    (1, 4)
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from topology import graphs
from topology.checks import check_choice
from topology.schedule import MAX_ENUMERATED_PERIOD, MultilayerSchedule, Schedule, compose, from_matrices
from topology.validation import check_levels, check_mixing_matrix, check_period
from topology.word import chain, concat, run


def _named(schedule: Schedule, name: str) -> Schedule:
    schedule.name = name
    return schedule


# -- several workers ------------------------------------------------------------------------------
def _check_averaging(averaging, num_workers: int, *, name: str) -> dict[int, int]:
    """``{period: group_size}``: periods >= 1, group sizes >= 1 dividing ``num_workers``."""
    if averaging is None:
        return {}
    if not isinstance(averaging, Mapping):
        raise ValueError(f"{name} must be a mapping {{period: group_size}}; got {averaging!r}")
    checked = {}
    for period, size in averaging.items():
        period = check_period(period, name=f"{name} period")
        size = check_period(size, name=f"{name}[{period}] (a group size)")
        if num_workers % size:
            raise ValueError(
                f"{name}[{period}] must be a group size dividing the {num_workers} workers; got {size}"
            )
        checked[period] = size
    return dict(sorted(checked.items()))


def _worker_matrix(t: int, num_workers: int, averaging: dict[int, int], levels) -> torch.Tensor:
    """P_t of :func:`multilayer_local_sgd` (see the module docstring)."""
    m = num_workers + (levels.depth if levels else 0)
    matrix = torch.eye(m, dtype=torch.float64)
    level = levels.level(t) if levels else 0
    if level:
        # Receivers: every worker and slow levels 1..L; each gets v^T X with
        # v = (a_0 / W, ..., a_0 / W, a_1, ..., a_L): a_0 * mean(workers) + sum_j a_j y_j.
        a = levels.level_weights(level)
        v = torch.zeros(m, dtype=torch.float64)
        v[:num_workers] = a[0] / num_workers
        v[num_workers : num_workers + level] = a[1:]
        matrix[:, : num_workers + level] = v.unsqueeze(1)
        return matrix
    due = [p for p in averaging if (t + 1) % p == 0]
    if due:
        size = averaging[max(due)]
        for start in range(0, num_workers, size):
            matrix[start : start + size, start : start + size] = 1.0 / size
    return matrix


def _worker_schedule(num_workers: int, averaging: dict[int, int], levels, *, name: str) -> Schedule:
    """The schedule of :func:`_worker_matrix`, without enumerating its period when possible.

    P_t depends on t only through which of the periods (the averaging periods and the levels'
    cumulative periods k_1 ... k_l) divide t + 1.  When these periods, sorted, form a divisibility
    chain (each dividing the next: local SGD, Lookahead over workers, ``{2: 2, 4: 4}``...), the
    periods dividing t + 1 are exactly those up to the largest one, q, so P_t is the matrix of
    t = q - 1 and the word is :func:`topology.word.chain`: O(number of periods) to build, whatever
    the period.  Otherwise (e.g. ``{2: 2, 3: 4}``) the lcm period is enumerated by
    :func:`topology.from_matrices`, and must be at most :data:`topology.schedule.MAX_ENUMERATED_PERIOD`
    (else a ``ValueError`` naming ``name``, the averaging argument).
    """
    periods = sorted(set(averaging) | set(levels.cumulative_periods if levels else ()))
    workers = range(num_workers)
    if any(b % a for a, b in zip(periods, periods[1:])):
        period = math.lcm(*periods)
        if period > MAX_ENUMERATED_PERIOD:
            raise ValueError(
                f"{name} must have periods that divide one another, or whose lcm (a period enumerated "
                f"step by step) is at most {MAX_ENUMERATED_PERIOD}; got periods {periods} (averaging and "
                f"slow levels' k_1 ... k_l), lcm {period}"
            )
        # P_t depends only on which periods divide t + 1: one matrix object per such set.
        cache: dict[tuple, torch.Tensor] = {}

        def matrix(t: int) -> torch.Tensor:
            due = tuple(q for q in periods if (t + 1) % q == 0)
            if due not in cache:
                cache[due] = _worker_matrix(t, num_workers, averaging, levels)
            return cache[due]

        return from_matrices(matrix, period=period, workers=workers)
    m = num_workers + (levels.depth if levels else 0)
    matrices = [torch.eye(m, dtype=torch.float64)]
    matrices += [check_mixing_matrix(_worker_matrix(q - 1, num_workers, averaging, levels), m,
                                     name=f"the matrix of period {q}") for q in periods]
    return compose(matrices, chain(periods, range(1, len(periods) + 1), base=0), workers=workers)


def multilayer_local_sgd(
    num_workers: int,
    ks: Sequence[int] = (),
    alphas: Sequence[float] = (),
    averaging: Mapping[int, int] | None = None,
) -> Schedule:
    """W workers averaging as ``averaging`` says, under n slow Lookahead levels (``ks``, ``alphas``,
    level 1 innermost; none when empty).  Agents: workers 0..W-1, slow level l at W + l - 1.

    Example:
        >>> s = multilayer_local_sgd(2, (2,), (0.5,))      # Lookahead over 2 workers
        >>> s.matrix(1).tolist()
        [[0.25, 0.25, 0.25], [0.25, 0.25, 0.25], [0.5, 0.5, 0.5]]
    """
    num_workers = check_period(num_workers, name="num_workers")
    averaging = _check_averaging(averaging, num_workers, name="averaging")
    levels = None
    if len(tuple(ks)) or len(tuple(alphas)):
        ks, alphas = check_levels(ks, alphas)
        levels = MultilayerSchedule(ks, alphas)
    if levels is None and not averaging:
        raise ValueError("give averaging periods or slow levels (ks, alphas); got neither")
    schedule = _worker_schedule(num_workers, averaging, levels, name="averaging")
    parts = [f"{num_workers} workers"]
    if averaging:
        parts.append(f"averaging={averaging}")
    if levels:
        parts.append(f"ks={levels.ks}, alphas={levels.alphas}")
    return _named(schedule, f"multilayer_local_sgd({', '.join(parts)})")


def local_sgd(num_workers: int, tau: int) -> Schedule:
    """Local SGD: ``num_workers`` workers averaging every ``tau`` steps, P = (1/W) 1 1^T."""
    tau = check_period(tau, name="tau")
    return _named(multilayer_local_sgd(num_workers, averaging={tau: num_workers}),
                  f"local_sgd({num_workers} workers, tau={tau})")


def hierarchical(num_workers: int, period_group_sizes: Mapping[int, int]) -> Schedule:
    """Hierarchical model averaging (PyTorch's ``HierarchicalModelAverager``): ``{period:
    group_size}``; at each step the largest period dividing t + 1 averages consecutive groups of
    its size.  As in PyTorch, the largest period's group must hold every worker.  (PyTorch counts
    its steps from 0 and so averages after the very first step; here the first averaging at
    ``period`` comes after exactly ``period`` steps.)
    """
    num_workers = check_period(num_workers, name="num_workers")
    averaging = _check_averaging(period_group_sizes, num_workers, name="period_group_sizes")
    if not averaging:
        raise ValueError("period_group_sizes must name at least one {period: group_size}")
    largest = max(averaging)
    if averaging[largest] != num_workers:
        raise ValueError(
            f"period_group_sizes[{largest}] (the largest period) must be {num_workers}, every "
            f"worker, so that all workers reach consensus; got {averaging[largest]}"
        )
    return _named(_worker_schedule(num_workers, averaging, None, name="period_group_sizes"),
                  f"hierarchical({num_workers} workers, {averaging})")


def lookahead_local_sgd(num_workers: int, k: int, alpha: float,
                        averaging: Mapping[int, int] | None = None) -> Schedule:
    """Lookahead over local SGD: W workers and a slow agent (agent W).  Every ``k`` steps the
    slow agent and every worker get (1 - alpha) z + alpha * mean(workers); in between the workers
    average as ``averaging`` says (default: never)."""
    schedule = multilayer_local_sgd(num_workers, (k,), (alpha,), averaging)
    extra = f", averaging={dict(sorted(averaging.items()))}" if averaging else ""
    return _named(schedule, f"lookahead_local_sgd({num_workers} workers, k={k}, alpha={alpha}{extra})")


# -- gossip ---------------------------------------------------------------------------------------
def gossip(matrices, *, every: int = 1, push_sum: bool = False, name: str | None = None) -> Schedule:
    """Gossip rounds ``matrices`` (one matrix, or a list cycled round after round), one round every
    ``every`` steps (P_t = round (t + 1) / every - 1 when every divides t + 1, else I); every agent
    is a worker.  ``push_sum``: the matrices are row-stochastic and run with push-sum weights.

    The period, ``every * len(matrices)``, is the word (I^(every - 1) round_r) over the rounds r:
    O(len(matrices)) to build, whatever ``every``.
    """
    every = check_period(every, name="every")
    if isinstance(matrices, torch.Tensor) and matrices.dim() == 2:
        matrices = [matrices]
    rounds = list(matrices)
    if not rounds:
        raise ValueError("matrices must hold at least one gossip round")
    first = check_mixing_matrix(rounds[0], None, name="matrices[0]", push_sum=push_sum)
    n = first.shape[0]
    checked = [first] + [check_mixing_matrix(p, n, name=f"matrices[{r}]", push_sum=push_sum)
                         for r, p in enumerate(rounds[1:], start=1)]
    # Index 0: the identity; index r + 1: round r.
    cycle = concat(*(concat(run(0, every - 1), run(r + 1, 1)) for r in range(len(checked))))
    schedule = compose([torch.eye(n, dtype=torch.float64)] + checked, cycle, workers=range(n),
                       push_sum=push_sum)
    return _named(schedule, name or f"gossip({n} agents, every={every})")


def _suffix(every: int) -> str:
    return f", every={every}" if every != 1 else ""


def ring(n: int, weights: str = "metropolis", every: int = 1) -> Schedule:
    """Gossip on the undirected ring of ``n`` agents."""
    p = graphs.mixing_matrix(graphs.ring_graph(n), _symmetric_weights(weights))
    return gossip(p, every=every, name=f"ring({n}, {weights}{_suffix(every)})")


def torus(rows: int, cols: int, weights: str = "metropolis", every: int = 1) -> Schedule:
    """Gossip on the undirected ``rows x cols`` torus (agent r * cols + c)."""
    p = graphs.mixing_matrix(graphs.torus_graph(rows, cols), _symmetric_weights(weights))
    return gossip(p, every=every, name=f"torus({rows}x{cols}, {weights}{_suffix(every)})")


def _symmetric_weights(weights: str) -> str:
    return check_choice(weights, ("metropolis", "uniform"), "weights")


def _exponential_weights(graph: torch.Tensor, weights: str) -> torch.Tensor:
    weights = _symmetric_weights(weights)
    if weights == "metropolis":
        graph = graph | graph.T  # the undirected version: i <-> i +- 2^k
    return graphs.mixing_matrix(graph, weights)


def exponential(n: int, weights: str = "uniform", every: int = 1) -> Schedule:
    """Gossip on the static exponential graph (see the module docstring for the weights)."""
    p = _exponential_weights(graphs.exponential_graph(n), weights)
    return gossip(p, every=every, name=f"exponential({n}, {weights}{_suffix(every)})")


def one_peer_exponential(n: int, weights: str = "uniform", every: int = 1) -> Schedule:
    """Gossip on the time-varying one-peer exponential graph: round r uses hop 2^(r mod tau)."""
    rounds = [_exponential_weights(g, weights) for g in graphs.one_peer_exponential_graphs(n)]
    if not rounds:
        raise ValueError(f"n must be at least 2 for a one-peer exponential graph; got {n}")
    return gossip(rounds, every=every, name=f"one_peer_exponential({n}, {weights}{_suffix(every)})")


def push_sum(graph, every: int = 1) -> Schedule:
    """Push-sum gossip on a directed graph (or a list of graphs, one per round): push weights,
    each agent also carrying a push-sum weight (see the module docstring)."""
    adjacency = [graph] if isinstance(graph, torch.Tensor) and graph.dim() == 2 else list(graph)
    for g in adjacency:
        if not isinstance(g, torch.Tensor) or g.dtype != torch.bool or g.dim() != 2:
            raise ValueError("graph must be a boolean adjacency matrix (or a list of them)")
    rounds = [graphs.mixing_matrix(g, "push") for g in adjacency]
    n = rounds[0].shape[0]
    return gossip(rounds, every=every, push_sum=True, name=f"push_sum({n} agents{_suffix(every)})")


def push_sum_random(n: int, extra_edges: int, seed: int = 0, every: int = 1) -> Schedule:
    """Push-sum on :func:`graphs.random_directed_graph` (``n``, ``extra_edges``, ``seed``): a
    directed, non-regular graph given by numbers only (for configuration files)."""
    schedule = push_sum(graphs.random_directed_graph(n, extra_edges, seed), every=every)
    return _named(schedule, f"push_sum_random({n}, extra_edges={extra_edges}, seed={seed}{_suffix(every)})")


#: The factories by name, keyword options only (for a registry of configuration names).
SCHEDULES = {
    "local_sgd": local_sgd,
    "hierarchical": hierarchical,
    "lookahead_local_sgd": lookahead_local_sgd,
    "multilayer_local_sgd": multilayer_local_sgd,
    "ring": ring,
    "torus": torus,
    "exponential": exponential,
    "one_peer_exponential": one_peer_exponential,
    "push_sum_random": push_sum_random,
}


__all__ = [
    "SCHEDULES",
    "push_sum_random",
    "multilayer_local_sgd",
    "local_sgd",
    "hierarchical",
    "lookahead_local_sgd",
    "gossip",
    "ring",
    "torus",
    "exponential",
    "one_peer_exponential",
    "push_sum",
]
