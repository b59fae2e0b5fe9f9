"""The finiteness check: NaN or Inf stops the run on every rank before it spreads or is saved.

Before every non-identity sync (and before every checkpoint) each rank sets, for each of its
agents i,

    flags[i]     = 1  if agent i's flat buffer (parameters, and pullback state slots) holds NaN/Inf
    flags[m + i] = 1  if a loss agent i computed since the last check was NaN/Inf

and the 2m flags are combined over every rank, so that every rank raises the same
:class:`launch.engine.health.NonFiniteError` (naming the agents and the iteration t) before the
sync mixes the bad values into other agents, and before a checkpoint could overwrite the last good
one.  The check must be collective: without it, a rank outside the blocks of the failing agent
would carry on into its next collective and find its peers gone instead of learning why.
Identity steps check nothing (between syncs an agent's values reach nobody, so "at the next sync
at the latest" is enough).

One object per simulation, chosen once (:func:`make_finiteness_check`):

:class:`FinitenessCheck`
    one all-reduce(MAX) of the 2m flags over every rank (``Communicator.max_flags_``) per check:
    one pass over each local buffer and one latency-bound collective of 2m floats.
:class:`HubDecidedCheck`
    under overlapped syncs with a single hub (:mod:`launch.engine.overlap`): the other ranks hold
    only passive agents, whose flags are final at the start of the step; they are summed into the
    hub with the data's reduce (:meth:`HubDecidedCheck.prefetch`), the hub adds its own at the sync
    and decides alone, then broadcasts the verdict; the others wait for it (they are idle anyway).
    No round trip through every rank on the hub's critical path.
:class:`UncheckedSyncs`
    ``check_finite=False``: syncs check nothing; checkpoints still do.
"""

from __future__ import annotations

import torch

from launch.comm.base import Communicator
from launch.engine.health import NonFiniteError, collective

#: Pending losses of one agent are folded into one number beyond this many (bounded memory when
#: syncs are rare): max |loss| keeps NaN (amax propagates it) and Inf, and cannot overflow.
FOLD_LOSSES = 256


class FinitenessCheck:
    """The collective check of the module docstring.

    Args:
        agents: this rank's agents (index -> :class:`agents.agent.Agent`).
        num_agents: m, over every rank.
        comm: the simulation's communicator.
    """

    def __init__(self, agents: dict, num_agents: int, comm: Communicator):
        self.agents, self.m, self.comm = agents, num_agents, comm
        self.world = tuple(range(comm.world_size))
        #: Losses of each local worker since the last check (tensors: no host sync per step).
        self.pending: dict[int, list[torch.Tensor]] = {}

    def record(self, losses: dict[int, torch.Tensor]) -> None:
        """Keep the losses of one iteration for the next check."""
        for i, loss in losses.items():
            kept = self.pending.setdefault(i, [])
            kept.append(loss)
            if len(kept) > FOLD_LOSSES:
                kept[:] = [torch.stack(kept).abs().amax()]

    def prefetch(self) -> None:
        """Start what the next check can start early (nothing here)."""

    def before_sync(self, t: int) -> None:
        """The check before the sync of iteration t."""
        self.check(t, "sync")

    @torch.no_grad()
    def check(self, t: int, where: str) -> None:
        """Raise :class:`NonFiniteError` on every rank if any agent of any rank is not finite.
        Collective: every rank calls it at the same point."""
        flags = self.local_flags()
        if self.comm.world_size == 1 and not flags.any():
            return
        if self.comm.world_size > 1:
            flags = flags.to(self._device())
            with collective(self.comm, t, f"finiteness check before the {where}", self.world):
                self.comm.max_flags_(flags)
            flags = flags.cpu()
        self.raise_if_flagged(flags, t, where)

    @torch.no_grad()
    def local_flags(self) -> torch.Tensor:
        """This rank's 2m flags (float32, CPU): ``flags[i]`` for agent i's buffer, ``flags[m + i]``
        for its losses since the last check (which are then forgotten); zero for other ranks'
        agents.

        One reduction per tensor and one host transfer: NaN and Inf propagate through a sum (any
        NaN gives NaN; +Inf gives +Inf or NaN), so ``isfinite(sum(x))`` is False whenever x holds
        a non-finite entry.  The converse can fail only when finite entries overflow the sum
        (|sum| > the dtype's max); such a flag is confirmed with the exact ``isfinite(x).all()``.
        """
        local = sorted(self.agents)
        tensors = [self.agents[i].flat.buffer for i in local]
        tensors += [torch.stack(self.pending[i]) if self.pending.get(i) else None for i in local]
        device = tensors[0].device
        sums = torch.stack([x.sum().to(torch.float64) if x is not None
                            else torch.zeros((), dtype=torch.float64, device=device) for x in tensors])
        suspects = (~torch.isfinite(sums)).nonzero().flatten().tolist()
        bad = [k for k in suspects if not torch.isfinite(tensors[k]).all()]
        self.pending.clear()
        flags = torch.zeros(2 * self.m, dtype=torch.float32)
        for k in bad:
            flags[local[k % len(local)] + (self.m if k >= len(local) else 0)] = 1.0
        return flags

    def raise_if_flagged(self, flags: torch.Tensor, t: int, where: str) -> None:
        """:class:`NonFiniteError` naming the flagged agents, if any (``flags`` combined over
        every rank, as :meth:`local_flags`)."""
        if flags.any():
            m = self.m
            raise NonFiniteError(t, [i for i in range(m) if flags[i]], [i for i in range(m) if flags[m + i]], where)

    def _device(self) -> torch.device:
        return next(iter(self.agents.values())).flat.buffer.device


class UncheckedSyncs(FinitenessCheck):
    """``check_finite=False``: nothing is recorded or checked at syncs; :meth:`check` (before a
    checkpoint) still runs."""

    def record(self, losses) -> None:
        pass

    def before_sync(self, t: int) -> None:
        pass


class HubDecidedCheck(FinitenessCheck):
    """The check decided by the hub rank under overlapped syncs (module docstring)."""

    def __init__(self, agents: dict, num_agents: int, comm: Communicator, hub: int):
        super().__init__(agents, num_agents, comm)
        self.hub = hub
        self._flags = self._reduce = None

    def prefetch(self) -> None:
        """Start the reduce of the passive ranks' flags to the hub (first: a tiny reduce, not
        queued behind the data's)."""
        if self._reduce is not None:
            self._reduce.wait()
        if self.comm.rank == self.hub:
            flags = torch.zeros(2 * self.m)                   # the hub's own: at the sync
        else:
            flags = self.local_flags()                        # passive agents only: final
        self._flags = flags.to(self._device())
        self._reduce = self.comm.reduce_async_(self._flags, self.hub, self.world, flags=True)

    def before_sync(self, t: int) -> None:
        if self._reduce is None:    # nothing prefetched (the same on every rank): the collective check
            return super().before_sync(t)
        comm = self.comm
        with collective(comm, t, "finiteness check before the sync", self.world):
            self._reduce.wait()
            if comm.rank == self.hub:
                flags = self.local_flags().to(self._device()) + self._flags
                verdict = comm.broadcast_async_(flags, self.hub, self.world, flags=True)
                if flags.any():
                    verdict.wait()      # deliver the verdict before raising
            else:
                flags = torch.zeros_like(self._flags)
                comm.broadcast_async_(flags, self.hub, self.world, flags=True).wait()
        self._flags = self._reduce = None
        self.raise_if_flagged(flags.cpu(), t, "sync")


def make_finiteness_check(enabled: bool, hub: int | None, agents: dict, num_agents: int,
                          comm: Communicator) -> FinitenessCheck:
    """The check of a simulation: off at syncs (``enabled`` False), decided by the ``hub`` rank
    (overlapped syncs with a single hub), or collective."""
    if not enabled:
        return UncheckedSyncs(agents, num_agents, comm)
    if hub is not None:
        return HubDecidedCheck(agents, num_agents, comm, hub)
    return FinitenessCheck(agents, num_agents, comm)
