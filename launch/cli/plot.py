"""``python -m launch.plot PATH [--out DIR] [--x step|sim_time|wall] [--logy] [--smooth W]``: look at
a run, or at a sweep, without writing code.

- ``PATH`` a **run directory** (it holds ``metrics.csv``): ``curves.png``, a panel each for the
  workers' training loss, every held-out metric of every agent and of X a, the distance of every
  agent to X a, and the inner learning rate (:mod:`launch.cli.plotting.figures`);
- ``PATH`` a **multirun directory** (hydra's ``multirun/<date>/<time>``: sub-directories that are
  runs): ``sweep.png``, one curve per run, or per group of runs that differ only in
  ``launch.seed`` (mean +- std, n in the legend); ``sweep.csv`` and ``sweep.md``, one row per run
  (:mod:`launch.cli.plotting.table`); the markdown table is printed.

Options: ``--out DIR`` where the files go (default ``PATH``); ``--x`` the x axis (step, the
simulated time of ``launch.cluster``, the wall time: :mod:`launch.cli.plotting.series`);
``--logy`` a log-scale y axis on every panel (values <= 0 are not drawn, with a warning);
``--smooth W`` a trailing moving average of W logged points on the training curves.

A panel that holds no information (no finite value; constant to rounding; distances 0 to
rounding) is left out, with a note saying why (:mod:`launch.cli.plotting.panels`).  Whatever
else is left out is a ``warning:`` on stderr naming it (:mod:`launch.cli.run_files`).
PNG through matplotlib's Agg backend (no display needed).

Exit status: 0; 2 with one line when ``PATH`` cannot be drawn (neither a run nor a multirun
directory, an unreadable metrics.csv, ``--x sim_time`` for a run without simulated time,
``--out`` not writable, matplotlib missing), and 2 too, after the files are written, when a file
of ``PATH`` could not be read (each named in a warning).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from launch.cli.errors import EXIT_CONFIG, EXIT_OK, report_error
from launch.cli.plotting.figures import run_panels, sweep_panels, xlabel
from launch.cli.plotting.panels import draw, kept, positive
from launch.cli.run_files import Notes, is_run, read_run, read_sweep
from launch.cli.plotting.series import X_AXES
from launch.cli.plotting.table import sweep_rows, write_table


def plot(path: Path | str, out: Path | str | None = None, *, x: str = "step", logy: bool = False, smooth: int = 1,
         notes: Notes | None = None) -> list[Path]:
    """Draw ``path`` (a run or a multirun directory) into ``out`` (default ``path``); returns the
    files written.  ``ValueError`` when it cannot (the module docstring's exit status 2)."""
    path, notes = Path(path), notes or Notes()
    out = Path(out) if out is not None else path
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory (give a run directory, with metrics.csv, or a multirun directory)")
    if is_run(path):
        run = read_run(path, notes)
        panels = kept(run_panels(run, x, smooth, notes), notes, str(path))
        return [_draw(panels, out / "curves.png", x, _title(str(path), smooth), logy, notes)]
    runs = read_sweep(path, notes)
    if not runs:
        raise ValueError(f"{path} is neither a run directory (it has no metrics.csv) nor a multirun directory "
                         f"(no sub-directory has a readable one)")
    panels = kept(sweep_panels(runs, x, smooth, notes), notes, str(path))
    figure = _draw(panels, out / "sweep.png", x, _title(f"{path}: {len(runs)} runs", smooth), logy, notes)
    rows, identifying = sweep_rows(runs, notes)
    try:
        csv_path, md_path, markdown = write_table(rows, identifying, out)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot write the table there: {err.strerror or err}") from None
    print(markdown)
    return [figure, csv_path, md_path]


def _draw(panels, file: Path, x: str, title: str, logy: bool, notes: Notes) -> Path:
    if not panels:
        raise ValueError(f"nothing to draw for {file.name}: every panel was left out (see the notes above)")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        return draw(positive(panels, notes) if logy else panels, file, xlabel=xlabel(x), title=title, logy=logy)
    except OSError as err:
        raise ValueError(f"--out {file.parent}: cannot write {file.name} there: {err.strerror or err}") from None


def _title(where: str, smooth: int) -> str:
    return where + (f"  (training curves: trailing mean of {smooth} logged points)" if smooth > 1 else "")


def _width(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (1: no smoothing); got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a run directory (outputs/<date>/<time>) or a multirun directory")
    parser.add_argument("--out", help="where to write the figures and tables (default: PATH)")
    parser.add_argument("--x", choices=tuple(X_AXES), default="step",
                        help="the x axis: step, sim_time (launch.cluster's simulated time), wall (default: step)")
    parser.add_argument("--logy", action="store_true", help="a log-scale y axis on every panel")
    parser.add_argument("--smooth", type=_width, default=1, metavar="W",
                        help="trailing moving average of W logged points on the training curves (default 1: none)")
    args = parser.parse_args(argv)
    notes = Notes()
    try:
        written = plot(args.path, args.out, x=args.x, logy=args.logy, smooth=args.smooth, notes=notes)
    except ValueError as err:
        report_error(err)
        return EXIT_CONFIG
    for p in written:
        print(f"wrote {p}")
    if notes.unreadable:
        report_error(f"{len(notes.unreadable)} file(s) could not be read and were left out: "
                     f"{', '.join(map(str, notes.unreadable))}")
        return EXIT_CONFIG
    return EXIT_OK
