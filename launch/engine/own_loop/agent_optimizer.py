"""Bring your own training loop: :class:`AgentOptimizer`, a ``torch.optim.Optimizer`` that makes
any training script a multi-agent Lookahead run.

The user builds the model and the inner optimizer as always and wraps the optimizer; every rank of
the job does so with the same schedule.  Then, on every iteration t of the user's loop::

    loss.backward()          # the user's forward and backward, clipping, AMP, accumulation ...
    opt.step()               # = the inner optimizer's step, then the sync of P_t;  t <- t + 1

on the user's own parameters, in place: they become views into the worker agent's flat buffer
(:class:`agents.agent.Agent` with ``adopt=True``), so the user's model and optimizer objects stay
the ones they built, and LR schedulers, ``GradScaler`` and clipping see the very tensors the agents
mix.  This is the same engine as :class:`launch.Simulation` (:class:`launch.engine.core.SyncEngine`:
the same compiled syncs, state policies, slow rules, overlap and finiteness check); only the
inner steps belong to the user's loop instead of ``loss_fn``.

Where the agents live (:class:`launch.engine.placement.Placement`, the same rules as Simulation):

- **co-located** (``comm=None``): the worker and every slow agent in this process; with
  ``topology.multilayer(ks, alphas)`` this is serial LA-n, step for step the reference
  :class:`agents.reference.MultilayerLookahead` (to rounding: the sync is one weighted sum here,
  a chain of differences there);
- **worker ranks** (:attr:`AgentOptimizer.is_worker`): each holds exactly one worker, and
  perhaps some passive agents; the user's loop runs there unchanged;
- **passive-only ranks**: :meth:`AgentOptimizer.serve` takes part in every sync (and evaluation,
  gather) and returns when every worker has called :meth:`AgentOptimizer.close`; no forward or
  backward runs there.  How they know what comes next: :mod:`launch.engine.own_loop.control`.

**The counter t** counts calls of :meth:`AgentOptimizer.step` that stepped: with gradient
accumulation, call ``step()`` once per accumulation group (t counts optimizer steps, not
micro-batches).  Under ``GradScaler`` a step whose gradients hold an inf or NaN is skipped: it
neither advances t nor syncs, exactly as the inner optimizer does not step.  With several worker
ranks the workers agree on it (``scaler.step(opt)`` calls ``opt.step()`` at every iteration with
its inf check, through GradScaler's protocol for optimizers that handle scaling; the workers
all-reduce their findings, one float, and all skip when any found one), so their counters stay in
step.  An LR scheduler steps the inner optimizer's own ``param_groups``
(``opt.param_groups`` *is* that list).

**Evaluation from the loop** (:meth:`AgentOptimizer.evaluating`): the weights of one agent (a
slow level: ``level=l``; ``agent=i``) or the virtual iterate X a (``virtual=True``) are loaded
into the user's model for the body of a ``with``, and the fast weights and the model's buffers
restored after, bit for bit (also on an exception).  Collective: every rank takes part (passive
ranks through ``serve``); the worker ranks must call it at the same step.  Buffers are not mixed by
P_t: the evaluated weights run with the worker's BatchNorm statistics, or with statistics
recomputed for them over a loader the user passes (``recompute_bn``, as
``torch.optim.swa_utils.update_bn``).  Do not call ``step()`` inside.

Example (co-located Lookahead, k=5, alpha=0.5, around SGD; the user's loop unchanged)::

    >>> import torch, topology
    >>> from launch import AgentOptimizer
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(3, 1)
    >>> inner = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> opt = AgentOptimizer(inner, topology.lookahead(5, 0.5), model=model)
    >>> scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    >>> for _ in range(10):
    ...     x = torch.randn(8, 3)
    ...     opt.zero_grad()
    ...     torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
    ...     _ = opt.step()
    ...     scheduler.step()
    >>> opt.t, inner.param_groups[0]["lr"], model.weight is list(model.parameters())[0]
    (10, 0.025, True)
    >>> with opt.evaluating(level=1):      # the slow weights, in the user's model
    ...     torch.equal(model.weight.detach().flatten(), opt.local_parameters()[1][:3])
    True
    >>> opt.close()
"""

from __future__ import annotations

import atexit
import contextlib
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from agents.agent import Agent, StateLayout
from agents.flat import check_attached, detached_parameters
from agents.reference import init_optimizer_hooks
from launch.comm.base import Communicator
from launch.comm.factory import make_communicator
from launch.comm.local import LocalCommunicator
from launch.engine.core import EngineOptions, SyncEngine
from launch.engine.guard.health import collective, stream_objects
from launch.engine.own_loop.adoption import (
    ADOPTED, adopted_parameters, adoption_problem, optimizer_factory, optimizer_parameters,
)
from launch.engine.own_loop.control import (ABORT, ABORT_REASONS, CLOSE, EVAL, REC, SAVE, STATE, SYNC, Command,
                                            ControlChannel)
from launch.engine.own_loop.colocated_workers import WorkerSwap
from launch.engine.own_loop.record import LoopRecord
from launch.engine.own_loop.environment import detect_launch
from launch.engine.placement import Placement
from launch.engine.readout import combine, target_code, target_weights
from launch.engine.store.checkpoint import Checkpointer, decline_save
from launch.engine.store.run_record import differences, engine_record
from topology.schedule import Schedule

#: ABORT reasons (:data:`launch.engine.own_loop.control.ABORT_REASONS`).
ADD_PARAM_GROUP, GROUP_ADDED, DETACHED = 1, 2, 3


def worker_of_rank(schedule: Schedule, placement: Placement, rank: int) -> int | None:
    """The worker agent on ``rank`` that adopts the user's model (None when it holds only passive
    agents): on ranks, the one worker of each; co-located, the first of the schedule's workers
    (the others: :mod:`launch.engine.own_loop.colocated_workers`).  ``ValueError`` when a rank of
    several holds several workers, or co-located under push-sum (the same error on every rank)."""
    by_rank: dict[int, list[int]] = {}
    for w in schedule.workers:
        by_rank.setdefault(placement.rank_of(w), []).append(w)
    crowded = {r: ws for r, ws in by_rank.items() if len(ws) > 1}
    if crowded and placement.world_size == 1:
        if schedule.push_sum:
            raise ValueError(f"a co-located AgentOptimizer drives several workers in turn (each_worker), but not "
                             f"under push-sum ({len(schedule.workers)} workers): start one process per worker "
                             f"(torchrun --nproc_per_node {len(schedule.workers)}), or use launch.Simulation")
        return schedule.workers[0]   # it adopts the model; the others are driven by each_worker()
    if crowded:
        r, ws = min(crowded.items())
        raise ValueError(
            f"each rank must hold at most one worker (its loop trains one model); with "
            f"agents_per_rank={placement.agents_per_rank} rank {r} holds workers {ws}: choose "
            f"agents_per_rank (and the number of processes) so that no two workers share a rank")
    return by_rank.get(rank, [None])[0]


class AgentOptimizer(torch.optim.Optimizer):
    """The agents of ``schedule`` on this rank, driven by the user's own loop (module docstring).

    Args:
        optimizer: the inner optimizer A, already built on ``model``'s parameters (any
            ``torch.optim.Optimizer``; not a ``ZeroRedundancyOptimizer``).  Every parameter it
            holds is mixed; parameters it does not hold (frozen layers) keep each rank's values.
        schedule: t -> P_t and the workers (:mod:`topology`); the same on every rank.
        model: the module that ``optimizer`` trains (not wrapped in DistributedDataParallel).
            On worker ranks it *is* the worker: its parameters become views into the worker's
            flat buffer; on passive-only ranks it gives the shapes.  Rank 0's values are every
            agent's theta_0 (broadcast at construction, into every rank's model).
        comm: where the agents run (:func:`launch.make_communicator`); default co-located;
            ``"auto"``: the launcher's (torchrun, mpiexec, else co-located:
            :func:`launch.engine.own_loop.environment.detect_launch`), created here and closed when the run
            ends (:meth:`close`, or the end of :meth:`serve`).
        state_policy, agents_per_rank, outer, check_finite, overlap, exact: as in
            :class:`launch.Simulation` (``agents_per_rank`` such that each rank holds at most one
            worker).

    Raises:
        ValueError: on every rank, before any collective other than the one that shares the
            verdicts: a DDP model, a ZeroRedundancyOptimizer, mixed dtypes or devices, a rank
            holding two workers, and every error of :class:`launch.Simulation`'s options.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule, *, model: nn.Module,
                 comm: Communicator | str | None = None, state_policy="maintain", agents_per_rank: int | None = None,
                 outer=None, check_finite: bool = True, overlap: bool | str = "auto", exact: bool = False):
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a topology.Schedule; got {type(schedule).__name__}")
        self._owns_comm = comm == "auto"
        if isinstance(comm, str):
            if comm != "auto":
                raise ValueError(f"comm must be a launch.Communicator, None (co-located) or 'auto'; got {comm!r}")
            comm = make_communicator(detect_launch())
        comm = comm if comm is not None else LocalCommunicator()
        options = EngineOptions(state_policy=state_policy, agents_per_rank=agents_per_rank, outer=outer,
                                check_finite=check_finite, overlap=overlap, exact=exact)
        try:
            self._start(optimizer, schedule, model, comm, options)
        except BaseException:
            if self._owns_comm:      # the same error on every rank: every rank closes what it made
                comm.close()
            raise

    def _start(self, optimizer, schedule, model, comm, options: EngineOptions) -> None:
        """The body of ``__init__`` (see the class docstring), on a resolved communicator."""
        # What only this rank can see (its model and optimizer) is refused before the engine's
        # agreement, which shares every rank's verdict so that all raise alike.
        problem = adoption_problem(model, optimizer)
        container, names = adopted_parameters(model, optimizer) if problem is None else (model, None)
        held: dict[str, int | None] = {}

        def admit(placement: Placement) -> None:
            if problem is not None:
                raise ValueError(problem)
            held["worker"] = worker_of_rank(schedule, placement, comm.rank)

        def make_agent(i: int, layout: StateLayout, policy: str) -> Agent:
            adopt = i == held["worker"]
            driven = not adopt and i in schedule.workers      # co-located: driven by each_worker()
            return Agent(i, container, worker=adopt or driven, optimizer=optimizer if adopt else factory if driven else None,
                         state_policy=policy, layout=layout, push_sum=schedule.push_sum, adopt=adopt)

        self.optimizer, self.model, self.schedule, self.comm = optimizer, model, schedule, comm
        factory = optimizer_factory(optimizer, container) if problem is None else None
        self.engine = SyncEngine(container, schedule, factory, make_agent, comm=comm, options=options,
                                 parameter_names=names, admit=admit)
        self.world = tuple(range(comm.world_size))
        self.control: ControlChannel | None = None
        #: The worker ranks when there are several (they agree on GradScaler's skipped steps), else None.
        self._worker_ranks: tuple[int, ...] | None = None
        if comm.world_size > 1:
            placement = self.engine.placement
            worker_ranks = tuple(sorted({placement.rank_of(w) for w in schedule.workers}))
            device = next(iter(self.engine.agents.values())).flat.buffer.device
            self.control = ControlChannel(comm, worker_ranks, device)
            if len(worker_ranks) > 1:
                comm.init_groups([worker_ranks])        # every rank, in the same order
                self._worker_ranks = worker_ranks
        worker = held["worker"]
        self._worker: Agent | None = self.engine.agents.get(worker) if worker is not None else None
        driven = [a for i, a in sorted(self.engine.agents.items()) if a.is_worker and a is not self._worker]
        #: Co-located with several workers: the swap of the model onto each (None otherwise).
        self._swap = WorkerSwap(model, optimizer, self._worker, driven) if driven else None
        self._pending: dict[int, torch.Tensor] = {}     # each_worker(): the losses of this iteration
        self._layout = (len(optimizer.param_groups), len(optimizer_parameters(optimizer)))
        self._closed = False
        # torch.optim.Optimizer plumbing, without its __init__ (it would build new param_groups).
        init_optimizer_hooks(self)
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True
        self.defaults = dict(optimizer.defaults)
        self._begun = False
        self._record: LoopRecord | None = None
        if self._worker is not None:
            ADOPTED.add(optimizer)              # its parameters are this agent's now (until close)
            self._worker.show_debiased_()       # push-sum: the model holds z = x / w
            if self.control is not None:        # a run whose loop forgets close(): the end, at exit
                atexit.register(self._close_at_exit)

    # -- torch.optim plumbing: param_groups and state are the inner optimizer's ----------------------
    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        """The inner optimizer's own ``param_groups`` list (the same object)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        """The inner optimizer's per-parameter state (the same object)."""
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.schedule!r}, rank {self.comm.rank}/{self.comm.world_size}, "
                f"agents {sorted(self.engine.agents)}, t={self.t},\n  optimizer={self.optimizer!r})")

    # -- where this rank stands -----------------------------------------------------------------------
    @property
    def t(self) -> int:
        """Optimizer steps taken (the sync of iteration t follows the (t+1)-th step)."""
        return self.engine.t

    @property
    def is_worker(self) -> bool:
        """Whether this rank holds a worker: its loop calls :meth:`step`; else :meth:`serve`."""
        return self._worker is not None

    @property
    def num_workers(self) -> int:
        """The schedule's number of workers (a DistributedSampler's ``num_replicas``)."""
        return len(self.schedule.workers)

    @property
    def worker_index(self) -> int | None:
        """This rank's worker's position among the schedule's workers, 0..num_workers-1 (a
        DistributedSampler's ``rank``); None on a passive-only rank."""
        if self._swap is not None and self._swap.current is not None:     # in each_worker()'s body
            return self.schedule.workers.index(self._swap.current.index)
        return None if self._worker is None else self.schedule.workers.index(self._worker.index)

    @property
    def agents(self) -> dict[int, Agent]:
        """This rank's agents, by index."""
        return self.engine.agents

    def local_parameters(self) -> dict[int, torch.Tensor]:
        """Flat parameter vectors of this rank's agents, packed (:meth:`launch.Simulation.local_parameters`;
        under push-sum the worker's holds z = x / w between steps)."""
        return self.engine.local_parameters()

    # -- the loop -----------------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable | None = None, *, loss: torch.Tensor | float | None = None):  # type: ignore[override]
        """The inner optimizer's step, then the sync of P_t; t <- t + 1.  Returns the inner
        step's return value.  ``loss``: this step's training loss, for the finiteness check and
        the record (:meth:`record`); default the closure's return value."""
        worker = self._require_worker("step")
        if self._layout != (len(self.param_groups), len(optimizer_parameters(self.optimizer))):
            self._abort(GROUP_ADDED)
        if self._swap is not None:
            return self._driven_step(closure, loss)
        self._check_attached(worker)
        if closure is not None and worker.push_weight is not None:
            raise ValueError("step(closure) is not supported under push-sum (the closure would see the "
                             "numerator x, not z = x / w): call backward before step()")
        engine = self.engine
        scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is not None and self._skipped(found_inf):
            return None
        worker.restore_numerator_()
        if self._record is not None:
            self._record.before(engine.t + 1)
        returned = self._inner_step(closure, scale, found_inf)
        worker.steps += 1
        loss = returned if loss is None else loss
        losses = {worker.index: torch.as_tensor(loss).detach()} if loss is not None else {}
        self._advance(engine.t, losses)
        worker.show_debiased_()
        return returned

    # GradScaler's protocol for optimizers that handle scaling themselves: it calls step() at every
    # iteration, its inf check's result in ``found_inf`` and, when the gradients are still scaled,
    # the scale in ``grad_scale``.  A step is skipped -- no inner step, t not advanced, no sync --
    # when any worker found an inf or NaN (the workers agree: their counters stay in step), as
    # GradScaler skips a plain optimizer's step; else the gradients are unscaled and the inner step
    # runs.
    _step_supports_amp_scaling = True

    def _skipped(self, found_inf: torch.Tensor) -> bool:
        """Whether GradScaler's step is skipped: an inf or NaN found on this worker, or on any
        worker rank when there are several (one all-reduce among them, then one host read, as
        GradScaler's own decision)."""
        flag = found_inf.detach().to(torch.float32).reshape(1).clone()
        if self._worker_ranks is not None:
            with collective(self.comm, self.t, "the workers' agreement on GradScaler's skip", self._worker_ranks):
                self.comm.all_reduce_(flag, self._worker_ranks)
        return bool(flag.item() > 0)

    def _inner_step(self, closure, scale: torch.Tensor | None, found_inf: torch.Tensor | None):
        """The inner optimizer's step; under GradScaler (``found_inf`` given, no inf found) the
        gradients are unscaled first -- by the inner optimizer when it handles scaling itself
        (fused Adam), else here, multiplied by 1 / scale as GradScaler.unscale_ does."""
        inner = self.optimizer
        if found_inf is None:
            return inner.step() if closure is None else inner.step(closure)
        if getattr(inner, "_step_supports_amp_scaling", False):
            inner.grad_scale, inner.found_inf = scale, found_inf
            try:
                return inner.step()
            finally:
                del inner.grad_scale, inner.found_inf
        if scale is not None:
            inv = scale.double().reciprocal().float()
            grads = [p.grad for group in inner.param_groups for p in group["params"] if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, inv.to(grads[0].device))
        return inner.step()

    def _advance(self, t: int, losses: dict) -> None:
        """The end of iteration t on a worker rank: the control message when the step syncs or is
        logged, the record's metrics, the sync, the record's clock; the next sync's reduces start."""
        engine, record = self.engine, self._record
        logged = record is not None and record.logged(t + 1)
        if self.control is not None and (logged or engine.is_sync(t)):
            self._announce(Command(SYNC, t, int(logged)))
        engine.end_step(losses, (lambda: record.before_sync(t + 1, losses)) if logged else None)
        if record is not None:
            record.after(t + 1)
        self._begun = True
        engine.begin_step()          # overlapped syncs: the next sync's reduces start now

    def each_worker(self) -> Iterator[int]:
        """The iteration's inner steps, worker by worker: yields the position of each of this
        rank's workers among the schedule's (0..num_workers-1: a DistributedSampler's ``rank``),
        the model and the inner optimizer being that worker in the body, which takes its step with
        ``opt.step()``; after the last, the sync of P_t, t <- t + 1.  On ranks (one worker each)
        it yields this rank's worker once and ``step()`` syncs as always, so the same loop runs
        co-located with every worker in turn and under torchrun with one per process::

            for w in opt.each_worker():
                opt.zero_grad(); loss_fn(model, next(shards[w])).backward(); opt.step()

        Co-located with several workers (:mod:`launch.engine.own_loop.colocated_workers`) every
        worker must step once per iteration (else a ``ValueError`` names the one that did not,
        and nothing syncs); ``evaluating``, ``save`` and ``close`` come outside the loop."""
        self._require_worker("each_worker")
        if self._swap is None:
            yield self.worker_index
            return
        t = self.engine.t
        if self._record is not None:
            self._record.before(t + 1)
        self._pending = {}
        for position, w in enumerate(self.schedule.workers):
            agent = self.engine.agents[w]
            self._swap.enter(agent)
            try:
                yield position
            finally:
                self._swap.leave(agent)
            if not any(i == w for i in self._pending):
                raise ValueError(f"worker {position} (agent {w}) did not call step() in each_worker()'s body at "
                                 f"t={t}: every worker steps once per iteration")
        losses = {i: loss for i, loss in self._pending.items() if loss is not None}
        self._pending = {}
        self._advance(t, losses)

    def _driven_step(self, closure, loss):
        """``step()`` with several co-located workers: the inner step of the worker in
        :meth:`each_worker`'s body (the sync follows the last worker's)."""
        agent = self._swap.current
        if agent is None:
            raise ValueError(f"this AgentOptimizer drives {len(self.schedule.workers)} workers in one process: call "
                             f"step() once per worker inside `for w in opt.each_worker():`")
        if closure is not None:
            raise ValueError("step(closure) is not supported with several workers in one process: call backward "
                             "before step()")
        if getattr(self, "found_inf", None) is not None:
            raise ValueError("GradScaler with several workers in one process is not supported (each worker would need "
                             "its own scaler): start one process per worker, or train without it")
        if agent.index in self._pending:
            raise ValueError(f"worker {self.worker_index} called step() twice in one each_worker() body")
        returned = self.optimizer.step() if agent is self._worker else self._swap.step(agent)
        agent.steps += 1
        loss = returned if loss is None else loss
        self._pending[agent.index] = torch.as_tensor(loss).detach() if loss is not None else None
        return returned

    def add_param_group(self, param_group: dict) -> None:
        """Refused (``ValueError`` on every rank): the agents' flat buffers are laid out for the
        parameters the inner optimizer held at construction."""
        self._abort(ADD_PARAM_GROUP)

    def close(self) -> None:
        """The end of the run on a worker rank: the passive ranks' :meth:`serve` returns once every
        worker has closed.  A collective (one control message) when distributed; idempotent."""
        if self._closed:
            return
        if self._worker is None:
            raise RuntimeError("close() is for worker ranks; this rank holds only passive agents: call serve()")
        self._closed = True
        atexit.unregister(self._close_at_exit)
        if self.control is not None:
            self.engine.wait_in_flight()
            self._announce(Command(CLOSE, self.t))
        self._finish()

    def serve(self, callback: Callable[["AgentOptimizer"], None] | None = None,
              checkpointer: Checkpointer | None = None) -> None:
        """On a passive-only rank: take part in every sync, evaluation, gather and checkpoint the
        workers start, until every worker has called :meth:`close`.  ``callback(opt)`` runs after
        each sync (``opt.t`` is then the iteration after it); ``checkpointer``: the one the
        workers :meth:`save` with (without it a worker's save fails on every rank).  Raises what
        the workers' events raise (:class:`launch.engine.guard.health.NonFiniteError`, a refused
        call's ``ValueError``, a :class:`launch.engine.store.checkpoint.CheckpointError`)."""
        if self._worker is not None:
            raise RuntimeError(f"this rank holds worker agent {self._worker.index}: run the training loop "
                               f"and call step(); serve() is for ranks that hold only passive agents")
        if self._closed:
            raise RuntimeError("serve() has already returned: the workers closed the run")
        engine = self.engine
        self._begin()
        while True:
            command = self.control.exchange(None)
            if command.kind == SYNC:
                self._follow(command)
                if callback is not None:
                    callback(self)
            elif command.kind == REC:
                engine.catch_up(command.t)
                self._record.evaluate(command.t)
            elif command.kind == EVAL:
                self._combine(command.arg)
            elif command.kind == STATE:
                self._gather_state()
            elif command.kind == SAVE:
                engine.catch_up(command.t)       # the workers' steps since the last sync
                if checkpointer is None:
                    decline_save(engine, "a worker saved a checkpoint, but this rank's serve() was given no "
                                         "checkpointer: pass the workers' Checkpointer as serve(checkpointer=...)")
                self._save(checkpointer, None)
            elif command.kind == CLOSE:
                engine.catch_up(command.t)
                self._closed = True
                self._finish()
                return

    def _follow(self, command: Command) -> None:
        """A passive rank's part of a worker's step that syncs or is logged (``command.arg``)."""
        record, done = self._record, command.t + 1
        self.engine.follow(command.t, (lambda: record.before_sync(done, {})) if command.arg else None)
        if record is not None:
            record.after(done)
        self.engine.begin_step()

    def _finish(self) -> None:
        """The end of the run on this rank: wait for everything in flight (the control message,
        the reduces prefetched for a sync that will not come); close a communicator made here;
        release the inner optimizer (another AgentOptimizer may wrap it now); complete the record
        (a collective)."""
        ADOPTED.discard(self.optimizer)
        if self._record is not None:
            self._record.close()
        if self.control is not None:
            self.control.wait()
            self.comm.wait_in_flight()
        if self._owns_comm:
            self.comm.close()

    def _begin(self) -> None:
        """Start the first sync's overlapped reduces (nothing without overlap).  Every rank does
        it before its first control message -- a worker rank before announcing its first event, a
        passive rank when ``serve`` starts -- so every rank issues it at the same place in its
        sequence of collectives, after ``load_state_dict`` (from the restored counter)."""
        if not self._begun:
            self._begun = True
            self.engine.begin_step()

    def _announce(self, command: Command) -> Command:
        """A worker rank's control message (after :meth:`_begin`)."""
        self._begin()
        return self.control.exchange(command)

    def _close_at_exit(self) -> None:
        """At interpreter exit, a worker rank whose loop did not call :meth:`close` closes the run
        (so that the passive ranks' ``serve`` returns instead of waiting for the collective
        timeout); errors are reported, not raised."""
        if self._closed:
            return
        import warnings

        warnings.warn(f"rank {self.comm.rank}: the AgentOptimizer was not closed; closing it at exit", stacklevel=1)
        try:
            self.close()
        except Exception as err:  # noqa: BLE001 - at exit: report only
            warnings.warn(f"rank {self.comm.rank}: closing the AgentOptimizer at exit failed: {err}", stacklevel=1)

    def _require_worker(self, what: str) -> Agent:
        if self._closed:
            raise RuntimeError(f"{what}: this AgentOptimizer is closed")
        if self._worker is None:
            raise RuntimeError(f"{what} is for worker ranks; this rank (rank {self.comm.rank}) holds only "
                               f"passive agents {sorted(self.engine.agents)}: call serve()")
        return self._worker

    def _check_attached(self, worker: Agent) -> None:
        """Every parameter of the model still a view into the worker's flat buffer (a check of
        pointers, no transfer); else the run is refused on every rank, this one naming them
        (:func:`agents.flat.check_attached`)."""
        if not detached_parameters(worker.parameters, worker.flat):
            return
        try:
            check_attached(worker.parameters, worker.flat, self.engine.parameter_names)
        except ValueError as detail:
            try:
                self._abort(DETACHED)
            except ValueError:
                raise detail from None

    def _abort(self, reason: int) -> None:
        """Refuse a call: the same ValueError on every rank (through the control message)."""
        if self.control is None or self._closed or self._worker is None:
            raise ValueError(ABORT_REASONS[reason])
        self._announce(Command(ABORT, self.t, reason))

    # -- evaluation ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def evaluating(self, level: int | None = None, *, agent: int | None = None, virtual: bool = False,
                   recompute_bn=None) -> Iterator["AgentOptimizer"]:
        """Load the weights of ``level`` (1 = innermost slow weights; default: the outermost, or
        the virtual iterate when the schedule has no slow agents), of ``agent``, or the virtual
        iterate X a (``virtual=True``) into the model for the body of the ``with``; on exit the
        model gets back its fast weights *and its buffers*, bit for bit (whatever the body did:
        a forward in train mode, a recomputation of BatchNorm's statistics).

        Buffers are not mixed by P_t (each worker keeps its own, as PyTorch's averagers do), so
        inside the body the evaluated weights run with the worker's BatchNorm statistics, unless
        ``recompute_bn`` is given: an iterable of batches (a DataLoader of training data; a
        batch's first element is the input when it is a list or tuple) over which the running
        statistics are recomputed for the loaded weights before the body, as
        ``torch.optim.swa_utils.update_bn`` does (statistics reset, a cumulative average over
        every batch, train mode for those forwards only).

        Example (inside the loop, every epoch)::

            with opt.evaluating(level=1, recompute_bn=train_loader):
                accuracy = evaluate(model, test_loader)
        """
        worker = self._require_worker("evaluating")
        code = target_code(self.schedule, level, agent, virtual)
        if self.control is not None:
            self._announce(Command(EVAL, self.t, code))
        value = self._combine(code)
        self.engine.wait_in_flight()         # overlapped syncs: the worker's buffer may be in flight
        params = worker.params
        with torch.no_grad():
            fast = params.clone()
            buffers = {name: b.clone() for name, b in self.model.named_buffers()}
            params.copy_(value)
        try:
            if recompute_bn is not None:
                torch.optim.swa_utils.update_bn(recompute_bn, self.model, device=params.device)
            yield self
        finally:
            with torch.no_grad():
                params.copy_(fast)
                for name, b in self.model.named_buffers():
                    b.copy_(buffers[name])

    def _combine(self, code: int) -> torch.Tensor:
        """X c for target ``code`` (:func:`launch.engine.readout.combine`); collective when
        distributed."""
        with self._numerators():
            return combine(self.engine, target_weights(self.schedule, code), debias=code < self.schedule.num_agents)

    @contextlib.contextmanager
    def _numerators(self):
        """Under push-sum the worker's buffer holds x (not z) inside."""
        if self._worker is not None:
            self._worker.restore_numerator_()
        try:
            yield
        finally:
            if self._worker is not None:
                self._worker.show_debiased_()

    # -- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:  # type: ignore[override]
        """This rank's state: ``{"t", "agents": {i: Agent.state_dict()}, "replicated", "run"}`` --
        the counter, every local agent's flat buffer (the worker's: the model's parameters), the
        inner optimizer's ``state_dict`` (in the worker's entry), a slow rule's replicated state
        (None without one) and the record of the run (:func:`launch.engine.store.run_record.engine_record`:
        schedule, sizes, dtype, policies, optimizers), which :meth:`load_state_dict` compares.
        Local; :meth:`gather_state_dict` gathers every rank's."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        with self._numerators():
            state = self.engine.state_dict()
        state["replicated"] = self.engine.replicated_state()
        state["run"] = engine_record(self.engine)
        for hook in self._optimizer_state_dict_post_hooks.values():
            state = hook(self, state) or state
        return state

    # -- the record of the run (launch.engine.own_loop.record) -----------------------------------------------
    def record(self, directory, *, evaluate=None, log_every: int | None = None, eval_every: int | None = None,
               progress: bool = False, tensorboard: bool = False, cluster: str | None = None,
               compute_s: float | None = None) -> None:
        """Record the run into ``directory`` as the command line does: ``metrics.csv`` (every
        ``log_every``-th step, default the schedule's period: every agent's loss -- give it as
        ``step(loss=loss)`` -- gradient norm and distance to X a before the sync, the simulated
        time on ``cluster``), ``eval.csv`` (at each :meth:`record_evaluation`, and every
        ``eval_every`` steps when given: ``evaluate(model) -> {metric: value}`` of every agent and
        of X a) and ``summary.json`` at :meth:`close`; ``python -m launch.plot directory`` draws
        it.  Every rank calls it, right after construction (after :meth:`resume`: a resumed run
        keeps the files' rows up to its checkpoint); rank 0 writes.  See
        :mod:`launch.engine.own_loop.record`."""
        if self._record is not None:
            raise ValueError("record() was called already: a run has one record")
        self._record = LoopRecord(self, directory, evaluate=evaluate, log_every=log_every, eval_every=eval_every,
                                  progress=progress, tensorboard=tensorboard, cluster=cluster, compute_s=compute_s)

    def record_evaluation(self) -> None:
        """Evaluate every agent and X a now into the record's ``eval.csv`` (:meth:`record` with
        ``evaluate``).  A collective: every worker rank calls it at the same step."""
        self._require_worker("record_evaluation")
        if self._record is None or self._record.record.evaluator is None:
            raise ValueError("record_evaluation() needs a record with an evaluate function: "
                             "opt.record(directory, evaluate=...) first")
        if self.control is not None:
            self._announce(Command(REC, self.t))
        self.engine.wait_in_flight()
        with self._numerators():
            self._record.evaluate(self.t)

    # -- checkpoints (the engine's one store, launch.engine.store) -----------------------------------------
    def save(self, checkpointer: Checkpointer, extra=None) -> Path:
        """Write a checkpoint of the run at its step t with ``checkpointer`` (a
        :class:`launch.Checkpointer`: checksummed files, an atomic manifest, a record of the run
        that a resume compares): every agent of every rank (the worker's flat buffer is the model's
        parameters; the inner optimizer's state), the model's buffers (BatchNorm's running
        statistics), each process's RNG states (torch, CUDA, numpy, Python) and ``extra``, this
        rank's own state (anything ``torch.save`` takes: the LR scheduler's and GradScaler's
        ``state_dict()``, the epoch and the position in it).  A collective: every worker rank calls
        it at the same step; passive ranks write their part in ``serve(checkpointer=...)``.
        Returns the checkpoint's folder."""
        self._require_worker("save")
        if self.control is not None:
            self._announce(Command(SAVE, self.t))
        return self._save(checkpointer, extra)

    def _save(self, checkpointer: Checkpointer, extra) -> Path:
        self.engine.wait_in_flight()          # overlapped syncs: a buffer may still be written
        if self._record is not None:          # a checkpoint of t implies the record's rows up to t
            self._record.record.flush()
        buffers = ({name: b.detach().cpu().clone() for name, b in self.model.named_buffers()}
                   if self._worker is not None else {})
        driven = self._swap.state() if self._swap is not None else None     # several co-located workers
        with self._numerators():
            return checkpointer.save(self.engine, extra={"buffers": buffers, "extra": extra, "driven": driven})

    def resume(self, checkpointer: Checkpointer, *, required: bool = False):
        """Restore the latest checkpoint of ``checkpointer`` into this fresh AgentOptimizer, on
        every rank, right after construction (before the loop; on passive ranks before
        :meth:`serve`): the counter t, every local agent, the inner optimizer's state, the model's
        buffers and the RNG states.  Returns this rank's ``extra`` as :meth:`save` was given it
        (None when the folder holds no checkpoint: a first run; ``required=True`` makes that a
        ``ValueError``).  The resume proves it continues the same run: another schedule, number of
        agents, model size, dtype, policy or optimizer (class or hyperparameters) is a
        ``ValueError`` on every rank naming each difference, unless the checkpointer allows it
        (``Checkpointer(allow=[...])``; an allowed hyperparameter takes its new value).  Resumed
        on the same layout, the run goes on bit for bit as if it had not stopped (provided the
        loop restores its own position from ``extra``)."""
        if self._begun or self._closed:
            raise ValueError("resume() must come before the first step, evaluation, gather or serve() "
                             "(on every rank, right after construction)")
        with self._numerators():
            t = checkpointer.load(self.engine, required=required)
        if t is None:
            return None
        saved = checkpointer.extra or {}
        if self._worker is not None:
            with torch.no_grad():
                for name, buffer in self.model.named_buffers():
                    if name in saved.get("buffers", {}):
                        buffer.copy_(saved["buffers"][name])
        if self._swap is not None and saved.get("driven") is not None:
            self._swap.load_state(saved["driven"])
        return saved.get("extra")

    def gather_state_dict(self) -> dict:
        """Every agent's state (the format of :meth:`state_dict`, every agent in ``"agents"``), on
        every worker rank: a collective (passive ranks take part through :meth:`serve`).  Save it
        on one rank; every rank of a new run loads it with :meth:`load_state_dict`."""
        self._require_worker("gather_state_dict")
        if self.control is not None:
            self._announce(Command(STATE, self.t))
        return self._gather_state()

    def _gather_state(self) -> dict:
        local = self.state_dict()
        parts = stream_objects(self.comm, local, self.t, "gather of the state") if self.control is not None else [local]
        agents = {i: entry for part in parts for i, entry in part["agents"].items()}
        run: dict = {}
        for part in parts:     # a passive rank's record holds no optimizer: the workers' do
            run.update(part["run"])
        return {"t": max(part["t"] for part in parts), "agents": agents, "replicated": local["replicated"], "run": run}

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        """Restore :meth:`state_dict` or :meth:`gather_state_dict` into this fresh AgentOptimizer
        (no step taken): the counter, this rank's agents (entries of other agents are ignored),
        the inner optimizer's state and a slow rule's.  Local: every rank loads, before its loop
        or :meth:`serve`.  ``ValueError`` when the state was saved by another run (another
        schedule, number of agents, parameters, dtype, policy or optimizer), naming what differs
        (:meth:`launch.Checkpointer.load` resumes with allowed changes)."""
        if self._begun or self._closed:
            raise ValueError("load_state_dict must come before the first step, evaluation, gather or serve() "
                             "(on every rank, right after construction)")
        state = dict(state_dict)
        _check_same_run(state.get("run"), engine_record(self.engine))
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state = hook(self, state) or state
        with self._numerators():
            self.engine.load_state_dict(state)
        if state.get("replicated") is not None:
            self.engine.load_replicated_state(state["replicated"])
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


def _check_same_run(saved: dict | None, current: dict) -> None:
    """``ValueError`` naming every difference between the record a state was saved with and
    this run's (a passive rank, which holds no optimizer, leaves the optimizer to the workers)."""
    if not isinstance(saved, dict):
        raise ValueError("load_state_dict: the state holds no record of its run (its 'run' entry): pass what "
                         "AgentOptimizer.state_dict() or gather_state_dict() returned")
    if "optimizer" not in current:
        saved = {k: v for k, v in saved.items() if not (k == "optimizer" or k.startswith("optimizer."))}
    found = differences(saved, current)
    classes = [key for key, _, _ in found if key in ("optimizer", "outer", "outer.optimizer")]
    found = [d for d in found if not any(d[0].startswith(c + ".") for c in classes)]   # the class explains them
    if found:
        raise ValueError("load_state_dict: the state was saved by another run: " + "; ".join(
            f"{key} is {new!r} here, {old!r} in the state" for key, old, new in found))
