"""Phased schedules: schedule_0 for steps_0 iterations, then schedule_1 for steps_1, ..., then the
last one forever.

``phases([(steps_0, s_0), ..., (None, s_last)])``: phase i starts at iteration
S_i = steps_0 + ... + steps_{i-1} and runs its schedule with *its own counter* u = t - S_i
starting at 0, P_t = s_i.matrix(t - S_i).  So the first sync of a Lookahead phase comes exactly
k iterations into it, and a phase may end between two of its syncs (it is then simply cut).

What the schedule-wide notions mean here (:class:`topology.Schedule` is a finite prefix followed
by a periodic part; here the prefix is every phase but the last, plus the last one's own prefix):

* ``distinct_matrices``: the union over phases, bitwise deduplicated, of the matrices that occur
  (a matrix of a phase cut before it occurs is left out), in order of first appearance;
* ``period``: the last phase's period; ``prefix_length``: S_last plus the last phase's prefix;
* ``consensus()``: the vector a fixed by *every* P_t of every phase (the null space over all
  distinct matrices), so that the virtual iterate X_t a moves by -lr G_t a at every t, during
  the phase changes too; None when the phases have no common one;
* ``spectral_gap``, ``period_product``, ``vectors_sent_per_agent``
  (:mod:`topology.diagnostics`): those of one period of the last, repeating phase (the earlier
  phases are transient);
* ``next_sync(t)``: exact over the phases (the first non-identity P at or after t).

Phases nest: a phase's schedule may itself be phased (its own prefix is cut like any word).
Every phase must have the same agents: ``num_agents``, ``workers`` and ``push_sum`` agree.

Post-local SGD (Lin et al.; PyTorch's recipe: a warm-up of synchronous data-parallel SGD, then
local SGD every tau) is one schedule::

    phases([(warmup, data_parallel(W)), (None, decentralized.local_sgd(W, tau))])

Its warm-up mixes the gradients (Q_t = the mean, P_t = I: :func:`topology.data_parallel`), as
DDP's ``post_localSGD_hook`` does, so the workers' optimizer states stay equal; after it, it
averages the parameters at t = warmup + tau - 1 + j tau (``local_sgd`` averages when its own
counter u satisfies (u + 1) % tau == 0).  ``phases([(warmup, local_sgd(W, 1)), ...])`` instead
averages the *parameters* every step of the warm-up: the same for plain SGD from equal models,
not for an optimizer with state (momentum, Adam).  Phases chain the gradient matrices Q_t exactly
as they chain the P_t (each phase's own counter, cut to its steps).

Correspondence with ``torch.distributed.algorithms.model_averaging`` (a training loop calling
``averager.average_parameters`` once per iteration, after ``optimizer.step()``; the averager's
``step`` counter is 0 at the first call and grows by one per call, so at our iteration t it reads
s = t unless set otherwise):

* ``PeriodicModelAverager(period, warmup_steps)`` averages when s >= warmup_steps and
  (s - warmup_steps) % period == 0.  ``local_sgd(W, tau)`` (averaging at (t + 1) % tau == 0) is
  ``PeriodicModelAverager(tau, warmup_steps=tau - 1)``; with the default ``warmup_steps=0`` it
  averages at s = 0, tau, 2 tau, ..., i.e. its counter is one behind ours (setting
  ``averager.step = 1`` before the loop also gives s = t + 1 and the same steps).
* ``phases([(w, local_sgd(W, 1)), (None, local_sgd(W, tau))])`` is: average the parameters at
  every s < w, and ``PeriodicModelAverager(tau, warmup_steps=w + tau - 1)``.  PyTorch's documented recipe,
  ``PostLocalSGDState(start_localSGD_iter=w)`` (gradients all-reduced while s < w) with
  ``PeriodicModelAverager(tau, warmup_steps=w)`` (models averaged at s = w, w + tau, ...), is
  ``phases([(w, data_parallel(W)), (1, local_sgd(W, 1)), (None, local_sgd(W, tau))])``: the
  gradients averaged at t < w, the parameters at w, w + tau, w + 2 tau, ...; with
  ``warmup_steps=w + tau - 1`` it is ``phases([(w, data_parallel(W)), (None, local_sgd(W, tau))])``
  (``tests/test_post_local.py`` checks both against DDP + the hook + the averager, bit for bit
  on 2 ranks).
* ``HierarchicalModelAverager(period_group_size_dict)`` averages, when s >= warmup_steps, with
  the group of the largest period dividing s; at s = 0 every period divides, so it averages
  globally after the very first step.  ``decentralized.hierarchical(W, d)`` (largest period
  dividing t + 1) is that averager with its counter started at 1 (``averager.step = 1`` before
  the loop: s = t + 1), groups of consecutive ranks as ``dist.new_subgroups`` makes them.

``tests/test_phases.py`` checks these correspondences against PyTorch's own averagers (their step
counters, in a one-process gloo group).

Example:
    >>> from topology import decentralized as dec
    >>> s = phases([(3, dec.local_sgd(2, 1)), (None, dec.local_sgd(2, 4))])
    >>> [t for t in range(12) if s.next_sync(t) == t]
    [0, 1, 2, 6, 10]
    >>> s.prefix_length, s.period, len(s.distinct_matrices)
    (3, 4, 2)
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from topology.checks import check_integer, check_list
from topology.schedule import Schedule, canonical
from topology.word import concat, renumber


class PhasedSchedule(Schedule):
    """The schedule of :func:`phases`; ``phases`` holds the (steps, schedule) pairs as given
    (steps of the last: None) and ``starts`` the iteration S_i at which phase i begins."""

    def __init__(self, spec):
        self.phases = _check_phases(spec)
        self.starts = []
        start = 0
        for steps, _ in self.phases:
            self.starts.append(start)
            start += steps or 0
        distinct, cycle, prefix = self._chained(lambda s: (s.distinct_matrices, s.prefix, s.cycle), Schedule.head)
        gradients = self._chained(lambda s: (s.distinct_gradient_matrices, s.gradient_prefix, s.gradient_cycle),
                                  Schedule.gradient_head)
        last = self.phases[-1][1]
        super().__init__(distinct, cycle, last.workers, last.push_sum, prefix, gradients)
        self.name = "phases([" + ", ".join(f"({steps}, {schedule!r})" for steps, schedule in self.phases) + "])"

    def _chained(self, parts, head) -> tuple:
        """(distinct, cycle, prefix) of one kind of matrix (``parts(schedule)`` = its distinct
        matrices, prefix and cycle words; ``head(schedule, steps)`` its first indices) over the
        phases: every phase's matrices numbered after the previous phases', each finite phase cut
        to its steps, the last phase's prefix appended and its cycle the cycle."""
        matrices, words, offset = [], [], 0
        for steps, schedule in self.phases:
            distinct, prefix, cycle = parts(schedule)
            numbers = range(offset, offset + len(distinct))
            matrices += distinct
            offset = numbers.stop
            if steps is not None:
                words.append(renumber(head(schedule, steps), numbers))
        return canonical(matrices, renumber(cycle, numbers), concat(*words, renumber(prefix, numbers)))

    def phase(self, t: int) -> tuple[int, int]:
        """(i, u): iteration t is iteration u of phase i (u = t - S_i)."""
        if t < 0:
            raise ValueError(f"t must be a non-negative iteration number; got {t}")
        i = bisect_right(self.starts, t) - 1
        return i, t - self.starts[i]


def _check_phases(spec) -> tuple[tuple[int | None, Schedule], ...]:
    spec = check_list(spec, "phases", "(steps, schedule) pairs")
    if not spec:
        raise ValueError("phases must hold at least one (steps, schedule) pair")
    checked = []
    for i, entry in enumerate(spec):
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 2:
            raise ValueError(f"phases[{i}] must be a pair (steps, schedule); got {entry!r}")
        steps, schedule = entry
        if not isinstance(schedule, Schedule):
            raise ValueError(f"phases[{i}]'s schedule must be a topology.Schedule; got {schedule!r}")
        if i == len(spec) - 1:
            if steps is not None:
                raise ValueError(f"phases[{i}] steps must be None: the last phase runs until the end; got {steps!r}")
        elif steps is None:
            raise ValueError(f"phases[{i}] steps must be an integer >= 1: only the last phase may be "
                             f"open-ended (None)")
        else:
            steps = check_integer(steps, f"phases[{i}] steps", minimum=1)
        first = checked[0][1] if checked else schedule
        for what in ("num_agents", "workers", "push_sum"):
            if getattr(schedule, what) != getattr(first, what):
                raise ValueError(f"phases[{i}] must have the same agents as phases[0]: {what} is "
                                 f"{getattr(schedule, what)!r}, phases[0]'s is {getattr(first, what)!r}")
        checked.append((steps, schedule))
    return tuple(checked)


def phases(spec: Sequence[tuple[int | None, Schedule]]) -> PhasedSchedule:
    """``spec[i] = (steps_i, schedule_i)``: schedule_i for steps_i iterations, its counter from 0;
    the last pair's steps is None (it runs forever).  See the module docstring."""
    return PhasedSchedule(spec)


__all__ = ["PhasedSchedule", "phases"]
