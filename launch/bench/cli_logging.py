"""B7: the command line's metrics off the critical path: a torchrun job of ``python -m launch``
with the default ``launch.log_every`` (the schedule's period) over the same job with logging off.

Each round runs the two jobs one after the other (the order rotating), as users run them:
``torchrun --nproc_per_node N -m launch launch=torch <overrides>`` (float32, ``device=auto``,
overlap where it applies: the ``launch=torch`` defaults), and reads the loop's time from the
run's ``summary.txt`` (``time_s``: the iterations alone, not the start-up).  "Logging off" is
``launch.log_every`` larger than ``launch.steps``: metrics.csv gets the last step only.  Target:
the default within 1.10x.  The job is ``--b7-overrides`` (default: digits_cnn, LA-2 ks (5, 2),
600 steps).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from launch.bench.processes import ROOT, free_port


def run_job(nprocs: int, overrides, out: Path, timeout: float = 900.0) -> dict:
    """One torchrun job; its summary's loop time and steps per second."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "launch", "launch=torch", *overrides,
               f"hydra.run.dir={out}"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the job {' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    summary = (out / "summary.txt").read_text()
    values = dict(re.findall(r"(\w+)=(\S+)", summary))
    return {"seconds": float(values["time_s"]), "steps_per_s": float(values["steps_per_s"]),
            "rows": sum(1 for _ in open(out / "metrics.csv")) - 1}


def cli_logging(*, nprocs: int, overrides, repeats: int) -> dict:
    """B7 (module docstring)."""
    overrides = list(overrides)
    variants = {"default log_every": [], "logging off": ["launch.log_every=1000000000"]}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            names = list(variants)
            for name in names[r % 2:] + names[:r % 2]:
                out = Path(tmp, f"{r}-{name.replace(' ', '-')}")
                runs[name].append(run_job(nprocs, overrides + variants[name], out))
    ratios = sorted(a["seconds"] / b["seconds"] for a, b in zip(runs["default log_every"], runs["logging off"]))
    ratio = ratios[len(ratios) // 2]
    row = {"name": f"{' '.join(overrides)}, {nprocs} procs: default log_every / logging off",
           "ratio": ratio, "target": 1.10, "met": ratio <= 1.10,
           "steps_per_s": [r["steps_per_s"] for r in runs["default log_every"]],
           "baseline_steps_per_s": [r["steps_per_s"] for r in runs["logging off"]],
           "metrics_rows": runs["default log_every"][0]["rows"]}
    return {"processes": nprocs, "overrides": overrides, "repeats": repeats, "rows": [row]}
