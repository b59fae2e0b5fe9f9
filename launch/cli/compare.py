"""``python -m launch.compare RUN_A RUN_B [--tolerance T]``: how far apart two recorded runs are.

For example the same job co-located and under torchrun, or a run and its serial reference
(``launch=serial``).  ``RUN_B`` is the reference.  Per agent i, the largest relative deviation

    max |x - y| / max |y|

(:func:`relative`: the maximum over the compared entries, x of RUN_A, y of RUN_B; the scale is
the reference's largest finite |y|) of

- ``final agents``: every entry of agent i's state dict in ``agents.pt`` (parameters and
  buffers, in float64);
- each column of ``metrics.csv`` both runs have (``loss``, ``grad_norm``,
  ``distance_to_virtual``; ``consensus_distance`` of older files is read as
  ``distance_to_virtual``), over the steps both recorded for agent i; ``wall_time`` and
  ``sim_time`` are timings, not results, and are not compared;
- each column of ``eval.csv`` both runs have (``lr``, ``heldout_<metric>``), over the steps both
  evaluated, for every agent and for X a (row ``virtual``).

Entries equal in both runs (the same NaN or infinity included) count 0; a value recorded in one
run and empty or non-finite in the other counts as infinite.  The table gives, per agent, each
of these and the step of its largest step-wise deviation; the last line the largest of all.

Tolerance: ``--tolerance T``, else the default of the runs' dtype (summary.json's ``dtype``,
else that of agents.pt's tensors; the larger when the runs differ): 1e-12 for float64, 1e-5 for
float32 (:data:`launch.cli.deviation.TOLERANCES`).

Exit status: 0 when the largest deviation is at most the tolerance, 1 above it; 2 with one line
when the runs cannot be compared (a missing or unreadable agents.pt, another number of agents,
another layout or shape of an agent's state).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from launch.cli.deviation import TOLERANCES, format_table
from launch.cli.errors import EXIT_CONFIG, EXIT_DEVIATION, EXIT_OK, report_error
from launch.cli.run_files import FLOATS, READ_ERRORS, VIRTUAL, Notes, read_run

#: metrics.csv columns that are timings, not results.
TIMINGS = ("wall_time", "sim_time")

#: Row keys of a CSV that identify a row rather than hold a value.
KEYS = ("step", "agent")


def relative(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """(max |x - y| / max |y|, the index of the largest |x - y|) of two float64 vectors (see the
    module docstring for non-finite entries); (0.0, -1) when empty.

    Example:
        >>> relative(torch.tensor([1.0, 2.0, float("nan")]), torch.tensor([1.0, 4.0, float("nan")]))
        (0.5, 1)
        >>> relative(torch.tensor([1.0, float("inf")]), torch.tensor([1.0, 3.0]))
        (inf, 1)
    """
    if x.numel() == 0:
        return 0.0, -1
    same = (x == y) | (x.isnan() & y.isnan())
    gaps = torch.where(same, torch.zeros_like(x), (x - y).abs().nan_to_num(nan=math.inf, posinf=math.inf))
    finite = y[y.isfinite()].abs()
    scale = float(finite.max()) if finite.numel() else 0.0
    worst, where = float(gaps.max()), int(gaps.argmax())
    if worst == 0.0:
        return 0.0, where
    return (worst / scale if scale > 0 else math.inf), where


def load_agents(run: Path) -> list[dict]:
    """``agents.pt`` of ``run``: a list of state dicts; ``ValueError`` when missing or unreadable."""
    path = run / "agents.pt"
    if not path.is_file():
        raise ValueError(f"{run} has no agents.pt (the final agents): give two run directories of python -m launch")
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
    except (*READ_ERRORS, RuntimeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if not isinstance(states, (list, tuple)) or not all(isinstance(s, dict) for s in states):
        raise ValueError(f"{path} is not a list of state dicts, one per agent")
    return list(states)


def compare_agents(a: list[dict], b: list[dict], names: tuple[str, str]) -> dict[int, float]:
    """Agent -> the relative deviation of its final state (``ValueError`` when the layouts differ)."""
    if len(a) != len(b):
        raise ValueError(f"{names[0]} has {len(a)} agents and {names[1]} has {len(b)}: they are not runs of the same job")
    result = {}
    for i, (x, y) in enumerate(zip(a, b)):
        if list(x) != list(y):
            raise ValueError(f"agent {i}'s state has entries {sorted(set(x) ^ set(y))} in one run only")
        for key in x:
            if tuple(x[key].shape) != tuple(y[key].shape):
                raise ValueError(f"the shape of agent {i}'s {key!r} is {tuple(x[key].shape)} in {names[0]} and "
                                 f"{tuple(y[key].shape)} in {names[1]}: they are not runs of the same model")
        result[i] = relative(_flat(x), _flat(y))[0]
    return result


def compare_rows(a: list[dict], b: list[dict], what: str, notes: Notes) -> dict:
    """(agent, column) -> (deviation, step of its largest gap) over the (step, agent) rows of both
    files; a note for each column or row found in one file only."""
    columns = [k for k in _columns(b) if k in _columns(a) and k not in KEYS + TIMINGS]
    for k in sorted((set(_columns(a)) ^ set(_columns(b))) - set(TIMINGS)):
        notes.note(f"{what}: column {k} is in one run only: not compared")
    rows_a = {(r["step"], r["agent"]): r for r in a}
    rows_b = {(r["step"], r["agent"]): r for r in b}
    shared = sorted(set(rows_a) & set(rows_b), key=_row_order)
    if len(shared) != len(rows_a) or len(shared) != len(rows_b):
        notes.note(f"{what}: {len(shared)} (step, agent) rows in both runs, of {len(rows_a)} and {len(rows_b)}; "
                   f"only those are compared")
    result = {}
    for agent in dict.fromkeys(k[1] for k in shared):
        keys = [k for k in shared if k[1] == agent]
        for column in columns:
            x = torch.tensor([_value(rows_a[k].get(column)) for k in keys], dtype=torch.float64)
            y = torch.tensor([_value(rows_b[k].get(column)) for k in keys], dtype=torch.float64)
            if x.isnan().all() and y.isnan().all():
                continue                     # empty in both (a passive agent's loss): nothing to compare
            deviation, where = relative(x, y)
            result[agent, column] = (deviation, keys[where][0] if deviation > 0 else None)
    return result


def tolerance_of(runs, states: list[dict], given: float | None) -> tuple[float, str]:
    """The tolerance and where it came from (module docstring)."""
    if given is not None:
        return given, "--tolerance"
    dtypes = [(run.summary or {}).get("dtype") for run in runs]
    if any(d not in FLOATS for d in dtypes):
        dtypes = [str(next((v.dtype for v in s.values() if v.is_floating_point()), torch.float64)).removeprefix("torch.")
                  for s in states]
    dtype = max(dtypes, key=lambda d: TOLERANCES[FLOATS[d]])
    return TOLERANCES[FLOATS[dtype]], f"{dtype}'s default"


def compare(run_a: Path, run_b: Path, tolerance: float | None, notes: Notes) -> tuple[list[dict], float, float, str]:
    """(the table's rows, the largest deviation, the tolerance, where it came from);
    ``ValueError`` when the runs cannot be compared."""
    states = [load_agents(run_a), load_agents(run_b)]
    finals = compare_agents(*states, names=(str(run_a), str(run_b)))
    runs = []
    if all((r / "metrics.csv").is_file() for r in (run_a, run_b)):
        runs = [read_run(run, notes, models=False) for run in (run_a, run_b)]
    else:
        notes.note("a run has no metrics.csv: only the final agents are compared")
    stepwise = {}
    for file in ("metrics.csv", "eval.csv") if runs else ():
        tables = [run.metrics if file == "metrics.csv" else run.evals for run in runs]
        if all(tables):
            stepwise.update({(agent, f"{file}:{column}"): value for (agent, column), value
                             in compare_rows(*tables, file, notes).items()})
    limit, origin = tolerance_of(runs, states, tolerance)
    return _table_rows(finals, stepwise), _largest(finals, stepwise), limit, origin


def _table_rows(finals: dict[int, float], stepwise: dict) -> list[dict]:
    agents = list(finals) + [a for a in dict.fromkeys(a for a, _ in stepwise) if a not in finals]
    rows = []
    for agent in agents:
        row = {"agent": str(agent), "final agents": finals.get(agent)}
        worst = max(((v, s) for (a, _), (v, s) in stepwise.items() if a == agent), default=(None, None))
        row.update({column: v for (a, column), (v, _) in stepwise.items() if a == agent})
        row["at step"] = worst[1]
        rows.append(row)
    return rows


def _largest(finals: dict[int, float], stepwise: dict) -> float:
    return max([*finals.values(), *(v for v, _ in stepwise.values())], default=0.0)


def _row_order(key: tuple) -> tuple:
    """(step, agent) rows by agent (0, 1, ..., then X a's), then step."""
    step, agent = key
    return (agent == VIRTUAL, agent if agent != VIRTUAL else 0, step)


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).to(torch.float64) for v in state.values()]) if state else torch.zeros(0)


def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _value(value) -> float:
    return math.nan if value is None else value


def format_report(rows: list[dict], largest: float, limit: float, origin: str, names: tuple[str, str]) -> str:
    """The printed table and verdict."""
    stepwise = [k for k in _columns(rows) if k not in ("agent", "final agents", "at step")]
    columns = [("agent", "agent", "s"), ("final agents", "final agents", "e")]
    columns += [(k, k.partition(":")[2], "e") for k in stepwise] + [("at step", "at step", "d")]
    verdict = "PASS" if largest <= limit else "FAIL"
    head = f"{names[0]} vs {names[1]} (the reference): max |x - y| / max |y| per agent"
    files = sorted({k.partition(":")[0] for k in stepwise})
    return (f"{head}{' (' + ', '.join(files) + ': over the steps both recorded)' if files else ''}\n"
            f"{format_table(rows, columns)}\nlargest {largest:.3e}, tolerance {limit:g} ({origin}): {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", help="a run directory (outputs/<date>/<time>)")
    parser.add_argument("run_b", help="the reference run directory")
    parser.add_argument("--tolerance", type=_tolerance, default=None,
                        help="the largest relative deviation accepted (default: by dtype, 1e-12 float64, 1e-5 float32)")
    args = parser.parse_args(argv)
    names = (args.run_a, args.run_b)
    try:
        rows, largest, limit, origin = compare(Path(args.run_a), Path(args.run_b), args.tolerance, Notes())
    except ValueError as err:
        report_error(err)
        return EXIT_CONFIG
    print(format_report(rows, largest, limit, origin, names))
    sys.stdout.flush()
    return EXIT_OK if largest <= limit else EXIT_DEVIATION


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0; got {text!r}")
    return value
