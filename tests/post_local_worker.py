"""One rank of tests/test_post_local.py: PyTorch's own post-local SGD recipe, case after case.

The recipe, on the gloo group of the case: ``DistributedDataParallel(model, process_group=group)``
with ``post_localSGD_hook`` and ``PostLocalSGDState(process_group=group, subgroup=subgroup,
start_localSGD_iter=START, post_local_gradient_allreduce=subgroup is not None)``, the inner
optimizer on the model's parameters, and ``PeriodicModelAverager(TAU, warmup_steps=w,
process_group=group)`` called after every ``optimizer.step()`` (the loop of
``tests/averagers_worker.theirs``).  Float64, the model and data of ``tests/problems`` (worker i
reads ``batches(1 + i)``, i its rank in the group).

Four processes run every case: the 2-rank cases on the pairs {0, 1} (SGD with momentum) and
{2, 3} (Adam) at once, the 4-rank cases on the world (the averager's counter alignment is the
same on 2 and 4 ranks: the documented ``warmup_steps=s`` runs on 2 only).

The "2 agents x 2 ranks" cases are local SGD over agents that span two ranks, written the PyTorch
way: a plain DDP model over each agent's pair {0, 1}, {2, 3} (no hook: DDP's own gradient mean),
and ``PeriodicModelAverager(TAU, warmup_steps=TAU - 1)`` over each lane {0, 2}, {1, 3} (each
pair's i-th rank with the other's i-th rank).  Writes ``out/rank{R}.pt``: {case name:
(worker index, (STEPS, d) parameters after every iteration)}.

Usage: python tests/post_local_worker.py SPEC_JSON, SPEC = {"out": folder}.
"""

import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (  # noqa: E402
    PostLocalSGDState, post_localSGD_hook,
)
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager  # noqa: E402

import topology  # noqa: E402
from tests.averagers_worker import theirs  # noqa: E402
from topology import decentralized as dec  # noqa: E402
from topology.data_parallel import shard_schedule  # noqa: E402

STEPS, START, TAU = 200, 30, 4
OPTIMIZERS = ("sgd_momentum", "adam")

#: variant -> the averager's warmup_steps; "subgroups": gradients still all-reduced inside pairs
#: of ranks after the warm-up.
VARIANTS = {"aligned": START + TAU - 1, "documented": START, "subgroups": START + TAU - 1}


def schedule(world: int, variant: str) -> topology.Schedule:
    """The schedule that is the case's recipe (docs/ranks.md)."""
    if variant == "agents of 2 ranks":
        return shard_schedule(dec.local_sgd(world // 2, TAU), 2)
    warmup = topology.data_parallel(world)
    if variant == "aligned":        # averages at t = START + TAU - 1 + j TAU
        return topology.phases([(START, warmup), (None, dec.local_sgd(world, TAU))])
    if variant == "documented":     # averages at t = START + j TAU
        return topology.phases([(START, warmup), (1, dec.local_sgd(world, 1)), (None, dec.local_sgd(world, TAU))])
    pairs = torch.zeros(world, world, dtype=torch.float64)
    for start in range(0, world, 2):
        pairs[start:start + 2, start:start + 2] = 0.5
    eye, mean = torch.eye(world, dtype=torch.float64), torch.full((world, world), 1.0 / world, dtype=torch.float64)
    local = topology.from_matrices([eye] * (TAU - 1) + [mean], gradient_matrices=[pairs] * TAU)
    return topology.phases([(START, warmup), (None, local)])


def cases() -> list[tuple[str, int, str, str]]:
    """(name, world, optimizer, variant) of every case."""
    found = [(f"2 ranks {o} {v}", 2, o, v) for v in ("aligned", "documented") for o in OPTIMIZERS]
    found += [(f"4 ranks {o} {v}", 4, o, v) for v in ("aligned", "subgroups", "agents of 2 ranks") for o in OPTIMIZERS]
    return found


def recipe(group, subgroup, optimizer: str, warmup_steps: int) -> torch.Tensor:
    """PyTorch's recipe on ``group`` (module docstring): this rank's parameters at every step."""
    state = PostLocalSGDState(process_group=group, subgroup=subgroup, start_localSGD_iter=START,
                              post_local_gradient_allreduce=subgroup is not None)

    def forward(model):
        ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=group)
        ddp.register_comm_hook(state, post_localSGD_hook)
        return ddp

    averager = PeriodicModelAverager(TAU, warmup_steps=warmup_steps, process_group=group)
    return theirs(dist.get_rank(group), [(averager, None)], STEPS, optimizer, forward)


def agents_of_two_ranks(pair, lane, optimizer: str) -> torch.Tensor:
    """Local SGD over 2 agents of 2 ranks, the PyTorch way (module docstring)."""
    averager = PeriodicModelAverager(TAU, warmup_steps=TAU - 1, process_group=lane)
    return theirs(dist.get_rank(), [(averager, None)], STEPS, optimizer,
                  lambda model: torch.nn.parallel.DistributedDataParallel(model, process_group=pair))


def run_case(world: int, optimizer: str, variant: str, pair, lane) -> tuple[int, torch.Tensor]:
    """(worker index, trajectory) of this rank in one case."""
    if variant == "agents of 2 ranks":
        return dist.get_rank(), agents_of_two_ranks(pair, lane, optimizer)
    group = pair if world == 2 else dist.group.WORLD
    subgroup = pair if variant == "subgroups" else None
    return dist.get_rank(group), recipe(group, subgroup, optimizer, VARIANTS[variant])


def main() -> int:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pair, _ = dist.new_subgroups(group_size=2)
    lane, _ = dist.new_subgroups_by_enumeration([[0, 2], [1, 3]])
    try:
        results = {name: run_case(world, optimizer, variant, pair, lane)
                   for name, world, optimizer, variant in cases()
                   if world == 4 or optimizer == OPTIMIZERS[rank // 2]}    # each pair runs its optimizer's
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(spec["out"], f"rank{rank}.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
