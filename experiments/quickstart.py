"""Lookahead on your own model, in any of the three places, with the same code.

    python experiments/quickstart.py                                        # co-located
    torchrun --nproc_per_node 2 experiments/quickstart.py --launch torch    # one agent per rank
    mpiexec -n 2 python experiments/quickstart.py --launch mpi

Every rank prints its agents' final loss; rank 0 prints every agent's parameter norm.
"""

import argparse

import torch
from torch import nn

import topology
from launch import make_communicator, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launch", choices=["colocated", "torch", "mpi"], default="colocated")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)

    # Your model, loss and data: any nn.Module, any loss_fn(module, batch), any iterator.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))

    def loss_fn(module, batch):
        x, y = batch
        return nn.functional.mse_loss(module(x), y)

    def batches():
        gen = torch.Generator().manual_seed(1)
        while True:
            x = torch.randn(64, 10, generator=gen)
            yield x, x[:, :1] * 2 - x[:, 1:2]

    comm = make_communicator(args.launch)
    result = simulate(
        model, loss_fn, batches(), topology.lookahead(k=5, alpha=0.5),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
        steps=args.steps, comm=comm,
    )
    for agent, loss in result.losses.items():
        print(f"rank {comm.rank}: agent {agent} last training loss {loss:.5f}")
    if comm.rank == 0:
        for agent, params in enumerate(result.parameters):
            norm = torch.cat([p.reshape(-1) for p in params.values()]).norm()
            print(f"agent {agent}: parameter norm {norm:.6f}")
    comm.close()


if __name__ == "__main__":
    main()
