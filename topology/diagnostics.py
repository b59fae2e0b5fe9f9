"""Diagnostics of a schedule's mixing: the spectral gap over one period.

Over one period the agents' values are multiplied by Q = P_0 P_1 ... P_{T-1} (X_{t+T} = X_t Q
when no gradient is taken).  Every P_t is column-stochastic (1^T P = 1^T) or, for push-sum,
row-stochastic (P 1 = 1), so Q has the eigenvalue 1 and spectral radius 1.  The spectral gap is

    gap = 1 - |lambda_2(Q)|,

with |lambda_1| >= |lambda_2| >= ... the moduli of Q's eigenvalues (repeated by multiplicity;
complex ones by modulus).  |lambda_2| is the asymptotic factor by which the disagreement X - X a
1^T shrinks per period, for symmetric and non-symmetric (directed, push-sum) matrices alike:
gap = 1 is exact consensus after one period (local SGD, Lookahead, the one-peer exponential
graph on 2^k agents), gap = 0 means no consensus (a disconnected graph, or P_t = I).  Unlike the
second singular value it is a rate, not a one-period bound: for non-normal Q the disagreement
can grow transiently.  ``per_step=True`` gives 1 - |lambda_2(Q)|^(1/T), the gap of one step at the
same asymptotic rate, which compares schedules of different periods.

A phased schedule (:func:`topology.phases`) is periodic only after its prefix: "one period" is
then one period of the repeating part, from t = prefix_length on (the last, open-ended phase);
the finite prefix changes the values reached, not the asymptotic rate or the long-run cost.

Gradient mixing (the Q_t of :mod:`topology.schedule`) does not enter the spectral gap: Q mixes
what the workers step on, not their parameters, so it cannot shrink a disagreement between them
(:func:`topology.data_parallel` has P = I and gap 0: its workers stay equal because they start
equal and step alike).  It does enter the communication cost (:func:`vectors_sent_per_agent`).

Cost: every function here works on the schedule's words (:mod:`topology.word`): O(nodes * log
period) m x m products, never one per iteration, so ``spectral_gap(lookahead(10**21, 0.5))``
takes as long as ``spectral_gap(lookahead(5, 0.5))``.
"""

from __future__ import annotations

import torch

from topology.data_parallel import gradient_plan
from topology.schedule import Schedule
from topology.word import counts, product

#: |lambda_2| at or below this is taken as 0 (an exact average up to rounding).
EXACT_TOL = 1e-12


def period_product(schedule: Schedule) -> torch.Tensor:
    """Q = P_S P_{S+1} ... P_{S+T-1} over one period T of the repeating part, S =
    ``prefix_length`` (0 but for phased schedules), float64, m x m.  Runs of one matrix and
    repeated sub-patterns are raised to their power by repeated squaring (:func:`topology.word.product`)."""
    return product(schedule.cycle, schedule.distinct_matrices)


def second_eigenvalue_modulus(matrix: torch.Tensor) -> float:
    """|lambda_2|: the second largest eigenvalue modulus (0 for a 1 x 1 matrix)."""
    if matrix.shape[0] < 2:
        return 0.0
    moduli = torch.linalg.eigvals(matrix).abs().sort(descending=True).values
    return min(1.0, float(moduli[1]))


def spectral_gap(schedule: Schedule, *, per_step: bool = False) -> float:
    """1 - |lambda_2| of the period product (see the module docstring).

    Example:
        >>> from topology import decentralized
        >>> round(spectral_gap(decentralized.local_sgd(4, tau=3)), 12)
        1.0
        >>> round(spectral_gap(decentralized.ring(4)), 6)
        0.666667
    """
    rate = second_eigenvalue_modulus(period_product(schedule))
    if rate <= EXACT_TOL:
        rate = 0.0  # exact consensus after one period; keeps per_step from turning 1e-17 into 1e-4
    if per_step:
        rate = rate ** (1.0 / schedule.period)
    return max(0.0, 1.0 - rate)


def vectors_sent_per_agent(schedule: Schedule) -> float:
    """Communication per agent per step, in parameter vectors, averaged over one period (of the
    repeating part, for a phased schedule), when every agent has its own rank (the cost model
    used to compare schedules at equal budget).

    A mix (gossip column j) costs one vector per source i != j (a point-to-point message); a
    block of g members costs 2 (g - 1) / g vectors per member, what a ring all-reduce sends.
    Identity steps cost nothing.  The gradient matrices Q_t count the same way (a gradient has
    the parameters' size): :func:`topology.data_parallel` costs 2 (W - 1) / W vectors per worker
    per step.  Computed as sum over distinct matrices d of cost(d) * (number of iterations of the
    period using d) / period, for the P's and for the Q's.
    """
    from topology.plan import compile_plan  # local: plan imports nothing from here, keep it so

    total = 0.0
    for index, count in sorted(counts(schedule.cycle).items()):
        total += _plan_vectors(compile_plan(schedule.distinct_matrices[index])) * count
    for index, count in sorted(counts(schedule.gradient_cycle).items()):
        total += _plan_vectors(gradient_plan(schedule, index)) * count
    return total / schedule.num_agents / schedule.period


def _plan_vectors(plan) -> float:
    """Vectors sent by every agent together for one application of ``plan`` (one agent per rank)."""
    vectors = sum(len([i for i in mix.sources if i != mix.receiver]) for mix in plan.mixes)
    return vectors + sum(2.0 * (len(b.members) - 1) for b in plan.blocks)
