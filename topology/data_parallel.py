"""Gradient mixing: synchronous data parallelism as a schedule, and the plan of a Q_t.

One iteration of the model is X_{t+1} = (X_t - lr * A(G_t Q_t)) P_t (:mod:`topology.schedule`):
worker j's inner optimizer steps on the mixed gradient h_j = sum_i Q[i, j] g_i, then the
parameters are mixed by P_t.  :func:`data_parallel` is the schedule with

    Q_t = J_W = (1/W) 1 1^T on the workers (zero on the passive agents),   P_t = I,

at every t: every worker steps on the mean gradient of all workers, which is synchronous
data-parallel SGD (DDP's all-reduce of the gradients).  From equal parameters and equal (fresh)
optimizer states, every worker computes the same step from the same h, so parameters *and*
optimizer states stay equal: what averaging the parameters every step (``local_sgd(W, 1)``)
gives only for plain SGD (a stateful optimizer's states diverge there, since each worker's
momentum or moments see its own gradient).

:func:`topology.phases` chains it with any parameter-mixing schedule; PyTorch's post-local SGD
recipe (DDP with ``post_localSGD_hook``, ``PostLocalSGDState(start_localSGD_iter=s,
post_local_gradient_allreduce=False)``, then ``PeriodicModelAverager(tau, warmup_steps=s + tau - 1)``
after every ``optimizer.step()``) is::

    phases([(s, data_parallel(W)), (None, local_sgd(W, tau))])

(with PyTorch's documented ``warmup_steps=s``: ``phases([(s, data_parallel(W)), (1, local_sgd(W, 1)),
(None, local_sgd(W, tau))])``; docs/ranks.md gives the whole mapping).

Arithmetic: h_j = sum over the support of Q's column j, in increasing i, of Q[i, j] * g_i.  DDP's
hook computes g_i / W on every rank, then all-reduces (SUM); g * (1/W) and g / W are the same
float when W is a power of two, and a sum of two terms does not depend on its order, so on 2
ranks the two agree bit for bit; with more terms the sums are ordered differently (to rounding).

**The plan of Q** (:func:`gradient_plan`): Q completed with the identity on the passive agents
(:func:`topology.validation.passive_identity`) is column-stochastic, and
:func:`topology.compile_plan` turns it into blocks (groups of workers whose gradients are
all-reduced with the block's weights: J_W is one block of every worker) and mixes, as it does
for P.  One agent per rank, a block of g workers is one all-reduce of the gradient over g ranks
per iteration (its cost in :mod:`topology.network` and :mod:`topology.diagnostics`).

Example:
    >>> s = data_parallel(2)
    >>> s.gradient_matrix(5).tolist(), s.matrix(5).tolist(), s.next_sync(0)
    ([[0.5, 0.5], [0.5, 0.5]], [[1.0, 0.0], [0.0, 1.0]], None)
    >>> gradient_plan(s, s.gradient_index(0)).blocks[0].members
    (0, 1)
"""

from __future__ import annotations

import torch

from topology.checks import check_integer
from topology.plan import Plan, compile_plan
from topology.schedule import Schedule, compose
from topology.validation import check_gradient_matrix, check_mixing_matrix, check_period, passive_identity
from topology.word import EMPTY, run


def data_parallel(num_workers: int, *, passive: int = 0) -> Schedule:
    """Synchronous data parallelism over ``num_workers`` workers (agents 0..W-1): Q_t = the mean
    over the workers, P_t = I, at every t (module docstring).  ``passive`` adds passive agents
    W..W+passive-1, which take no step and keep their values: chain it with a schedule that has
    them (``lookahead_local_sgd``'s slow agents) in :func:`topology.phases`.

    Example:
        >>> s = data_parallel(2, passive=1)
        >>> s.workers, s.passive, s.gradient_matrix(0)[:, 2].tolist()
        ((0, 1), (2,), [0.0, 0.0, 0.0])
    """
    num_workers = check_period(num_workers, name="num_workers")
    passive = check_integer(passive, "passive", minimum=0)
    m = num_workers + passive
    workers = tuple(range(num_workers))
    mean = torch.zeros(m, m, dtype=torch.float64)
    mean[:num_workers, :num_workers] = 1.0 / num_workers
    mean = check_gradient_matrix(mean, m, workers, name="the data-parallel gradient matrix")
    schedule = compose([torch.eye(m, dtype=torch.float64)], run(0, 1), workers=workers,
                       gradients=([mean], run(0, 1), EMPTY))
    schedule.name = f"data_parallel({num_workers} workers{f', passive={passive}' if passive else ''})"
    return schedule


def shard_schedule(schedule: Schedule, ranks_per_agent: int) -> Schedule:
    """The one-agent-per-rank schedule of ``schedule`` run with every agent spanning G =
    ``ranks_per_agent`` ranks (``launch.engine.placement.GroupPlacement``): agent i becomes the G
    shard agents i G .. i G + G - 1 (a worker's data-parallel shards, a passive agent's replicas),
    and

        Q'_t = Q_t (x) J_G,    P'_t = P_t (x) I_G        ((x): the Kronecker product, J_G = (1/G) 1 1^T),

    so shard (j, b) steps on sum_i Q_t[i, j] (1/G) sum_a g_(i, a) -- the mean of each agent's
    shards' gradients (DDP inside the agent), mixed across agents by Q_t -- and gets
    sum_i P_t[i, j] x_(i, b): the sync of P_t on lane b alone (each group's b-th rank with the
    others' b-th rank).  Its trajectory (:func:`agents.matrix_reference.run_model`, the data of
    shard s ``data(s)``) is the serial check of agents that span ranks.  Distinct matrices map one
    to one, so the words are the same: nothing is enumerated.  G = 1 gives ``schedule``'s matrices.

    Example (local SGD over 2 agents of 2 ranks: gradients averaged in each agent's pair, the
    parameters averaged lane by lane):
        >>> from topology.decentralized import local_sgd
        >>> s = shard_schedule(local_sgd(2, 3), 2)
        >>> s.workers, s.gradient_matrix(0)[:, 0].tolist(), s.matrix(2)[:, 0].tolist()
        ((0, 1, 2, 3), [0.5, 0.5, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0])
    """
    size = check_period(ranks_per_agent, name="ranks_per_agent")
    if schedule.push_sum:
        raise ValueError("shard_schedule does not spread push-sum schedules over ranks (their weights)")
    m = schedule.num_agents * size
    workers = tuple(w * size + lane for w in schedule.workers for lane in range(size))
    eye, mean = torch.eye(size, dtype=torch.float64), torch.full((size, size), 1.0 / size, dtype=torch.float64)
    mixing = [check_mixing_matrix(torch.kron(p, eye), m, name="the shard mixing matrix")
              for p in schedule.distinct_matrices]
    gradients = [check_gradient_matrix(torch.kron(q, mean), m, workers, name="the shard gradient matrix")
                 for q in schedule.distinct_gradient_matrices]
    sharded = Schedule(mixing, schedule.cycle, workers, False, schedule.prefix,
                       (gradients, schedule.gradient_cycle, schedule.gradient_prefix))
    sharded.name = f"shard_schedule({schedule!r}, ranks_per_agent={size})"
    return sharded


def gradient_plan(schedule: Schedule, index: int) -> Plan:
    """The plan of the distinct gradient matrix ``index`` of ``schedule`` (module docstring)."""
    matrix = schedule.distinct_gradient_matrices[index]
    return compile_plan(matrix + passive_identity(schedule.num_agents, schedule.workers))


__all__ = ["data_parallel", "gradient_plan", "shard_schedule"]
