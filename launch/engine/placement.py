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
