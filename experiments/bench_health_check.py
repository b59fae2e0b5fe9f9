"""Cost of the collective NaN/Inf check (launch.health) per sync, measured side by side.

Two gloo ranks on CPU run Lookahead with k = 1 (a sync, hence a check, after every step: the
worst case) on a linear model of d parameters; blocks of steps with ``check_finite`` on and off
alternate in one run, and the script prints the median time per step of each and their ratio.
Co-located (one process) the check is a pass over the buffers without any collective.

    python experiments/bench_health_check.py            # d = 1e3 and 1e6
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import topology  # noqa: E402
from launch import LocalCommunicator, Simulation, make_communicator  # noqa: E402

SIZES = (1_000, 1_000_000)
BLOCKS, STEPS = 10, 20


def batches(d):
    x = torch.randn(4, d) / d ** 0.5
    while True:
        yield x, torch.ones(4, 1)


def loss_fn(module, batch):
    return ((module(batch[0]) - batch[1]) ** 2).mean()


def measure(comm, d):
    """Median seconds per step with the check on and off (alternating blocks)."""
    torch.manual_seed(0)
    sim = Simulation(torch.nn.Linear(d, 1, bias=False), loss_fn, batches(d), topology.lookahead(1, 0.5),
                     lambda p: torch.optim.SGD(p, lr=0.1), comm=comm)
    times = {True: [], False: []}
    sim.run(5)
    for block in range(2 * BLOCKS):
        sim.check_finite = block % 2 == 0
        comm.barrier()
        start = time.perf_counter()
        sim.run(STEPS)
        comm.barrier()
        times[sim.check_finite].append((time.perf_counter() - start) / STEPS)
    return statistics.median(times[True]), statistics.median(times[False])


def rank_main(rank, port, results):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    comm = make_communicator("torch", device="cpu")
    for d in SIZES:
        on, off = measure(comm, d)
        if rank == 0:
            results[d] = (on, off)
    comm.close()


def main():
    torch.set_num_threads(1)
    from tests.spawn import free_port

    print(f"{'where':<22} {'d':>9} {'check on':>12} {'check off':>12} {'ratio':>7}")
    for d in SIZES:
        on, off = measure(LocalCommunicator(), d)
        print(f"{'co-located':<22} {d:>9} {on * 1e3:>9.3f} ms {off * 1e3:>9.3f} ms {on / off:>7.3f}")
    results = mp.Manager().dict()
    mp.spawn(rank_main, args=(free_port(), results), nprocs=2)
    for d in SIZES:
        on, off = results[d]
        print(f"{'gloo, 2 ranks':<22} {d:>9} {on * 1e3:>9.3f} ms {off * 1e3:>9.3f} ms {on / off:>7.3f}")


if __name__ == "__main__":
    main()
