"""One rank of a spawned benchmark job (:func:`launch.bench.processes.spawn`).

``python -m launch.bench.rank TASK_JSON OUT_DIR``: opens a torch.distributed communicator from the
environment (an MPI one with ``"launch": "mpi"`` in the task, under mpiexec), runs the task
(``sync``: B2 and the GPU row, ``end_to_end``: B3, ``memory``: B4's distributed cases,
``post_local_sgd``: B6, ``exact_sync``: B8, ``premul``: the GPU run's PREMUL_SUM comparison) and
writes ``OUT_DIR/rank{R}.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def run_task(task: dict, comm) -> dict:
    """The result of ``task`` on this rank."""
    import torch

    from launch.bench.distributed import end_to_end, sync_cost
    from launch.bench.memory import run_case

    if task["task"] == "sync":
        result = {"rows": sync_cost(comm, task["sizes"], task["units"], task["repeats"])}
        if comm.device.type == "cuda":
            result["device_name"] = torch.cuda.get_device_name(comm.device)
        return result
    if task["task"] == "memory":
        return run_case(task["case"], comm)
    if task["task"] == "end_to_end":
        return end_to_end(comm, task["width"], task["batch_size"], tuple(task["ks"]), task["units"], task["repeats"])
    if task["task"] == "exact_sync":
        from launch.bench.distributed import exact_sync_cost

        return exact_sync_cost(comm, task["sizes"], task["rule_sizes"], task["units"], task["repeats"])
    if task["task"] == "premul":
        from launch.bench.distributed import premul_bits

        return premul_bits(comm)
    if task["task"] == "post_local_sgd":
        from launch.bench.post_local import post_local_sgd

        return post_local_sgd(comm, task["width"], task["batch_size"], task["periods"], task["units"], task["repeats"])
    raise ValueError("task must be sync, end_to_end, memory, post_local_sgd, exact_sync or premul; "
                     f"got {task['task']!r}")


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)
    from launch.comm.torch_dist import TorchCommunicator

    task, out = json.loads(argv[0]), argv[1]
    if task.get("launch") == "mpi":
        from launch.comm.mpi import MPICommunicator

        comm = MPICommunicator(timeout_s=task.get("timeout_s", 300))
    else:
        comm = TorchCommunicator(device=task.get("device", "cpu"), timeout_s=task.get("timeout_s", 300))
    try:
        result = run_task(task, comm)
        Path(out, f"rank{comm.rank}.json").write_text(json.dumps(result))
    finally:
        comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
