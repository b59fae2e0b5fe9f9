"""torch.distributed communicator: one process per rank, NCCL on CUDA, gloo on CPU."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from launch.comm.base import Communicator, Pending, check_timeout


def choose_device_and_backend(device: str | None = None) -> tuple[torch.device, str]:
    """NCCL with one GPU per rank when CUDA is asked for (or available, with ``device=None``),
    gloo on CPU.  Two ranks on one GPU are refused: ``ValueError`` on every rank of the node."""
    want_cuda = torch.cuda.is_available() if device in (None, "auto") else str(device).startswith("cuda")
    if not want_cuda:
        return torch.device("cpu"), "gloo"
    if not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asks for CUDA, but no CUDA device is available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    count = torch.cuda.device_count()
    if local_world > count:
        raise ValueError(
            f"{local_world} ranks on this node but only {count} CUDA device(s): NCCL needs one GPU "
            f"per rank; start at most {count} processes per node (torchrun --nproc_per_node {count})"
        )
    return torch.device("cuda", local_rank), "nccl"


class TorchCommunicator(Communicator):
    """Collectives through torch.distributed.

    Initialises the default process group from the environment that torchrun sets (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT) unless one is already initialised.  Every collective,
    including those on subgroups, times out after ``timeout_s`` seconds instead of hanging.
    """

    def __init__(self, device: str | None = None, timeout_s: float = 300.0):
        super().__init__()
        self.device, backend = choose_device_and_backend(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.timeout_s = check_timeout(timeout_s)
        self.timeout = timedelta(seconds=self.timeout_s)
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            # torch._dynamo (which creating any torch.optim optimizer imports) keeps a reference to
            # a process group that exists when it is first imported: that group then outlives
            # destroy_process_group, and its destruction at interpreter exit aborts the process now
            # and then ("terminate called without an active exception").  Imported first, it holds
            # none.  (Measured: 1 run in 6 of a 3-rank job aborted at exit before this.)
            import torch._dynamo  # noqa: F401
            kwargs = {"device_id": self.device} if backend == "nccl" else {}
            dist.init_process_group(backend=backend, timeout=self.timeout, **kwargs)
        self.backend = dist.get_backend()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def _world_group(self):
        return dist.group.WORLD

    def _new_group(self, ranks: tuple[int, ...]):
        # new_group is collective over the whole world: every rank calls it, in order.
        return dist.new_group(list(ranks), timeout=self.timeout)

    def _warm(self, group) -> None:
        dist.all_reduce(torch.zeros(1, device=self.device), group=group)

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        self.stats.broadcasts += 1
        dist.broadcast(tensor, src=src)

    def all_reduce_(self, tensor: torch.Tensor, ranks: tuple[int, ...]) -> None:
        self._count_all_reduce(tensor)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._group(ranks))

    def reduce_async_(self, tensor: torch.Tensor, dst: int, ranks: tuple[int, ...], *,
                      flags: bool = False) -> Pending:
        self._count_reduce(tensor, flags)
        work = dist.reduce(tensor, dst=dst, op=dist.ReduceOp.SUM, group=self._group(ranks), async_op=True)
        return self._track(work.wait)

    def broadcast_async_(self, tensor: torch.Tensor, src: int, ranks: tuple[int, ...], *,
                         flags: bool = False) -> Pending:
        self._count_block_broadcast(tensor, flags)
        return self._track(dist.broadcast(tensor, src=src, group=self._group(ranks), async_op=True).wait)

    def exchange(self, sends, recvs) -> None:
        if not sends and not recvs:
            return
        self._count_sends(sends)
        ops = [dist.P2POp(dist.isend, t, peer, tag=tag) for t, peer, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, peer, tag=tag) for t, peer, tag in recvs]
        for request in dist.batch_isend_irecv(ops):
            request.wait()

    def max_flags_(self, flags: torch.Tensor) -> None:
        super().max_flags_(flags)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)

    def responsive_ranks(self, wait_s: float) -> list[int] | None:
        """Roll call through the rendezvous store (TCPStore): every surviving rank that reaches
        this point sets its key; the ranks whose key is missing after ``wait_s`` seem lost.
        None when the store itself is gone (it lives in rank 0's process unless torchrun's agent
        hosts it)."""
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set_timeout(timedelta(seconds=wait_s))
            store.set(f"lookahead-agents/roll-call/{self.rank}", "1")
            keys = [f"lookahead-agents/roll-call/{r}" for r in range(self.world_size)]
            deadline = time.monotonic() + wait_s
            while True:
                present = [r for r, key in enumerate(keys) if store.check([key])]
                if len(present) == self.world_size or time.monotonic() > deadline:
                    return present
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - any failure of the store means: cannot tell
            return None

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        self.wait_in_flight(ignore_errors=True)
        # Drop our references to the process groups with them: a group kept alive past
        # destroy_process_group is destroyed at interpreter exit instead, after gloo's own
        # statics, and aborts the process ("terminate called without an active exception").
        self._groups.clear()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
