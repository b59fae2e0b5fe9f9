"""``python -m launch.bench --gpu``: the prepared run for a machine with CUDA GPUs; one JSON.

Four parts, each skipped with its reason where the machine cannot run it (no CUDA: every part;
one GPU: the NCCL one), in well under 8 minutes on one GPU:

``nccl``
    the NCCL weighted all-reduce (an LA-n sync, :mod:`launch.bench.distributed`'s B2 task, one
    rank per GPU, every GPU of the machine) over a raw NCCL all-reduce of the same buffer, as a
    bandwidth ratio (target >= 0.95), with the sync's defaults (the finiteness check on) and as
    compiled (check off).  Needs 2 GPUs or more.
``reference``
    co-located LA-2 on the device against the serial reference on the same device, float64,
    every agent after every iteration: the largest relative deviation ``max|x_i - y_i| /
    max|y_i|`` (target <= 1e-12).
``B1``
    B1 (:func:`launch.bench.colocated.overhead`) with the model, agents and batches on the device.
``cli``
    the default command-line job on the device, ``python -m launch launch.device=cuda`` (LA-2,
    co-located, float64, checked against the serial reference at every step): its exit status
    and summary line; and with 3 GPUs or more the ``launch=torch`` job, ``torchrun
    --nproc_per_node 3 -m launch launch=torch`` (one GPU per rank, NCCL, float32).

``premul``
    NCCL's ``ReduceOp.PREMUL_SUM`` (:class:`launch.engine.sync.blocks.PremulBlock`) against the
    two passes it replaces (``x.mul_(w)``, then the SUM all-reduce), bit for bit, per dtype and
    weight, one rank per GPU (one GPU: the product alone;
    :func:`launch.bench.distributed.premul_bits`): met unless the engine's rule
    (:func:`launch.engine.sync.compile.premul_applies`) chooses PREMUL_SUM where the bits differ.

``--device`` runs the parts that need no NCCL on another device (``--device cpu``: how the test
suite checks this script on a machine without CUDA).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launch.bench.processes import ROOT, free_port

GPU_PARTS = ("nccl", "reference", "B1", "cli", "premul")


def available(device: str) -> str | None:
    """Why ``device`` cannot be used here, or None."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return "no CUDA device"
    return None


def nccl(config) -> dict:
    """The ``nccl`` part: :func:`launch.bench.suite.gpu` (B2's task with NCCL)."""
    from launch.bench.suite import gpu

    return gpu(config)


def premul() -> dict:
    """The ``premul`` part: :func:`launch.bench.distributed.premul_bits` on one rank per GPU."""
    import torch

    from launch.bench.processes import spawn

    return spawn(torch.cuda.device_count(), {"task": "premul", "device": "cuda"})[0]


def reference(device: str, steps: int, width: int = 32, batch_size: int = 16) -> dict:
    """The ``reference`` part: co-located LA-2 vs the serial reference on ``device``, float64."""
    import torch

    import topology
    from agents.reference import MultilayerLookahead
    from launch.bench import workloads
    from launch.bench.colocated import sgd
    from launch.engine.simulation import Simulation

    ks, alphas = (5, 2), (0.5, 0.6)
    model = workloads.mlp(width).to(device=device, dtype=torch.float64)
    fixed = [(x.to(device=device, dtype=torch.float64), y.to(device)) for x, y in workloads.batches(model, batch_size)]
    sim = Simulation(model, workloads.loss_fn, workloads.stream(fixed), topology.multilayer(ks, alphas), sgd())
    ref = copy.deepcopy(model)
    optimizer = MultilayerLookahead(sgd()(list(ref.parameters())), ks, alphas)
    data = workloads.stream(fixed)
    worst = 0.0
    for _ in range(steps):
        sim.step()
        optimizer.zero_grad(set_to_none=True)
        workloads.loss_fn(ref, next(data)).backward()
        optimizer.step()
        columns = [list(ref.parameters())] + [optimizer.slow_params(level) for level in range(1, len(ks) + 1)]
        for i, column in enumerate(columns):
            y = torch.cat([p.detach().reshape(-1) for p in column])
            x = sim.agents[i].params
            worst = max(worst, float((x - y).abs().max() / y.abs().max()))
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device
    return {"rows": [{"name": f"co-located LA-2 ks={ks} vs serial reference, float64, {steps} steps, {name}",
                      "deviation": worst, "target": 1e-12, "met": worst <= 1e-12}],
            "device": str(device), "device_name": name, "parameters": workloads.num_parameters(model)}


def b1(config, device: str) -> dict:
    """The ``B1`` part on ``device``."""
    from launch.bench.colocated import overhead

    return overhead(width=config.b1_width, batch_size=config.b1_batch, k=config.k, units=config.b1_iterations,
                    repeats=config.b1_repeats, device=device)


def cli(device: str, overrides=(), timeout: float = 300.0) -> dict:
    """The ``cli`` part: the default job with ``launch.device=<device>`` (and the torchrun job on
    3 GPUs when the machine has them)."""
    import torch

    rows = [_cli_run([sys.executable, "-m", "launch", f"launch.device={device}", *overrides],
                     "python -m launch launch.device=" + device, timeout)]
    if device.startswith("cuda") and torch.cuda.device_count() >= 3:
        rows.append(_cli_run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3",
                              "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "launch",
                              "launch=torch", *overrides], "torchrun --nproc_per_node 3 -m launch launch=torch",
                             timeout))
    else:
        rows.append({"name": "torchrun --nproc_per_node 3 -m launch launch=torch",
                     "skipped": "needs 3 CUDA devices (one per agent of the default LA-2)"})
    return {"rows": rows}


def _cli_run(command: list[str], name: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        start = time.perf_counter()
        done = subprocess.run(command + [f"hydra.run.dir={out}"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)
        summary = Path(out, "summary.txt").read_text().strip() if Path(out, "summary.txt").exists() else ""
    values = dict(re.findall(r"(\w+)=(\S+)", summary))
    return {"name": name, "returncode": done.returncode, "summary": summary,
            "steps_per_s": float(values["steps_per_s"]) if "steps_per_s" in values else None,
            "wall_seconds": time.perf_counter() - start, "met": done.returncode == 0 and "status=ok" in summary,
            **({} if done.returncode == 0 else {"output": (done.stdout + done.stderr)[-3000:]})}


def run(config, device: str = "cuda") -> dict:
    """Every part (module docstring); a part that fails is recorded with its error."""
    import traceback

    results = {}
    why = available(device)
    for part in GPU_PARTS:
        start = time.perf_counter()
        if why is not None:
            results[part] = {"skipped": why}
            continue
        try:
            if part == "nccl":
                results[part] = nccl(config) if device.startswith("cuda") else {"skipped": "NCCL needs CUDA"}
            elif part == "reference":
                results[part] = reference(device, steps=config.gpu_reference_steps)
            elif part == "B1":
                results[part] = b1(config, device)
            elif part == "premul":
                results[part] = premul() if device.startswith("cuda") else {"skipped": "NCCL needs CUDA"}
            else:
                results[part] = cli(device, config.gpu_cli_overrides)
        except Exception as err:  # noqa: BLE001 - the run goes on and records what failed
            results[part] = {"error": "".join(traceback.format_exception_only(err)).strip(),
                             "traceback": traceback.format_exc()}
        results[part]["wall_seconds"] = time.perf_counter() - start
    return results


def table(results: dict) -> str:
    """The GPU run as text, one line per figure."""
    lines = []
    for part in GPU_PARTS:
        result = results[part]
        lines.append(part)
        if "skipped" in result or "error" in result:
            lines.append(f"    {'skipped: ' + result['skipped'] if 'skipped' in result else 'error: ' + result['error']}")
            continue
        for row in result.get("rows", []):
            if "skipped" in row:
                lines.append(f"    {row['name']}: skipped: {row['skipped']}")
            elif "deviation" in row:
                lines.append(f"    {row['name']:<70} {row['deviation']:.2e}  target {row['target']:g}  "
                             f"{'yes' if row['met'] else 'NO'}")
            elif "same_bits" in row:
                lines.append(f"    {row['name']:<70} same bits: {'yes' if row['same_bits'] else 'no'}, "
                             f"chosen: {'yes' if row['premul_chosen'] else 'no'}  {'yes' if row['met'] else 'NO'}")
            elif "summary" in row:
                lines.append(f"    {row['name']}: exit {row['returncode']}; {row['summary'] or '(no summary)'}")
            else:
                extra = f"  (check off: {row['ratio_check_off']:.3f})" if "ratio_check_off" in row else ""
                target = row.get("target", "")
                target = f"{target:.2f}" if isinstance(target, float) else str(target)
                lines.append(f"    {row['name']:<70} {row['ratio']:.3f}{extra}  target {target}  "
                             f"{'yes' if row.get('met') else 'NO'}")
        if "device_name" in result:
            lines.append(f"    device: {result['device_name']}")
    return "\n".join(lines)
