"""The simulation: every agent of a schedule, on whichever ranks a communicator spans.

One iteration t of the model X_{t+1} = (X_t - lr G_t) P_t:

    1. every local worker takes one inner step on its own next batch:  x_i <- x_i - lr * g_i;
    2. the plan of P_t mixes the agents' flat buffers:                 X <- X P_t;
    3. t <- t + 1.

The agents, their syncs, checkpoints' state and the start-up are the engine's core
(:class:`launch.engine.core.SyncEngine`, which a Simulation holds as ``.engine``, as
:class:`launch.AgentOptimizer` does); a Simulation adds its own loop: deep copies of the user's
module for the workers, their data streams, and ``loss_fn(module, batch)``.

Example (co-located, LA-1 on a least-squares problem):

    >>> import torch, topology
    >>> from launch import simulate
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = torch.nn.Linear(3, 1)
    >>> def batches():
    ...     while True:
    ...         x = torch.randn(8, 3)
    ...         yield x, x.sum(1, keepdim=True)
    >>> loss = lambda module, batch: ((module(batch[0]) - batch[1]) ** 2).mean()
    >>> result = simulate(model, loss, batches(), topology.lookahead(5, 0.5),
    ...                   lambda p: torch.optim.SGD(p, lr=0.1), steps=50)
    >>> len(result.parameters), sorted(result.parameters[1])
    (2, ['bias', 'weight'])
    >>> model.load_state_dict(result.state_dicts[1])   # the slow weights, buffers included
    <All keys matched successfully>
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from agents.agent import Agent, LossFn, OptimizerFactory, StateLayout
from agents.flat import check_dtype_device
from launch.comm.base import Communicator
from launch.engine.core import EngineOptions, SyncEngine
from launch.engine.own_loop.adoption import ddp_problem
from launch.engine.readout import StateKeys, gather_parameters, gather_state_dicts
from launch.engine.store.checkpoint import Checkpointer, check_resume_step
from topology.schedule import Schedule

Data = Iterable | Callable[[int], Iterable]


class Simulation:
    """The agents of ``schedule`` that live on this rank, and the loop that drives them.

    Args:
        model: the user's module (never modified: agents work on deep copies).  Every rank passes
            one of the same architecture; rank 0's values become every agent's theta_0.
        loss_fn: ``loss_fn(module, batch) -> scalar tensor``.
        data: the batches of the single worker (an iterable), or ``agent_index -> iterable`` for
            schedules with several workers.
        schedule: t -> P_t and the workers (see :mod:`topology`).
        optimizer: factory ``params -> torch.optim.Optimizer``, the inner optimizer A.
        state_policy: ``maintain`` | ``reset`` | ``pullback`` (see :mod:`agents.state_policy`), or
            for a multilayer schedule one policy per level (``reset_inner``, ``pullback_outer``,
            ..., see :mod:`agents.level_policy`).
        comm: where the agents run; default co-located (:class:`launch.comm.LocalCommunicator`).
        agents_per_rank: default: num_agents / world_size (all agents on one rank co-located).
        dtype, device: convert the agents' copies of the model, and every batch as it is drawn
            (floating tensors to ``dtype``, every tensor to ``device``, inside tuples, lists and
            dicts: :func:`convert_batch`); default: the model and the batches as they are.
        outer: a state-dependent slow update, an :class:`agents.slow_rule.SlowRule`
            (:class:`agents.outer.OuterOptimizer`: outer SGD, SlowMo, DiLoCo;
            :class:`agents.adaptive.AdaptiveAlpha`), run by
            :mod:`launch.engine.sync.slow_rule` in place of the plain mixing; default None.
        check_finite: at every non-identity sync, check that every buffer the sync reads and
            every loss are finite, else raise :class:`launch.engine.guard.health.NonFiniteError` on
            every rank: before the sync on one rank; on several, carried by the sync's own
            collectives, at the last sync of its window (:mod:`launch.engine.guard.finiteness`).
        overlap: run the blocks whose workers all live on one rank (a distributed Lookahead's
            syncs) overlapped with the inner steps: the passive agents' part is reduced to that
            rank while it computes (:mod:`launch.engine.sync.overlap`).  True, False (one all-reduce
            per block), or ``"auto"`` (the default): wherever it applies and its scratch, one
            flat copy, is at most 1 GiB (:func:`launch.engine.sync.compile.compile_sync`).  Not with
            ``outer`` (``"auto"`` then means False).
        exact: add every sum a sync forms in one order fixed by the agents' indices (left to
            right, each product ``w_i x_i`` rounded once), so that a distributed run equals its
            co-located run bit for bit, in any dtype, on any number of ranks
            (:mod:`launch.engine.sync.ordered`; its cost: docs/exactness.md).  Default False: the
            backend's all-reduce, exact only where a sum has two terms.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Data,
        schedule: Schedule,
        optimizer: OptimizerFactory,
        *,
        state_policy="maintain",
        comm: Communicator | None = None,
        agents_per_rank: int | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        outer=None,
        check_finite: bool = True,
        overlap: bool | str = "auto",
        exact: bool = False,
    ):
        _check_arguments(model, loss_fn, data, schedule, optimizer)
        check_dtype_device(dtype, device)
        convert = dtype is not None or device is not None
        if convert:
            model = copy.deepcopy(model).to(device=device, dtype=dtype)
        self.loss_fn = loss_fn
        self._keys = StateKeys.of(model)

        def make_agent(i: int, layout: StateLayout, policy: str) -> Agent:
            worker = i in schedule.workers
            stream = iter(data(i) if callable(data) else data) if worker else None
            if stream is not None and convert:
                stream = ConvertedStream(stream, dtype, device)
            return Agent(i, model, worker=worker, optimizer=optimizer, data=stream, state_policy=policy,
                         layout=layout, push_sum=schedule.push_sum)

        options = EngineOptions(state_policy=state_policy, agents_per_rank=agents_per_rank, outer=outer,
                                check_finite=check_finite, overlap=overlap, exact=exact)
        #: The per-rank engine (:class:`launch.engine.core.SyncEngine`): the agents and their syncs.
        self.engine = SyncEngine(model, schedule, optimizer, make_agent, comm=comm, options=options)

    # -- what the engine holds, read-only ----------------------------------------------------------
    t = property(lambda self: self.engine.t, doc="Iterations done.")
    agents = property(lambda self: self.engine.agents, doc="This rank's agents, by index.")
    schedule = property(lambda self: self.engine.schedule, doc="The schedule t -> P_t.")
    comm = property(lambda self: self.engine.comm, doc="Where the agents run.")
    rank = property(lambda self: self.engine.rank, doc="This process's rank.")
    placement = property(lambda self: self.engine.placement, doc="Which rank holds which agent.")
    parameter_names = property(lambda self: self.engine.parameter_names, doc="The parameters' names, in order.")

    # -- the loop --------------------------------------------------------------------------------------
    def step(self, before_sync: Callable[[dict], None] | None = None) -> dict[int, torch.Tensor]:
        """Iteration t: inner steps of the local workers, then the sync of P_t;
        ``before_sync(losses)`` between them (a reader of the agents before they are mixed).

        Returns the losses of the local workers (evaluated before their update), by agent.
        """
        engine = self.engine
        engine.begin_step()
        losses = {i: agent.inner_step(self.loss_fn) for i, agent in engine.agents.items() if agent.is_worker}
        engine.end_step(losses, None if before_sync is None else (lambda: before_sync(losses)))
        return losses

    def run(self, steps: int, callback: Callable[["Simulation", dict], None] | None = None) -> None:
        """``steps`` iterations; ``callback(sim, losses)`` after each."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer; got {steps!r}")
        for _ in range(steps):
            losses = self.step()
            if callback is not None:
                callback(self, losses)

    def wait_in_flight(self) -> None:
        """:meth:`launch.engine.core.SyncEngine.wait_in_flight`: before code outside the loop
        writes an agent's buffer."""
        self.engine.wait_in_flight()

    # -- reading and saving the agents ---------------------------------------------------------------
    def local_parameters(self) -> dict[int, torch.Tensor]:
        """Flat parameter vectors of this rank's agents (live views)."""
        return self.engine.local_parameters()

    def gather_parameters(self) -> list[dict[str, torch.Tensor]]:
        """Every agent's parameters as ``{name: tensor}`` (CPU copies), on every rank (under
        push-sum the de-biased z_i = x_i / w_i): :func:`launch.engine.readout.gather_parameters`."""
        return gather_parameters(self.engine)

    def gather_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Every agent's full ``state_dict``, indexed by agent, on every rank (collective).

        The keys are the model's ``state_dict`` keys, in its order, so that
        ``model.load_state_dict(sim.gather_state_dicts()[i])`` works; CPU copies.  Parameters are
        :meth:`gather_parameters`' (de-biased under push-sum).  Buffers (BatchNorm running
        statistics, ``num_batches_tracked``...) are not mixed by P_t: a worker's are its own
        module's; a passive agent, which has no module, gets those of the lowest-numbered worker
        (so Lookahead's slow weights are evaluated with the fast worker's statistics, as the serial
        optimizer does: it has one module).
        """
        return gather_state_dicts(self.engine, self._keys)

    def state_dict(self) -> dict:
        """This rank's part of the state (:meth:`launch.engine.core.SyncEngine.state_dict`)."""
        return self.engine.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` into this fresh simulation
        (:meth:`launch.engine.core.SyncEngine.load_state_dict`)."""
        self.engine.load_state_dict(state)


@dataclass
class SimulationResult:
    """What :func:`simulate` returns, on every rank.

    ``parameters``: every agent's final parameters (``{name: tensor}``, indexed by agent);
    ``losses``: the final losses of this rank's workers; ``simulation``: the simulation itself;
    ``state_dicts``: every agent's full ``state_dict``, buffers included
    (:meth:`Simulation.gather_state_dicts`: a passive agent carries the lowest-numbered
    worker's buffers), so ``model.load_state_dict(result.state_dicts[i])`` evaluates agent i.
    """

    parameters: list[dict[str, torch.Tensor]]
    losses: dict[int, float]
    simulation: Simulation
    state_dicts: list[dict[str, torch.Tensor]]


def simulate(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    schedule: Schedule,
    optimizer: OptimizerFactory,
    steps: int,
    **options,
) -> SimulationResult:
    """Run ``steps`` iterations of ``schedule`` and return every agent's parameters.

    The same call runs co-located (the default), under torchrun (``comm=TorchCommunicator()``)
    or under mpiexec (``comm=MPICommunicator()``); see :class:`Simulation` for the arguments.
    ``checkpoint=launch.engine.store.checkpoint.Checkpointer(...)``: resume from its latest checkpoint if any,
    run until t == ``steps`` (a total), saving every ``every`` iterations and at the end; a
    checkpoint already past ``steps`` is a ``ValueError`` naming both (on every rank alike).
    ``dtype`` / ``device``: the agents' models and every batch are converted (see
    :class:`Simulation`).
    """
    callback = options.pop("callback", None)
    checkpoint = options.pop("checkpoint", None)
    sim = Simulation(model, loss_fn, data, schedule, optimizer, **options)
    last: dict[int, float] = {}

    def record(s, losses):
        last.update(losses)
        if callback is not None:
            callback(s, losses)

    if checkpoint is None:
        sim.run(steps, record)
    else:
        resumed = checkpoint.load(sim)  # the same t on every rank (load agrees on it)
        check_resume_step(resumed, steps, checkpoint.directory)
        run_with_checkpoints(sim, steps, checkpoint, record)
    state_dicts = sim.gather_state_dicts()
    parameters = [{name: state[name] for name in sim.parameter_names} for state in state_dicts]
    return SimulationResult(parameters, {i: float(v) for i, v in last.items()}, sim, state_dicts)


def run_with_checkpoints(sim, steps: int, checkpointer: Checkpointer,
                         callback: Callable | None = None) -> None:
    """Step ``sim`` until t == ``steps`` (a total, so a resumed run does the rest), saving with
    ``checkpointer.maybe_save`` after each iteration and once more at the end (unless just saved)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer; got {steps!r}")
    saved = False
    while sim.t < steps:
        losses = sim.step()
        if callback is not None:
            callback(sim, losses)
        saved = checkpointer.maybe_save(sim)
    if not saved:  # decided from t and every alone: the same on every rank (save is collective)
        checkpointer.save(sim)


def convert_batch(batch, dtype: torch.dtype | None, device):
    """``batch`` with its floating tensors in ``dtype`` and every tensor on ``device`` (None: left
    as it is), recursively inside tuples, lists and dicts; anything else unchanged.  CPU tensors
    go to a GPU without making the host wait (:func:`_converted`).

    Example:
        >>> x, y = convert_batch((torch.zeros(2), torch.ones(2, dtype=torch.long)), torch.float64, None)
        >>> x.dtype, y.dtype
        (torch.float64, torch.int64)
    """
    if isinstance(batch, torch.Tensor):
        return _converted(batch, dtype if batch.is_floating_point() else None, device)
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(convert_batch(b, dtype, device) for b in batch)
    if isinstance(batch, tuple):  # a named tuple
        return type(batch)(*(convert_batch(b, dtype, device) for b in batch))
    if isinstance(batch, dict):
        return {k: convert_batch(v, dtype, device) for k, v in batch.items()}
    return batch


def _converted(tensor: torch.Tensor, dtype: torch.dtype | None, device) -> torch.Tensor:
    """``tensor`` in ``dtype`` on ``device``.  From the CPU to a GPU the copy is asynchronous: the
    tensor is copied into page-locked memory first (unless it is there already), from which
    ``non_blocking=True`` makes the copy a transfer queued on the current stream -- from pageable
    memory the host would wait for the GPU to finish its queued work at every batch.  The
    page-locked copy is the caching host allocator's, kept alive until the transfer has run; a dtype
    conversion runs on the GPU after it (a cast on the host would give a pageable tensor again)."""
    target = None if device is None else torch.device(device)
    if target is not None and target.type == "cuda" and tensor.device.type == "cpu":
        pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
        moved = pinned.to(device=target, non_blocking=True)        # the transfer, then the cast there
        return moved if dtype is None else moved.to(dtype=dtype)
    return tensor.to(device=device, dtype=dtype)


class ConvertedStream:
    """A worker's stream whose batches go through :func:`convert_batch`.  A stream with
    ``state_dict()`` / ``load_state_dict()`` keeps them (checkpoints restore its position)."""

    def __init__(self, stream, dtype: torch.dtype | None, device):
        self.stream, self.dtype, self.device = stream, dtype, device
        for name in ("state_dict", "load_state_dict"):
            if hasattr(stream, name):
                setattr(self, name, getattr(stream, name))

    def __iter__(self):
        return self

    def __next__(self):
        return convert_batch(next(self.stream), self.dtype, self.device)


def _check_arguments(model, loss_fn, data, schedule, optimizer) -> None:
    """The arguments that :class:`Simulation` validates before anything else (no communication)."""
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a topology.Schedule; got {type(schedule).__name__}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    problem = ddp_problem(model)
    if problem is not None:
        raise ValueError(problem)
    if not callable(optimizer):
        raise ValueError("optimizer must be a factory: params -> torch.optim.Optimizer")
    if not callable(loss_fn):
        raise ValueError("loss_fn must be callable as loss_fn(module, batch)")
    if len(schedule.workers) > 1 and not callable(data):
        raise ValueError(
            f"data must be a function agent_index -> iterable when the schedule has "
            f"{len(schedule.workers)} workers; got a single {type(data).__name__}"
        )
    if not callable(data) and not (hasattr(data, "__iter__") or hasattr(data, "__getitem__")):
        raise ValueError(f"data must be an iterable of batches (or agent_index -> iterable); "
                         f"got {type(data).__name__}")
