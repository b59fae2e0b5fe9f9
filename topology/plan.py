"""Compilation of one mixing matrix P into a plan of collectives (the README's "Design": from P_t to collectives).

The new value of agent j is column j of P applied to the old values: x_j' = sum_i P[i, j] x_i.
The columns of P fall into three kinds:

* identity columns (P[:, j] = e_j): agent j keeps its value; nothing happens.
* *blocks*: a set S of two or more columns that are all equal to one vector a (P restricted to
  S is a 1^T).  Every agent in S gets the same value sum_i a_i x_i, so the block is a single
  weighted all-reduce: each member scales its buffer by a_i and all-reduce(SUM) runs on the
  process group of the members, members = S union support(a).  A member outside S contributes
  a_i x_i and keeps its own value.
* *mixes*: every other column j, a weighted sum of a few neighbours (gossip), executed as a
  neighbour exchange and a local weighted sum.

Inputs are always the old values X_t, so an agent whose old value feeds an operation other than
the one that overwrites it is listed in :attr:`Plan.snapshot` and must be copied first.
Plans are rank-agnostic: where the members live is the launcher's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Block:
    """Agents ``receivers`` all get sum_i weights[i] * x_{members[i]}."""

    members: tuple[int, ...]
    weights: tuple[float, ...]
    receivers: tuple[int, ...]


@dataclass(frozen=True)
class Mix:
    """Agent ``receiver`` gets sum_i weights[i] * x_{sources[i]}."""

    receiver: int
    sources: tuple[int, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class Plan:
    """The operations that apply one matrix P.

    ``blocks`` each cost one all-reduce when their members span more than one rank; ``mixes`` cost
    one point-to-point message per (source, receiver) pair on different ranks.  ``touched`` are
    the agents whose value changes (non-identity columns), in increasing order.
    """

    num_agents: int
    blocks: tuple[Block, ...] = ()
    mixes: tuple[Mix, ...] = ()
    snapshot: tuple[int, ...] = field(default=())

    @property
    def is_identity(self) -> bool:
        return not self.blocks and not self.mixes

    @property
    def touched(self) -> tuple[int, ...]:
        agents = [r for b in self.blocks for r in b.receivers] + [m.receiver for m in self.mixes]
        return tuple(sorted(agents))

    @property
    def num_all_reduces(self) -> int:
        """The number of blocks, i.e. of weighted all-reduces when every member has its own rank."""
        return len(self.blocks)

    def apply(self, columns: torch.Tensor) -> torch.Tensor:
        """Run the plan on a d x m matrix of columns (reference semantics, used in tests)."""
        out = columns.clone()
        for block in self.blocks:
            value = sum(w * columns[:, i] for i, w in zip(block.members, block.weights))
            for r in block.receivers:
                out[:, r] = value
        for mix in self.mixes:
            out[:, mix.receiver] = sum(w * columns[:, i] for i, w in zip(mix.sources, mix.weights))
        return out


def compile_plan(matrix: torch.Tensor) -> Plan:
    """Compile a validated m x m column-stochastic matrix into a :class:`Plan`.

    Columns are grouped by exact (bitwise) equality; groups of two or more become blocks, the
    others mixes.  Members, receivers and sources are listed in increasing agent order, which
    fixes the order of every local sum.
    """
    m = matrix.shape[0]
    eye = torch.eye(m, dtype=matrix.dtype)
    groups: dict[bytes, list[int]] = {}
    for j in range(m):
        column = matrix[:, j]
        if torch.equal(column, eye[:, j]):
            continue
        groups.setdefault(column.numpy().tobytes(), []).append(j)

    blocks, mixes = [], []
    for columns in groups.values():
        vector = matrix[:, columns[0]]
        support = [i for i in range(m) if vector[i] != 0]
        if len(columns) >= 2:
            members = sorted(set(support) | set(columns))
            blocks.append(
                Block(tuple(members), tuple(float(vector[i]) for i in members), tuple(columns))
            )
        else:
            mixes.append(Mix(columns[0], tuple(support), tuple(float(vector[i]) for i in support)))
    blocks.sort(key=lambda b: b.receivers)
    mixes.sort(key=lambda x: x.receiver)

    # An agent must be snapshotted when its old value is read by an operation other than the
    # one that writes its new value (it would otherwise be read after being overwritten).
    writer: dict[int, int] = {}
    readers: dict[int, set[int]] = {}
    operations = [(b.members, b.receivers) for b in blocks] + [(x.sources, (x.receiver,)) for x in mixes]
    for op, (inputs, outputs) in enumerate(operations):
        for r in outputs:
            writer[r] = op
        for i in inputs:
            readers.setdefault(i, set()).add(op)
    snapshot = tuple(
        sorted(i for i, ops in readers.items() if i in writer and ops - {writer[i]})
    )
    return Plan(m, tuple(blocks), tuple(mixes), snapshot)
