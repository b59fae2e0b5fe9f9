"""Communicators: how flat tensors move between the ranks that hold the agents.

Owns the :class:`Communicator` interface (collectives on groups of ranks, asynchronous reduce and
broadcast, point-to-point exchange, the counters of :class:`CommStats`) and its three
implementations: co-located (:class:`LocalCommunicator`), torch.distributed
(:class:`launch.comm.torch_dist.TorchCommunicator`: NCCL on CUDA, gloo on CPU) and MPI
(:class:`launch.comm.mpi.MPICommunicator`, through mpi4py); and which device a rank computes on
and which backend that gives (:mod:`launch.comm.devices`: the model's device decides).

Imports: torch (and mpi4py, lazily), and :class:`topology.network.RankCounts` (the per-rank
counts that the cost model computes for a plan, which :class:`CommStats` extends); nothing of
``launch`` outside this package, nor agents: a communicator moves tensors and knows nothing of
schedules.
"""

from launch.comm.base import CollectiveTimeout, CommStats, Communicator, Pending
from launch.comm.devices import check_device
from launch.comm.factory import LAUNCHES, make_communicator
from launch.comm.local import LocalCommunicator

__all__ = ["CollectiveTimeout", "CommStats", "Communicator", "Pending", "LAUNCHES", "LocalCommunicator", "check_device",
           "make_communicator"]
