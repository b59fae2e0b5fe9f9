"""The benchmark suite's configuration and the runners of B2, B3, B6 and GPU around :func:`spawn`.

:class:`Config` holds every size and repeat count; :data:`TINY` is a configuration that runs in
seconds (what the test suite runs), the defaults are the figures in the README.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from launch.bench.processes import spawn

BENCHMARKS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "GPU")


@dataclass(frozen=True)
class Config:
    """Sizes and repeats of every benchmark (see ``python -m launch.bench --help``)."""

    repeats: int = 11                      # interleaved rounds of every timed benchmark (B2, B3, B5)
    # B1: co-located overhead
    b1_width: int = 1024                   # MLP width: 1024 -> 1.06M parameters
    b1_batch: int = 64
    k: int = 5                             # k_1 of LA-n (B1) and of LA-2 (B3)
    b1_iterations: int = 40                # per round: a multiple of LA-4's period 5 * 2 * 2 * 2
    b1_repeats: int = 15
    # B2: sync cost
    b2_processes: tuple[int, ...] = (2, 3, 4)
    b2_sizes: tuple[int, ...] = (1_000_000, 25_000_000)
    b2_syncs: int = 5                      # syncs per round at d >= 10M (more below: see syncs_per_round)
    # B3: end to end
    b3_width: int = 1024
    b3_batch: int = 64
    b3_iterations: int = 20                # per round: a multiple of LA-2's period k * 2
    # B4: memory
    b4_width: int = 4096                   # 16.8M parameters: 67 MB per flat float32 copy
    b4_batch: int = 16
    b4_depths: tuple[int, ...] = (1, 2, 4)
    b4_repeats: int = 3
    # B5: scale
    b5_agents: tuple[int, ...] = (8, 32, 128)
    b5_width: int = 320                    # 104k parameters
    b5_batch: int = 32
    b5_agent_iterations: int = 512         # per round, for every number of agents
    # B6: local SGD vs PyTorch's post-local SGD
    b6_workers: tuple[int, ...] = (2, 4)
    b6_periods: tuple[int, ...] = (1, 8)
    b6_width: int = 1024                   # 1.06M parameters
    b6_batch: int = 64
    b6_iterations: int = 16                # per round (a multiple of every period)
    # B7: the command line's metrics (torchrun jobs)
    b7_processes: int = 3
    b7_overrides: tuple[str, ...] = ("problem=digits_cnn", "launch.steps=600")
    b7_repeats: int = 3
    # B8: the exact sync over the default sync
    b8_processes: tuple[int, ...] = (3, 4)
    b8_sizes: tuple[int, ...] = (1_000_000, 25_000_000)
    b8_rule_sizes: tuple[int, ...] = (256, 4096, 65536, 1_048_576)   # the gather-or-chain rule's range
    b8_rule_launches: tuple[str, ...] = ("torch", "mpi")
    # GPU
    gpu_sizes: tuple[int, ...] = (25_000_000,)
    gpu_syncs: int = 20
    gpu_reference_steps: int = 300         # LA-2 vs the reference
    gpu_cli_overrides: tuple[str, ...] = ()   # every command-line job's (the problem's size)
    gpu_job_steps: int = 200               # a command-line job's steps (the resume: as many again)
    gpu_own_loop_steps: int = 100
    gpu_sync_steps: int = 40               # steps whose host synchronisations are counted
    gpu_ring_agents: int = 256
    gpu_stop_timeout_s: int = 10           # launch.timeout_s of the job whose rank is stopped

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


#: A configuration that runs every benchmark in seconds (what tests/test_bench.py runs).
TINY = Config(
    repeats=2, b1_width=64, b1_batch=8, b1_iterations=10, b1_repeats=2, b2_processes=(2,), b2_sizes=(10_000,),
    b2_syncs=2, b3_width=64, b3_batch=8, b3_iterations=10, b4_width=512, b4_batch=4,
    b4_depths=(1,), b4_repeats=1, b5_agents=(2, 4), b5_width=32, b5_batch=4, b5_agent_iterations=8,
    b6_workers=(2,), b6_periods=(1, 2), b6_width=32, b6_batch=4, b6_iterations=4,
    b7_overrides=("problem.dim=4", "problem.hidden=4", "launch.steps=20"), b7_repeats=1,
    b8_processes=(3,), b8_sizes=(10_000,), b8_rule_sizes=(256,), b8_rule_launches=("torch",),
    gpu_sizes=(10_000,), gpu_syncs=2, gpu_reference_steps=20, gpu_cli_overrides=("problem.dim=4", "problem.hidden=4"),
    gpu_job_steps=10, gpu_own_loop_steps=12, gpu_sync_steps=20, gpu_ring_agents=4, gpu_stop_timeout_s=5,
)


def _merge_sync_rows(ranks: list[dict]) -> list[dict]:
    """Rank 0's rows of a ``sync`` task, with the counts checked on every rank."""
    rows = []
    for i, row in enumerate(ranks[0]["rows"]):
        per_rank = [r["rows"][i] for r in ranks]
        row = dict(row)
        row["counts_match_plan_on_every_rank"] = all(
            r["collectives_per_sync"] == r["plan_collectives"] and r["bytes_per_sync"] == r["plan_bytes"]
            and r.get("flag_reduces_per_sync", 0) == 0 for r in per_rank
        )
        rows.append(row)
    return rows


def sync_cost(config: Config) -> dict:
    """B2: one spawned job per number of processes, every size inside it."""
    rows = []
    for n in config.b2_processes:
        ranks = spawn(n, {"task": "sync", "sizes": list(config.b2_sizes), "units": config.b2_syncs,
                          "repeats": config.repeats})
        for row in _merge_sync_rows(ranks):
            row.update(name=f"LA-{n - 1} sync / all_reduce, {n} procs, d={row['parameters']:,}",
                       target=1.10, met=row["ratio"] <= 1.10)
            rows.append(row)
    return {"backend": "gloo", "syncs_per_round_at_10M": config.b2_syncs, "repeats": config.repeats, "rows": rows}


def end_to_end(config: Config) -> dict:
    """B3: distributed LA-2 on 3 processes over the serial reference on one."""
    ks = (config.k, 2)
    result = spawn(3, {"task": "end_to_end", "width": config.b3_width, "batch_size": config.b3_batch,
                       "ks": list(ks), "units": config.b3_iterations, "repeats": config.repeats})[0]
    rows = [dict(name=f"LA-2 ks={ks}, 3 procs ({variant}) / serial reference, 1 proc", target=1.15,
                 met=figures["ratio"] <= 1.15, **figures)
            for variant, figures in result["variants"].items()]
    exact = result["exact_over_default"]
    rows.append(dict(name=f"LA-2 ks={ks}, 3 procs (exact) / (default), end to end", target=1.05, met=exact <= 1.05,
                     ratio=exact, seconds=result["variants"]["exact"]["seconds"]))
    return {"ks": list(ks), "batch_size": config.b3_batch, "iterations_per_round": config.b3_iterations,
            "repeats": config.repeats, "parameters": result["parameters"],
            "default_overlapped": result["default_overlapped"],
            "serial_seconds": result["serial_seconds"], "rows": rows}


def post_local(config: Config) -> dict:
    """B6: one spawned job per number of workers, every period inside it."""
    rows, parameters = [], None
    for w in config.b6_workers:
        ranks = spawn(w, {"task": "post_local_sgd", "width": config.b6_width, "batch_size": config.b6_batch,
                          "periods": list(config.b6_periods), "units": config.b6_iterations,
                          "repeats": config.repeats})
        parameters = ranks[0]["parameters"]
        for row in ranks[0]["rows"]:
            row.update(name=f"local SGD / PostLocalSGDOptimizer, W={w}, period {row['period']}",
                       target=1.00, met=row["ratio"] <= 1.00)
            rows.append(row)
            rows.append(dict(name=f"own loop (AgentOptimizer) / PostLocalSGDOptimizer, W={w}, period {row['period']}",
                             target=1.00, met=row["own_loop_ratio"] <= 1.00, ratio=row["own_loop_ratio"],
                             seconds=row["own_loop_seconds"], workers=w, period=row["period"],
                             bit_identical=row["bit_identical"], own_loop=True))
    return {"backend": "gloo", "parameters": parameters, "batch_size": config.b6_batch,
            "repeats": config.repeats, "rows": rows}


def exact_sync(config: Config) -> dict:
    """B8: one spawned job per launcher and number of processes, every size inside it (the
    exact / default rows on gloo; the strategy rule's rows on every launcher of
    ``b8_rule_launches``)."""
    rows, rule_rows = [], []
    for launch in dict.fromkeys(("torch",) + config.b8_rule_launches):
        for n in config.b8_processes:
            result = spawn(n, {"task": "exact_sync", "launch": launch,
                               "sizes": list(config.b8_sizes) if launch == "torch" else [],
                               "rule_sizes": list(config.b8_rule_sizes) if launch in config.b8_rule_launches else [],
                               "units": config.b2_syncs, "repeats": config.repeats})[0]
            for row in result["rows"]:
                row.update(name=f"exact / default LA-{n - 1} sync, {n} procs, d={row['parameters']:,}",
                           target=1.30, met=row["ratio"] <= 1.30)
                rows.append(row)
            rule_rows += [dict(row, launch=launch) for row in result["rule_rows"]]
    return {"backend": "gloo", "repeats": config.repeats, "rows": rows, "rule_rows": rule_rows}


def gpu(config: Config) -> dict:
    """NCCL: weighted all-reduce (an LA sync) bandwidth over raw all-reduce, one rank per GPU."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    count = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    if count < 2:
        return {"skipped": f"needs 2 CUDA devices (NCCL: one rank per GPU); found 1: {name}",
                "device_name": name}
    ranks = spawn(count, {"task": "sync", "device": "cuda", "sizes": list(config.gpu_sizes),
                          "units": config.gpu_syncs, "repeats": config.repeats})
    rows = []
    for row in _merge_sync_rows(ranks):
        # bandwidth = bytes / time, the same bytes: the bandwidth ratio is raw time / sync time.
        bandwidth_ratio = 1.0 / row["ratio"]
        row["ratio_check_off"] = 1.0 / row["ratio_check_off"]      # as compiled, check off
        row.update(name=f"NCCL weighted / raw all-reduce bandwidth, {count} GPUs, d={row['parameters']:,}",
                   ratio=bandwidth_ratio, target=0.95, met=bandwidth_ratio >= 0.95,
                   sync_bandwidth_bytes_per_s=row["bytes_per_sync"] / row["sync_seconds"],
                   raw_bandwidth_bytes_per_s=row["bytes_per_sync"] / row["raw_seconds"])
        rows.append(row)
    return {"backend": "nccl", "device_name": ranks[0].get("device_name", name), "devices": count,
            "rows": rows}


__all__ = ["BENCHMARKS", "Config", "TINY", "sync_cost", "end_to_end", "post_local", "exact_sync", "gpu"]
