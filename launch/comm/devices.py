"""Which device a rank computes on and which backend moves its tensors: the model decides.

**The device comes from the model** (or from an explicit ``device``): a model on the CPU gets
gloo even where CUDA exists; a model on a GPU gets NCCL, bound to *this rank's* GPU.  A
communicator's :attr:`launch.comm.Communicator.device` is the device its collectives' tensors
must live on (None: any, nothing moves); :func:`check_device` refuses a model whose device does
not fit it, before any collective.

**This rank's GPU** (:func:`own_gpu`), from torchrun's ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``
and the number of devices this process sees:

- every process sees every GPU of the node (``device_count() >= LOCAL_WORLD_SIZE``):
  ``cuda:LOCAL_RANK``;
- one GPU per process, by ``CUDA_VISIBLE_DEVICES`` (a scheduler's usual binding: the process
  sees exactly one device although the node runs several ranks): ``cuda:0``, the only one;
- otherwise (fewer devices than ranks, and not one each by ``CUDA_VISIBLE_DEVICES``): refused,
  NCCL needs one GPU per rank.

**An explicit GPU index** (``launch.device=cuda:N``) with several ranks on the node is refused
(:func:`check_launch_device`): one index typed for every rank would put every rank on GPU N while
NCCL binds rank r to its own GPU.  (The index is not silently replaced by ``LOCAL_RANK``: that
would run somewhere else than typed.)  ``cuda`` (or ``auto``) means "this rank's GPU".  A single
process on the node may name any GPU.  A model already on a GPU (the own loop) is checked
against the rank's GPU by :func:`check_device`, which names ``LOCAL_RANK`` and what to write.
"""

from __future__ import annotations

import os

import torch

#: The rule of :func:`own_gpu`, as the refusals name it.
ONE_GPU_PER_RANK = ("NCCL needs one GPU per rank: each rank takes cuda:LOCAL_RANK, or the only GPU that "
                    "CUDA_VISIBLE_DEVICES leaves it")


def local_ranks() -> tuple[int, int]:
    """``(LOCAL_RANK, LOCAL_WORLD_SIZE)`` from the environment torchrun sets (0 and 1 without)."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def visible_gpus() -> int:
    """How many CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def own_gpu(local_rank: int, local_world: int, count: int) -> int:
    """The index of this rank's GPU among the ``count`` it sees (module docstring), or
    ``ValueError`` (the same on every rank of the node: it depends on the node only).

    Example:
        >>> own_gpu(local_rank=1, local_world=2, count=8)
        1
    """
    if count == 0:
        raise ValueError("the device asks for CUDA, but no CUDA device is available; use cpu")
    if count >= local_world:
        return local_rank
    if count == 1 and os.environ.get("CUDA_VISIBLE_DEVICES"):
        return 0
    raise ValueError(
        f"{local_world} ranks on this node but only {count} CUDA device(s) visible to each: {ONE_GPU_PER_RANK}; "
        f"start at most {count} processes per node (torchrun --nproc_per_node {count}), or bind one GPU "
        f"per process with CUDA_VISIBLE_DEVICES")


def resolve(device) -> torch.device:
    """``device`` (None, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a ``torch.device``) as
    the device this rank computes on: CPU for None and ``cpu``; for CUDA this rank's GPU
    (:func:`own_gpu`), except that a single process on the node keeps an explicit index; ``auto``:
    CUDA when available, else the CPU.  With several ranks on the node an explicit index gives
    this rank's GPU too: a model placed on another one is refused by :func:`check_device`, and
    the command line refuses the index itself (:func:`check_launch_device`).

    Example:
        >>> resolve(None), resolve("cpu")
        (device(type='cpu'), device(type='cpu'))
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device("cpu" if device is None else device)
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device must be a CPU or CUDA device; got {str(device)!r}")
    local_rank, local_world = local_ranks()
    count = visible_gpus()
    own = own_gpu(local_rank, local_world, count)
    if device.index is None or local_world > 1:
        return torch.device("cuda", own)
    if device.index >= count:
        raise ValueError(f"device {str(device)!r} is not available: this process sees {count} CUDA device(s)")
    return device


def check_launch_device(device: str, key: str = "launch.device") -> None:
    """``ValueError`` for an explicit GPU index (``cuda:N``) typed for a node that runs several
    ranks that each see several GPUs (module docstring); the same verdict on every rank of the
    node.  ``cuda:0`` where each process sees exactly one GPU names that GPU and is accepted."""
    index = torch.device(device).index if str(device).startswith("cuda") else None
    local_rank, local_world = local_ranks()
    if index is None or local_world == 1 or (visible_gpus() == 1 and index == 0):
        return
    raise ValueError(
        f"{key}={device} names one GPU for every rank, but torchrun started {local_world} ranks on this "
        f"node and {ONE_GPU_PER_RANK}; write {key}=cuda (each rank takes its own GPU) instead of {key}={device}")


def device_problem(comm, device) -> str | None:
    """Why tensors on ``device`` cannot go through ``comm``'s collectives (None: they can).

    ``comm.device`` None (co-located) takes any device; otherwise the types must agree (a CPU
    model on an NCCL group, a CUDA model on gloo or MPI) and so must the GPU (a model on cuda:0
    on a rank whose NCCL communicator is bound to cuda:1)."""
    want = getattr(comm, "device", None)
    if want is None:
        return None
    device = torch.device(device)
    if device.type == want.type and (device.type != "cuda" or device.index == want.index):
        return None
    backend = getattr(comm, "backend", "?")
    if want.type != device.type:
        fix = ("keep the model on the CPU, or use launch=torch for CUDA" if backend == "mpi" else
               f"create the communicator for the model's device (make_communicator(launch, device=<the model's "
               f"device>); on the command line launch.device={device.type})")
        return f"rank {comm.rank}: the model is on {device} but the {backend} communicator moves {want.type} tensors; {fix}"
    local_rank, local_world = local_ranks()
    return (f"rank {comm.rank}: the model is on {device} but this rank's GPU is {want} (LOCAL_RANK={local_rank} "
            f"of LOCAL_WORLD_SIZE={local_world}: {ONE_GPU_PER_RANK}); move the model to "
            f"torch.device('cuda', int(os.environ['LOCAL_RANK'])) (or call torch.cuda.set_device(LOCAL_RANK) "
            f"before model.cuda()); on the command line write launch.device=cuda")


def check_device(comm, device) -> None:
    """``ValueError`` (:func:`device_problem`'s message) unless tensors on ``device`` fit
    ``comm``'s collectives.  Call it before the first collective of a model (the theta_0 broadcast).

    Example:
        >>> from launch.comm.local import LocalCommunicator
        >>> check_device(LocalCommunicator(), "cpu")
    """
    problem = device_problem(comm, device)
    if problem is not None:
        raise ValueError(problem)
