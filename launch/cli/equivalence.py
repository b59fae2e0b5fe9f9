"""``python -m launch.equivalence <overrides>``: is your configuration the same everywhere it runs?

Takes exactly the configuration and overrides of ``python -m launch`` and runs the job, in
lockstep, in every place available to it, comparing every agent after every iteration:

- ``serial``: the serial reference (:class:`agents.reference.MultilayerLookahead`), when the
  topology has one (Lookahead, multilayer);
- ``colocated``: the simulation with every agent in this process;
- ``torch`` / ``mpi``: the simulation with one agent per process, when started under torchrun
  with ``launch=torch`` or under mpiexec with ``launch=mpi``; every process then also runs the
  serial and co-located runs, and compares its own agent with them.

    python -m launch.equivalence topology=lookahead agents=adam launch.steps=300
    torchrun --nproc_per_node 3 -m launch.equivalence launch=torch
    mpiexec -n 3 python -m launch.equivalence launch=mpi tolerance=1e-10

Nothing is stored: the runs advance together and the largest deviation
``max|x_i - y_i| / max|y_i|`` (the scale of the reference y) is kept per agent and per pair of
runs.  Rank 0 prints the table (and writes it to ``equivalence.txt`` in hydra's run directory).

The simulation's runs (co-located and distributed) use the exact mode by default
(``launch.exact``, null here meaning true: every sum a sync forms added in agent order,
:mod:`launch.engine.sync.ordered`), and the distributed run must then equal the co-located run
bit for bit: its tolerance is 0, in every dtype.  The serial reference, written from the papers
with its own arithmetic, is compared to rounding: ``tolerance`` (default by dtype,
:data:`launch.cli.deviation.TOLERANCES`: 1e-12 in float64).  With ``launch.exact=false`` every
pair is compared to ``tolerance``.  Every rank exits with the same status: 0 when every deviation
is within its pair's tolerance, 1 above it, 2 for an invalid configuration.

On a GPU the model's own kernels must be deterministic too for the two runs to agree (the sync is
exact, a kernel with atomics is not): in the exact mode on CUDA the command sets
``torch.use_deterministic_algorithms(True)`` (PyTorch then raises on an operation without a
deterministic implementation), turns off cuDNN's benchmark mode and sets
``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless the environment sets it (:func:`deterministic_kernels`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
import torch
from omegaconf import DictConfig

from launch.cli.app import open_run, run_job
from launch.cli.build import Job
from launch.cli.deviation import DeviationTracker, format_table
from launch.cli.errors import linger, run_hydra_app
from launch.cli.registry import serial_reference_missing
from launch.cli.runs import role
from launch.engine.guard.health import gather_objects

_STATUS = [0]


def compare(job: Job, comm) -> dict[tuple[str, str], DeviationTracker]:
    """Run ``job`` in every place available (see the module docstring) for ``job.steps``
    iterations; the largest deviation per agent for every pair (run under test, reference run),
    merged over the ranks of ``comm`` (identical on every rank)."""
    model = job.model()
    runs = {}
    if serial_reference_missing(job.schedule, job.outer, job.stages) is None:
        runs["serial"] = open_run(job, None, model, "serial")
    runs["colocated"] = open_run(job, None, model, "colocated")
    if comm is not None:
        runs[job.launch.mode] = open_run(job, comm, model)
    names = list(runs)
    if len(names) < 2:
        raise ValueError(
            f"nothing to compare: topology {job.schedule!r} has no serial reference; start the "
            f"command under torchrun (launch=torch) or mpiexec (launch=mpi) to compare co-located "
            f"with distributed"
        )
    pairs = [(a, b) for j, a in enumerate(names) for b in names[:j]]
    trackers = {pair: DeviationTracker() for pair in pairs}
    for _ in range(job.launch.steps):
        for run in runs.values():
            run.step()
        columns = {name: run.columns() for name, run in runs.items()}
        for (a, b), tracker in trackers.items():
            tracker.update(columns[a], columns[b])
    if comm is not None:
        gathered = gather_objects(comm, {pair: tracker.worst for pair, tracker in trackers.items()}, job.launch.steps,
                                  "gather of the deviations")
        for pair, tracker in trackers.items():
            tracker.merge(part[pair] for part in gathered)
    return trackers


def with_exact_default(job: Job) -> Job:
    """``job`` with ``launch.exact`` resolved: null means true here (module docstring)."""
    if job.launch.exact is None:
        job.launch = dataclasses.replace(job.launch, exact=True)
    return job


def deterministic_kernels(job: Job) -> bool:
    """In the exact mode on CUDA: PyTorch's deterministic kernels, cuDNN without benchmarking and
    cuBLAS's deterministic workspace (module docstring); whether it set them."""
    if not job.launch.exact or not job.launch.device.startswith("cuda") or not torch.cuda.is_available():
        return False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    return True


def pair_tolerance(job: Job, pair: tuple[str, str]) -> float:
    """The tolerance of ``pair`` (run under test, reference run): 0 between the simulation's runs
    in the exact mode (co-located and distributed give the same bits), else ``job.tolerance``."""
    simulations = "serial" not in pair
    return 0.0 if simulations and job.launch.exact else job.tolerance


def report(job: Job, trackers, processes: int) -> tuple[str, int]:
    """The printed table and the exit status."""
    rows = []
    for i in range(job.schedule.num_agents):
        row = {"agent": i, "role": role(job.schedule, i)}
        for (a, b), tracker in trackers.items():
            row[f"{a} vs {b}"] = tracker.worst.get(i)
        rows.append(row)
    columns = [("agent", "agent", "d"), ("role", "role", "s")]
    columns += [(f"{a} vs {b}", f"{a} vs {b}", "e") for a, b in trackers]
    verdicts = []
    for pair, tracker in trackers.items():
        tolerance = pair_tolerance(job, pair)
        worst = max(tracker.worst.values(), default=0.0)
        ok = worst <= tolerance       # a NaN deviation is never within tolerance
        bound = "0 (bit for bit, launch.exact)" if tolerance == 0.0 and job.launch.exact else f"{tolerance:g}"
        verdicts.append((ok, f"{'PASS' if ok else 'FAIL'}: {pair[0]} vs {pair[1]}: largest deviation "
                             f"{worst:.3e}, tolerance {bound}"))
    status = 0 if all(ok for ok, _ in verdicts) else 1
    where = f", {processes} processes" if processes > 1 else ""
    mode = ", exact" if job.launch.exact else ""
    text = (
        f"equivalence of {job.problem_name} on {job.schedule!r}, {job.launch.steps} steps, "
        f"{str(job.launch.dtype).replace('torch.', '')}{where}{mode}\n"
        f"largest relative deviation max|x_i - y_i| / max|y_i| over every step (x vs y):\n"
        f"{format_table(rows, columns)}\n"
        + "\n".join(line for _, line in verdicts)
    )
    return text, status


def run(cfg: DictConfig, out_dir: Path | str) -> int:
    """The equivalence check of ``cfg``; returns the exit status (the same on every rank)."""

    def body(job: Job, comm) -> int:
        deterministic_kernels(with_exact_default(job))
        trackers = compare(job, comm)
        text, status = report(job, trackers, 1 if comm is None else comm.world_size)
        if comm is None or comm.rank == 0:
            print(text, flush=True)
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "equivalence.txt").write_text(text + "\n")
        return status

    return run_job(cfg, body)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    _STATUS[0] = max(_STATUS[0], run(cfg, HydraConfig.get().runtime.output_dir))


def main() -> int:
    """Entry point of ``python -m launch.equivalence`` (hydra's own errors: one line, status 2)."""
    _STATUS[0] = 0
    status = run_hydra_app(hydra_main)
    return linger(_STATUS[0] if status is None else status)


if __name__ == "__main__":
    sys.exit(main())
