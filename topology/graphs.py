"""Communication graphs and their mixing weights, as small generator functions (Bluefog style).

A graph on n agents is a boolean ``n x n`` tensor ``A`` with ``A[i, j]`` true when agent i's value
reaches agent j (an edge i -> j), without self loops.  Weights turn a graph into a mixing matrix in
this project's convention (topology.schedule): ``P[i, j]`` is the weight of agent i's old value in
agent j's new value, x_j' = sum_i P[i, j] x_i.  Every agent always keeps a share of its own value.

Weights (``d_in(j)``: in-degree of j, ``d_out(i)``: out-degree of i, ``d(i)``: degree of an
undirected graph):

``metropolis``  (undirected graphs only) Metropolis-Hastings: P[i, j] = 1 / (1 + max(d(i), d(j)))
                on every edge, P[j, j] = 1 - sum of the others.  Symmetric, hence doubly
                stochastic, on any undirected graph.
``uniform``     every agent averages itself and its in-neighbours equally: P[i, j] = 1 / (1 +
                d_in(j)).  Column-stochastic (each new value is a convex combination); doubly
                stochastic on regular graphs (every agent with the same in- and out-degree), as
                the ring, torus and exponential graphs below.
``push``        every agent splits its value equally between itself and its out-neighbours:
                P[i, j] = 1 / (1 + d_out(i)).  *Row*-stochastic: mass-preserving, the matrix that
                push-sum needs (see :mod:`topology.decentralized`).  In the usual x' = W x notation
                W = P^T, so this is the "column-stochastic W" of the push-sum literature.

Example:
    >>> g = ring_graph(4)
    >>> [round(w, 12) for w in mixing_matrix(g, "metropolis")[:, 0].tolist()]
    [0.333333333333, 0.333333333333, 0.0, 0.333333333333]
"""

from __future__ import annotations

import math

import torch

from topology.checks import check_choice, check_integer

WEIGHTS = ("metropolis", "uniform", "push")


def _graph(n: int, edges) -> torch.Tensor:
    adjacency = torch.zeros(n, n, dtype=torch.bool)
    for i, j in edges:
        if i != j:
            adjacency[i, j] = True
    return adjacency


def ring_graph(n: int) -> torch.Tensor:
    """Undirected ring: agent i exchanges with i - 1 and i + 1 (mod n)."""
    n = check_integer(n, "n", minimum=1)
    return _graph(n, [(i, (i + s) % n) for i in range(n) for s in (-1, 1)])


def torus_graph(rows: int, cols: int) -> torch.Tensor:
    """Undirected 2-D torus: agent r * cols + c exchanges with its 4 grid neighbours (wrapping)."""
    rows, cols = check_integer(rows, "rows", minimum=1), check_integer(cols, "cols", minimum=1)
    edges = []
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                edges.append((i, ((r + dr) % rows) * cols + (c + dc) % cols))
    return _graph(rows * cols, edges)


def exponential_offsets(n: int) -> list[int]:
    """The hops 1, 2, 4, ... < n of the exponential graphs (tau = ceil(log2 n) of them)."""
    n = check_integer(n, "n", minimum=1)
    return [2**k for k in range(math.ceil(math.log2(n)))] if n > 1 else []


def exponential_graph(n: int) -> torch.Tensor:
    """Static exponential graph (Ying et al. 2021, Bluefog's ExponentialGraph): directed edges
    i -> i + 2^k (mod n) for 2^k < n.  Every agent has in- and out-degree ceil(log2 n)."""
    return _graph(n, [(i, (i + h) % n) for i in range(n) for h in exponential_offsets(n)])


def one_peer_exponential_graphs(n: int) -> list[torch.Tensor]:
    """Time-varying one-peer exponential graph (Ying et al. 2021): at round r, the single directed
    edge i -> i + 2^(r mod tau) (mod n) per agent; one graph per round of a period."""
    return [_graph(n, [(i, (i + h) % n) for i in range(n)]) for h in exponential_offsets(n)]


def random_directed_graph(n: int, extra_edges: int, seed: int = 0) -> torch.Tensor:
    """A strongly connected directed graph that is not regular: the directed ring i -> i + 1 plus
    ``extra_edges`` distinct random chords (seeded), so in- and out-degrees differ."""
    n = check_integer(n, "n", minimum=3)
    extra_edges = check_integer(extra_edges, "extra_edges", minimum=0)
    adjacency = _graph(n, [(i, (i + 1) % n) for i in range(n)])
    free = [(i, j) for i in range(n) for j in range(n) if i != j and not adjacency[i, j]]
    if extra_edges > len(free):
        raise ValueError(f"extra_edges must be at most {len(free)} for n = {n}; got {extra_edges}")
    order = torch.randperm(len(free), generator=torch.Generator().manual_seed(seed))
    for index in order[:extra_edges].tolist():
        adjacency[free[index]] = True
    return adjacency


def is_undirected(adjacency: torch.Tensor) -> bool:
    return bool(torch.equal(adjacency, adjacency.T))


def mixing_matrix(adjacency: torch.Tensor, weights: str = "metropolis") -> torch.Tensor:
    """The float64 mixing matrix of a graph with ``weights`` (one of :data:`WEIGHTS`)."""
    check_choice(weights, WEIGHTS, "weights")
    a = adjacency.to(torch.float64)
    n = a.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    if weights == "metropolis":
        if not is_undirected(adjacency):
            raise ValueError(
                "weights='metropolis' needs an undirected graph (a symmetric adjacency); this one is "
                "directed: use weights='uniform' (receivers average) or 'push' (push-sum)"
            )
        degree = a.sum(1)
        # P[i, j] = 1 / (1 + max(d_i, d_j)) on edges; the diagonal takes the rest of column j.
        p = a / (1.0 + torch.maximum(degree.unsqueeze(1), degree.unsqueeze(0)))
        return p + torch.diag(1.0 - p.sum(0))
    if weights == "uniform":
        # Column j: agent j and its in-neighbours (A[:, j]), 1 / (1 + d_in(j)) each.
        return (a + eye) / (1.0 + a.sum(0, keepdim=True))
    # push: row i: agent i and its out-neighbours (A[i, :]), 1 / (1 + d_out(i)) each.
    return (a + eye) / (1.0 + a.sum(1, keepdim=True))


def degrees(matrix: torch.Tensor) -> tuple[list[int], list[int]]:
    """(out-degrees, in-degrees) of the graph behind a mixing matrix, self loops excluded:
    how many other agents read agent i's value, and how many others agent j reads."""
    off = (matrix != 0) & ~torch.eye(matrix.shape[0], dtype=torch.bool)
    return off.sum(1).tolist(), off.sum(0).tolist()
