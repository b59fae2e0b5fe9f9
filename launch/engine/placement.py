"""Placement of agents on ranks: agent i lives on rank i // agents_per_rank."""

from __future__ import annotations

from dataclasses import dataclass

from topology.validation import check_period


@dataclass(frozen=True)
class Placement:
    """``num_agents`` agents in contiguous runs of ``agents_per_rank`` on ``world_size`` ranks.

    Co-located: one rank holds every agent.  torch.distributed / MPI: by default num_agents /
    world_size agents per rank, so the number of agents must be a multiple of the world size
    (e.g. 64 gossiping agents on 4 processes: 16 each).  Mixing between agents of one rank is
    local tensor math; across ranks it is the plan's collectives.
    """

    num_agents: int
    world_size: int
    agents_per_rank: int

    @classmethod
    def make(cls, num_agents: int, world_size: int, agents_per_rank: int | None = None) -> "Placement":
        """Validate and build; ``agents_per_rank=None`` means num_agents / world_size (when the
        world size divides the number of agents).  Raises the same ``ValueError`` on every rank."""
        if agents_per_rank is None:
            if num_agents % world_size:
                divisors = [r for r in range(1, num_agents + 1) if num_agents % r == 0]
                raise ValueError(
                    f"world size {world_size} does not fit the schedule's {num_agents} agents: the "
                    f"number of agents must be a multiple of the number of processes (start one of "
                    f"{', '.join(map(str, divisors))} processes, or set agents_per_rank)"
                )
            agents_per_rank = num_agents // world_size
        agents_per_rank = check_period(agents_per_rank, name="agents_per_rank")
        if world_size * agents_per_rank != num_agents:
            raise ValueError(
                f"world size {world_size} does not fit the schedule's {num_agents} agents with "
                f"agents_per_rank={agents_per_rank}: start {num_agents // agents_per_rank if num_agents % agents_per_rank == 0 else num_agents} "
                f"processes (world size x agents per rank must equal the number of agents)"
            )
        return cls(num_agents, world_size, agents_per_rank)

    def rank_of(self, agent: int) -> int:
        return agent // self.agents_per_rank

    def agents_on(self, rank: int) -> tuple[int, ...]:
        start = rank * self.agents_per_rank
        return tuple(range(start, start + self.agents_per_rank))

    def ranks_of(self, agents) -> tuple[int, ...]:
        """The sorted ranks holding ``agents``."""
        return tuple(sorted({self.rank_of(i) for i in agents}))


@dataclass(frozen=True)
class GroupPlacement:
    """Agents that span ranks: every slot of ``slots`` is a *group* of ``ranks_per_agent`` = G ranks.

    ``slots`` is an ordinary :class:`Placement` of the agents on S = world_size / G slots (agent
    i on slot i // agents_per_group).  Slot s is the group of ranks s G .. s G + G - 1, and rank
    r = s G + i is *lane* i of group s.  Every rank of a group holds every agent of its slot:

    * a worker as one data-parallel shard: lane i reads its own batches (shard i), the G shards'
      gradients are all-reduced over the group at every step (:meth:`group_ranks`), so the G
      shards step alike and stay bitwise equal;
    * a passive agent as one replica per lane ("replicated on the group"); a passive agent on a
      slot of its own (``agents_per_group`` such that no worker shares it) is held by a group of
      G ranks of its own ("on its own ranks"), one replica per lane, all equal.

    **Syncs run lane by lane.**  Lane i, the ranks {s G + i : s < S}, holds one copy of every
    agent: it is the one-agent-per-slot world of ``slots``, so each P_t's plan compiled for
    ``slots`` (slot s standing for rank s) runs on every lane at once, the i-th rank of each group
    with the i-th rank of the others (:meth:`lane_rank`, :meth:`lane_groups`): no gather to one
    rank, and every lane computes the same values (its inputs are equal).  One agent per rank
    is G = 1 (lane 0 is the world).

    The model it runs is the one-agent-per-rank model of :func:`topology.data_parallel.shard_schedule`
    on S G shard agents (co-located, the serial check of this placement).

    Example (4 ranks as 2 agents of 2 ranks; LA-1 over local SGD's workers: 2 workers and a slow
    agent would need agents_per_group):
        >>> p = GroupPlacement.make(2, 4, 2)
        >>> p.group_ranks(1), p.lane_ranks(0), p.agents_on(3), p.ranks_holding(0)
        ((2, 3), (0, 2), (1,), (0, 1))
        >>> p.lane_groups([(0, 1)])
        [(0, 2), (1, 3)]
    """

    slots: Placement
    ranks_per_agent: int

    @classmethod
    def make(cls, num_agents: int, world_size: int, ranks_per_agent: int,
             agents_per_group: int | None = None) -> "GroupPlacement":
        """Validate and build (the same ``ValueError`` on every rank): the world size must be a
        multiple of ``ranks_per_agent``, and the S = world_size / G groups must fit the agents as
        :meth:`Placement.make` fits them on S ranks (``agents_per_group``: its
        ``agents_per_rank``)."""
        size = check_period(ranks_per_agent, name="ranks_per_agent")
        if world_size % size:
            raise ValueError(
                f"world size {world_size} is not a multiple of ranks_per_agent={size}: every agent spans a "
                f"group of {size} ranks, so start a multiple of {size} processes")
        groups = world_size // size
        if agents_per_group is None and num_agents % groups:
            raise ValueError(
                f"{groups} groups of {size} ranks (world size {world_size}, ranks_per_agent={size}) do not fit "
                f"the schedule's {num_agents} agents: the number of agents must be a multiple of the number "
                f"of groups (start ranks_per_agent x a divisor of {num_agents} processes, or set agents_per_group)")
        if agents_per_group is not None:
            agents_per_group = check_period(agents_per_group, name="agents_per_group")
            if groups * agents_per_group != num_agents:
                raise ValueError(
                    f"{groups} groups of {size} ranks (world size {world_size}, ranks_per_agent={size}) do not fit "
                    f"the schedule's {num_agents} agents with agents_per_group={agents_per_group}: groups x agents "
                    f"per group must equal the number of agents")
        return cls(Placement.make(num_agents, groups, agents_per_group), size)

    @property
    def num_groups(self) -> int:
        return self.slots.world_size

    @property
    def world_size(self) -> int:
        return self.num_groups * self.ranks_per_agent

    def group_of(self, rank: int) -> int:
        """The group (slot) of ``rank``."""
        return rank // self.ranks_per_agent

    def lane_of(self, rank: int) -> int:
        """The lane of ``rank``: its position in its group."""
        return rank % self.ranks_per_agent

    def lane_rank(self, slot: int, lane: int) -> int:
        """The rank of ``slot``'s group on ``lane``."""
        return slot * self.ranks_per_agent + lane

    def group_ranks(self, group: int) -> tuple[int, ...]:
        """The ranks of ``group``: those that all-reduce its workers' gradients."""
        return tuple(self.lane_rank(group, lane) for lane in range(self.ranks_per_agent))

    def lane_ranks(self, lane: int) -> tuple[int, ...]:
        """The ranks of ``lane``: one per group, in group order."""
        return tuple(self.lane_rank(slot, lane) for slot in range(self.num_groups))

    def agents_on(self, rank: int) -> tuple[int, ...]:
        """The agents ``rank`` holds (a shard of each worker, a replica of each passive agent)."""
        return self.slots.agents_on(self.group_of(rank))

    def ranks_holding(self, agent: int) -> tuple[int, ...]:
        """Every rank holding a shard or replica of ``agent``: its group."""
        return self.group_ranks(self.slots.rank_of(agent))

    def lane_groups(self, slot_groups) -> list[tuple[int, ...]]:
        """The process groups of every lane for the ``slot_groups`` (groups of slots, as
        ``compile_sync`` returns them for ``slots``): each slot group on lane 0, then on lane 1,
        ...; the same list on every rank, in the order every rank must create them.  The
        gradient groups (:meth:`group_ranks`) are separate."""
        return [tuple(self.lane_rank(slot, lane) for slot in group)
                for lane in range(self.ranks_per_agent) for group in slot_groups]

    def shard_of(self, agent: int, rank: int) -> int:
        """The index of ``rank``'s shard (or replica) of ``agent`` among the shard agents of
        ``topology.data_parallel.shard_schedule``: agent x G + lane (a worker's shard reads the
        data stream of that index: ``data(shard)``)."""
        if agent not in self.agents_on(rank):
            raise ValueError(f"rank {rank} does not hold agent {agent}; it holds {list(self.agents_on(rank))}")
        return agent * self.ranks_per_agent + self.lane_of(rank)
