"""torch.distributed communicator: one process per rank; NCCL for a model on a GPU, gloo on CPU.

**Failures on NCCL.**  By default NCCL's watchdog ends the whole process when a collective times
out (``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``: SIGABRT, no Python error), while the main thread may
be blocked in a host read.  Before it creates the process group, this communicator therefore
sets (unless the environment already sets them) :data:`NCCL_ERROR_HANDLING`:
``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` -- on a timeout or an NCCL error the watchdog aborts the
communicators, which ends the collectives still running (a host read waiting on one returns), and
keeps the process -- and ``TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC`` (the watchdog waits 4 times this
before aborting, for a flight-recorder dump that is off by default).  The process group then
reports the failure (``Backend.get_error()``: TIMEOUT, COMM_ERROR, REMOTE_ERROR), which
:meth:`TorchCommunicator.failure` reads without touching the GPU, and every later collective on
it raises.  :func:`launch.engine.guard.health.collective` checks :meth:`failure` before every
collective, so the survivors raise the same ``RankFailureError`` as under gloo.  With
``TORCH_NCCL_BLOCKING_WAIT=1`` in the environment NCCL runs no watchdog and every collective
blocks the host until it completes, raising in the main thread after the timeout (also named);
that costs one host synchronisation per collective, which the default above does not.
"""

from __future__ import annotations

import importlib
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from launch.comm.base import Communicator, Pending, check_timeout
from launch.comm.devices import resolve

#: The NCCL error-handling settings made before the process group exists (module docstring),
#: each only where the environment does not set it.
NCCL_ERROR_HANDLING = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2", "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC": "1000"}


def choose_device_and_backend(device=None) -> tuple[torch.device, str]:
    """The device of this rank's collectives and its backend, from the model's device (or an
    explicit one; :func:`launch.comm.devices.resolve`): NCCL bound to this rank's GPU for CUDA,
    gloo for the CPU (None: the CPU, as a model built without a device).  ``ValueError`` where
    the node cannot give each rank a GPU of its own."""
    device = resolve(device)
    return device, ("nccl" if device.type == "cuda" else "gloo")


def configure_nccl_error_handling(environ=os.environ) -> dict[str, str]:
    """Set :data:`NCCL_ERROR_HANDLING` in ``environ`` where it is unset (before the NCCL process
    group is created: it reads them once); returns what was set."""
    added = {key: value for key, value in NCCL_ERROR_HANDLING.items() if key not in environ
             and not (key == "TORCH_NCCL_ASYNC_ERROR_HANDLING" and "NCCL_ASYNC_ERROR_HANDLING" in environ)}
    environ.update(added)
    return added


class TorchCommunicator(Communicator):
    """Collectives through torch.distributed.

    Initialises the default process group from the environment that torchrun sets (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT) unless one is already initialised.  Every collective,
    including those on subgroups, times out after ``timeout_s`` seconds instead of hanging.
    """

    def __init__(self, device=None, timeout_s: float = 300.0):
        super().__init__()
        self.device, backend = choose_device_and_backend(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            configure_nccl_error_handling()
        self.timeout_s = check_timeout(timeout_s)
        self.timeout = timedelta(seconds=self.timeout_s)
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            # torch._dynamo (which creating any torch.optim optimizer imports) keeps a reference to
            # a process group that exists when it is first imported: that group then outlives
            # destroy_process_group, and its destruction at interpreter exit aborts the process now
            # and then ("terminate called without an active exception").  Imported first, it holds
            # none.  (Measured: 1 run in 6 of a 3-rank job aborted at exit before this.)
            importlib.import_module("torch._dynamo")   # (an import statement would make torch local here)
            kwargs = {"device_id": self.device} if backend == "nccl" else {}
            dist.init_process_group(backend=backend, timeout=self.timeout, **kwargs)
        self.backend = dist.get_backend()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def _world_group(self):
        return dist.group.WORLD

    def failure(self) -> str | None:
        """What NCCL's watchdog reported on one of this rank's process groups (a timeout, a
        communicator error, a remote error; module docstring), or None.  Reads a flag of the
        process group: no collective, no GPU work.  gloo raises in the collective itself: None."""
        if self.backend != "nccl":
            return None
        for ranks, group in [(tuple(range(self.world_size)), self._world_group()), *self._groups.items()]:
            error = group._get_backend(self.device).get_error()
            if error.name != "SUCCESS":
                return f"NCCL reported {error.name} on the process group of ranks {list(ranks)}"
        return None

    def _new_group(self, ranks: tuple[int, ...]):
        # new_group is collective over the whole world: every rank calls it, in order.
        return dist.new_group(list(ranks), timeout=self.timeout)

    def _warm(self, group) -> None:
        dist.all_reduce(torch.zeros(1, device=self.device), group=group)

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int):
        holder = [obj]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        self.stats.broadcasts += 1
        dist.broadcast(tensor, src=src)

    def all_reduce_(self, tensor: torch.Tensor, ranks: tuple[int, ...], *, premul: float | None = None) -> None:
        op = dist.ReduceOp.SUM
        if premul is not None:
            if self.backend != "nccl":
                raise ValueError(f"premul (ReduceOp.PREMUL_SUM) needs the nccl backend; this one is {self.backend}")
            op = dist._make_nccl_premul_sum(premul)
        self._count_all_reduce(tensor)
        dist.all_reduce(tensor, op=op, group=self._group(ranks))

    def all_gather_(self, out: torch.Tensor, tensor: torch.Tensor, ranks: tuple[int, ...]) -> None:
        self._count("gather", tensor)
        dist.all_gather_into_tensor(out, tensor.reshape(-1), group=self._group(ranks))

    def reduce_async_(self, tensor: torch.Tensor, dst: int, ranks: tuple[int, ...], *,
                      flags: bool = False) -> Pending:
        self._count_reduce(tensor, flags)
        work = dist.reduce(tensor, dst=dst, op=dist.ReduceOp.SUM, group=self._group(ranks), async_op=True)
        return self._track(work.wait)

    def _broadcast_async(self, tensor: torch.Tensor, src: int, ranks: tuple[int, ...]) -> Pending:
        return self._track(dist.broadcast(tensor, src=src, group=self._group(ranks), async_op=True).wait)

    def _p2p_async(self, sends, recvs) -> Pending:
        if not sends and not recvs:
            return Pending(None)
        ops = [dist.P2POp(dist.isend, t, peer, tag=tag) for t, peer, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, peer, tag=tag) for t, peer, tag in recvs]
        requests = dist.batch_isend_irecv(ops)

        def wait() -> None:
            for request in requests:
                request.wait()
        return self._track(wait)

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
