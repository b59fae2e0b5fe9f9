"""Failures a long run must report instead of hiding or hanging: bad numbers and lost ranks.

**Non-finite values.**  :func:`check_finite` runs on every rank before every non-identity sync
(and before every checkpoint): each rank sets, for each of its agents i,

    flags[i]     = 1  if agent i's flat buffer (parameters, and pullback state slots) holds NaN/Inf
    flags[m + i] = 1  if a loss agent i computed since the last check was NaN/Inf

and one all-reduce(MAX) of these 2m numbers over every rank (``Communicator.max_flags_``) gives
every rank the same flags, so every rank raises the same :class:`NonFiniteError` (naming the
agents and the iteration t) before the sync mixes the bad values into other agents, and before a
checkpoint could overwrite the last good one.  The check must be collective: without it, a rank
outside the blocks of the failing agent would carry on into its next collective and find its
peers gone instead of learning why.  Cost per check: one pass over each local buffer, and one
latency-bound collective of 2m floats; identity steps check nothing (between syncs an agent's
values reach nobody, so "at the next sync at the latest" is enough).

**Lost ranks.**  When a peer dies, gloo raises at once (``Connection reset by peer``), NCCL and
gloo raise after the communicator's ``timeout_s`` when a peer is alive but stuck.
:func:`collective` turns that backend error into :class:`RankFailureError` naming this rank, the
iteration, the operation and the rank that seems lost: the one of the collective's ranks that does
not answer a roll call through the rendezvous store within :data:`ROLL_CALL_S` (the candidates
when the store cannot tell, e.g. when it died with rank 0).  A survivor blocked behind another
survivor (a ring all-reduce waits on its neighbour) cannot answer in time and may be named too;
the message says "seems".  Under
MPI, ``mpiexec`` itself kills the other ranks and exits non-zero when one dies.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


#: Seconds the survivors of a failed collective wait for each other's roll call.
ROLL_CALL_S = 3.0


class NonFiniteError(FloatingPointError):
    """NaN or Inf in some agents' parameters (or optimizer state slots) or losses.

    Attributes: ``step`` (the iteration t whose sync or checkpoint found it), ``agents`` (sorted
    agent indices with non-finite values), ``parameters`` and ``losses`` (which of those had
    non-finite parameters / a non-finite loss).
    """

    def __init__(self, step: int, parameters: list[int], losses: list[int], where: str):
        self.step = step
        self.parameters = parameters
        self.losses = losses
        self.agents = sorted(set(parameters) | set(losses))
        parts = []
        if parameters:
            parts.append(f"parameters of agent(s) {parameters}")
        if losses:
            parts.append(f"loss of agent(s) {losses}")
        super().__init__(
            f"non-finite values (NaN or Inf) in the {' and the '.join(parts)}, detected at the "
            f"{where} of iteration t={step}; the run stops here and no checkpoint is written "
            f"(the last one is kept)"
        )


class RankFailureError(RuntimeError):
    """A collective failed: a peer rank died, or got stuck past the collective timeout."""


#: Pending losses of one agent are folded into one number beyond this many (bounded memory when
#: syncs are rare): max |loss| keeps NaN (amax propagates it) and Inf, and cannot overflow.
FOLD_LOSSES = 256


def record_losses(sim, losses: dict[int, torch.Tensor]) -> None:
    """Keep the losses of one iteration for the next :func:`check_finite` (no host sync).

    They live on the simulation (``sim._pending_losses``, created here), so that the Simulation
    itself only calls this hook."""
    pending = sim.__dict__.setdefault("_pending_losses", {})
    for i, loss in losses.items():
        kept = pending.setdefault(i, [])
        kept.append(loss)
        if len(kept) > FOLD_LOSSES:
            kept[:] = [torch.stack(kept).abs().amax()]


@torch.no_grad()
def check_finite(sim, t: int, where: str = "sync") -> None:
    """Raise :class:`NonFiniteError` on every rank if any agent of any rank is not finite.

    Collective: every rank must call it at the same point (every rank runs the same plans).
    (Overlapped syncs check through :class:`launch.overlap.Prefetcher` instead: the same flags,
    gathered on the hub while it computes.)
    """
    flags = local_flags(sim)
    if sim.comm.world_size == 1 and not flags.any():
        return
    if sim.comm.world_size > 1:
        flags = flags.to(next(iter(sim.agents.values())).flat.buffer.device)
        with collective(sim.comm, t, f"finiteness check before the {where}", tuple(range(sim.comm.world_size))):
            sim.comm.max_flags_(flags)
        flags = flags.cpu()
    raise_if_flagged(sim, flags, t, where)


@torch.no_grad()
def local_flags(sim) -> torch.Tensor:
    """This rank's 2m flags (float32, CPU): ``flags[i]`` for agent i's buffer, ``flags[m + i]`` for
    its losses since the last check (which are then forgotten); zero for other ranks' agents.

    One reduction per tensor and one host transfer: NaN and Inf propagate through a sum (any NaN
    gives NaN; +Inf gives +Inf or NaN), so ``isfinite(sum(x))`` is False whenever x holds a
    non-finite entry.  The converse can fail only when finite entries overflow the sum
    (|sum| > the dtype's max); such a flag is confirmed with the exact ``isfinite(x).all()``.
    """
    m = sim.schedule.num_agents
    local = sorted(sim.agents)
    pending = sim.__dict__.get("_pending_losses", {})
    tensors = [sim.agents[i].flat.buffer for i in local]
    tensors += [torch.stack(pending[i]) if pending.get(i) else None for i in local]
    device = tensors[0].device
    sums = torch.stack([x.sum().to(torch.float64) if x is not None else torch.zeros((), dtype=torch.float64, device=device)
                        for x in tensors])
    suspects = (~torch.isfinite(sums)).nonzero().flatten().tolist()
    bad = [k for k in suspects if not torch.isfinite(tensors[k]).all()]
    pending.clear()
    flags = torch.zeros(2 * m, dtype=torch.float32)
    for k in bad:
        flags[local[k % len(local)] + (m if k >= len(local) else 0)] = 1.0
    return flags


def raise_if_flagged(sim, flags: torch.Tensor, t: int, where: str) -> None:
    """:class:`NonFiniteError` naming the flagged agents, if any (``flags`` as :func:`local_flags`,
    combined over every rank)."""
    if flags.any():
        m = sim.schedule.num_agents
        parameters = [i for i in range(m) if flags[i]]
        losses = [i for i in range(m) if flags[m + i]]
        raise NonFiniteError(t, parameters, losses, where)


@contextmanager
def collective(comm, t: int, what: str, ranks: tuple[int, ...]):
    """Run a collective; turn the backend's failure into :class:`RankFailureError`."""
    if comm.world_size == 1:
        yield
        return
    try:
        yield
    except (ValueError, FloatingPointError):
        raise
    except (RuntimeError, OSError) as err:
        others = [r for r in ranks if r != comm.rank]
        present = comm.responsive_ranks(ROLL_CALL_S)
        silent = others if present is None else [r for r in others if r not in present]
        if present is None:
            lost = f"one of ranks {others} seems lost (no roll call: the rendezvous store is unreachable too)"
        elif len(silent) == 1:
            lost = f"rank {silent[0]} seems lost"
        elif silent:
            lost = f"ranks {silent} seem lost"
        else:
            lost = f"a rank among {others} seems lost"
        timeout = getattr(comm, "timeout", None)
        waited = f" (or stuck past the collective timeout of {timeout.total_seconds():g} s)" if timeout else ""
        raise RankFailureError(
            f"rank {comm.rank}: the {what} of iteration t={t} failed on the ranks {list(ranks)}: "
            f"{lost}: killed or crashed{waited}. Resume from the last checkpoint. "
            f"Backend error: {err}"
        ) from err
