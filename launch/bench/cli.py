"""``python -m launch.bench``: the performance benchmarks; prints a table and writes JSON.

Every figure is a ratio of two things measured side by side in the same run, in interleaved rounds
(A, B, A, B, ...), and the median over rounds is reported (see :mod:`launch.bench`):

B1  co-located overhead: LA-1, LA-2, LA-4 over the bare inner optimizer (torch.optim.SGD with
    foreach), an MLP of about 1M parameters; target <= 1 + 1/k_1 + 0.05.  The serial reference
    Lookahead over torch-optimizer's Lookahead; target <= 1.0.
B2  sync cost: a distributed LA-n sync over a raw dist.all_reduce of the same flat buffer on the
    same group (gloo, 2 to 4 processes, 1M to 25M parameters); target <= 1.10.  The sync with the
    defaults (the finiteness check on, carried by the all-reduce itself); as its plan compiles it
    (check_finite off) on a second line.  Collectives and bytes per sync, from the communicator's
    stats, against the plan's count (and no collective of the check).
B3  end to end: time per iteration of distributed LA-2 on 3 processes over the serial reference
    on one, k_1 >= 5; target <= 1.15.  Four variants: the default (overlap="auto": overlapped,
    the finiteness check on), the default without the check, overlap=False, and exact=True (every
    sum in agent order); and the exact mode over the default end to end, target <= 1.05.
B4  memory: peak resident memory per rank over the bare model plus optimizer, in flat copies;
    target: at most 1 on the fast rank, about m for m co-located agents.
B5  scale: co-located gossip ring with 8, 32, 128 agents of a 100k-parameter model, time per
    iteration per agent; target: the largest within 1.2x of the smallest.
B6  the project's local SGD (topology.local_sgd, defaults) over PyTorch's PostLocalSGDOptimizer +
    PeriodicModelAverager(period, warmup_steps=period - 1), the same averaging on the same steps,
    same 1M-parameter model and batches, gloo, W = 2 and 4, period 1 and 8; target <= 1.00; the
    averaging step alone on a second line; the two sides' final bits compared.  And the own loop:
    launch.AgentOptimizer around the same SGD, a plain loop calling its step(), over the same
    PyTorch run; target <= 1.00.
B7  the command line: a torchrun LA-2 job (digits_cnn, float32) with the default launch.log_every
    over the same job with logging off; target <= 1.10.
B8  the exact sync (every sum in agent order, bit-identical on any layout; compile_sync(exact=True))
    over the default sync, the same LA-n sync on the same buffer, gloo, 3 and 4 processes, 1M and
    25M parameters; target <= 1.30.  Below, for the rule that picks a block's strategy (by
    backend): the gathered, sharded and chained exact sync, each over the default sync, gloo and
    MPI.
GPU NCCL weighted all-reduce bandwidth over raw NCCL all-reduce (>= 0.95), with the device name;
    "skipped: no CUDA device" without one.  ``--gpu`` runs the acceptance run for a GPU
    machine instead (:mod:`launch.bench.gpu`: one JSON, one PASS / FAIL / SKIP line per part;
    ``--device cpu`` runs its parts on the CPU).

Ratios are on wall-clock time; single-process rows (B1, B5) also give the ratio of the process's
CPU time, "(cpu)", which leaves out what other processes of a shared machine take.
Every process runs with one intra-op thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``).
Exit status 0 when the benchmarks ran (1 with ``--check`` when a target is missed).

Example: ``python -m launch.bench --tiny --json /tmp/bench.json`` (seconds);
``python -m launch.bench --json bench.json`` (the README's table, minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

BENCHMARK_TITLES = {
    "B1": "co-located overhead", "B2": "sync cost", "B3": "end to end", "B4": "memory",
    "B5": "scale", "B6": "local SGD vs PyTorch's post-local SGD", "B7": "command-line metrics",
    "B8": "exact sync", "GPU": "NCCL bandwidth",
}


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": model, "python": platform.python_version(), "torch": torch.__version__,
        "platform": platform.platform(), "load_average_at_start": list(os.getloadavg()),
    }


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v.replace("_", "")) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return values


def parse(argv):
    from launch.bench.suite import BENCHMARKS

    parser = argparse.ArgumentParser(prog="python -m launch.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="bench.json", help="where to write the results (default bench.json)")
    parser.add_argument("--tiny", action="store_true", help="a tiny configuration that runs in seconds")
    parser.add_argument("--only", type=lambda s: tuple(s.split(",")), default=BENCHMARKS,
                        help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--repeats", type=int, help="interleaved rounds per timed benchmark (median reported)")
    parser.add_argument("--k", type=int, help="k_1 of LA-n in B1 and B3 (>= 5 for B3's target)")
    parser.add_argument("--b2-processes", type=_ints, help="B2 process counts, e.g. 2,3,4")
    parser.add_argument("--b2-sizes", type=_ints, help="B2 flat buffer sizes, e.g. 1000000,25000000")
    parser.add_argument("--b4-repeats", type=int, help="fresh processes per B4 case (median reported)")
    parser.add_argument("--b5-agents", type=_ints, help="B5 numbers of agents, e.g. 8,32,128")
    parser.add_argument("--b8-processes", type=_ints, help="B8 process counts, e.g. 3,4")
    parser.add_argument("--b8-sizes", type=_ints, help="B8 flat buffer sizes, e.g. 1000000,25000000")
    parser.add_argument("--b6-workers", type=_ints, help="B6 numbers of processes, e.g. 2,4")
    parser.add_argument("--b6-periods", type=_ints, help="B6 averaging periods, e.g. 1,8")
    parser.add_argument("--gpu", action="store_true",
                        help="the acceptance run for a GPU machine instead (launch.bench.gpu); JSON default gpu.json")
    parser.add_argument("--device", default="cuda",
                        help="--gpu: the device of its parts (default cuda; cpu to run them without one)")
    parser.add_argument("--parts", type=lambda s: tuple(s.split(",")), default=None,
                        help="--gpu: comma-separated subset of its parts (default: all)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a measured target is missed")
    args = parser.parse_args(argv)
    unknown = [b for b in args.only if b not in BENCHMARKS]
    if unknown:
        parser.error(f"--only must name benchmarks among {', '.join(BENCHMARKS)}; got {', '.join(unknown)}")
    from launch.bench.gpu import PARTS

    unknown = [p for p in args.parts or () if p not in PARTS]
    if unknown:
        parser.error(f"--parts must name parts among {', '.join(PARTS)}; got {', '.join(unknown)}")
    for name in ("repeats", "k", "b4_repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer; got {value}")
    return args


def config_from(args):
    from launch.bench.suite import TINY, Config

    config = TINY if args.tiny else Config()
    changes = {name: getattr(args, name) for name in ("repeats", "k", "b2_processes", "b2_sizes", "b4_repeats",
                                                      "b5_agents", "b6_workers", "b6_periods", "b8_processes",
                                                      "b8_sizes")
               if getattr(args, name) is not None}
    if args.repeats is not None:
        changes["b1_repeats"] = args.repeats
    return config.replace(**changes)


def run_benchmark(name: str, config) -> dict:
    from launch.bench import colocated, memory, suite

    if name == "B1":
        return colocated.overhead(width=config.b1_width, batch_size=config.b1_batch, k=config.k,
                                  units=config.b1_iterations, repeats=config.b1_repeats)
    if name == "B2":
        return suite.sync_cost(config)
    if name == "B3":
        return suite.end_to_end(config)
    if name == "B4":
        return memory.memory(width=config.b4_width, batch_size=config.b4_batch, depths=config.b4_depths,
                             repeats=config.b4_repeats)
    if name == "B5":
        return colocated.scale(agents=config.b5_agents, width=config.b5_width, batch_size=config.b5_batch,
                               units=config.b5_agent_iterations, repeats=config.repeats)
    if name == "B6":
        return suite.post_local(config)
    if name == "B8":
        return suite.exact_sync(config)
    if name == "B7":
        from launch.bench.cli_logging import cli_logging

        return cli_logging(nprocs=config.b7_processes, overrides=config.b7_overrides, repeats=config.b7_repeats)
    return suite.gpu(config)


def _exact_row(row: dict) -> list[str]:
    """B8: an exact row's times and the exact sync's counts."""
    if "exact_counts_per_sync" not in row:
        return []
    return [f"{'':8}exact {row['exact_seconds'] * 1e3:.2f} ms ({row['strategy']}: {row['exact_counts_per_sync']}), "
            f"default {row['default_seconds'] * 1e3:.2f} ms"]


def _strategy_rule(result: dict) -> list[str]:
    """B8: the rows of the rule that picks an exact block's strategy."""
    return [f"{'':8}{row['launch']}, {row['processes']} procs, d={row['parameters']:,}: gather "
            f"{row['gather_ratio']:.3f}x, shards {row['shards_ratio']:.3f}x, chain {row['chain_ratio']:.3f}x the default "
            f"sync; the rule: {row['rule']}"
            for row in result.get("rule_rows", [])]


def table(results: dict) -> str:
    """The results as a fixed-width text table (one line per figure)."""
    lines = [f"{'':4}{'figure':<66}{'value':>9}{'(cpu)':>8}{'target':>10}  met", "-" * 102]
    for name, title in BENCHMARK_TITLES.items():
        result = results[name]
        lines.append(f"{name:<4}{title}")
        if "skipped" in result:
            lines.append(f"{'':4}skipped: {result['skipped']}")
            continue
        if "error" in result:
            lines.append(f"{'':4}error: {result['error'].splitlines()[0]}")
            continue
        for row in result["rows"]:
            if "skipped" in row:
                lines.append(f"{'':4}{row['name']}: skipped: {row['skipped']}")
                continue
            value = row["ratio"] if "ratio" in row else row.get("extra_copies")
            unit = "x" if "ratio" in row else " copies"
            target = row.get("target", "")
            target = f"{target:.2f}" if isinstance(target, float) else str(target)
            met = {True: "yes", False: "NO", None: ""}[row.get("met")]
            cpu = f"{row['cpu_ratio']:.3f}x" if "cpu_ratio" in row else ""
            lines.append(f"{'':4}{row['name']:<66}{value:>8.3f}{unit if unit == 'x' else ' '}{cpu:>8}"
                         f"{target:>10}  {met}")
            if "collectives_per_sync" in row:
                lines.append(
                    f"{'':8}per sync: {row['collectives_per_sync']} all-reduce, {row['bytes_per_sync']:,} bytes, "
                    f"{row.get('flag_reduces_per_sync', 0)} other collective "
                    f"(plan: {row['plan_collectives']}, {row['plan_bytes']:,}, 0); equal on every rank: "
                    f"{'yes' if row['counts_match_plan_on_every_rank'] else 'NO'}")
            if "ratio_check_off" in row and "scale_seconds" in row:
                lines.append(
                    f"{'':8}as compiled, the finiteness check off: {row['ratio_check_off']:.3f}x "
                    f"({row['unchecked_sync_seconds'] * 1e3:.2f} ms)")
            if "scale_seconds" in row:
                lines.append(
                    f"{'':8}sync {row['sync_seconds'] * 1e3:.2f} ms, all_reduce {row['raw_seconds'] * 1e3:.2f} ms, "
                    f"the weighting pass x.mul_(a_i) alone {row['scale_seconds'] * 1e3:.2f} ms; "
                    f"(sync, check off - pass) / all_reduce = {row['ratio_without_scale']:.3f}")
            lines += _exact_row(row)
            if "averaging_ratio" in row:
                lines.append(
                    f"{'':8}the averaging step alone: {row['averaging_ratio']:.3f}x ({row['averaging_seconds'] * 1e3:.2f} ms "
                    f"vs {row['baseline_averaging_seconds'] * 1e3:.2f} ms); final parameters bit-identical: "
                    f"{'yes' if row['bit_identical'] else 'NO'}")
        lines += _strategy_rule(result)
        if name == "GPU" and "device_name" in result:
            lines.append(f"{'':8}device: {result['device_name']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.gpu:
        return gpu_main(args, sys.argv[1:] if argv is None else argv)
    os.environ["OMP_NUM_THREADS"] = "1"     # for every process the benchmarks start
    import torch

    torch.set_num_threads(1)
    config = config_from(args)
    results = {"machine": machine(),
               "command": " ".join(["python -m launch.bench"] + list(sys.argv[1:] if argv is None else argv)),
               "config": dataclasses.asdict(config)}
    for name in BENCHMARK_TITLES:
        if name not in args.only:
            results[name] = {"skipped": "not selected (--only)"}
            continue
        start = time.perf_counter()
        print(f"running {name} ({BENCHMARK_TITLES[name]}) ...", file=sys.stderr, flush=True)
        results[name] = run_benchmark(name, config)
        results[name]["wall_seconds"] = time.perf_counter() - start
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(table(results))
    m = results["machine"]
    print(f"\n{m['nproc']} CPUs ({m['cpu_model']}), torch {m['torch']}, OMP_NUM_THREADS=1; "
          f"load average {m['load_average_at_start'][0]:.2f} -> {m['load_average_at_end'][0]:.2f}; "
          f"JSON: {args.json}")
    missed = [row["name"] for name in BENCHMARK_TITLES for row in results[name].get("rows", [])
              if row.get("met") is False]
    if missed and args.check:
        print("targets missed: " + "; ".join(missed), file=sys.stderr)
        return 1
    return 0


def gpu_main(args, argv) -> int:
    """``--gpu``: the acceptance run (:mod:`launch.bench.gpu`): one JSON (default gpu.json), one
    line per part; exit 1 when a part failed (0 when every part passed or was skipped)."""
    from launch.bench import gpu

    config = config_from(args)
    path = args.json if args.json != "bench.json" else "gpu.json"
    start = time.perf_counter()
    results = {"machine": machine(), "command": " ".join(["python -m launch.bench"] + list(argv)),
               "device": args.device, "config": dataclasses.asdict(config)}
    results.update(gpu.run(config, args.device, args.parts or gpu.PARTS))
    results["wall_seconds"] = time.perf_counter() - start
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print("\n".join(gpu.lines(results)))
    print(f"\n{results['wall_seconds']:.0f} s; JSON: {path}")
    return 1 if any(results[p].get("passed") is False for p in gpu.PARTS if p in results) else 0


if __name__ == "__main__":
    sys.exit(main())
