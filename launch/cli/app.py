"""``python -m launch``: one hydra configuration, run serially, co-located, under torchrun or mpiexec.

    python -m launch                                   # the default job: LA-2 co-located, checked
    python -m launch topology=lookahead agents=adam launch.steps=2000
    python -m launch -m agents.optimizer.lr=0.01,0.05  # a sweep: one run directory per value
    torchrun --nproc_per_node 3 -m launch launch=torch
    mpiexec -n 3 python -m launch launch=mpi
    python -m launch launch=serial                     # the serial reference (Lookahead family)

The configuration is in ``launch/cli/conf`` (groups ``agents``, ``topology``, ``problem``,
``launch``); :mod:`launch.cli.build` turns it into a job.  Outputs, in hydra's run directory
(written by rank 0): ``.hydra/config.yaml`` (the resolved configuration), ``metrics.csv``
(:mod:`launch.cli.metrics`, written as the run goes), ``agents.pt`` (every agent's final
``state_dict``, a list indexed by agent) and ``summary.txt`` (the one-line summary, also printed;
it includes ``spectral_gap``, 1 - |lambda_2| of the product of one period's mixing matrices,
:func:`topology.diagnostics.spectral_gap`).
Rank 0 shows a progress bar; the other ranks print nothing but errors.

With ``launch=colocated`` and ``launch.check_reference=true`` (the default) every agent is
compared with the serial reference at every step, and the run fails above ``tolerance``.

Exit status: 0 success; 1 a deviation above ``tolerance``; 2 an invalid configuration (a
``ValueError``, printed as one line on every rank, e.g. a process count that does not match the
topology's number of agents).  In a multirun sweep the status is the worst of its jobs.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm import tqdm

from launch.cli.build import Job, build_job
from launch.cli.checkpoint_options import checkpointer_for
from launch.cli.deviation import DeviationTracker, format_table, tolerance_for
from launch.cli.errors import in_config_terms, report_error
from launch.cli.metrics import MetricsProbe, MetricsWriter
from launch.cli.registry import serial_reference_missing
from launch.cli.runs import SerialRun, open_simulation_run, plant_deviation_, role
from launch.comm import make_communicator
from topology.diagnostics import spectral_gap

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
    return make_communicator(job.mode, device=job.device) if job.mode in ("torch", "mpi") else None


def run_job(cfg: DictConfig, body) -> int:
    """Build the job of ``cfg``, open its communicator, return ``body(job, comm)``; a
    ``ValueError`` (an invalid configuration, on every rank alike) is reported as one line and
    gives status 2.  The communicator is closed in any case."""
    comm = None
    try:
        job = build_job(cfg)
        if cfg.launch.get("num_threads"):
            torch.set_num_threads(cfg.launch.num_threads)
        comm = make_comm(job)
        return body(job, comm)
    except ValueError as err:
        report_error(in_config_terms(err))
        return 2
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
    gap = spectral_gap(job.schedule)  # 1 - |lambda_2| of P_0 ... P_{period-1} (topology.diagnostics)
    model = job.model()
    run_ = open_run(job, comm, model)
    checkpointer, resume = checkpointer_for(cfg, job, out_dir)
    first = checkpointer.load(run_.simulation, required=True) if resume else 0
    reference = _reference_run(job, cfg, model, resume)
    tracker, elapsed = _loop(job, cfg, comm, run_, reference, checkpointer, first, out_dir if rank0 else None)

    template = job.model()
    state_dicts = run_.state_dicts(template)  # a collective: every rank
    if not rank0:
        return 0
    torch.save(state_dicts, out_dir / "agents.pt")
    rows = _evaluate(job, template, state_dicts, tracker if reference is not None else None)
    where = _where(job, comm)
    status, summary = _summary(job, comm, rows, gap, tolerance if reference is not None else None, where, elapsed,
                               first)
    print(f"\n{_title(job, where, reference is not None)}\n{_table(rows, reference is not None)}")
    print(summary, flush=True)
    (out_dir / "summary.txt").write_text(summary + "\n")
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


def _loop(job: Job, cfg: DictConfig, comm, run_, reference, checkpointer, first: int, out_dir: Path | None):
    """Iterations ``first`` .. ``job.steps - 1``: step, checkpoint, plant (test only), compare with
    the reference, log.  Returns the deviation tracker and the loop's wall time.  ``out_dir``:
    where rank 0 writes metrics.csv (None on the other ranks)."""
    tracker = DeviationTracker()
    probe = MetricsProbe(run_, comm, job.schedule.num_agents, job.schedule.consensus())
    writer = MetricsWriter(out_dir / "metrics.csv") if out_dir is not None else None
    bar = tqdm(total=job.steps, initial=first, desc=f"{job.problem_name} {_where(job, comm)}", unit="step",
               disable=writer is None, mininterval=0.5)
    start = time.perf_counter()
    if writer is not None:
        writer.start = start
    saved = False
    for t in range(first, job.steps):
        losses = run_.step()
        # Decided from t alone, identically on every rank (saving is collective).
        saved = checkpointer is not None and checkpointer.maybe_save(run_.simulation)
        plant_deviation_(run_, cfg.get("plant"), t)
        if reference is not None:
            reference.step()
            tracker.update(run_.columns(), reference.columns())
        done = t + 1
        if done % job.log_every == 0 or done == job.steps:
            _write(writer, bar, probe.log(done, losses, time.perf_counter() - start))
        bar.update()
    _write(writer, bar, probe.finish())
    bar.close()
    elapsed = time.perf_counter() - start
    if checkpointer is not None and first < job.steps and not saved:
        checkpointer.save(run_.simulation)  # and at the end
    if writer is not None:
        writer.close()
    return tracker, elapsed


def _write(writer, bar, entries) -> None:
    """Rank 0: append the metrics rows that are complete (:meth:`MetricsProbe.log`), and show the
    workers' mean loss of the latest."""
    if writer is None:
        return
    for step, rows, wall in entries:
        writer.write(step, rows, wall)
        worker_losses = [r["loss"] for r in rows if not math.isnan(r["loss"])]
        bar.set_postfix(loss=f"{sum(worker_losses) / max(len(worker_losses), 1):.4g}", refresh=False)


def _evaluate(job: Job, template, state_dicts: list, tracker: DeviationTracker | None) -> list[dict]:
    """One row per agent: its role, the problem's held-out metrics, its deviation when checked."""
    rows = []
    for i, state in enumerate(state_dicts):
        template.load_state_dict(state)
        metrics = job.evaluate(template.to(job.device) if job.evaluate_on_device else template)
        rows.append({"agent": i, "role": role(job.schedule, i), **metrics,
                     **({"deviation": tracker.worst.get(i, 0.0)} if tracker is not None else {})})
    return rows


def _metric_keys(rows: list[dict]) -> list[str]:
    return [k for k in rows[0] if k not in ("agent", "role", "deviation")]


def _where(job: Job, comm) -> str:
    return job.mode if comm is None else f"{job.mode}, {comm.world_size} processes ({comm.backend})"


def _title(job: Job, where: str, checked: bool) -> str:
    dtype = str(job.dtype).replace("torch.", "")
    return f"{job.schedule!r}, {job.steps} steps, {dtype}, {'co-located vs serial reference' if checked else where}"


def _table(rows: list[dict], checked: bool) -> str:
    columns = [("agent", "agent", "d"), ("role", "role", "s")]
    columns += [(k, "held-out loss" if k == "loss" else f"held-out {k}", "f") for k in _metric_keys(rows)]
    if checked:
        columns.append(("deviation", "max rel. deviation", "e"))
    return format_table(rows, columns)


def _summary(job: Job, comm, rows, gap: float, tolerance: float | None, where: str, elapsed: float,
             first: int) -> tuple[int, str]:
    """The exit status and the one-line summary (``tolerance``: None when nothing was checked)."""
    checked = tolerance is not None
    worst = max((r["deviation"] for r in rows), default=0.0) if checked else None
    status = 1 if checked and not worst <= tolerance else 0
    parts = [f"problem={job.problem_name}", f"topology={job.schedule!r}", f"launch={job.mode}",
             f"processes={1 if comm is None else comm.world_size}", f"steps={job.steps}",
             f"dtype={str(job.dtype).replace('torch.', '')}", f"seed={job.seed}"]
    parts += [f"heldout_{k}=[{', '.join(f'{r[k]:.6g}' for r in rows)}]" for k in _metric_keys(rows)]
    parts.append(f"spectral_gap={gap:.6g}")
    if checked:
        parts.append(f"max_deviation={worst:.3e}")
    parts += [f"time_s={elapsed:.2f}", f"steps_per_s={(job.steps - first) / max(elapsed, 1e-9):.1f}",
              "status=" + ("ok" if status == 0 else f"FAILED (deviation above tolerance {tolerance:g})")]
    return status, "summary: " + " ".join(parts)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    status = run(cfg, HydraConfig.get().runtime.output_dir)
    _STATUS[0] = max(_STATUS[0], status)


def main() -> int:
    """Entry point of ``python -m launch``: runs the hydra app, returns the worst exit status."""
    hydra_main()
    return _STATUS[0]
