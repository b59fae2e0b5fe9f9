"""The finiteness check: NaN or Inf stops every rank, with the same error, before it is saved.

What is checked, on each rank, at every non-identity sync: every buffer of a local agent that the
sync reads (its parameters, and under ``pullback`` the state slots: the agent's *contribution*),
and the losses its local workers computed since the previous sync.  (:class:`MarkerCheck` skips
a passive agent whose buffer no in-place write has touched since the last sync, by the tensor's
version counter: what a sync wrote there mixes contributions checked where they came from.
Writes through ``.data`` or NumPy bypass the counter.)  A finding is recorded per
agent with the iteration t of the sync (``first[i]``: parameters, ``first[m + i]``: losses).

**Host synchronisation** (knowledge kept on the device, :class:`MarkerCheck` with ``host``
False, as on CUDA): none at a sync except at a window's decision sync, where one boolean is read
(``bool(known)``), and none per step; the collective check before a checkpoint reads its flags
(one transfer each way).  :func:`flag_non_finite_` and :func:`scale_checked` on CUDA read
nothing.  (:class:`BeforeSyncCheck`, one rank, reads its flags before every sync.)

One object per simulation, chosen once (:func:`make_finiteness_check`):

:class:`MarkerCheck` (several ranks; the default)
    no collective of its own.  Each contribution is checked in the pass that weights it (fused
    in one kernel where that is faster, :func:`scale_checked`), and findings travel with the
    sync's data: a rank that knows of one writes NaN into the first element of every buffer it
    contributes (the *marker*; otherwise it makes that element finite), and reads the first
    element of every buffer it receives; NaN survives any sum, so a NaN marker reaches every
    rank the data reaches.  Syncs are grouped into windows (:mod:`launch.engine.guard.windows`) such
    that by a window's last sync, its *decision sync*, every rank knows of every finding that
    could reach everyone in time; there every rank reads its marker knowledge (the same
    everywhere) and, if it is set, all ranks exchange their records (one collective, on this
    failure path only) and raise the same :class:`~launch.engine.guard.health.NonFiniteError`.  The
    guarantee: a non-finite value found at the sync of iteration s stops every rank at the
    decision sync of s's window (at the next window's when s is too late in its window for the
    marker to reach every rank by its end), or at an earlier checkpoint, whose check is
    collective; the error names the agents found at the earliest sync and that sync.  What it
    costs against a check before the sync: the bad values have been mixed (the syncs up to the
    decision sync run with them), so the pre-sync values are not recoverable; the last good
    checkpoint is.
:class:`BeforeSyncCheck` (one rank; and several ranks whose schedule never lets some rank's
    news reach every rank, where the windows do not exist)
    before every non-identity sync, one pass over each local buffer and, on several ranks, one
    all-reduce (MAX) of 2m flags over every rank (``Communicator.max_flags_``): every rank raises
    the same error before the sync mixes anything.
:class:`UncheckedSyncs`
    ``check_finite=False``: syncs check nothing; checkpoints still do.

Every class checks collectively before a checkpoint (:meth:`FinitenessCheck.check`), so that
the last good checkpoint is never replaced by a non-finite state.

The hooks the sync's steps call (:mod:`launch.engine.sync.blocks`): ``scale`` (a term of a weighted
sum, checked), ``inspect`` (a buffer sent as it is), ``mark`` (before a collective, on the
buffer this rank contributes) and ``read`` (after it, on the buffer received); they do nothing
except in :class:`MarkerCheck`.
"""

from __future__ import annotations

import math

import torch

from launch.comm.base import Communicator
from launch.engine.guard.health import NonFiniteError, collective

#: Pending losses of one agent are folded into one number beyond this many (bounded memory when
#: syncs are rare): max |loss| keeps NaN (amax propagates it) and Inf, and cannot overflow.
FOLD_LOSSES = 256

#: On CPU, a term is scaled and checked in one fused kernel above this size (beyond the caches a
#: pass is memory-bound and the fused kernel costs what the scaling alone does; below it, the
#: scaling then a sum is faster).  On CUDA always.
FUSED_MIN_BYTES = 32 << 20
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fused_check_(tensors: list[torch.Tensor], flag: torch.Tensor, factor: torch.Tensor) -> None:
    """``t *= factor`` for each tensor and ``flag = 1`` when any entry is non-finite, in one pass
    (PyTorch's gradient-unscaling kernel; ``flag`` and ``factor``: one-element float32)."""
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, flag, factor)


def flag_non_finite_(x: torch.Tensor, flag: torch.Tensor) -> bool | None:
    """``flag`` (a one-element float32 tensor) set to 1 when ``x`` holds NaN or Inf; ``x`` is
    only read (on CUDA it is multiplied by 1.0 in place, which changes no bit).

    On CPU: one sum (NaN and Inf propagate through it), confirmed exactly by min and max when it
    is not finite (finite entries whose sum overflows are no finding).  On CUDA: the fused
    kernel, no host synchronisation.  Returns whether it set ``flag`` (None on CUDA: unknown)."""
    if x.device.type == "cuda":
        _fused_check_([x], flag, torch.ones(1, device=x.device))
        return None
    if not math.isfinite(float(x.sum())):
        low, high = torch.aminmax(x)
        if not (math.isfinite(float(low)) and math.isfinite(float(high))):
            flag.fill_(1.0)
            return True
    return False


def scale_checked(kernel, out: torch.Tensor, src: torch.Tensor, weights: tuple[float, ...],
                  flag: torch.Tensor) -> bool | None:
    """``kernel.scale(out, src, weights)`` (see :class:`launch.engine.sync.kernel.WeightedSum`) and
    ``flag`` set to 1 when the product holds NaN or Inf.

    In place (``out is src``), in float32 / float16 / bfloat16, on CUDA or above
    :data:`FUSED_MIN_BYTES`: one fused pass, bit for bit the product of ``torch.mul`` (the weight
    rounded to the dtype's compute type, float32, as ``torch.mul`` rounds it).  Otherwise the
    product, then :func:`flag_non_finite_` on it.  Returns whether it set ``flag`` (None:
    unknown without reading it)."""
    fused = (out is src and out.dtype in FUSED_DTYPES
             and (out.device.type == "cuda" or out.numel() * out.element_size() >= FUSED_MIN_BYTES))
    if not fused:
        kernel.scale(out, src, weights)
        return flag_non_finite_(out, flag)
    n = kernel.split
    regions = [out] if n is None else [out[:n], out[n:]]
    for region, weight in zip(regions, weights):
        _fused_check_([region], flag, torch.full((1,), weight, dtype=torch.float32, device=out.device))
    return None


class SyncHooks:
    """The hooks a sync calls on its finiteness check; here, doing nothing (a program run without
    a check: :data:`NO_CHECK`)."""

    #: Whether the sync's steps check and mark what they send.
    active = False

    def prefetch(self, t: int) -> None:
        """Before the sync of iteration t's overlapped parts are computed (at the start of a step)."""

    def before_sync(self, t: int) -> None:
        """Before the sync of iteration t."""

    def after_sync(self, t: int) -> None:
        """After the sync of iteration t (its program has run)."""

    def scale(self, kernel, out: torch.Tensor, src: torch.Tensor, weights, agent: int) -> torch.Tensor:
        """``out = weights * src``, ``src`` the buffer (or product) of ``agent``."""
        return kernel.scale(out, src, weights)

    def inspect(self, tensor: torch.Tensor, agent: int) -> None:
        """``tensor``, agent ``agent``'s buffer, is sent as it is."""

    def mark(self, tensor: torch.Tensor) -> None:
        """``tensor`` is what this rank contributes to a collective."""

    def read(self, tensor: torch.Tensor) -> None:
        """``tensor`` is what this rank received from a collective."""


#: The hooks of a program run without a finiteness check.
NO_CHECK = SyncHooks()


class FinitenessCheck(SyncHooks):
    """What every check has: the losses kept until the next sync, the local scan of every buffer
    and the collective check before a checkpoint.  Its sync hooks do nothing.

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

    # -- the collective check (checkpoints) -------------------------------------------------------
    @torch.no_grad()
    def check(self, t: int, where: str) -> None:
        """Raise :class:`NonFiniteError` on every rank if any agent of any rank is not finite
        (or, :class:`MarkerCheck`, was found so at a sync).  Collective: every rank calls it at
        the same point."""
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
        suspects = (~torch.isfinite(sums)).cpu().nonzero().flatten().tolist()   # one transfer
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


class BeforeSyncCheck(FinitenessCheck):
    """Before every non-identity sync, :meth:`check` (module docstring): on one rank a local scan,
    on several one all-reduce of the flags."""

    def before_sync(self, t: int) -> None:
        self.check(t, "sync")


class UncheckedSyncs(FinitenessCheck):
    """``check_finite=False``: nothing is recorded or checked at syncs; :meth:`check` (before a
    checkpoint) still runs."""

    def record(self, losses) -> None:
        pass


class MarkerCheck(FinitenessCheck):
    """The check carried by the sync's own collectives (module docstring).

    Args:
        agents, num_agents, comm: as :class:`FinitenessCheck`.
        windows: the schedule's :class:`launch.engine.guard.windows.Windows` on this placement.
        host: keep the knowledge in Python (reading one element of a buffer costs nothing on
            CPU), or in tensors on the agents' device (no host synchronisation except at
            decision syncs: CUDA); default: by the device.

    State: ``found`` (2m flags of the current sync, on the device), ``first`` (2m records: the
    iteration of each agent's first finding, inf if none), ``known`` (this window's marker
    knowledge) and ``deferred`` (findings kept for the next window).
    """

    active = True

    def __init__(self, agents: dict, num_agents: int, comm: Communicator, windows, host: bool | None = None):
        super().__init__(agents, num_agents, comm)
        self.windows = windows
        device = self._device()
        self.host = device.type != "cuda" if host is None else host
        self.found = torch.zeros(2 * num_agents, dtype=torch.float32, device=device)
        self.first = torch.full((2 * num_agents,), math.inf, dtype=torch.float64, device=device)
        self.known = self.deferred = False
        if not self.host:
            self.known = torch.zeros((), dtype=torch.bool, device=device)
            self.deferred = torch.zeros((), dtype=torch.bool, device=device)
        self._admissible = False
        self._seen: set[int] = set()
        #: Host mode: whether ``found`` holds a flag (so the finite case reads no tensor).
        self._any = False
        #: Passive agents: their buffer's version (in-place write counter) after the last sync
        #: that read them; ``_read``: the local agents this sync reads.
        self._clean: dict[int, int] = {}
        self._read: set[int] = set()

    # -- around a sync ---------------------------------------------------------------------------
    def prefetch(self, t: int) -> None:
        self._admissible = self.windows.at(t, self.comm.rank)[0]

    def before_sync(self, t: int) -> None:
        self._entry = self.windows.at(t, self.comm.rank)
        self._admissible = self._entry[1]
        m = self.m
        for i, losses in self.pending.items():
            worst = torch.stack(losses).abs().amax() if len(losses) > 1 else losses[0].abs()
            if not self.host:
                self.found[m + i] += (~torch.isfinite(worst)).to(torch.float32)
            elif not math.isfinite(float(worst)):
                self.found[m + i] = 1.0
                self._any = True
        self.pending.clear()

    def after_sync(self, t: int) -> None:
        for i in self._read:                 # read by this sync: its value now is the sync's result
            if not self.agents[i].is_worker:
                self._clean[i] = self.agents[i].flat.buffer._version
        self._read.clear()
        found = self._fold()
        if not self.host or found:
            # first[k] = t where found[k] and first[k] is still inf: t goes to the kernel as a
            # scalar argument (no tensor made from a Python number, no host-to-device copy).
            self.first.masked_fill_((self.found > 0) & torch.isinf(self.first), float(t))
            self.found.zero_()
            self._any = False
        self._seen.clear()
        if not self._entry[2]:
            return
        if bool(self.known):                 # the same on every rank: see launch.engine.guard.windows
            self._fail(t, "sync", self.first.clone())
        self.known, self.deferred = self.deferred, (False if self.host else torch.zeros_like(self.deferred))

    def _fold(self):
        """This rank's findings so far join the window's knowledge (admissible) or the next
        one's; returns whether there are any (a bool, or a tensor on the device)."""
        found = self._any if self.host else self.found.amax() > 0
        if self._admissible:
            self.known = self.known or found if self.host else self.known | found
        else:
            self.deferred = self.deferred or found if self.host else self.deferred | found
        return found

    # -- the hooks of the sync's steps -------------------------------------------------------------
    def _skips(self, agent: int) -> bool:
        """Nothing to check: another rank's agent, one checked already at this sync, or a
        passive agent whose buffer no in-place write has touched since the last sync (whose
        result is as finite as the contributions it mixed, each checked where it came from)."""
        if agent not in self.agents:
            return True
        self._read.add(agent)
        return agent in self._seen or self._clean.get(agent) == self.agents[agent].flat.buffer._version

    def scale(self, kernel, out, src, weights, agent: int) -> torch.Tensor:
        if self._skips(agent):
            return kernel.scale(out, src, weights)
        self._seen.add(agent)
        flag = self.found[agent:agent + 1]
        self._note(scale_checked(kernel, out, src, weights, flag), flag)
        return out

    def inspect(self, tensor: torch.Tensor, agent: int) -> None:
        if not self._skips(agent):
            self._seen.add(agent)
            flag = self.found[agent:agent + 1]
            self._note(flag_non_finite_(tensor, flag), flag)

    def _note(self, set_flag: bool | None, flag: torch.Tensor) -> None:
        """Host mode: remember whether anything was found (reading ``flag`` when unknown)."""
        if self.host and not self._any:
            self._any = set_flag if set_flag is not None else float(flag) > 0

    def mark(self, tensor: torch.Tensor) -> None:
        """The marker: NaN when this rank knows of a finding, else made finite (a non-finite
        first element that this rank may not announce yet becomes 0)."""
        self._fold()
        marker = tensor[:1]
        if not self.host:
            marker.copy_(torch.where(self.known, torch.full_like(marker, math.nan), marker.nan_to_num(0.0, 0.0, 0.0)))
        elif self.known:
            marker.fill_(math.nan)
        elif not math.isfinite(float(marker)):
            marker.fill_(0.0)

    def read(self, tensor: torch.Tensor) -> None:
        if not self.host:
            self.known |= torch.isnan(tensor[0])
        elif not self.known and math.isnan(float(tensor[0])):
            self.known = True

    # -- the failure path and checkpoints ----------------------------------------------------------
    @torch.no_grad()
    def check(self, t: int, where: str) -> None:
        """The collective check before a checkpoint: this rank's records, its current findings
        and a scan of its buffers and pending losses (found "at t"), combined over every rank."""
        scan = self.local_flags().to(self.first.device)
        found_now = torch.full_like(self.first, math.inf).masked_fill_((scan > 0) | (self.found > 0), float(t))
        records = torch.minimum(self.first, found_now)
        self._fail(t, where, records, only_if_found=True)

    def _fail(self, t: int, where: str, records: torch.Tensor, only_if_found: bool = False) -> None:
        """Combine every rank's ``records`` (one all-reduce) and raise the error they name."""
        negated = -records
        with collective(self.comm, t, f"finiteness check at the {where}", self.world):
            self.comm.max_flags_(negated)
        records = (-negated).cpu()
        earliest = float(records.min())
        if only_if_found and math.isinf(earliest):
            return
        m = self.m
        step = t if math.isinf(earliest) else int(earliest)
        parameters = [i for i in range(m) if records[i] == earliest]
        losses = [i for i in range(m) if records[m + i] == earliest]
        found_at = "sync" if step < t or (step == t and where == "sync") else where
        raise NonFiniteError(step, parameters, losses, found_at, stopped=(t, where))


def make_finiteness_check(enabled: bool, windows, agents: dict, num_agents: int,
                          comm: Communicator) -> FinitenessCheck:
    """The check of a simulation: off at syncs (``enabled`` False); before the sync on one rank or
    when ``windows`` is None; else carried by the sync's collectives (:class:`MarkerCheck`, its
    knowledge kept by the agents' device)."""
    if not enabled:
        return UncheckedSyncs(agents, num_agents, comm)
    if comm.world_size == 1 or windows is None:
        return BeforeSyncCheck(agents, num_agents, comm)
    return MarkerCheck(agents, num_agents, comm, windows)
