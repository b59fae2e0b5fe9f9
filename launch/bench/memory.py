"""B4: peak resident memory, each case in a fresh process, over a bare baseline process.

The peak is the kernel's high-water mark of the process's resident set (``VmHWM`` in
``/proc/self/status``), read after the run: it sees every allocation, torch's included (which
``tracemalloc`` does not), and a fresh process per case keeps one case's peak out of another's.

Every case builds the same MLP (float32) and runs the same inner optimizer (SGD with momentum, so
the optimizer holds one copy of the parameters' size) for ``steps`` iterations:

``bare``
    the model and its optimizer: parameters, gradients, momentum.
``colocated LA-n``
    ``launch.Simulation`` of LA-n (ks = 2, ..., 2) with its n + 1 = m agents in this process; the
    user's model stays alive, as in the baseline.
``distributed bare``
    rank 0 of a 2-process torch.distributed (gloo) job running the bare case: the baseline of a
    rank (the process group, its threads and buffers cost a few MB).
``distributed LA-1``
    rank 0 (the fast worker) and rank 1 (the slow agent) of LA-1 under torch.distributed (gloo).
``distributed LA-1 fast rank, overlap``
    the same with ``overlap=True`` (:mod:`launch.engine.sync.overlap`): the fast rank holds one more flat
    copy, the scratch that receives the slow agent's part (target <= 2.1).

The excess is reported in *flat copies*: (peak - baseline peak) / (d x itemsize), over ``bare``
for co-located runs and over ``distributed bare`` for ranks.  Targets: one flat copy on the fast
rank (its flat buffer, beside the user's model), with 0.1 copy allowed for the collectives'
transient buffers and bookkeeping (<= 1.1); m +- 0.5 for m co-located agents (their m buffers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def peak_rss_bytes() -> int:
    """The high-water mark of this process's resident set, in bytes (Linux ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (B4 needs Linux)")


def run_case(case: dict, comm=None) -> dict:
    """Build and run ``case`` in this (fresh) process; its peak resident memory."""
    import torch

    import topology
    from launch.bench import workloads
    from launch.engine.simulation import Simulation

    torch.set_num_threads(1)
    model = workloads.mlp(case["width"])
    fixed = workloads.batches(model, case["batch_size"], count=2)
    optimizer = lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=True)  # noqa: E731
    depth = case.get("depth", 0)
    if depth == 0:
        if comm is not None:
            comm.barrier()
        opt = optimizer(list(model.parameters()))
        data = workloads.stream(fixed)
        for _ in range(case["steps"]):
            opt.zero_grad(set_to_none=True)
            workloads.loss_fn(model, next(data)).backward()
            opt.step()
    else:
        sim = Simulation(model, workloads.loss_fn, workloads.stream(fixed),
                         topology.multilayer((2,) * depth, (0.5,) * depth), optimizer, comm=comm,
                         overlap=case.get("overlap", False))
        sim.run(case["steps"])
    return {"peak_bytes": peak_rss_bytes(), "parameters": workloads.num_parameters(model),
            "itemsize": 4}


def measure(case: dict, timeout: float = 300.0) -> dict:
    """``run_case(case)`` in a fresh Python process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "launch.bench.memory", json.dumps(case)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"memory case {case} failed:\n{done.stdout}{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(*, width: int, batch_size: int, depths: tuple[int, ...], repeats: int) -> dict:
    """B4: every case ``repeats`` times, interleaved with the baseline; medians of the peaks."""
    from launch.bench.processes import spawn
    from launch.bench.timing import median

    base = {"width": width, "batch_size": batch_size}
    peaks: dict[str, list[int]] = {}
    d = itemsize = None
    for _ in range(repeats):
        for name, case in [("bare", dict(base, steps=4))] + [
            (f"colocated LA-{n}", dict(base, depth=n, steps=2 ** n)) for n in depths
        ]:
            result = measure(case)
            d, itemsize = result["parameters"], result["itemsize"]
            peaks.setdefault(name, []).append(result["peak_bytes"])
        ranks = spawn(2, {"task": "memory", "case": dict(base, steps=4)})
        peaks.setdefault("distributed bare", []).append(ranks[0]["peak_bytes"])
        ranks = spawn(2, {"task": "memory", "case": dict(base, depth=1, steps=4)})
        peaks.setdefault("distributed LA-1 fast rank", []).append(ranks[0]["peak_bytes"])
        peaks.setdefault("distributed LA-1 slow rank", []).append(ranks[1]["peak_bytes"])
        ranks = spawn(2, {"task": "memory", "case": dict(base, depth=1, steps=4, overlap=True)})
        peaks.setdefault("distributed LA-1 fast rank, overlap", []).append(ranks[0]["peak_bytes"])
    copy_bytes = d * itemsize
    rows = []
    for name, values in peaks.items():
        baseline = "distributed bare" if name.startswith("distributed LA") else "bare"
        extra = (median(values) - median(peaks[baseline])) / copy_bytes
        row = {"name": name, "peak_bytes": median(values), "baseline": baseline, "extra_copies": extra}
        if name.startswith("colocated LA-"):
            m = int(name.rsplit("-", 1)[1]) + 1
            row.update(agents=m, target=f"{m} +- 0.5", met=abs(extra - m) <= 0.5)
        elif name == "distributed LA-1 fast rank":
            row.update(target="<= 1.1", met=extra <= 1.1)
        elif name == "distributed LA-1 fast rank, overlap":
            row.update(target="<= 2.1", met=extra <= 2.1)
        rows.append(row)
    return {"parameters": d, "bytes_per_copy": copy_bytes, "repeats": repeats,
            "rows": rows}


if __name__ == "__main__":
    print(json.dumps(run_case(json.loads(sys.argv[1]))))
