"""Largest relative deviation between two runs' columns, tracked step by step, and its table."""

from __future__ import annotations

import torch

from topology.checks import check_real

#: The tolerance of ``tolerance: null``, by dtype.  Serial and simulated runs compute a sync in
#: different forms (``z + alpha * (x - z)`` vs ``alpha * x + (1 - alpha) * z``), which differ in
#: the last bit; float64 keeps the trajectories 1e-12 apart over thousands of steps, the shorter
#: formats only to a few hundred units of their precision.
TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-1}


def tolerance_for(value, dtype: torch.dtype) -> float:
    """The configured ``tolerance``, or the dtype's default (:data:`TOLERANCES`) when None."""
    value = check_real(value, "tolerance", minimum=0.0, kind="a number", optional="by dtype")
    return TOLERANCES[dtype] if value is None else value


class DeviationTracker:
    """Per agent i, the largest ``max|x_i - y_i| / max|y_i|`` over every step it was shown.

    ``x`` are the columns under test, ``y`` the reference's; only agents present in both are
    compared (a rank of a distributed run compares its own agents).  The scale is the
    reference's largest entry at that step, so the bound is relative to the parameters' scale.
    """

    def __init__(self) -> None:
        self.worst: dict[int, float] = {}

    @torch.no_grad()
    def update(self, columns: dict[int, torch.Tensor], reference: dict[int, torch.Tensor]) -> None:
        for i, x in columns.items():
            if i not in reference:
                continue
            y = reference[i]
            deviation = float((x - y.to(x.device)).abs().max() / y.abs().max())
            self.worst[i] = max(self.worst.get(i, 0.0), deviation)

    def merge(self, others) -> "DeviationTracker":
        """The element-wise maximum with other trackers' ``worst`` dicts (e.g. from every rank)."""
        for worst in others:
            for i, value in worst.items():
                self.worst[i] = max(self.worst.get(i, 0.0), value)
        return self


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A fixed-width table: ``columns`` are (key, header, format) with format ``d``, ``s`` (left
    aligned), ``f`` (6 decimals) or ``e`` (3 digits); missing values are blank."""

    def cell(value, fmt):
        if value is None:
            return ""
        return f"{value:.6f}" if fmt == "f" else f"{value:.3e}" if fmt == "e" else str(value)

    texts = [[cell(row.get(key), fmt) for key, _, fmt in columns] for row in rows]
    widths = [max([len(header)] + [len(t[j]) for t in texts]) for j, (_, header, _) in enumerate(columns)]

    def line(cells):
        return "  ".join(c.ljust(w) if fmt == "s" else c.rjust(w)
                         for c, w, (_, _, fmt) in zip(cells, widths, columns)).rstrip()

    return "\n".join([line([h for _, h, _ in columns])] + [line(t) for t in texts])
