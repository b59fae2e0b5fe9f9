"""MPI communicator through mpi4py: one process per rank under ``mpiexec``.

Buffers are CPU tensors handed to MPI without a copy (through their numpy view); MPI supports
float32 and float64 here.
"""

from __future__ import annotations


import torch

from launch.comm.base import Communicator, Pending

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _buffer(tensor: torch.Tensor):
    if tensor.device.type != "cpu" or tensor.dtype not in SUPPORTED_DTYPES or not tensor.is_contiguous():
        raise ValueError(
            "the MPI communicator moves contiguous CPU float32/float64 tensors; got "
            f"{tensor.dtype} on {tensor.device} (use launch=torch for CUDA)"
        )
    return tensor.detach().numpy()


class MPICommunicator(Communicator):
    """Collectives through mpi4py on ``MPI.COMM_WORLD``; subgroups made with ``Comm.Split``."""

    backend = "mpi"

    def __init__(self):
        super().__init__()
        try:
            from mpi4py import MPI
        except ImportError as err:  # pragma: no cover - depends on the install
            raise ImportError("launch=mpi needs mpi4py: pip install '.[mpi]'") from err
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()

    def _world_group(self):
        return self.comm

    def _new_group(self, ranks: tuple[int, ...]):
        # Split is collective over COMM_WORLD: every rank calls it, in the same order; a
        # non-member gets MPI.COMM_NULL.
        color = 0 if self.rank in ranks else self.MPI.UNDEFINED
        return self.comm.Split(color, key=self.rank)

    def _warm(self, group) -> None:
        group.Allreduce(self.MPI.IN_PLACE, torch.zeros(1).numpy())

    def all_gather_object(self, obj) -> list:
        return self.comm.allgather(obj)

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        self.stats.broadcasts += 1
        self.comm.Bcast(_buffer(tensor), root=src)

    def all_reduce_(self, tensor: torch.Tensor, ranks: tuple[int, ...]) -> None:
        self._count_all_reduce(tensor)
        self._groups[ranks].Allreduce(self.MPI.IN_PLACE, _buffer(tensor), op=self.MPI.SUM)

    def exchange(self, sends, recvs) -> None:
        if not sends and not recvs:
            return
        self._count_sends(sends)
        requests = [self.comm.Isend(_buffer(t), dest=peer, tag=tag) for t, peer, tag in sends]
        requests += [self.comm.Irecv(_buffer(t), source=peer, tag=tag) for t, peer, tag in recvs]
        self.MPI.Request.Waitall(requests)

    def reduce_async_(self, tensor: torch.Tensor, dst: int, ranks: tuple[int, ...], *,
                      flags: bool = False) -> Pending:
        self._count_reduce(tensor, flags)
        group, root = self._group(ranks), ranks.index(dst)   # Split keeps the order of ranks
        if self.rank == dst:
            request = group.Ireduce(self.MPI.IN_PLACE, _buffer(tensor), op=self.MPI.SUM, root=root)
        else:
            request = group.Ireduce(_buffer(tensor), None, op=self.MPI.SUM, root=root)
        return self._track(request.Wait)

    def broadcast_async_(self, tensor: torch.Tensor, src: int, ranks: tuple[int, ...], *,
                         flags: bool = False) -> Pending:
        self._count_block_broadcast(tensor, flags)
        return self._track(self._group(ranks).Ibcast(_buffer(tensor), root=ranks.index(src)).Wait)

    def max_flags_(self, flags: torch.Tensor) -> None:
        super().max_flags_(flags)
        self.comm.Allreduce(self.MPI.IN_PLACE, _buffer(flags), op=self.MPI.MAX)

    def barrier(self) -> None:
        self.comm.Barrier()

    def close(self) -> None:
        self.wait_in_flight(ignore_errors=True)
        for ranks, sub in self._groups.items():
            if sub is not self.comm:
                sub.Free()
        self._groups.clear()
