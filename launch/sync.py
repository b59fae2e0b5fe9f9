"""Running a :class:`topology.Plan` on one rank's agents through a communicator.

A plan is rank-agnostic; :class:`RankProgram` is its compilation for one rank of a placement:
which local agents contribute to which block, which ranks a block spans (its process group), and
which point-to-point messages the mixes need.  Programs are built once per distinct P_t.

Arithmetic of a block on one rank (receivers R, local members with non-zero weight w_i):

    acc = w_r * x_r  (r: the first local receiver, when it has a weight and no snapshot)
    acc += w_i * x_i  for every other local member i, in increasing agent order
    all-reduce(acc, SUM) over the ranks of the block, when it spans more than one rank
    x_j <- acc        for every other local receiver j

Each product is rounded once before it is added, so a two-agent block gives the same bits
co-located as with one agent per rank (a sum of two terms is commutative).  With one agent per
rank the block is ``x.mul_(w); all_reduce(x)``: one collective, in place, no allocation.

A *hub block* (``hub_of``, see :mod:`launch.overlap`) runs instead as a reduce of the passive
ranks' weighted sums to the hub rank, started before the workers' inner steps
(:meth:`RankProgram.launch_prefetch`), and a broadcast of the hub's result at the sync:

    hub:           acc = sum of w_i * x_i over its members (as above);  acc += S;  broadcast(acc)
    other ranks:   s_q = sum of w_i * x_i over their members (at the prefetch);  S = reduce(s_q)

Memory: a product ``w_i * x_i`` is formed in place in ``x_i`` itself when i is a local receiver of
the block whose old value nothing else reads (not in the snapshot): x_i is overwritten by acc
afterwards anyway.  So a co-located Lookahead block needs no scratch buffer at all; the others
(products of passive members, snapshots, received values, gossip accumulators) use buffers
allocated once per program.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from launch.communicator import Communicator
from launch.placement import Placement
from topology.plan import Plan


@dataclass(frozen=True)
class _BlockStep:
    terms: tuple[tuple[int, float], ...]   # local members with non-zero weight
    receivers: tuple[int, ...]             # local receivers
    ranks: tuple[int, ...]                 # ranks of all members: the process group
    hub: int | None = None                 # a hub block's hub rank (launch.overlap), else None


@dataclass(frozen=True)
class _MixStep:
    receiver: int
    terms: tuple[tuple[int, float], ...]   # all sources, local or received


class RankProgram:
    """What rank ``rank`` does to apply ``plan``."""

    def __init__(self, plan: Plan, placement: Placement, rank: int, hub_of=None):
        """``hub_of(block) -> rank | None``: which blocks run overlapped (:mod:`launch.overlap`);
        default none."""
        self.plan = plan
        self.rank = rank
        local = set(placement.agents_on(rank))
        self.local = local
        self.snapshot = tuple(i for i in plan.snapshot if i in local)
        self.blocks = []
        for block in plan.blocks:
            if not local.intersection(block.members):
                continue
            self.blocks.append(
                _BlockStep(
                    terms=tuple((i, w) for i, w in zip(block.members, block.weights) if i in local and w != 0.0),
                    receivers=tuple(r for r in block.receivers if r in local),
                    ranks=placement.ranks_of(block.members),
                    hub=hub_of(block) if hub_of is not None else None,
                )
            )
        sends, recvs, mixes = set(), set(), []
        for mix in plan.mixes:
            dst = placement.rank_of(mix.receiver)
            for src_agent in mix.sources:
                src = placement.rank_of(src_agent)
                if src == rank and dst != rank:
                    sends.add((src_agent, dst))
                if dst == rank and src != rank:
                    recvs.add((src_agent, src))
            if dst == rank:
                mixes.append(_MixStep(mix.receiver, tuple(zip(mix.sources, mix.weights))))
        self.sends = tuple(sorted(sends))
        self.recvs = tuple(sorted(recvs))
        self.mixes = tuple(mixes)
        self.group_ranks = tuple(b.ranks for b in self.blocks if len(b.ranks) > 1)
        self._scratch: dict[str, torch.Tensor] = {}
        #: Hub blocks' reduces started by launch_prefetch and not yet consumed, by block position.
        self._prefetch: dict[int, object] = {}
        #: The hub's broadcasts still in flight (their source, the receivers' acc, is read-only
        #: until waited for: see launch.overlap.Prefetcher.wait_broadcasts).
        self.broadcasts: list = []

    @property
    def num_collectives(self) -> int:
        """All-reduces this rank enters per run (hub blocks: a reduce and a broadcast instead)."""
        return sum(1 for b in self.blocks if len(b.ranks) > 1 and b.hub is None)

    @property
    def has_hub_blocks(self) -> bool:
        return any(b.hub is not None for b in self.blocks)

    def launch_prefetch(self, tensors: dict[int, torch.Tensor], comm: Communicator) -> None:
        """Start the reduce of every hub block: this rank's weighted sum of its members (zeros on
        the hub, whose members are added at the sync), summed into the hub's scratch S.

        The members' values must not change until the sync: they are the values the sync mixes.
        """
        for position, step in enumerate(self.blocks):
            if step.hub is None:
                continue
            scratch = self._buffer(f"prefetch{position}", next(iter(tensors.values())))
            earlier = self._prefetch.pop(position, None)
            if earlier is not None:         # launched for a sync that never ran: its data is stale
                earlier.wait()
            if self.rank == step.hub:
                scratch.zero_()
            else:
                self._weighted_sum(scratch, step.terms, tensors, in_place=False)
            self._prefetch[position] = comm.reduce_async_(scratch, step.hub, step.ranks)

    def _buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        buf = self._scratch.get(name)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._scratch[name] = torch.empty_like(like)
        return buf

    def run(self, tensors: dict[int, torch.Tensor], comm: Communicator) -> None:
        """Apply the plan to the local agents' flat ``tensors`` (agent index -> tensor), in place."""
        old = dict(tensors)
        for i in self.snapshot:
            snap = self._buffer(f"snapshot{i}", tensors[i])
            snap.copy_(tensors[i])
            old[i] = snap

        if self.sends or self.recvs:
            received = {i: self._buffer(f"recv{i}", next(iter(tensors.values()))) for i, _ in self.recvs}
            comm.exchange(
                [(old[i], dst, i) for i, dst in self.sends],
                [(received[i], src, i) for i, src in self.recvs],
            )
            old.update(received)

        for position, step in enumerate(self.blocks):
            if step.hub is None:
                self._run_block(step, tensors, old, comm)
            else:
                self._run_hub_block(position, step, tensors, old, comm)
        for step in self.mixes:
            acc = self._buffer("acc", tensors[step.receiver])
            self._weighted_sum(acc, step.terms, old, in_place=False)
            tensors[step.receiver].copy_(acc)

    def _local_sum(self, step: _BlockStep, tensors, old) -> torch.Tensor:
        """acc = this rank's part of the block, sum of w_i * x_i over its local members, held in
        the first local receiver (a scratch buffer when there is none)."""
        first = step.receivers[0] if step.receivers else None
        in_place = first is not None and first not in self.snapshot and any(i == first for i, _ in step.terms)
        acc = tensors[first] if first is not None else self._buffer("acc", next(iter(tensors.values())))
        if in_place:
            terms = [t for t in step.terms if t[0] == first] + [t for t in step.terms if t[0] != first]
        else:
            terms = list(step.terms)
        # Receivers other than acc's owner are overwritten by acc below: scale them in place.
        spare = frozenset(r for r in step.receivers[1:] if r not in self.snapshot)
        self._weighted_sum(acc, terms, old, in_place=in_place, spare=spare)
        return acc

    def _run_block(self, step: _BlockStep, tensors, old, comm: Communicator) -> None:
        acc = self._local_sum(step, tensors, old)
        if len(step.ranks) > 1:
            comm.all_reduce_(acc, step.ranks)
        for r in step.receivers[1:]:
            tensors[r].copy_(acc)

    def _run_hub_block(self, position: int, step: _BlockStep, tensors, old, comm: Communicator) -> None:
        prefetched = self._prefetch.pop(position, None)
        if prefetched is None:
            raise RuntimeError("a hub block ran without launch_prefetch (launch.overlap.Prefetcher.ensure)")
        scratch = self._buffer(f"prefetch{position}", next(iter(tensors.values())))
        if self.rank == step.hub:
            # The hub holds every worker of the block, and they are receivers: acc is one of them.
            acc = self._local_sum(step, tensors, old)
            prefetched.wait()
            acc.add_(scratch)                # + S, the other ranks' part, rounded once
            self.broadcasts.append(comm.broadcast_async_(acc, step.hub, step.ranks))
        else:
            prefetched.wait()
            acc = tensors[step.receivers[0]] if step.receivers else scratch
            comm.broadcast_async_(acc, step.hub, step.ranks).wait()
        for r in step.receivers[1:]:
            tensors[r].copy_(acc)

    def _weighted_sum(self, acc: torch.Tensor, terms, old, *, in_place: bool,
                      spare: frozenset = frozenset()) -> None:
        """acc = sum of w * old[i] over ``terms`` in order; ``in_place``: acc is old[terms[0]].

        ``spare``: agents whose old value may be destroyed; their product is formed in place
        (``old[i].mul_(w)`` rounds exactly as ``torch.mul(old[i], w, out=tmp)``: same bits).
        """
        if not terms:
            acc.zero_()
            return
        (i0, w0), rest = terms[0], terms[1:]
        if in_place:
            acc.mul_(w0)
        else:
            torch.mul(old[i0], w0, out=acc)
        for i, w in rest:
            if i in spare:
                product = old[i].mul_(w)
            else:
                product = torch.mul(old[i], w, out=self._buffer("tmp", acc))
            acc.add_(product)
