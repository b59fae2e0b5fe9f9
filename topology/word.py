"""Words: compressed sequences of matrix indices, the map t -> index of a schedule.

A schedule of period T = 10^21 cannot list one index per iteration.  A :class:`Word` stores the
sequence as a small expression instead, built from three forms:

* ``run(i, c)``: the index i, c times in a row;
* ``concat(w_1, ..., w_r)``: the words one after the other;
* ``repeat(w, n)``: the word w, n times in a row.

Words are immutable and may share sub-words (a DAG), so that, e.g., the n-level multilayer
pattern (:func:`chain`) takes O(n) nodes for a period of k_1 ... k_n.  Every operation below costs
time in the number of nodes (and the depth of the expression), never in the length:

* :meth:`Word.at` (the index at position t), :meth:`Word.next_marked` (the first position >= t
  whose index is in a set), :meth:`Word.take` (the first n positions, as a word);
* :func:`reverse` (the word backwards) and :func:`segment` (positions a .. b - 1, as a word);
* :func:`fold`: any function defined on the three forms (the product of the matrices of a
  word, the number of times each index occurs, a renumbering of the indices...), evaluated once
  per node.  :func:`matrix_power` is the power by repeated squaring that products use.

Positions count from 0, as iterations do.

Example:
    >>> w = concat(repeat(concat(run(0, 2), run(1, 1)), 10**20), run(2, 1))   # (0 0 1)^(10^20) 2
    >>> w.length, w.at(5), w.at(3 * 10**20), w.next_marked(6, frozenset({2}))
    (300000000000000000001, 1, 2, 300000000000000000000)
    >>> counts(w)[0]
    200000000000000000000
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import groupby
from typing import Callable, Sequence

import torch


class Word:
    """A finite sequence of matrix indices (see the module docstring); ``length`` positions."""

    length: int

    def at(self, t: int) -> int:
        """The index at position t, 0 <= t < length."""
        raise NotImplementedError

    def first(self, marked: frozenset) -> int | None:
        """The first position whose index is in ``marked``; None if there is none."""
        cache = self.__dict__.setdefault("_first", {})
        if marked not in cache:
            cache[marked] = self._first_marked(marked)
        return cache[marked]

    def next_marked(self, t: int, marked: frozenset) -> int | None:
        """The first position p >= t (0 <= t < length) whose index is in ``marked``; None if none."""
        raise NotImplementedError

    def take(self, n: int) -> Word:
        """The word of the first n positions, 0 <= n <= length."""
        raise NotImplementedError

    def _first_marked(self, marked: frozenset) -> int | None:
        raise NotImplementedError

    def tolist(self) -> list[int]:
        """Every index, in order: O(length), for tests and small words only."""
        return fold(self, lambda i, c: [i] * c, lambda parts: [i for p in parts for i in p],
                    lambda inner, n: inner * n)


class Run(Word):
    """The index ``index``, ``count`` >= 1 times."""

    def __init__(self, index: int, count: int):
        self.index, self.count, self.length = index, count, count

    def at(self, t: int) -> int:
        return self.index

    def _first_marked(self, marked):
        return 0 if self.index in marked else None

    def next_marked(self, t, marked):
        return t if self.index in marked else None

    def take(self, n):
        return run(self.index, n)

    def __repr__(self):
        return f"run({self.index}, {self.count})"


class Concat(Word):
    """``parts`` one after the other (each of length >= 1); no parts: the empty word."""

    def __init__(self, parts: Sequence[Word]):
        self.parts = tuple(parts)
        self.offsets = []  # offsets[i]: the position where parts[i] starts
        length = 0
        for part in self.parts:
            self.offsets.append(length)
            length += part.length
        self.length = length

    def _part(self, t: int) -> int:
        return bisect_right(self.offsets, t) - 1

    def at(self, t):
        i = self._part(t)
        return self.parts[i].at(t - self.offsets[i])

    def _marked_parts(self, marked) -> list[int]:
        """``following[i]``: the first part j >= i holding a marked index (len(parts) if none)."""
        cache = self.__dict__.setdefault("_following", {})
        if marked not in cache:
            following = [len(self.parts)] * (len(self.parts) + 1)
            for i in range(len(self.parts) - 1, -1, -1):
                following[i] = i if self.parts[i].first(marked) is not None else following[i + 1]
            cache[marked] = following
        return cache[marked]

    def _from_part(self, j: int, marked) -> int | None:
        if j == len(self.parts):
            return None
        return self.offsets[j] + self.parts[j].first(marked)

    def _first_marked(self, marked):
        return self._from_part(self._marked_parts(marked)[0], marked)

    def next_marked(self, t, marked):
        i = self._part(t)
        p = self.parts[i].next_marked(t - self.offsets[i], marked)
        if p is not None:
            return self.offsets[i] + p
        return self._from_part(self._marked_parts(marked)[i + 1], marked)

    def take(self, n):
        if n == self.length:
            return self
        if n == 0:
            return EMPTY
        i = self._part(n)
        return concat(*self.parts[:i], self.parts[i].take(n - self.offsets[i]))

    def __repr__(self):
        return f"concat({', '.join(map(repr, self.parts))})"


class Repeat(Word):
    """``word`` (length >= 1), ``times`` >= 2 times in a row."""

    def __init__(self, word: Word, times: int):
        self.word, self.times, self.length = word, times, word.length * times

    def at(self, t):
        return self.word.at(t % self.word.length)

    def _first_marked(self, marked):
        return self.word.first(marked)

    def next_marked(self, t, marked):
        # Within copy r = t // L, from t's offset; else the first mark of copy r + 1 (if any).
        size = self.word.length
        r, local = divmod(t, size)
        p = self.word.next_marked(local, marked)
        if p is not None:
            return r * size + p
        first = self.word.first(marked)
        if first is None or r + 1 >= self.times:
            return None
        return (r + 1) * size + first

    def take(self, n):
        size = self.word.length
        return concat(repeat(self.word, n // size), self.word.take(n % size))

    def __repr__(self):
        return f"repeat({self.word!r}, {self.times})"


#: The word of no position.
EMPTY = Concat(())


def run(index: int, count: int) -> Word:
    """``index`` ``count`` >= 0 times (the empty word for 0)."""
    return Run(index, count) if count else EMPTY


def concat(*words: Word) -> Word:
    """The words one after the other: empty words dropped, nested concatenations flattened,
    neighbouring runs of one index merged, a single remaining word returned as is."""
    parts: list[Word] = []
    for word in words:
        for part in word.parts if isinstance(word, Concat) else (word,):
            if isinstance(part, Run) and parts and isinstance(parts[-1], Run) and parts[-1].index == part.index:
                parts[-1] = Run(part.index, parts[-1].count + part.count)
            else:
                parts.append(part)
    return parts[0] if len(parts) == 1 else Concat(parts)


def repeat(word: Word, times: int) -> Word:
    """``word`` ``times`` >= 0 times in a row (a run stays a run; a repeat's count multiplies)."""
    if times == 0 or word.length == 0:
        return EMPTY
    if times == 1:
        return word
    if isinstance(word, Run):
        return Run(word.index, word.count * times)
    if isinstance(word, Repeat):
        return Repeat(word.word, word.times * times)
    return Repeat(word, times)


def from_indices(indices: Sequence[int]) -> Word:
    """The word of an explicit list of indices (run-length encoded)."""
    runs = [Run(index, sum(1 for _ in group)) for index, group in groupby(indices)]
    return runs[0] if len(runs) == 1 else Concat(runs)


def chain(periods: Sequence[int], indices: Sequence[int], base: int) -> Word:
    """The word of length ``periods[-1]`` whose position t holds ``indices[j]`` for the largest j
    with ``periods[j]`` dividing t + 1, and ``base`` when none does.

    ``periods`` must be a divisibility chain: non-decreasing, each dividing the next (equal
    neighbours: the later wins).  With q_0 = 1, let C_j be the word of one q_j-cycle and B_j the
    same without its last position.  A q_j-cycle is q_j / q_{j-1} q_{j-1}-cycles whose last
    position (t + 1 = q_j) is replaced by indices[j], so

        B_0 = (),  C_0 = (base),  B_j = C_{j-1}^(q_j / q_{j-1} - 1) B_{j-1},  C_j = B_j (indices[j]),

    two nodes per level (B_{j-1} is shared, not copied).  Lookahead LA-n is the chain of the
    cumulative periods k_1, k_1 k_2, ... with the level-l matrix as indices[l - 1].

    Example:
        >>> chain([2, 6], [1, 2], 0).tolist()
        [0, 1, 0, 1, 0, 2]
    """
    body, cycle, previous = EMPTY, run(base, 1), 1
    for period, index in zip(periods, indices):
        if period % previous:
            raise ValueError(f"periods must be a divisibility chain; {previous} does not divide {period}")
        body = concat(repeat(cycle, period // previous - 1), body)
        cycle = concat(body, run(index, 1))
        previous = period
    return cycle


def fold(word: Word, on_run: Callable, on_concat: Callable, on_repeat: Callable):
    """Evaluate a function defined on the three forms, once per node of ``word``:
    ``on_run(index, count)``, ``on_concat([value of each part])``, ``on_repeat(value, times)``."""
    memo: dict[int, tuple[Word, object]] = {}

    def go(w: Word):
        key = id(w)
        if key not in memo:
            if isinstance(w, Run):
                value = on_run(w.index, w.count)
            elif isinstance(w, Concat):
                value = on_concat([go(p) for p in w.parts])
            else:
                value = on_repeat(go(w.word), w.times)
            memo[key] = (w, value)  # the node is kept alive, so its id is not reused meanwhile
        return memo[key][1]

    return go(word)


def counts(word: Word) -> dict[int, int]:
    """How many times each index occurs (exact Python integers)."""
    def add(parts):
        total: dict[int, int] = {}
        for part in parts:
            for i, c in part.items():
                total[i] = total.get(i, 0) + c
        return total

    return fold(word, lambda i, c: {i: c}, add, lambda inner, n: {i: c * n for i, c in inner.items()})


def order_of_appearance(word: Word) -> list[int]:
    """The distinct indices of ``word`` in order of first appearance."""
    def merge(parts):
        seen: dict[int, None] = {}
        for part in parts:
            seen.update(dict.fromkeys(part))
        return list(seen)

    return fold(word, lambda i, c: [i], merge, lambda inner, n: inner)


def renumber(word: Word, mapping: Sequence[int] | dict) -> Word:
    """``word`` with every index i replaced by ``mapping[i]``."""
    return fold(word, lambda i, c: run(mapping[i], c), lambda parts: concat(*parts), repeat)


def reverse(word: Word) -> Word:
    """``word`` backwards: position p holds the index ``word`` holds at length - 1 - p.  With
    :meth:`Word.next_marked` it finds the *last* marked position before a given one."""
    return fold(word, run, lambda parts: concat(*reversed(parts)), repeat)


def segment(word: Word, start: int, stop: int) -> Word:
    """The word of positions ``start`` .. ``stop`` - 1 (0 <= start <= stop <= length): the last
    stop - start positions of the first ``stop``, i.e. a cut of the reversed word, reversed."""
    return reverse(reverse(word.take(stop)).take(stop - start))


def matrix_power(matrix: torch.Tensor, n: int) -> torch.Tensor:
    """matrix^n by repeated squaring (O(log n) products; n >= 0 any Python integer)."""
    result = None
    while n:
        if n & 1:
            result = matrix if result is None else result @ matrix
        n >>= 1
        if n:
            matrix = matrix @ matrix
    return torch.eye(matrix.shape[0], dtype=matrix.dtype) if result is None else result


def product(word: Word, matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ordered product M_{w_0} M_{w_1} ... M_{w_{L-1}} of a non-empty word (left to right, as
    x' = x P applies P_0 first), in O(nodes * log(length)) matrix products."""
    def chain_product(parts):
        q = parts[0]
        for p in parts[1:]:
            q = q @ p
        return q

    return fold(word, lambda i, c: matrix_power(matrices[i], c), chain_product, matrix_power)


__all__ = [
    "EMPTY",
    "Word",
    "chain",
    "concat",
    "counts",
    "fold",
    "from_indices",
    "matrix_power",
    "order_of_appearance",
    "product",
    "renumber",
    "repeat",
    "reverse",
    "run",
    "segment",
]
