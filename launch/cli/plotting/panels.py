"""Panels of ``python -m launch.plot``: which are drawn, and the drawing (matplotlib, Agg backend).

**A panel that holds no information is left out** (:func:`why_empty`), with a ``note:`` on stderr
saying which and why.  With V the finite values of its curves (before smoothing and averaging):

1. *no value*: V is empty (every cell empty, NaN or infinite; a file without the column);
2. *constant to rounding*: max V - min V <= 64 eps max|V|, eps the machine epsilon of the run's
   dtype (float64's when unknown): nothing changes but the last bits.  Exactly constant values
   (a learning rate that never changes, distances that are all 0) fall here;
3. *zero to rounding*, for the distance panels only, which measure differences of the models:
   max V <= 64 eps S, S the largest ||z_i||_2 of the final models (``agents.pt``: every floating
   entry of every agent's state dict; the largest over the runs of a sweep; the rule is skipped
   when a run has no agents.pt).  A sum such as X a = sum_i a_i z_i is exact up to a few units
   of rounding of the entries it adds, so after a sync that leaves every agent equal,
   ||z_i - X a|| is a few eps ||z|| of noise, not a distance: 64 units leave room for sums of
   up to 64 terms rounded at every addition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from launch.cli.run_files import Notes
from launch.cli.plotting.series import Curve

#: Units of rounding (of the run's dtype) within which values count as constant or zero.
ROUNDING_UNITS = 64

#: At most this many curves get a legend entry (a ring of 64 agents draws without one).
LEGEND_MAX = 12

#: Panels per row of a figure.
COLUMNS = 3


@dataclass
class Panel:
    """A panel: its title, its curves, and what :func:`why_empty` needs."""

    title: str
    curves: list[Curve] = field(default_factory=list)
    eps: float = 2.0 ** -52
    scale: float | None = None           # S of rule 3 (distance panels), or None


def why_empty(values: list[float], eps: float, scale: float | None = None) -> str | None:
    """Why a panel of ``values`` holds no information (the module docstring's rules), or None.

    Example:
        >>> why_empty([0.0, 1e-17, 2e-16], 2.0 ** -52, scale=3.0) is not None
        True
        >>> why_empty([0.5, 0.25], 2.0 ** -52) is None
        True
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "it has no finite value"
    low, high = min(finite), max(finite)
    top = max(abs(low), abs(high))
    if high - low <= ROUNDING_UNITS * eps * top:
        return f"its values are constant to rounding ({_g(low)} .. {_g(high)})"
    if scale is not None and top <= ROUNDING_UNITS * eps * scale:
        return (f"its values are 0 to rounding (at most {_g(top)}, within {ROUNDING_UNITS} eps of the models' "
                f"norm {_g(scale)})")
    return None


def kept(panels: list[Panel], notes: Notes, where: str) -> list[Panel]:
    """The panels that hold information; a note for each one left out."""
    result = []
    for panel in panels:
        reason = why_empty([v for c in panel.curves for v in c.y], panel.eps, panel.scale)
        if reason is None:
            result.append(panel)
        else:
            notes.note(f"{where}: panel '{panel.title}' left out: {reason}")
    return result


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed); ``ValueError`` without it."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("python -m launch.plot needs matplotlib: pip install -e '.[experiments]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(panels: list[Panel], path: Path, *, xlabel: str, title: str, logy: bool) -> Path:
    """Draw ``panels`` (already :func:`kept`, and :func:`positive` for ``logy``) into the PNG
    ``path``, :data:`COLUMNS` per row."""
    plt = pyplot()
    rows = math.ceil(len(panels) / COLUMNS)
    cols = min(COLUMNS, len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.7 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for c in panel.curves:
            _draw_curve(ax, c)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(xlabel)
        if logy:
            ax.set_yscale("log")
        if 0 < len(panel.curves) <= LEGEND_MAX:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def _draw_curve(ax, c: Curve) -> None:
    marker = "o" if len(c.x) < 30 else None
    line, = ax.plot(c.x, c.y, "--" if c.dashed else "-", label=c.label, marker=marker, markersize=3)
    if c.std is not None:
        low = [m - s for m, s in zip(c.y, c.std)]
        high = [m + s for m, s in zip(c.y, c.std)]
        ax.fill_between(c.x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)


def positive(panels: list[Panel], notes: Notes) -> list[Panel]:
    """The panels for a log-scale y axis (``--logy``): each curve without its points <= 0, a
    warning naming the curve and how many (a log scale cannot show them)."""
    for panel in panels:
        for c in panel.curves:
            keep = [j for j, v in enumerate(c.y) if v > 0]
            if len(keep) < len(c.y):
                notes.warn(f"panel '{panel.title}': {len(c.y) - len(keep)} value(s) <= 0 of {c.label} are not "
                           f"drawn on the log scale (--logy)")
                c.x, c.y = [c.x[j] for j in keep], [c.y[j] for j in keep]
                c.std = None if c.std is None else [c.std[j] for j in keep]
    return panels


def _g(value: float) -> str:
    return format(value, ".3g")
