"""B6: the project's local SGD against PyTorch's post-local SGD, the same averaging on the same steps.

Both sides, on every rank of one gloo job of W processes: the same MLP (about 1M parameters, the
same initial values), the same batches (rank r cycles its own fixed list), the same inner
optimizer (``torch.optim.SGD(foreach=True)``):

``local SGD``
    ``launch.Simulation`` of ``topology.decentralized.local_sgd(W, period)`` with its defaults
    (the finiteness check on; one agent per rank): every ``period`` iterations the sync
    ``x.mul_(1/W); all_reduce(x)`` on the agent's flat buffer.
``own loop``
    ``launch.AgentOptimizer`` around the same SGD with the same schedule, the user's loop calling
    its ``step()`` (the own loop's sync: the control message among the worker ranks, then the
    same weighted all-reduce).
``PyTorch``
    ``torch.distributed.optim.PostLocalSGDOptimizer`` around the same SGD, with
    ``PeriodicModelAverager(period, warmup_steps=period - 1)``.

**Aligning the counters.**  ``local_sgd(W, tau)`` averages after the inner step of iteration t
when ``(t + 1) % tau == 0`` (t = tau - 1, 2 tau - 1, ...).  The averager counts its calls from
0 and averages at call s when ``s >= warmup_steps`` and ``(s - warmup_steps) % period == 0``,
then adds one; ``PostLocalSGDOptimizer.step`` calls it once, after the inner step.  With
``warmup_steps = period - 1`` that is s = period - 1, 2 period - 1, ...: the same iterations.
Its average is ``flat = cat(params); flat /= W; all_reduce(flat)`` then every parameter rebound to
a view of ``flat``; ours multiplies by 1/W, which for W = 2 and 4 is the same exact scaling, and
the all-reduce is the same gloo ring on the same group: after the same iterations both sides hold
the same bits (checked at the end of every run: ``bit_identical``).

Timed in interleaved rounds (:mod:`launch.bench.timing`), the slowest rank's time: an iteration
(inner step and, every ``period``, the average) end to end, and the averaging step alone
(``sim.engine.sync(t)`` at an averaging t; PyTorch's ``average_parameters_or_parameter_groups`` on the
optimizer's parameter groups, what its averager calls).
"""

from __future__ import annotations

import copy
import warnings


def post_local_sgd(comm, width: int, batch_size: int, periods, units: int, repeats: int) -> dict:
    """B6 on this rank: one row per period (``units`` iterations per round, a multiple of it)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.model_averaging import averagers, utils
    from torch.distributed.optim import PostLocalSGDOptimizer

    from launch import AgentOptimizer
    from launch.bench import workloads
    from launch.bench.colocated import bare_step, sgd
    from launch.bench.distributed import _contender
    from launch.bench.timing import interleave, median, ratio
    from launch.engine.simulation import Simulation
    from topology import decentralized

    model = workloads.mlp(width)
    fixed = workloads.batches(model, batch_size, seed=1 + comm.rank)
    world = comm.world_size
    rows = []
    for period in periods:
        sim = Simulation(model, workloads.loss_fn, lambda i: workloads.stream(fixed),
                         decentralized.local_sgd(world, period), sgd(), comm=comm)
        theirs = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # period 1: "only DistributedDataParallel should be used"
            optimizer = PostLocalSGDOptimizer(sgd()(list(theirs.parameters())),
                                              averagers.PeriodicModelAverager(period, warmup_steps=period - 1))
        own_model = copy.deepcopy(model)
        own = AgentOptimizer(sgd()(list(own_model.parameters())), decentralized.local_sgd(world, period),
                             model=own_model, comm=comm)
        average_t = period - 1
        steps = max(units, period) // period * period
        times = interleave({
            "local SGD": _contender(sim.step, comm.device),
            "own loop": _contender(bare_step(own_model, own, workloads.stream(fixed)), comm.device),
            "PyTorch": _contender(bare_step(theirs, optimizer, workloads.stream(fixed)), comm.device),
        }, units=steps, repeats=repeats)
        # Same iterations on every side (warm-up and rounds): the same bits.
        flat_theirs = torch.cat([p.detach().reshape(-1) for p in theirs.parameters()])
        same = torch.tensor([1.0 if torch.equal(sim.agents[comm.rank].params, flat_theirs)
                             and torch.equal(own.local_parameters()[comm.rank], flat_theirs) else 0.0])
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        own.close()
        averaging = interleave({
            "local SGD": _contender(lambda: sim.engine.sync(average_t), comm.device),
            "PyTorch": _contender(lambda: utils.average_parameters_or_parameter_groups(
                optimizer.param_groups, dist.group.WORLD), comm.device),
        }, units=steps, repeats=repeats)
        rows.append({"workers": world, "period": period, "iterations_per_round": steps,
                     "ratio": ratio(times, "local SGD", "PyTorch"), "seconds": median(times["local SGD"]),
                     "own_loop_ratio": ratio(times, "own loop", "PyTorch"), "own_loop_seconds": median(times["own loop"]),
                     "baseline_seconds": median(times["PyTorch"]),
                     "averaging_ratio": ratio(averaging, "local SGD", "PyTorch"),
                     "averaging_seconds": median(averaging["local SGD"]),
                     "baseline_averaging_seconds": median(averaging["PyTorch"]),
                     "bit_identical": bool(same.item() == 1.0)})
        del sim, theirs, optimizer, own, own_model
    return {"parameters": workloads.num_parameters(model), "rows": rows}
