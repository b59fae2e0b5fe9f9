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

B8 (``task = "exact_sync"``, gloo or MPI): the exact sync (``compile_sync(exact=True)``,
:mod:`launch.engine.sync.ordered`) over the default sync, the same LA-n outermost sync on the
same flat float32 buffer, both as compiled (no finiteness check), each block's strategy by the
backend's rule.  Then, for that rule, the gathered and the chained exact sync over the default
sync, size by size.

``task = "premul"`` (the GPU run's ``premul`` part, :func:`premul_bits`): NCCL's
``ReduceOp.PREMUL_SUM`` against the two passes it replaces, bit for bit.

B3 (``task = "end_to_end"``): LA-2 on 3 processes (rank 0 the fast worker) against the serial
``MultilayerLookahead`` run by rank 0 alone in the same job (the other ranks wait at a barrier):
the default simulation (``overlap="auto"``, which overlaps a distributed Lookahead's syncs, and
the finiteness check), the same without the check (the serial reference checks nothing either),
and ``overlap=False`` (one all-reduce per sync on the fast rank's critical path, check on); and
``exact=True`` (every sum in agent order: the ordered hub, overlapped), also timed over the
default in the same rounds.
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


def _comm_contender(body, comm):
    """``run(n)`` as :func:`_contender`, through ``comm`` (any launcher): barrier, n calls of
    ``body``, the slowest rank's seconds per call."""
    import torch

    def run(n: int) -> float:
        comm.barrier()
        start = time.perf_counter()
        for _ in range(n):
            body()
        seconds = torch.tensor([(time.perf_counter() - start) / n], dtype=torch.float64)
        comm.max_flags_(seconds)
        return float(seconds)
    return run


def exact_sync_cost(comm, sizes, rule_sizes, units: int, repeats: int) -> dict:
    """B8 on this rank (see the module docstring): ``rows`` (exact / default per size in
    ``sizes``) and ``rule_rows`` (gather, shards and chain / default per size in ``rule_sizes``).
    Any launcher (CPU)."""
    import torch

    import topology
    from launch.bench.timing import interleave, median, ratio
    from launch.engine.placement import Placement
    from launch.engine.sync.compile import BlockRules, rank_program
    from launch.engine.sync.ordered import gather_max_bytes, shard_min_bytes
    from topology.plan import compile_plan

    depth = comm.world_size - 1
    schedule = topology.multilayer((2,) * depth, (0.5,) * depth)
    plan = compile_plan(schedule.matrix(schedule.period - 1))       # the outermost sync: every rank
    placement = Placement.make(schedule.num_agents, comm.world_size)
    comm.init_groups([tuple(range(comm.world_size))])

    def program(d: int, exact: bool, gather_max: int = gather_max_bytes(comm.backend),
                shard_min: int | None = shard_min_bytes(comm.backend)):
        return rank_program(plan, placement, comm.rank, rules=BlockRules(exact, d * 4, None, gather_max, shard_min))

    def timed(d: int, programs: dict) -> dict:
        tensors = {comm.rank: torch.zeros(d)}            # zeros: repeated sums stay finite
        return interleave({name: _comm_contender(lambda p=p: p.run_tensors(tensors, comm), comm)
                           for name, p in programs.items()}, units=syncs_per_round(units, d), repeats=repeats)

    rows = []
    for d in sizes:
        programs = {"default": program(d, False), "exact": program(d, True)}
        before = dict(vars(comm.stats))
        programs["exact"].run_tensors({comm.rank: torch.zeros(d)}, comm)
        counts = {k: v - before[k] for k, v in vars(comm.stats).items() if v != before[k]}
        times = timed(d, programs)
        rows.append({"processes": comm.world_size, "parameters": d, "ratio": ratio(times, "exact", "default"),
                     "exact_seconds": median(times["exact"]), "default_seconds": median(times["default"]),
                     "strategy": type(programs["exact"].blocks[0]).__name__, "exact_counts_per_sync": counts,
                     "syncs_per_round": syncs_per_round(units, d)})
    rule_rows = []
    for d in rule_sizes:
        times = timed(d, {"default": program(d, False), "gather": program(d, True, 1 << 62),
                          "shards": program(d, True, 0, 0), "chain": program(d, True, 0, None)})
        rule = type(program(d, True).blocks[0]).__name__
        rule_rows.append({"processes": comm.world_size, "parameters": d, "rule": rule,
                          **{f"{k}_ratio": ratio(times, k, "default") for k in ("gather", "shards", "chain")},
                          **{f"{k}_seconds": median(times[k]) for k in ("gather", "shards", "chain", "default")}})
    return {"rows": rows, "rule_rows": rule_rows}


#: The weights :func:`premul_bits` compares: LA-2's (0.5, 0.6) products, local SGD's 1/3, and
#: ones exact in every dtype.
PREMUL_WEIGHTS = (1 / 3, 0.5, 0.3, 0.2, 0.25)


def premul_bits(comm, numel: int = (1 << 20) + 3) -> dict:
    """For each dtype and weight of :data:`PREMUL_WEIGHTS`: ``all_reduce(x, PREMUL_SUM(w))`` against
    ``x.mul_(w); all_reduce(x)`` on the group of every rank, x drawn at random (seeded by rank;
    on one rank: the product alone), compared bit for bit on every rank.  A row is met unless
    :func:`launch.engine.sync.compile.premul_applies` chooses PREMUL_SUM where the bits differ.
    Any communicator whose ``all_reduce_`` takes ``premul`` (NCCL; the co-located one, where
    it is ``mul_``)."""
    import torch

    from launch.engine.sync.blocks import LocalBlock
    from launch.engine.sync.compile import premul_applies

    world = tuple(range(comm.world_size))
    bits = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}
    rows = []
    for dtype, integer in bits.items():
        for weight in PREMUL_WEIGHTS:
            g = torch.Generator().manual_seed(1234 + comm.rank)
            x = torch.randn(numel, generator=g, dtype=torch.float64).to(device=comm.device, dtype=dtype)
            two_pass, fused = x.clone().mul_(weight), x.clone()
            if comm.world_size > 1:
                comm.all_reduce_(two_pass, world)
            comm.all_reduce_(fused, world, premul=weight)
            differs = torch.tensor([0.0 if torch.equal(fused.view(integer), two_pass.view(integer)) else 1.0],
                                   device=comm.device)
            comm.max_flags_(differs)                  # 1 when the bits differ on some rank
            same = float(differs) == 0.0
            chosen = premul_applies(LocalBlock(((0, (weight,)),), (0,), (0, 1)), (), dtype)
            rows.append({"name": f"PREMUL_SUM vs mul_ + SUM, {str(dtype)[6:]}, w={weight:.6g}",
                         "dtype": str(dtype), "weight": weight, "same_bits": same, "premul_chosen": chosen,
                         "met": same or not chosen})
    return {"processes": comm.world_size, "numel": numel, "rows": rows}


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
                "overlap off": {"overlap": False}, "exact": {"exact": True}}
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
            "exact_over_default": ratio(times, "exact", "default"),
            "variants": {name: {"ratio": ratio(times, name, "serial reference"), "seconds": median(times[name])}
                         for name in variants}}
