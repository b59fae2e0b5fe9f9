"""The command-line parts of ``python -m launch.bench --gpu`` (:mod:`launch.bench.gpu`).

Each part runs real jobs (``python -m launch``, ``torchrun ... -m launch``) in a temporary run
directory and returns ``{"passed", "summary", "rows"}``; a row is one job: its command, exit
status and summary line (the output's tail when it failed).

``torchrun``    ``torchrun --nproc_per_node 1 -m launch launch=torch`` on the device (NCCL with
                one rank on CUDA: set_device, ``device_id``, the object collectives) with
                checkpoints, a resume of its last checkpoint on the device, and a resume of the
                same checkpoint on the CPU (gloo); the two resumed runs' agents compared (with
                ``--device cpu``: the one resume).
``low_precision``  the default co-located job in bfloat16 and in float16 (checked against the
                serial reference at the dtype's tolerance).
``torchrun_2``  (2 GPUs) ``torchrun --nproc_per_node 2 -m launch launch=torch topology=lookahead``
                (the overlapped sync, the finiteness markers, the metrics over NCCL) and the own
                loop on 2 ranks (``experiments.own_loop``: the control messages).
``sigstop``     (2 GPUs) the same job with rank 1 stopped by SIGSTOP: rank 0 must end with the
                one-line error naming rank 1, within a bound.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from launch.bench.processes import ROOT, free_port, stop_a_rank

def torchrun(nprocs: int, module: str = "launch") -> list[str]:
    """The command line of ``torchrun --nproc_per_node nprocs -m module`` on a free local port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), "-m", module]


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def job(command: list[str], run_dir: Path | None, name: str, timeout: float = 240.0) -> dict:
    """Run one job (``hydra.run.dir=run_dir`` when given) and describe it as a row."""
    import subprocess

    start = time.perf_counter()
    extra = [f"hydra.run.dir={run_dir}"] if run_dir is not None else []
    done = subprocess.run(command + extra, cwd=ROOT, env=environment(), capture_output=True, text=True,
                          timeout=timeout)
    summary_file = Path(run_dir, "summary.txt") if run_dir is not None else None
    summary = summary_file.read_text().strip() if summary_file is not None and summary_file.exists() else ""
    ok = done.returncode == 0 and (run_dir is None or "status=ok" in summary)
    return {"name": name, "returncode": done.returncode, "summary": summary, "met": ok,
            "wall_seconds": time.perf_counter() - start,
            **({} if ok else {"output": (done.stdout + done.stderr)[-3000:]})}


def _verdict(rows: list[dict], extra: str = "") -> dict:
    passed = all(row["met"] for row in rows)
    failed = [row["name"] for row in rows if not row["met"]]
    summary = (f"{len(rows)} job(s) ok" if passed else "failed: " + "; ".join(failed)) + extra
    return {"passed": passed, "summary": summary, "rows": rows}


def checkpoint_resume(config, device: str) -> dict:
    """The ``torchrun`` part (module docstring)."""
    import torch

    steps, base = config.gpu_job_steps, ["launch=torch", *config.gpu_cli_overrides]
    with tempfile.TemporaryDirectory() as tmp:
        here, cpu = Path(tmp, "device"), Path(tmp, "cpu")
        rows = [job(torchrun(1) + base + [f"launch.device={device}", f"launch.steps={steps}",
                                          f"launch.checkpoint_every={max(1, steps // 2)}"], here,
                    f"torchrun --nproc_per_node 1 -m launch launch=torch launch.device={device}, checkpoints")]
        if rows[0]["met"]:
            shutil.copytree(here, cpu)
            places = ((device, here), ("cpu", cpu)) if device != "cpu" else (("cpu", cpu),)
            for where, run_dir in places:
                rows.append(job(torchrun(1) + base + [f"launch.device={where}", f"launch.steps={2 * steps}",
                                                      "launch.resume=true"], run_dir,
                                f"the same, resumed from step {steps} on {where}"))
                rows[-1]["met"] = rows[-1]["met"] and f"resumed_from={steps}" in rows[-1]["summary"]
        extra = ""
        if len(rows) == 3 and all(row["met"] for row in rows):     # (on the CPU only one resume: nothing to compare)
            a, b = (torch.load(d / "agents.pt", map_location="cpu") for d in (here, cpu))
            worst = max(float((x[k].double() - y[k].double()).abs().max() / y[k].double().abs().max().clamp_min(1e-30))
                        for x, y in zip(a, b) for k in x if x[k].is_floating_point())
            rows.append({"name": f"resumed on {device} vs resumed on cpu: max relative deviation", "deviation": worst,
                         "met": worst == worst})      # reported; NaN fails
            extra = f"; resumed on {device} vs on cpu: {worst:.2e}"
    return _verdict(rows, extra)


def low_precision(config, device: str) -> dict:
    """The ``low_precision`` part: the default job in bfloat16 and float16 on ``device``."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("bfloat16", "float16"):
            rows.append(job([sys.executable, "-m", "launch", f"launch.device={device}", f"launch.dtype={dtype}",
                             f"launch.steps={config.gpu_job_steps}", *config.gpu_cli_overrides], Path(tmp, dtype),
                            f"python -m launch launch.device={device} launch.dtype={dtype}"))
    return _verdict(rows)


def two_ranks(config, device: str) -> dict:
    """The ``torchrun_2`` part (module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = [job(torchrun(2) + ["launch=torch", "topology=lookahead", f"launch.device={device}", "launch.log_every=1",
                                   f"launch.steps={config.gpu_job_steps}", *config.gpu_cli_overrides], Path(tmp, "run"),
                    f"torchrun --nproc_per_node 2 -m launch launch=torch topology=lookahead launch.device={device}")]
    rows.append(job(torchrun(2, "experiments.own_loop") + ["--epochs", "1", "--device", device], None,
                    f"torchrun --nproc_per_node 2 -m experiments.own_loop --device {device}"))
    return _verdict(rows)


def stopped_rank(config, device: str) -> dict:
    """The ``sigstop`` part (module docstring)."""
    timeout_s = config.gpu_stop_timeout_s
    bound = 6 * timeout_s + 30          # the timeout, NCCL's abort (4 s), the roll call (3 s), exiting
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "run")
        command = torchrun(2) + ["launch=torch", "topology=lookahead", f"launch.device={device}", "launch.steps=100000",
                                 "launch.log_every=1", f"launch.timeout_s={timeout_s}", *config.gpu_cli_overrides,
                                 f"hydra.run.dir={out}"]
        output, elapsed = stop_a_rank(command, out / "metrics.csv", 1 + 2 * 3, "RANK", rank=1, survivors=(0,),
                                      give_up_s=bound, env=environment())
    named = re.findall(r"error \[rank 0\]: rank 0: the (.+?) of iteration t=\d+ failed on the ranks \[0, 1\]: "
                       r"rank 1 seems lost", output)
    passed = bool(named) and elapsed < bound
    row = {"name": f"rank 1 of 2 stopped (SIGSTOP), launch.timeout_s={timeout_s}", "met": passed,
           "seconds_to_exit": elapsed, "failed_collective": named[0] if named else None,
           **({} if passed else {"output": output[-3000:]})}
    summary = (f"rank 0 named rank 1 ({named[0]}) and exited {elapsed:.1f} s after the SIGSTOP" if passed
               else "rank 0 did not name rank 1")
    return {"passed": passed, "summary": summary, "rows": [row]}
