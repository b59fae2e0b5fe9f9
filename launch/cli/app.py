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
(:mod:`launch.cli.metrics`, written as the run goes), ``eval.csv`` (held-out metrics of every
agent and of X a, every ``launch.eval_every`` steps and at the end, and the inner learning rates:
:mod:`launch.cli.evaluation`), ``agents.pt`` (every agent's final ``state_dict``, buffers
included, a list indexed by agent), ``summary.json`` and ``summary.txt`` (:mod:`launch.cli.summary`;
the line is also printed; it includes ``spectral_gap``, 1 - |lambda_2| of the product of one
period's mixing matrices, :func:`topology.diagnostics.spectral_gap`), and with
``launch.tensorboard=true`` TensorBoard event files (:mod:`launch.cli.tensorboard`).  With
``launch.cluster`` every iteration is also clocked on a simulated cluster (:mod:`launch.cli.simtime`:
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
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm import tqdm

from experiments.partition import write_label_histograms
from launch.cli import rundir
from launch.cli.build import Job, build_job
from launch.cli.checkpoint_options import checkpointer_for
from launch.cli.deviation import DeviationTracker, format_table, tolerance_for
from launch.cli.errors import (EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DEVIATION, EXIT_NONFINITE, EXIT_OK, EXIT_RANK_FAILURE,
                               in_config_terms, linger, report_error, run_hydra_app)
from launch.cli.evaluation import VIRTUAL, EvalWriter, Evaluator
from launch.cli.finish import finish_run
from launch.cli.metrics import MetricsProbe, MetricsWriter
from launch.cli.registry import serial_reference_missing
from launch.cli.runs import SerialRun, open_simulation_run, plant_deviation_, role
from launch.cli.simtime import SimulatedTime, simulated_placement
from launch.cli.summary import summary_record, write_summary
from launch.cli.tensorboard import TensorBoardLog
from launch.comm import make_communicator
from launch.engine.store.checkpoint import CheckpointError
from launch.engine.guard.health import NonFiniteError, RankFailureError
from launch.engine.simulation import check_resume_step
from topology.diagnostics import spectral_gap

rundir.register()  # ${launch_stamp:} of the default run directory, before hydra composes

#: The worst exit status of the jobs this process ran (a multirun runs several).
_STATUS = [0]


def open_run(job: Job, comm, model, mode: str | None = None):
    """The run of ``job`` in ``mode`` (default ``job.mode``): a :class:`SerialRun`, or a
    :class:`SimulationRun` on ``comm`` (co-located when ``comm`` is None)."""
    mode = mode or job.mode
    if mode == "serial":
        return SerialRun(model, job.problem.loss_fn, job.batches(0), job.schedule, job.optimizer, job.state_policy,
                         outer=job.outer, stages=job.stages)
    return open_simulation_run(job, comm, model, mode)


def make_comm(job: Job):
    """The communicator of a torch / mpi job (None for serial and co-located)."""
    if job.mode == "torch" and not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
        raise ValueError(
            "launch=torch must be started by torchrun (RANK, WORLD_SIZE and MASTER_ADDR are not set): "
            "torchrun --nproc_per_node M -m launch launch=torch ..., with M the number of agents"
        )
    return (make_communicator(job.mode, device=job.device, timeout_s=job.timeout_s)
            if job.mode in ("torch", "mpi") else None)


def run_job(cfg: DictConfig, body) -> int:
    """Build the job of ``cfg``, open its communicator, return ``body(job, comm)``.  Reported as
    one line on every rank, each raised alike on every rank: a ``ValueError`` (an invalid
    configuration or missing data) gives status 2, a ``NonFiniteError`` 3, a
    ``RankFailureError`` 4, a ``CheckpointError`` of a checkpoint during the run 5 (the run stops;
    the last complete checkpoint is kept).  The communicator is closed in any case."""
    comm = None
    try:
        job = build_job(cfg)
        if job.num_threads is not None:
            torch.set_num_threads(job.num_threads)
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
    return run_job(cfg, lambda job, comm: _run(job, cfg, Path(out_dir), comm))


def _run(job: Job, cfg: DictConfig, out_dir: Path, comm) -> int:
    rank0 = comm is None or comm.rank == 0
    tolerance = tolerance_for(cfg.tolerance, job.dtype)
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if job.problem.partition is not None:   # each worker's label histogram
            write_label_histograms(job.problem.partition, out_dir)
    gap = spectral_gap(job.schedule)  # 1 - |lambda_2| of P_0 ... P_{period-1} (topology.diagnostics)
    model = job.model()
    placement = (simulated_placement(job.cluster, job.schedule.num_agents, 1 if comm is None else comm.world_size,
                                     job.agents_per_rank) if job.cluster is not None else None)
    run_ = open_run(job, comm, model)
    checkpointer, resume = checkpointer_for(cfg, job, out_dir)
    first = 0
    if resume:
        first = checkpointer.load(run_.simulation, required=True)  # the same t on every rank
        check_resume_step(first, job.steps, checkpointer.directory, "launch.steps")
        if rank0:
            left = (f"running iterations {first}..{job.steps - 1}" if first < job.steps else "nothing left to run")
            print(f"note: resumed from the checkpoint at t={first} in {checkpointer.directory}; {left} "
                  f"(launch.steps={job.steps})", file=sys.stderr)
    reference = _reference_run(job, cfg, model, resume)
    if checkpointer is not None and checkpointer.changed and rank0:
        print("note: resumed with the allowed change(s) " + ", ".join(
            f"{key}: {old!r} -> {new!r}" for key, old, new in checkpointer.changed), file=sys.stderr)
    clock = _simulated_time(job, run_, placement, first)
    tracker, elapsed, final = _loop(job, cfg, comm, run_, reference, checkpointer, first, out_dir if rank0 else None,
                                    clock)
    ending = finish_run(run_, checkpointer, first, job.steps)  # the end checked like a sync; a failed
    # final checkpoint does not stop the results below from being written (launch.cli.finish)

    template = job.model()
    state_dicts = run_.state_dicts(template)  # a collective: every rank
    if not rank0:
        ending.report(None)
        return ending.status()
    torch.save(state_dicts, out_dir / "agents.pt")
    rows = _table_rows(job, final, tracker if reference is not None else None)
    virtual = next((r for r in final if r["agent"] == VIRTUAL), None)
    checked = reference is not None
    worst = max((r["deviation"] for r in rows), default=0.0) if checked else None
    status = ending.status(EXIT_DEVIATION if checked and not worst <= tolerance else EXIT_OK)
    where = _where(job, comm)
    failure, detail = ending.failure(status, worst, tolerance)
    record = summary_record(job, processes=1 if comm is None else comm.world_size, agent_rows=rows,
                            virtual_row=virtual, gap=gap, tolerance=tolerance if checked else None, worst=worst,
                            elapsed=elapsed, first=first, exit_status=status, failure=failure,
                            failure_detail=detail, final_checkpoint=ending.checkpoint, metrics_csv=out_dir / "metrics.csv",
                            simulated=clock.summary() if clock is not None else None)
    print(f"\n{_title(job, where, checked)}\n{_table(rows, checked)}")
    if clock is not None:
        print(clock.describe())
    print(write_summary(out_dir, record), flush=True)
    if status == EXIT_DEVIATION:
        print(f"FAILED: {detail}", file=sys.stderr)
    ending.report(out_dir)
    return status


def _reference_run(job: Job, cfg: DictConfig, model, resume: bool):
    """The serial reference run stepped beside the simulation (``launch.check_reference`` with
    ``launch=colocated``), or None: not asked for, resumed, or the job has none (a note says so)."""
    if not (job.mode == "colocated" and cfg.launch.get("check_reference", False)):
        return None
    if resume:
        print("note: resumed from a checkpoint; launch.check_reference is skipped", file=sys.stderr)
        return None
    missing = serial_reference_missing(job.schedule, job.outer, job.stages)
    if missing is not None:
        print(f"note: {missing}; launch.check_reference is skipped", file=sys.stderr)
        return None
    return open_run(job, None, model, "serial")


def _simulated_time(job: Job, run_, placement, first: int) -> SimulatedTime | None:
    """The run's simulated clock on ``launch.cluster`` (None without one)."""
    if job.cluster is None:
        return None
    local_workers = len(set(job.schedule.workers) & set(run_.columns()))
    return SimulatedTime(job.schedule, job.cluster, placement, run_.simulation.sync_nbytes, job.compute_s,
                         job.overlap, local_workers, start=first, device=job.device)


def _loop(job: Job, cfg: DictConfig, comm, run_, reference, checkpointer, first: int, out_dir: Path | None,
          clock: SimulatedTime | None):
    """Iterations ``first`` .. ``job.steps - 1``: step, checkpoint, plant (test only), compare with
    the reference, log, evaluate.  Returns the deviation tracker, the loop's wall time and (on rank
    0) the rows of the last evaluation (at ``job.steps``).  ``out_dir``: where rank 0 writes
    metrics.csv, eval.csv and TensorBoard's files (None on the other ranks); ``clock``: the
    simulated time of ``launch.cluster``, or None."""
    tracker = DeviationTracker()
    probe = MetricsProbe(run_, comm, job.schedule.num_agents, job.schedule.consensus())
    evaluator = Evaluator(job, run_, comm)
    writer = (MetricsWriter(out_dir / "metrics.csv", workers=job.schedule.workers, consensus=probe.a is not None,
                            resume_at=first or None) if out_dir is not None else None)
    evals = EvalWriter(out_dir / "eval.csv") if out_dir is not None else None
    board = TensorBoardLog(out_dir) if out_dir is not None and job.tensorboard else None
    bar = tqdm(total=job.steps, initial=first, desc=f"{job.problem_name} {_where(job, comm)}", unit="step",
               disable=writer is None, mininterval=0.5)
    start = time.perf_counter()
    if writer is not None:
        writer.start = start
    final: list[dict] = []
    sim_times: dict[int, float] = {}   # logged step -> its simulated time, until its row is written
    try:
        for t in range(first, job.steps):
            done = t + 1
            logged = done % job.log_every == 0 or done == job.steps
            if logged or evaluator.due(done):
                evaluator.note_lr(done)  # the learning rate of this iteration, before it runs
            started = time.perf_counter()
            losses = run_.step()
            if clock is not None:
                simulated = clock.advance(started)
                if logged:
                    sim_times[done] = simulated
            plant_deviation_(run_, cfg.get("plant"), t)
            if reference is not None:
                reference.step()
                tracker.update(run_.columns(), reference.columns())
            if logged:   # rows complete a few logged steps later (MetricsProbe.log): off the critical path
                _write_metrics(probe.log(done, losses, time.perf_counter() - start), writer, board, bar, job, sim_times)
            if evaluator.due(done):
                final = _write_evaluation(evaluator.evaluate(done), evals, board)
            # Decided from t alone, identically on every rank (saving is collective); the last one:
            # launch.cli.finish.finish_run.  The metrics in flight are completed first, so that a
            # checkpoint of t implies every row up to t is in metrics.csv (a resume keeps those).
            if checkpointer is not None and done < job.steps and checkpointer.due(done):
                _write_metrics(probe.finish(), writer, board, bar, job, sim_times)
                checkpointer.save(run_.simulation)
            bar.update()
        _write_metrics(probe.finish(), writer, board, bar, job, sim_times)
        if evaluator.evaluated != job.steps:  # resumed at the end: nothing ran, evaluate anyway
            final = _write_evaluation(evaluator.evaluate(job.steps), evals, board)
    finally:
        bar.close()
        for sink in (writer, evals, board):
            if sink is not None:
                sink.close()
    elapsed = time.perf_counter() - start
    return tracker, elapsed, [r for r in final if r["step"] == job.steps]


def _write_metrics(entries, writer: MetricsWriter | None, board, bar, job: Job, sim_times: dict[int, float]) -> None:
    """Rank 0: append the metrics rows that are complete (:meth:`MetricsProbe.log`), to
    metrics.csv and TensorBoard, and show the workers' mean loss of the latest (NaN / Inf shown
    as such).  ``sim_times``: the simulated time of each logged step not yet written (popped)."""
    for step, rows, wall in entries:
        simulated = sim_times.pop(step, None)
        if writer is None:
            continue
        writer.write(step, rows, wall, simulated)
        if board is not None:
            board.metrics(step, rows)
        worker_losses = [rows[i]["loss"] for i in job.schedule.workers]
        bar.set_postfix(loss=f"{sum(worker_losses) / max(len(worker_losses), 1):.4g}", refresh=False)


def _write_evaluation(rows: list[dict] | None, evals: EvalWriter | None, board) -> list[dict]:
    """Rank 0: append ``rows`` to eval.csv (and TensorBoard); returns them ([] elsewhere)."""
    if rows is None:
        return []
    if evals is not None:
        evals.write(rows)
    if board is not None:
        board.evaluation(rows)
    return rows


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
    return job.mode if comm is None else f"{job.mode}, {comm.world_size} processes ({comm.backend})"


def _title(job: Job, where: str, checked: bool) -> str:
    dtype = str(job.dtype).replace("torch.", "")
    return f"{job.schedule!r}, {job.steps} steps, {dtype}, {'co-located vs serial reference' if checked else where}"


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
