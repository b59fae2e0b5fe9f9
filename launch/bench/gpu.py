"""``python -m launch.bench --gpu``: the acceptance run for a machine with CUDA GPUs.

One JSON (``--json``, default gpu.json) and one line per part: ``PASS``, ``FAIL`` or ``SKIP``,
the part's name and what it found.  In under 8 minutes on one GPU.  The parts, in order:

``versions``      torch, CUDA, cuDNN, NCCL, the device's name and the number of GPUs.
``torchrun``      ``torchrun --nproc_per_node 1 -m launch launch=torch`` (NCCL end to end) with
                  checkpoints, a resume, and a resume of the same checkpoint on the CPU
                  (:mod:`launch.bench.gpu_jobs`).
``own_loop``      the own loop on the device: fused Adam, GradScaler with autocast,
                  ``torch.compile``, a forced-inf step that must not count
                  (:mod:`launch.bench.gpu_loops`).
``reference``     co-located LA-2 on the device against the serial reference, float64.
``low_precision`` the default command-line job in bfloat16 and float16.
``host_syncs``    host synchronisations per step and per sync.
``B1``            B1 (:func:`launch.bench.colocated.overhead`) on the device, synchronised once per
                  round.
``ring``          a co-located ring of 256 agents: time per agent-step on the device and on the CPU.
``nccl``          (2 GPUs or more) the NCCL weighted all-reduce over a raw one, as a bandwidth ratio
                  (target >= 0.95; :func:`launch.bench.suite.gpu`).
``torchrun_2``    (2 GPUs) ``torchrun --nproc_per_node 2 -m launch launch=torch topology=lookahead``
                  and the own loop on 2 ranks.
``sigstop``       (2 GPUs) one rank stopped with SIGSTOP: named by the other, within a bound.

``--device cpu`` runs every part on the CPU instead (gloo for the torchrun jobs; ``nccl`` is
skipped): how the test suite checks this script on a machine without CUDA.  Without CUDA and
without ``--device cpu`` every part is skipped with its reason.
"""

from __future__ import annotations

import time
import traceback

from launch.bench import gpu_jobs, gpu_loops

PARTS = ("versions", "torchrun", "own_loop", "reference", "low_precision", "host_syncs", "B1", "ring", "nccl",
         "torchrun_2", "sigstop")
#: Parts that need 2 GPUs on CUDA (one rank per GPU).
MULTI_GPU = ("nccl", "torchrun_2", "sigstop")


def available(device: str) -> str | None:
    """Why ``device`` cannot be used here, or None."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return "no CUDA device"
    return None


def versions(config, device: str) -> dict:
    """The ``versions`` part."""
    import torch

    cuda = torch.cuda.is_available()
    nccl_version = torch.cuda.nccl.version() if cuda else None      # (major, minor, patch); an int before 2.0
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count() if cuda else 0,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "nccl": ".".join(map(str, nccl_version)) if isinstance(nccl_version, tuple) else nccl_version,
            "device": device, "device_name": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda")
            else "cpu"}
    info["passed"] = not device.startswith("cuda") or info["nccl"] is not None
    info["summary"] = (f"torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, NCCL {info['nccl']}, "
                       f"{info['gpus']} GPU(s), device {device}: {info['device_name']}")
    return info


def b1(config, device: str) -> dict:
    """The ``B1`` part on ``device``."""
    from launch.bench.colocated import overhead

    result = overhead(width=config.b1_width, batch_size=config.b1_batch, k=config.k, units=config.b1_iterations,
                      repeats=config.b1_repeats, device=device)
    timed = [row for row in result["rows"] if "ratio" in row]
    result["passed"] = all(row["met"] for row in timed if row["name"].startswith("LA-"))
    result["summary"] = ", ".join(f"{row['name']} {row['ratio']:.3f} (target {row['target']:.2f})" for row in timed)
    return result


def nccl(config, device: str) -> dict:
    """The ``nccl`` part: :func:`launch.bench.suite.gpu` (B2's task with NCCL)."""
    from launch.bench.suite import gpu

    result = gpu(config)
    rows = result.get("rows", [])
    result["passed"] = bool(rows) and all(row["met"] for row in rows)
    result["summary"] = "; ".join(f"{row['name']}: {row['ratio']:.3f} (target 0.95)" for row in rows)
    return result


RUNNERS = {"versions": versions, "torchrun": gpu_jobs.checkpoint_resume, "own_loop": gpu_loops.own_loop,
           "reference": gpu_loops.reference, "low_precision": gpu_jobs.low_precision,
           "host_syncs": gpu_loops.host_syncs, "B1": b1, "ring": gpu_loops.ring, "nccl": nccl,
           "torchrun_2": gpu_jobs.two_ranks, "sigstop": gpu_jobs.stopped_rank}


def why_skipped(part: str, device: str) -> str | None:
    """Why ``part`` cannot run on ``device`` here, or None."""
    import torch

    why = available(device)
    if why is not None:
        return why
    if part == "nccl" and not device.startswith("cuda"):
        return "NCCL needs CUDA"
    if part in MULTI_GPU and device.startswith("cuda") and torch.cuda.device_count() < 2:
        return f"needs 2 CUDA devices (one rank per GPU); found {torch.cuda.device_count()}"
    return None


def run(config, device: str = "cuda", only=PARTS) -> dict:
    """Every part of ``only`` (module docstring); a part that raises is recorded with its error."""
    results = {}
    for part in only:
        start = time.perf_counter()
        why = why_skipped(part, device)
        try:
            results[part] = {"skipped": why} if why is not None else RUNNERS[part](config, device)
        except Exception as err:  # noqa: BLE001 - the run goes on and records what failed
            results[part] = {"passed": False, "error": "".join(traceback.format_exception_only(err)).strip(),
                             "traceback": traceback.format_exc()}
            results[part]["summary"] = results[part]["error"].splitlines()[-1]
        results[part]["wall_seconds"] = time.perf_counter() - start
    return results


def lines(results: dict) -> list[str]:
    """One line per part: PASS / FAIL / SKIP, its name, what it found, its wall time."""
    out = []
    for part in PARTS:
        if part not in results:
            continue
        result = results[part]
        if "skipped" in result:
            out.append(f"SKIP {part}: {result['skipped']}")
            continue
        verdict = "PASS" if result.get("passed") else "FAIL"
        out.append(f"{verdict} {part}: {result.get('summary', '')} ({result['wall_seconds']:.0f} s)")
    return out
