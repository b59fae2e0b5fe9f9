"""The one weighted-sum kernel of every sync, and the scratch buffers it writes into.

Every way of applying a mixing matrix (a block's all-reduce, an overlapped hub block, a gossip
mix, an outer rule's workers' average) reduces, on one rank, to

    acc = sum_k  w_k * x_{i_k}        over the terms (i_k, w_k), in order,

with each product ``w_k * x_{i_k}`` rounded once before it is added (``torch.mul`` into a
buffer, then ``acc.add_``).  Two consequences the tests rely on: a sum of two terms is the same
bits in either order (addition of two rounded products is commutative), so a two-agent block
gives the same result co-located and on two ranks; and the kernel never fuses a multiply-add, so
the result does not depend on the device's FMA.

**Regions.**  A flat buffer may hold the parameters and, under ``pullback``, the inner
optimizer's state slots after them (:class:`agents.flat.FlatBuffer`).  Per-level state policies
mix the two regions with different weights (:mod:`launch.engine.sync.state_weights`), so a term's
weight is a tuple: one weight per region, ``regions = (split,)`` splitting the buffer at
``split``; with one region the tuple has one weight and the buffer is scaled whole.  Scaling a
region is ``torch.mul(src[region], w, out=dst[region])``, the same kernel (and bits) as
``src.mul_(w)`` when ``dst`` is ``src``.

**Memory.**  The products go to a scratch buffer (``tmp``), except for agents in ``spare``:
those whose old value the caller will overwrite anyway, whose product is formed in place.

**Products formed elsewhere.**  A term whose weights are None is a product already (received
from the rank that formed it, :mod:`launch.engine.sync.ordered`): it is added as it is, so the
sum is the same bits as if it had been formed here.
"""

from __future__ import annotations

import torch

#: A term of a weighted sum: (agent index, one weight per region, or None: a product already).
Term = tuple[int, tuple[float, ...] | None]


class Scratch:
    """Named buffers allocated once and reused (reallocated only when asked for another shape,
    dtype or device).  One per compiled program, shared by its steps: they run one at a time."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def like(self, name: str, tensor: torch.Tensor, numel: int | None = None) -> torch.Tensor:
        """The buffer ``name``, of ``tensor``'s shape (or flat, of ``numel`` elements), dtype and
        device (contents undefined)."""
        shape = tensor.shape if numel is None else torch.Size([numel])
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != tensor.dtype or buf.device != tensor.device:
            buf = self._buffers[name] = tensor.new_empty(shape)
        return buf


class WeightedSum:
    """``acc = sum of w_k * x_{i_k}`` (see the module docstring).

    Args:
        split: where the state region begins in a flat buffer, when the two regions are
            weighted separately; None: one region, each term has one weight.
        scratch: where the products of non-spare terms are formed (buffer ``"tmp"``).
    """

    def __init__(self, split: int | None, scratch: Scratch):
        self.split = split
        self.scratch = scratch

    def scale(self, out: torch.Tensor, src: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
        """``out = weights * src`` region by region (``out`` may be ``src``); returns ``out``."""
        if self.split is None:
            return torch.mul(src, weights[0], out=out)
        n = self.split
        torch.mul(src[:n], weights[0], out=out[:n])
        torch.mul(src[n:], weights[1], out=out[n:])
        return out

    def __call__(self, acc: torch.Tensor, terms: list[Term] | tuple[Term, ...], old: dict[int, torch.Tensor], *,
                 in_place: bool = False, spare: frozenset = frozenset(), check=None) -> torch.Tensor:
        """Write the sum into ``acc`` and return it.

        ``in_place``: ``acc`` is ``old[terms[0][0]]`` itself, scaled in place.  ``spare``:
        agents whose ``old`` value may be destroyed (their product is formed in it).  No terms:
        ``acc`` is zeroed.  ``check``: the finiteness check, which forms each product
        (``check.scale(self, out, src, weights, agent)``, :mod:`launch.engine.guard.finiteness`);
        products formed elsewhere (weights None) were checked where they were formed.
        """
        if not terms:
            return acc.zero_()
        (first, weights), rest = terms[0], terms[1:]
        self.product(acc, acc if in_place else old[first], weights, first, check)
        for i, weights in rest:
            out = old[i] if i in spare or weights is None else self.scratch.like("tmp", acc)
            acc.add_(self.product(out, old[i], weights, i, check))
        return acc

    def product(self, out: torch.Tensor, src: torch.Tensor, weights, agent: int, check=None) -> torch.Tensor:
        """``out = weights * src`` (``check.scale`` forms it when a check is given); weights None:
        ``src`` is the product already, copied into ``out`` unless it is ``out``.  Returns ``out``."""
        if weights is None:
            return out if out is src else out.copy_(src)
        return self.scale(out, src, weights) if check is None else check.scale(self, out, src, weights, agent)
