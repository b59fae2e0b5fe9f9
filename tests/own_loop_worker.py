"""One rank of a multi-process AgentOptimizer test: runs the user's own loop, case after case.

Usage: python tests/own_loop_worker.py SPEC_JSON.  SPEC keys: backend (torch | mpi), out (a
folder), cases (a list; each has ``kind``: ``lookahead`` or ``workers`` (see
tests.own_loop_cases) or ``refusal`` (``name``: one of REFUSALS: each should raise on every rank)).  Writes
``out/case{k}-rank{R}.pt`` for case k: the recorder's result, or for a refusal
``{"error": exception type name or None, "message": str}``.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import topology  # noqa: E402
from launch import AgentOptimizer  # noqa: E402
from tests import own_loop_cases as cases  # noqa: E402
from tests import problems  # noqa: E402


def make_comm(spec):
    if spec["backend"] == "mpi":
        from launch.comm.mpi import MPICommunicator

        return MPICommunicator()
    from launch.comm.torch_dist import TorchCommunicator

    return TorchCommunicator(device="cpu", timeout_s=spec.get("timeout_s", 60))


def one_step(net, opt, batch):
    opt.zero_grad()
    problems.loss_fn(net, batch).backward()
    opt.step()


def lookahead(net, comm, k=2):
    return AgentOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), topology.lookahead(k, 0.5), model=net, comm=comm)


def refuse_ddp(comm, hook=False):
    net = nn.parallel.DistributedDataParallel(problems.make_model(0))
    if hook:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        net.register_comm_hook(None, default_hooks.allreduce_hook)
    lookahead(net, comm)


def refuse_ddp_simulation(comm):
    from launch import Simulation

    net = nn.parallel.DistributedDataParallel(problems.make_model(0))
    Simulation(net, problems.loss_fn, problems.batches(1), topology.lookahead(2, 0.5),
               problems.OPTIMIZERS["sgd"], comm=comm)


def refuse_fsdp(comm, inner=False):
    """FSDP1 on CPU (gloo): the wrapper, or the module inside it (which holds the flat parameter)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    net = FullyShardedDataParallel(problems.make_model(0), device_id=torch.device("cpu"))
    lookahead(net.module if inner else net, comm)


def cpu_mesh(comm):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (comm.world_size,))


def refuse_fully_shard(comm):
    from torch.distributed.fsdp import fully_shard

    net = problems.make_model(0)
    fully_shard(net, mesh=cpu_mesh(comm))
    lookahead(net, comm)


def refuse_tensor_parallel(comm):
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    net = parallelize_module(problems.make_model(0), cpu_mesh(comm), {"0": ColwiseParallel()})
    lookahead(net, comm)


def refuse_ddp_forward(comm):
    """model=ddp.module while the loop calls the wrapper: the watch sees it at the first step (a
    plain forward of the module is not reported); every rank raises the exchanged verdicts."""
    from launch.engine.core import agree
    from launch.engine.own_loop.adoption import DDPForwardWatch

    net = problems.make_model(0)
    ddp = nn.parallel.DistributedDataParallel(net)
    watch = DDPForwardWatch(net)
    batch = next(problems.batches(1 + comm.rank))
    problems.loss_fn(net, batch).backward()
    if watch.problem() is not None or watch.problem((0, 1)) is not None:
        raise AssertionError("a plain forward of the module was reported as a DDP forward")
    problems.loss_fn(ddp, batch).backward()
    if watch.problem((0, 1)) is not None:
        raise AssertionError("a DDP spanning exactly the agent's ranks must be allowed")
    try:
        problem = watch.problem()
        agree(comm, problem, None if problem is not None else {})
    finally:
        watch.remove()


def refuse_zero(comm):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    net = problems.make_model(0)
    inner = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.SGD, lr=0.1)
    AgentOptimizer(inner, topology.lookahead(2, 0.5), model=net, comm=comm)


def refuse_mixed_dtypes(comm):
    net = problems.make_model(0)
    if comm.rank == 1:             # one rank only: every rank must still raise
        net[2].float()
    lookahead(net, comm)


def after_one_step(comm, then):
    """LA-1 (k=2) on 2 ranks: the passive rank serves; the worker takes one step, then runs
    ``then(net, opt, next_step)`` (the sync of t=1 comes with the next step)."""
    net = problems.make_model(0)
    opt = lookahead(net, comm)
    if not opt.is_worker:
        opt.serve()
        return
    data = problems.batches(1)
    one_step(net, opt, next(data))
    then(net, opt, lambda: one_step(net, opt, next(data)))


def refuse_add_param_group(comm, direct=False):
    extra = {"params": [nn.Parameter(torch.zeros(3, dtype=torch.float64))]}

    def then(net, opt, next_step):
        if direct:
            opt.optimizer.add_param_group(extra)    # behind the AgentOptimizer's back
            next_step()
        else:
            opt.add_param_group(extra)

    after_one_step(comm, then)


def refuse_nonfinite(comm):
    """NaN in the worker's parameters: the finiteness check of the next sync stops every rank."""
    def then(net, opt, next_step):
        with torch.no_grad():
            net[0].weight[0, 0] = float("nan")
        next_step()

    after_one_step(comm, then)


def refuse_out_of_step(comm):
    net = problems.make_model(0)
    opt = AgentOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), topology.decentralized.local_sgd(2, 2),
                         model=net, comm=comm)
    data = problems.batches(1 + comm.rank)
    for _ in range(4 if comm.rank == 0 else 3):   # rank 1 closes before the sync of t=3
        one_step(net, opt, next(data))
    opt.close()


def refuse_two_workers(comm):
    net = problems.make_model(0)
    AgentOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), topology.decentralized.local_sgd(4, 2),
                   model=net, comm=comm)


def refuse_other_alphas(comm):
    """Rank 1 builds its schedule with another alpha: refused at construction, naming both."""
    net = problems.make_model(0)
    AgentOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), topology.lookahead(2, 0.5 if comm.rank == 0 else 0.6),
                   model=net, comm=comm)


def refuse_other_overlap(comm):
    net = problems.make_model(0)
    AgentOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), topology.lookahead(2, 0.5), model=net, comm=comm,
                   overlap=comm.rank == 0)


def refuse_other_exact(comm):
    net = problems.make_model(0)
    AgentOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), topology.lookahead(2, 0.5), model=net, comm=comm,
                   exact=comm.rank == 0)


def refuse_bad_option_on_one_rank(comm):
    """An invalid option on rank 1 alone: every rank raises it (no rank waits in a collective)."""
    net = problems.make_model(0)
    AgentOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), topology.lookahead(2, 0.5), model=net, comm=comm,
                   overlap="auto" if comm.rank == 0 else "sometimes")


def refuse_simulation_other_k(comm):
    from launch import Simulation

    Simulation(problems.make_model(0), problems.loss_fn, problems.batches(1), topology.lookahead(2 + comm.rank, 0.5),
               problems.OPTIMIZERS["sgd"], comm=comm)


REFUSALS = {
    "other_alphas": refuse_other_alphas,
    "other_overlap": refuse_other_overlap,
    "other_exact": refuse_other_exact,
    "bad_option_on_one_rank": refuse_bad_option_on_one_rank,
    "simulation_other_k": refuse_simulation_other_k,
    "ddp": refuse_ddp,
    "ddp_hook": lambda comm: refuse_ddp(comm, hook=True),
    "ddp_simulation": refuse_ddp_simulation,
    "fsdp": refuse_fsdp,
    "fsdp_module": lambda comm: refuse_fsdp(comm, inner=True),
    "fully_shard": refuse_fully_shard,
    "tensor_parallel": refuse_tensor_parallel,
    "ddp_forward": refuse_ddp_forward,
    "zero": refuse_zero,
    "mixed_dtypes": refuse_mixed_dtypes,
    "add_param_group": refuse_add_param_group,
    "group_added": lambda comm: refuse_add_param_group(comm, direct=True),
    "nonfinite": refuse_nonfinite,
    "out_of_step": refuse_out_of_step,
    "two_workers": refuse_two_workers,
}


def run(case, comm):
    if case["kind"] == "lookahead":
        return cases.lookahead_case(case, comm)
    if case["kind"] == "workers":
        return cases.workers_case(case, comm)
    if case["kind"] == "resume":
        return cases.resume_case(case, comm)
    try:
        REFUSALS[case["name"]](comm)
    except (ValueError, RuntimeError, FloatingPointError) as err:
        return {"error": type(err).__name__, "message": str(err)}
    return {"error": None, "message": ""}


def main() -> int:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    comm = make_comm(spec)
    try:
        for k, case in enumerate(spec["cases"]):
            torch.save(run(case, comm), os.path.join(spec["out"], f"case{k}-rank{comm.rank}.pt"))
    finally:
        comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
