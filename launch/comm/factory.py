"""``make_communicator(launch)``: the communicator of a launch name."""

from __future__ import annotations

from launch.comm.base import Communicator, check_timeout
from launch.comm.local import LocalCommunicator

#: Where the simulator's agents can run: one process, torch.distributed, MPI.
LAUNCHES = ("colocated", "torch", "mpi")


def make_communicator(launch: str = "colocated", *, device=None, timeout_s: float = 300.0) -> Communicator:
    """The communicator for ``launch``: ``colocated`` (one process holds every agent), ``torch``
    (one agent per rank under torchrun) or ``mpi`` (under mpiexec).

    ``device``: the model's device (or an explicit one: ``"cpu"``, ``"cuda"``, ``"auto"``), which
    picks the torch backend: NCCL bound to this rank's GPU for CUDA, gloo for the CPU; None: the
    CPU, as a model built without a device (:mod:`launch.comm.devices`).  The communicator's
    ``device`` is then where its collectives' tensors live: pass the model's device here, and
    :func:`launch.comm.devices.check_device` refuses a model that does not fit.

    ``timeout_s``: every collective of a torch or mpi communicator completes or fails within this
    many seconds (a peer stuck or dead); :func:`launch.engine.guard.health.collective` then names it.
    The torch.distributed and MPI communicators are imported only when asked for (mpi4py is an
    optional dependency).

    Example:
        >>> make_communicator("colocated").world_size
        1
    """
    check_timeout(timeout_s)
    if launch == "colocated":
        return LocalCommunicator()
    if launch == "torch":
        from launch.comm.torch_dist import TorchCommunicator

        return TorchCommunicator(device=device, timeout_s=timeout_s)
    if launch == "mpi":
        from launch.comm.mpi import MPICommunicator

        return MPICommunicator(timeout_s=timeout_s)
    raise ValueError(f"launch must be one of {', '.join(LAUNCHES)}; got {launch!r}")
