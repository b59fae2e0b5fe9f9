"""What the agents hold, read out: the one place where X c, every agent's and level's weights,
their buffers and the distances between them are computed.

Every reader of the agents goes through here: the command line's metrics and evaluations
(:mod:`launch.engine.record.metrics`, :mod:`launch.engine.record.evaluation`), :meth:`launch.AgentOptimizer.evaluating`,
:meth:`launch.Simulation.gather_state_dicts` and the experiments' diagnostics.

**Targets.**  A target is one vector over the agents, ``c``, and the weights read are
``v = X c`` (:func:`target_code`, :func:`target_weights`):

- agent i (``agent=i``): ``c = e_i`` (under push-sum the agent's model, the de-biased
  z_i = x_i / w_i); ``level=l``: the l-th passive agent of the schedule, which is level l's slow
  weights in the schedules of :mod:`topology` (``multilayer``/``lookahead``: agent l;
  ``multilayer_local_sgd``/``lookahead_local_sgd``: agent W + l - 1; ``with_slow_agent``: agent W);
- the virtual iterate (``virtual=True``): ``c = a``, the schedule's consensus vector
  (``P_t a = a`` for every t, :meth:`topology.Schedule.consensus`), the iterate that follows
  ``theta_{t+1} = theta_t - lr G_t a`` (Wang et al. eq. 8); under push-sum X holds the numerators
  and a = 1/n, so v is their mean, the conserved average (:mod:`topology.decentralized`).

**The arithmetic** (:func:`weighted_sum`): each rank sums ``c_i x_i`` over its own agents in
agent order, each product rounded once (``torch.mul`` then ``add_``: the kernel of a sync), and
one all-reduce (SUM) over every rank completes ``v`` (:func:`combine`).  For one agent's weights
``v = 1.0 * x_i + 0 + ... + 0`` is exactly x_i, bit for bit.

**Distances, one name per meaning.**

- the *distance to the virtual iterate* of agent i: ``||z_i - X a||_2`` (:func:`squared_distances`;
  the ``distance_to_virtual`` column of ``metrics.csv``);
- the *consensus distance* of a set S of agents (default: the workers):
  ``sqrt((1/|S|) sum_{i in S} ||z_i - zbar||^2)``, zbar their mean (:func:`consensus_distance`),
  the decentralized-optimization literature's measure of disagreement.

The functions take an ``engine``: a :class:`launch.engine.core.SyncEngine`, or a door that holds
one and shows its ``t``, ``comm``, ``schedule``, ``agents`` and ``parameter_names`` (both do).
Every function here that reads other ranks' agents is a collective: call it on every rank at the
same point.  Values are identical on every rank.

Example:
    >>> import torch
    >>> from topology import decentralized
    >>> from launch import Simulation
    >>> from experiments.problems import teacher_student
    >>> p = teacher_student(dim=4, hidden=4)
    >>> sim = Simulation(p.model(), p.loss_fn, p.batches, decentralized.ring(4),
    ...                  lambda params: torch.optim.SGD(params, lr=0.05))
    >>> rows = []
    >>> sim.run(3, MetricsHook(rows.append))
    >>> sorted(rows[-1])[:4], rows[-1]["step"]
    (['consensus_distance', 'loss/agent0', 'loss/agent1', 'loss/agent2'], 3)
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from launch.engine.guard.health import collective, gather_objects, stream_objects
from topology.diagnostics import spectral_gap
from topology.schedule import Schedule


# -- targets ------------------------------------------------------------------------------------
def _check_index(value, name: str, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < upper:
        raise ValueError(f"{name} must be an int in 0..{upper - 1}; got {value!r}")
    return int(value)


def target_code(schedule: Schedule, level=None, agent=None, virtual: bool = False) -> int:
    """The target of ``evaluating(level, agent=, virtual=)`` as an integer: the agent's index, or
    m for the virtual iterate (how the own loop's control message names it); ``ValueError`` for a
    bad or ambiguous choice.  Default (nothing given): the outermost level (the last passive
    agent) when the schedule has passive agents, else the virtual iterate."""
    given = [name for name, v in (("level", level), ("agent", agent)) if v is not None]
    if virtual:
        given.append("virtual")
    if len(given) > 1:
        raise ValueError(f"give at most one of level, agent and virtual=True; got {', '.join(given)}")
    m, passive = schedule.num_agents, schedule.passive
    if agent is not None:
        return _check_index(agent, "agent", m)
    if level is not None:
        if not passive:
            raise ValueError(f"level: this schedule ({schedule!r}) has no slow (passive) agents; "
                             f"evaluate agent=i or virtual=True")
        if isinstance(level, bool) or not isinstance(level, numbers.Integral) or not 1 <= level <= len(passive):
            raise ValueError(f"level must be an int in 1..{len(passive)} (level 1 innermost); got {level!r}")
        return passive[int(level) - 1]
    if virtual or not passive:
        if schedule.consensus() is None:
            raise ValueError(f"virtual: this schedule ({schedule!r}) has no unique consensus vector a "
                             f"(P_t a = a), so no virtual iterate; evaluate agent=i")
        return m
    return passive[-1]


def target_weights(schedule: Schedule, code: int) -> dict[int, float]:
    """The vector c of target ``code`` as ``{agent: weight}`` (non-zero weights only)."""
    if code < schedule.num_agents:
        return {code: 1.0}
    return virtual_weights(schedule)


def virtual_weights(schedule: Schedule) -> dict[int, float] | None:
    """The consensus vector a as ``{agent: weight}`` (non-zero weights only), or None when the
    schedule has none."""
    a = schedule.consensus()
    return None if a is None else {i: w for i, w in enumerate(a.tolist()) if w != 0.0}


# -- X c -------------------------------------------------------------------------------------------
@torch.no_grad()
def weighted_sum(tensors: dict[int, torch.Tensor], weights: dict[int, float], out: torch.Tensor) -> torch.Tensor:
    """``out = sum_i w_i x_i`` over the agents of ``tensors`` that have a weight, in agent order,
    each product rounded once (module docstring); ``out`` zero when none has.  Returns ``out``."""
    out.zero_()
    for i in sorted(tensors):
        if i in weights:
            out.add_(torch.mul(tensors[i], weights[i]))
    return out


def models(engine, debias: bool = True) -> dict[int, torch.Tensor]:
    """``{agent: z_i}`` of this rank's agents: each agent's model, de-biased under push-sum
    (:meth:`agents.agent.Agent.debiased`: x_i / w_i, a new tensor; else x_i, a live view); with
    ``debias=False`` the buffers' x_i themselves (live views).  In the flat buffer's layout (its
    zero padding included, :mod:`agents.flat`): what a sync mixes and what
    ``AgentOptimizer.evaluating`` loads; ``agent.flat.pack(z)`` drops the padding."""
    return {i: (agent.debiased() if debias else agent.params) for i, agent in engine.agents.items()}


@torch.no_grad()
def combine(engine, weights: dict[int, float], *, debias: bool) -> torch.Tensor:
    """``X c`` on every rank (a collective when the engine spans several): this rank's
    :func:`weighted_sum` over its own agents (their models z_i with ``debias``, else their x_i),
    then one all-reduce over every rank.  A new tensor."""
    local = models(engine, debias)
    value = weighted_sum(local, weights, torch.empty_like(next(iter(local.values()))))
    comm = engine.comm
    if comm.world_size > 1:
        world = tuple(range(comm.world_size))
        with collective(comm, engine.t, "combination of the agents' weights", world):
            comm.all_reduce_(value, world)
    return value


# -- distances ----------------------------------------------------------------------------------
@torch.no_grad()
def squared_distances(tensors: dict[int, torch.Tensor], theta: torch.Tensor, m: int) -> torch.Tensor:
    """``||z_i - theta||^2`` of the agents of ``tensors`` (float64, length m, zero for the
    others): summed over ranks, every agent's squared distance to ``theta``."""
    squared = torch.zeros(m, dtype=torch.float64, device=theta.device)
    for i, z in tensors.items():
        squared[i] = float(torch.sum((z - theta) ** 2))
    return squared


@torch.no_grad()
def consensus_distance(engine, agents: Iterable[int] | None = None) -> float:
    """The consensus distance of ``agents`` (default: the workers; module docstring); a
    collective on every rank.

    Two gathers of d-vectors per call (the local sum, then the local squared distances), whatever
    the number of agents per rank; co-located nothing moves.
    """
    schedule = engine.schedule
    members = sorted(set(schedule.workers if agents is None else agents))
    if not members or not all(0 <= i < schedule.num_agents for i in members):
        raise ValueError(f"agents must be agent indices in [0, {schedule.num_agents}); got {members}")
    local = {i: z for i, z in models(engine).items() if i in members}
    # Pass 1: zbar from the per-rank sums (summed in rank order: the same bits on every rank).
    total = None
    for part in gather_objects(engine.comm, torch.stack(list(local.values())).sum(0).cpu() if local else None,
                               engine.t, "consensus distance's gather"):
        if part is not None:
            total = part.clone() if total is None else total + part
    mean = total / len(members)
    # Pass 2: the sum of squared distances (no cancellation, unlike E||z||^2 - ||zbar||^2).
    squares = sum(float(((z.cpu() - mean) ** 2).sum()) for z in local.values())
    return (sum(gather_objects(engine.comm, squares, engine.t, "consensus distance's gather")) / len(members)) ** 0.5


def agent_losses(engine, losses: dict) -> dict[int, float]:
    """Every worker's loss of the step, ``{agent: loss}`` from the per-rank ``losses`` (as a
    door's step returns them); a collective on every rank."""
    merged: dict = {}
    for part in gather_objects(engine.comm, {i: float(v) for i, v in losses.items()}, engine.t, "gather of the losses"):
        merged.update(part)
    return dict(sorted(merged.items()))


# -- every agent's weights and buffers ------------------------------------------------------------
@dataclass(frozen=True)
class StateKeys:
    """How a model's ``state_dict`` is laid out: its keys in order, each tied parameter's alias ->
    the name ``named_parameters`` keeps, and whether it has buffers."""

    keys: tuple[str, ...]
    aliases: dict
    has_buffers: bool

    @classmethod
    def of(cls, model: nn.Module) -> "StateKeys":
        first: dict[int, str] = {}
        aliases = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            canonical = first.setdefault(id(p), name)
            if canonical != name:
                aliases[name] = canonical
        return cls(tuple(model.state_dict()), aliases, any(True for _ in model.buffers()))


def gather_parameters(engine) -> list[dict[str, torch.Tensor]]:
    """Every agent's parameters as ``{name: tensor}`` (CPU copies), on every rank, indexed by
    agent (under push-sum the de-biased z_i = x_i / w_i); a collective, streamed rank by rank
    (:func:`launch.engine.guard.health.stream_objects`: no GPU holds world x model)."""
    local = {
        i: [c.view(shape).detach().cpu().clone()
            for c, shape in zip(a.flat.split(a.debiased()), a.flat.shapes)]
        for i, a in engine.agents.items()
    }
    merged: dict[int, list[torch.Tensor]] = {}
    for part in stream_objects(engine.comm, local, engine.t, "gather of the parameters"):
        merged.update(part)
    return [dict(zip(engine.parameter_names, merged[i])) for i in range(engine.schedule.num_agents)]


def gather_state_dicts(engine, keys: StateKeys) -> list[dict[str, torch.Tensor]]:
    """Every agent's full ``state_dict`` in the layout ``keys`` (CPU copies), indexed by agent, on
    every rank (a collective).  Parameters are :func:`gather_parameters`'.  Buffers (BatchNorm's
    running statistics ...) are not mixed by P_t: a worker's are its own module's; a passive
    agent, which has no module, gets those of the lowest-numbered worker."""
    parameters = gather_parameters(engine)
    buffers: dict[int, dict[str, torch.Tensor]] = {}
    if keys.has_buffers:
        local = {i: {n: b.detach().cpu().clone() for n, b in a.module.named_buffers()}
                 for i, a in engine.agents.items() if a.is_worker}
        for part in stream_objects(engine.comm, local, engine.t, "gather of the buffers"):
            buffers.update(part)
    first = min(engine.schedule.workers)
    out = []
    for i, params in enumerate(parameters):
        own = buffers.get(i, buffers.get(first, {}))
        out.append({key: (params[keys.aliases.get(key, key)] if keys.aliases.get(key, key) in params else own[key])
                    for key in keys.keys})
    return out


# -- a metrics log for Simulation.run ----------------------------------------------------------------
class MetricsHook:
    """A ``Simulation.run(steps, callback)`` callback: every ``every`` steps, builds

        {"step": t, "consensus_distance": ..., "loss_mean": ..., "loss/agent{i}": ...,
         "spectral_gap": ..., "spectral_gap_per_step": ...}

    (``step``: iterations done, i.e. ``sim.t`` after the step; ``consensus_distance`` of
    ``agents``, default the workers: :func:`consensus_distance`) and calls ``log(row)`` on every
    rank.  The spectral gaps are the schedule's (:func:`topology.diagnostics.spectral_gap`),
    computed once.  ``extra(sim) -> dict`` adds columns (e.g. held-out losses).
    """

    def __init__(self, log: Callable[[dict], None], every: int = 1, agents: Iterable[int] | None = None,
                 extra: Callable[[object], dict] | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1; got {every!r}")
        self.log, self.every, self.extra = log, every, extra
        self.agents = None if agents is None else tuple(agents)
        self._gaps: dict[int, tuple[float, float]] = {}

    def gaps(self, schedule) -> tuple[float, float]:
        key = id(schedule)
        if key not in self._gaps:
            self._gaps[key] = (spectral_gap(schedule), spectral_gap(schedule, per_step=True))
        return self._gaps[key]

    def __call__(self, sim, losses: dict) -> None:
        if sim.t % self.every:
            return
        per_agent = agent_losses(sim, losses)
        gap, gap_per_step = self.gaps(sim.schedule)
        row = {
            "step": sim.t,
            "consensus_distance": consensus_distance(sim, self.agents),
            "loss_mean": sum(per_agent.values()) / len(per_agent) if per_agent else float("nan"),
            "spectral_gap": gap,
            "spectral_gap_per_step": gap_per_step,
        }
        row.update({f"loss/agent{i}": v for i, v in per_agent.items()})
        if self.extra is not None:
            row.update(self.extra(sim))
        self.log(row)
