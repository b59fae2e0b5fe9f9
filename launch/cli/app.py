"""``python -m launch``: one hydra configuration, run serially, co-located, under torchrun or mpiexec.

    python -m launch                                   # the default job: LA-2 co-located, checked
    python -m launch topology=lookahead agents=adam launch.steps=2000
    python -m launch -m agents.optimizer.lr=0.01,0.05  # a sweep: one run directory per value
    torchrun --nproc_per_node 3 -m launch launch=torch
    mpiexec -n 3 python -m launch launch=mpi
    python -m launch launch=serial                     # the serial reference (Lookahead family)

The configuration is in ``launch/cli/conf`` (groups ``agents``, ``topology``, ``problem``,
``launch``); :mod:`launch.cli.build` turns it into a job.  Outputs, in hydra's run directory
(``outputs/<date>/<time>``, the same for every process of a job: :mod:`launch.cli.rundir`;
written by rank 0): ``.hydra/config.yaml`` (the resolved configuration), ``metrics.csv``
(:mod:`launch.engine.record.metrics`, written as the run goes), ``eval.csv`` (held-out metrics of every
agent and of X a, every ``launch.eval_every`` steps and at the end, and the inner learning rates:
:mod:`launch.engine.record.evaluation`), ``agents.pt`` (every agent's final ``state_dict``, buffers
included, a list indexed by agent), ``summary.json`` and ``summary.txt`` (:mod:`launch.cli.summary`;
the line is also printed; it includes ``spectral_gap``, 1 - |lambda_2| of the product of one
period's mixing matrices, :func:`topology.diagnostics.spectral_gap`), and with
``launch.tensorboard=true`` TensorBoard event files (:mod:`launch.engine.record.tensorboard`).  With
``launch.cluster`` every iteration is also clocked on a simulated cluster (:mod:`launch.engine.record.clock`:
metrics.csv's ``sim_time``, the summary's ``sim_time_s``, a printed line).
``python -m launch.plot DIR`` draws a run or a sweep (:mod:`launch.cli.plot`).
Rank 0 shows a progress bar; the other ranks print nothing but errors.

With ``launch=colocated`` and ``launch.check_reference=true`` (the default) every agent is
compared with the serial reference at every step, and the run fails above ``tolerance``.

Exit status (:mod:`launch.cli.errors`, the same on every rank): 0 success; 1 a deviation above
``tolerance``; 2 an invalid configuration or missing data (one line naming the key, on every rank:
hydra's own errors too; a resume whose configuration is not the checkpoint's); 3 the run met NaN
or Inf (at a sync: one line per rank; at its end: its summary says so); 4 a lost rank; 5 the
results are written but the final checkpoint is not (:mod:`launch.cli.finish`).  In a multirun
sweep the status is the worst of its jobs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.partition import write_label_histograms
from launch.cli import rundir
from launch.cli.build import Job, build_job
from launch.cli.resume import checkpointer_for
from launch.cli.deviation import DeviationTracker, format_table
from launch.cli.errors import (EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DEVIATION, EXIT_NONFINITE, EXIT_OK, EXIT_RANK_FAILURE,
                               in_config_terms, linger, report_error, run_hydra_app)
from launch.cli.finish import Ending, finish_run
from launch.cli.registry import serial_reference_missing
from launch.cli.runs import SerialRun, open_simulation_run, role
from launch.engine.record.clock import SimulatedTime, simulated_hubs, simulated_placement
from launch.engine.record.recorder import RunRecord
from launch.cli.summary import summary_record
from launch.engine.record.summary import write_summary
from launch.comm import make_communicator
from launch.engine.guard.health import NonFiniteError, RankFailureError
from launch.engine.record.evaluation import VIRTUAL
from launch.engine.store.checkpoint import CheckpointError, check_resume_step
from topology.diagnostics import spectral_gap

rundir.register()  # ${launch_stamp:} of the default run directory, before hydra composes

#: The worst exit status of the jobs this process ran (a multirun runs several).
_STATUS = [0]


def open_run(job: Job, comm, model, mode: str | None = None):
    """The run of ``job`` in ``mode`` (default ``launch.name``): a :class:`SerialRun`, or a
    :class:`SimulationRun` on ``comm`` (co-located when ``comm`` is None)."""
    mode = mode or job.launch.mode
    if mode == "serial":
        return SerialRun(model, job.problem.loss_fn, job.batches(0), job.schedule, job.optimizer, job.state_policy,
                         outer=job.outer, stages=job.stages)
    return open_simulation_run(job, comm, model, mode)


def make_comm(job: Job):
    """The communicator of a torch / mpi job (None for serial and co-located)."""
    launch = job.launch
    if launch.mode == "torch" and not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
        raise ValueError(
            "launch=torch must be started by torchrun (RANK, WORLD_SIZE and MASTER_ADDR are not set): "
            "torchrun --nproc_per_node M -m launch launch=torch ..., with M the number of agents"
        )
    return (make_communicator(launch.mode, device=launch.device, timeout_s=launch.timeout_s)
            if launch.mode in ("torch", "mpi") else None)


def run_job(cfg: DictConfig, body) -> int:
    """Build the job of ``cfg``, open its communicator, return ``body(job, comm)``.  Reported as
    one line on every rank, each raised alike on every rank: a ``ValueError`` (an invalid
    configuration or missing data) gives status 2, a ``NonFiniteError`` 3, a
    ``RankFailureError`` 4, a ``CheckpointError`` of a checkpoint during the run 5 (the run stops;
    the last complete checkpoint is kept).  The communicator is closed in any case."""
    comm = None
    try:
        job = build_job(cfg)
        if job.launch.num_threads is not None:
            torch.set_num_threads(job.launch.num_threads)
        comm = make_comm(job)
        return body(job, comm)
    except ValueError as err:
        report_error(in_config_terms(err))
        return EXIT_CONFIG
    except NonFiniteError as err:  # raised alike on every rank: each says so once
        report_error(err)
        return EXIT_NONFINITE
    except RankFailureError as err:
        report_error(err)
        return EXIT_RANK_FAILURE
    except CheckpointError as err:
        report_error(err)
        return EXIT_CHECKPOINT
    finally:
        if comm is not None:
            comm.close()


def run(cfg: DictConfig, out_dir: Path | str) -> int:
    """Run the job of ``cfg``, writing its outputs under ``out_dir``; returns the exit status."""
    return run_job(cfg, lambda job, comm: _run(job, Path(out_dir), comm))


def _run(job: Job, out_dir: Path, comm) -> int:
    """The job on this rank: open the run (resumed or not), iterate, finish, write the results."""
    rank0 = comm is None or comm.rank == 0
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if job.problem.partition is not None:   # each worker's label histogram
            write_label_histograms(job.problem.partition, out_dir)
    placement = (simulated_placement(job.launch.cluster, job.schedule.num_agents, 1 if comm is None else comm.world_size,
                                     job.launch.agents_per_rank, name="launch.cluster")
                 if job.launch.cluster is not None else None)
    model = job.model()
    run_ = open_run(job, comm, model)
    checkpointer, first = _resume(job, out_dir, run_, rank0)
    reference = _reference_run(job, model, first is not None)
    first = first or 0
    clock = _simulated_time(job, run_, placement, first)
    log = _record(job, run_, comm, out_dir if rank0 else None, first, clock)
    try:
        tracker = _loop(job, run_, reference, checkpointer, log, first)
    finally:
        elapsed = log.close()
    ending = finish_run(run_, checkpointer, first, job.launch.steps, log.nonfinite)  # checked like a sync; a failed
    # final checkpoint does not stop the results below from being written (launch.cli.finish)
    state_dicts = run_.state_dicts(job.model())  # a collective: every rank
    if not rank0:
        ending.report(None)
        return ending.status()
    torch.save(state_dicts, out_dir / "agents.pt")
    final = [r for r in log.final if r["step"] == job.launch.steps]
    return _report(job, comm, out_dir, final, tracker if reference is not None else None, ending,
                   elapsed=elapsed, first=first, clock=clock)


def _resume(job: Job, out_dir: Path, run_, rank0: bool):
    """The run's checkpointer (None without checkpoints) and the t it resumed from (None when it
    did not resume): the same t on every rank."""
    checkpointer = checkpointer_for(job.checkpoints, out_dir)
    if checkpointer is not None:
        checkpointer.check_writable(run_.engine)   # before a step is computed, on every rank alike
    if checkpointer is None or not job.checkpoints.resume:
        return checkpointer, None
    steps = job.launch.steps
    first = checkpointer.load(run_.engine, required=True)
    check_resume_step(first, steps, checkpointer.directory, "launch.steps")
    if rank0:
        left = f"running iterations {first}..{steps - 1}" if first < steps else "nothing left to run"
        print(f"note: resumed from the checkpoint at t={first} in {checkpointer.directory}; {left} "
              f"(launch.steps={steps})", file=sys.stderr)
        if checkpointer.changed:
            print("note: resumed with the allowed change(s) " + ", ".join(
                f"{key}: {old!r} -> {new!r}" for key, old, new in checkpointer.changed), file=sys.stderr)
    return checkpointer, first


def _reference_run(job: Job, model, resumed: bool):
    """The serial reference run stepped beside the simulation (``launch.check_reference`` with
    ``launch=colocated``), or None: not asked for, resumed, or the job has none (a note says so)."""
    if not (job.launch.mode == "colocated" and job.launch.check_reference):
        return None
    if resumed:
        print("note: resumed from a checkpoint; launch.check_reference is skipped", file=sys.stderr)
        return None
    missing = serial_reference_missing(job.schedule, job.outer, job.stages)
    if missing is not None:
        print(f"note: {missing}; launch.check_reference is skipped", file=sys.stderr)
        return None
    return open_run(job, None, model, "serial")


def _simulated_time(job: Job, run_, placement, first: int) -> SimulatedTime | None:
    """The run's simulated clock on ``launch.cluster`` (None without one)."""
    if placement is None:
        return None
    engine = run_.engine
    local_workers = len(set(job.schedule.workers) & set(run_.agents))
    return SimulatedTime(job.schedule, job.launch.cluster, placement, engine.sync_nbytes, job.launch.compute_s,
                         simulated_hubs(engine, placement), local_workers, start=first, device=job.launch.device)


def _record(job: Job, run_, comm, out_dir: Path | None, first: int, clock: SimulatedTime | None) -> RunRecord:
    """The run's record (:class:`launch.engine.record.recorder.RunRecord`): metrics.csv,
    eval.csv (the problem's held-out metrics on a fresh model), TensorBoard, the progress bar."""
    launch = job.launch
    template = job.model().to(launch.device) if job.evaluate_on_device else job.model()
    return RunRecord(run_, comm, job.schedule, out_dir, log_every=job.log_every, evaluate=job.evaluate,
                     template=template, eval_every=launch.eval_every, steps=launch.steps, first=first, clock=clock,
                     tensorboard=launch.tensorboard, progress=f"{job.problem_name} {_where(job, comm)}")


def _loop(job: Job, run_, reference, checkpointer, log: RunRecord, first: int) -> DeviationTracker:
    """Iterations ``first`` .. ``launch.steps - 1``: step, compare with the reference, record,
    checkpoint.  Returns the deviation tracker."""
    tracker = DeviationTracker()
    steps = job.launch.steps
    for t in range(first, steps):
        done = t + 1
        log.before(done)
        run_.step(lambda losses: log.before_sync(done, losses))
        if reference is not None:
            reference.step()
            tracker.update(run_.columns(), reference.columns())
        log.after(done)
        # Decided from t alone, identically on every rank (saving is collective); the last one:
        # launch.cli.finish.finish_run.  The metrics in flight are completed first, so that a
        # checkpoint of t implies every row up to t is in metrics.csv (a resume keeps those).
        if checkpointer is not None and done < steps and checkpointer.due(done):
            log.flush()
            checkpointer.save(run_.engine)
    log.flush()
    if log.evaluator.evaluated != steps:  # resumed at the end: nothing ran, evaluate anyway
        log.evaluate(steps)
    return tracker


def _report(job: Job, comm, out_dir: Path, final: list[dict], tracker: DeviationTracker | None,
            ending: Ending, *, elapsed: float, first: int, clock: SimulatedTime | None) -> int:
    """Rank 0: the table, the summary (summary.json, summary.txt, the printed line); returns the
    exit status."""
    rows = _table_rows(job, final, tracker)
    virtual = next((r for r in final if r["agent"] == VIRTUAL), None)
    checked = tracker is not None
    tolerance = job.tolerance
    worst = max((r["deviation"] for r in rows), default=0.0) if checked else None
    status = ending.status(EXIT_DEVIATION if checked and not worst <= tolerance else EXIT_OK)
    failure, detail = ending.failure(status, worst, tolerance)
    record = summary_record(job, processes=1 if comm is None else comm.world_size, agent_rows=rows,
                            virtual_row=virtual, gap=spectral_gap(job.schedule),
                            tolerance=tolerance if checked else None, worst=worst, elapsed=elapsed, first=first,
                            exit_status=status, failure=failure, failure_detail=detail,
                            final_checkpoint=ending.checkpoint, metrics_csv=out_dir / "metrics.csv",
                            simulated=clock.summary() if clock is not None else None)
    print(f"\n{_title(job, _where(job, comm), checked)}\n{_table(rows, checked)}")
    if clock is not None:
        print(clock.describe())
    print(write_summary(out_dir, record), flush=True)
    if status == EXIT_DEVIATION:
        print(f"FAILED: {detail}", file=sys.stderr)
    ending.report(out_dir)
    return status


def _table_rows(job: Job, final: list[dict], tracker: DeviationTracker | None) -> list[dict]:
    """One row per agent: its role, its held-out metrics at the end (the last evaluation), its
    deviation when checked."""
    rows = []
    for row in final:
        if row["agent"] == VIRTUAL:
            continue
        i = row["agent"]
        rows.append({"agent": i, "role": role(job.schedule, i), **{k: v for k, v in row.items() if k.startswith("heldout_")},
                     **({"deviation": tracker.worst.get(i, 0.0)} if tracker is not None else {})})
    return rows


def _metric_keys(rows: list[dict]) -> list[str]:
    return [k for k in rows[0] if k.startswith("heldout_")]


def _where(job: Job, comm) -> str:
    return job.launch.mode if comm is None else f"{job.launch.mode}, {comm.world_size} processes ({comm.backend})"


def _title(job: Job, where: str, checked: bool) -> str:
    dtype = str(job.launch.dtype).replace("torch.", "")
    return f"{job.schedule!r}, {job.launch.steps} steps, {dtype}, {'co-located vs serial reference' if checked else where}"


def _table(rows: list[dict], checked: bool) -> str:
    columns = [("agent", "agent", "d"), ("role", "role", "s")]
    columns += [(k, "held-out " + k.removeprefix("heldout_"), "f") for k in _metric_keys(rows)]
    if checked:
        columns.append(("deviation", "max rel. deviation", "e"))
    return format_table(rows, columns)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    status = run(cfg, HydraConfig.get().runtime.output_dir)
    _STATUS[0] = max(_STATUS[0], status)


def main() -> int:
    """Entry point of ``python -m launch``: runs the hydra app, returns the worst exit status
    (hydra's own errors: one line and :data:`~launch.cli.errors.EXIT_CONFIG`)."""
    _STATUS[0] = 0
    status = run_hydra_app(hydra_main)
    return linger(_STATUS[0] if status is None else status)
