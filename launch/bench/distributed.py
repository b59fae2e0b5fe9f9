"""B2 (sync cost), B3 (end to end) and the GPU benchmark: spawned torch.distributed processes.

:func:`launch.bench.processes.spawn` starts ``nprocs`` ranks (:mod:`launch.bench.rank`) as one
torch.distributed job and returns what each rank wrote; the tasks of B2 and B3 are the functions
here.  Every timed block starts after a barrier and counts
as the slowest rank's time (an all-reduce MAX outside the timed region).

B2 (``task = "sync"``): LA-n on n + 1 processes, one agent per rank; the outermost sync (level n,
a block over every rank: ``x.mul_(a_i); all_reduce(x)``) is timed against a raw
``dist.all_reduce`` of the same flat buffer on the same (world) group.  The sync is timed with the
defaults (the finiteness check on: each contribution checked in its weighting pass, its marker
set, the result's marker read, and this sync is its window's decision sync:
:mod:`launch.engine.guard.finiteness`) and, in the same rounds, as the plan compiles it
(``check_finite`` off: the plan's collectives and nothing else); ``overlap=False`` in both (B2 is
the all-reduce sync; B3 has overlap).  The buffers are zeroed first, so that the raw sums,
repeated, stay finite (a sum's speed does not depend on its values).  The weighting
pass ``x.mul_(a_i)`` alone is timed too: a weighted all-reduce needs it and gloo cannot fuse it,
so ``(sync - scale) / raw`` shows what remains.  Collectives and bytes of one sync are read from
the communicator's stats and compared with the plan's count: one all-reduce per block, d x
itemsize bytes each.

B3 (``task = "end_to_end"``): LA-2 on 3 processes (rank 0 the fast worker) against the serial
``MultilayerLookahead`` run by rank 0 alone in the same job (the other ranks wait at a barrier):
the default simulation (``overlap="auto"``, which overlaps a distributed Lookahead's syncs, and
the finiteness check), the same without the check (the serial reference checks nothing either),
and ``overlap=False`` (one all-reduce per sync on the fast rank's critical path, check on).
"""

from __future__ import annotations

import time


# ------------------------------------------------------------------------------ inside a rank
def _slowest(seconds: float, device) -> float:
    import torch
    import torch.distributed as dist

    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def _contender(body, device):
    """``run(n)``: barrier, n calls of ``body`` (then wait for the device), slowest rank's s/call."""
    import torch
    import torch.distributed as dist

    def run(n: int) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(n):
            body()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return _slowest((time.perf_counter() - start) / n, device)
    return run


def syncs_per_round(units: int, d: int) -> int:
    """``units`` syncs per round for 10M parameters and more; proportionally more below (at most
    10x): a small sync is latency-bound, and its rounds must last long enough to be steady."""
    return min(10 * units, max(units, round(units * 10_000_000 / d)))


def sync_cost(comm, sizes, units: int, repeats: int) -> list[dict]:
    """B2 on this rank (see the module docstring), one row per size in ``sizes``; ``units``:
    syncs per round at 10M parameters and more (:func:`syncs_per_round`)."""
    import torch.distributed as dist

    import topology
    from launch.bench import workloads
    from launch.bench.colocated import sgd
    from launch.bench.timing import interleave, median, ratio
    from launch.engine.simulation import Simulation

    depth = comm.world_size - 1
    schedule = topology.multilayer((2,) * depth, (0.5,) * depth)
    outermost = schedule.period - 1          # L(t) = depth: one block over every rank
    rows = []
    for d in sizes:
        sims = {check: Simulation(workloads.FlatVector(d), workloads.loss_fn, iter(()), schedule, sgd(),
                                  comm=comm, device=comm.device, check_finite=check, overlap=False)
                for check in (True, False)}
        buffers = {check: sim.agents[comm.rank].sync_tensor() for check, sim in sims.items()}
        for buffer in buffers.values():
            buffer.zero_()
        before = (comm.stats.all_reduces, comm.stats.all_reduce_bytes, comm.stats.flag_reduces)
        sims[True].engine.sync(outermost)
        collectives = comm.stats.all_reduces - before[0]
        nbytes = comm.stats.all_reduce_bytes - before[1]
        flag_reduces = comm.stats.flag_reduces - before[2]
        plan = sims[True].engine.programs[schedule.matrix_index(outermost)].plan
        weight = plan.blocks[0].weights[plan.blocks[0].members.index(comm.rank)]
        buffer = buffers[False]
        times = interleave({
            "raw all_reduce": _contender(lambda: dist.all_reduce(buffer), comm.device),
            "LA sync": _contender(lambda: sims[True].engine.sync(outermost), comm.device),
            "LA sync, check off": _contender(lambda: sims[False].engine.sync(outermost), comm.device),
            # The weighting pass alone (x.mul_(a_i)), to explain the difference.
            "scale": _contender(lambda: buffer.mul_(weight), comm.device),
        }, units=syncs_per_round(units, d), repeats=repeats)
        rows.append({
            "syncs_per_round": syncs_per_round(units, d),
            "processes": comm.world_size, "parameters": d, "ratio": ratio(times, "LA sync", "raw all_reduce"),
            "sync_seconds": median(times["LA sync"]), "raw_seconds": median(times["raw all_reduce"]),
            "ratio_check_off": ratio(times, "LA sync, check off", "raw all_reduce"),
            "unchecked_sync_seconds": median(times["LA sync, check off"]),
            "scale_seconds": median(times["scale"]),
            "ratio_without_scale": ratio({"x": [s - c for s, c in zip(times["LA sync, check off"], times["scale"])],
                                          "raw": times["raw all_reduce"]}, "x", "raw"),
            "collectives_per_sync": collectives, "bytes_per_sync": nbytes, "flag_reduces_per_sync": flag_reduces,
            "plan_collectives": plan.num_all_reduces,
            "plan_bytes": plan.num_all_reduces * d * buffer.element_size(),
        })
        del sims, buffers, buffer
    return rows


def end_to_end(comm, width: int, batch_size: int, ks, units: int, repeats: int) -> dict:
    """B3 on this rank (see the module docstring)."""
    import copy

    import torch.distributed as dist

    import topology
    from agents.reference import MultilayerLookahead
    from launch.bench import workloads
    from launch.bench.colocated import bare_step, sgd
    from launch.bench.timing import interleave, median, ratio
    from launch.engine.simulation import Simulation

    model = workloads.mlp(width)
    fixed = workloads.batches(model, batch_size)
    alphas = (0.5,) * len(ks)
    variants = {"default": {}, "default, no check": {"check_finite": False},
                "overlap off": {"overlap": False}}
    sims = {name: Simulation(model, workloads.loss_fn, workloads.stream(fixed),
                             topology.multilayer(ks, alphas), sgd(), comm=comm, **kwargs)
            for name, kwargs in variants.items()}
    serial = lambda: None  # noqa: E731 - the other ranks only wait
    if comm.rank == 0:
        ref = copy.deepcopy(model)
        serial = bare_step(ref, MultilayerLookahead(sgd()(list(ref.parameters())), ks, alphas),
                            workloads.stream(fixed))
    contenders = {"serial reference": _contender(serial, comm.device)}
    contenders.update({name: _contender(sim.step, comm.device) for name, sim in sims.items()})
    times = interleave(contenders, units=units, repeats=repeats)
    dist.barrier()
    return {"parameters": workloads.num_parameters(model), "default_overlapped": sims["default"].engine.overlap.active,
            "serial_seconds": median(times["serial reference"]),
            "variants": {name: {"ratio": ratio(times, name, "serial reference"), "seconds": median(times[name])}
                         for name in variants}}
