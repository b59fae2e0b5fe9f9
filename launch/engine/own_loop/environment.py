"""Which launcher started this process: what ``AgentOptimizer(..., comm="auto")`` runs on.

torchrun (and any launcher that sets torch.distributed's environment: ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``) -> ``"torch"``; mpiexec (MPICH/Hydra and Intel MPI's ``PMI_RANK``, Open MPI's
``OMPI_COMM_WORLD_RANK``, PMIx's ``PMIX_RANK``, MVAPICH's ``MV2_COMM_WORLD_RANK``) -> ``"mpi"``;
a plain ``python`` -> ``"colocated"``.  The names are :data:`launch.comm.LAUNCHES`, for
:func:`launch.make_communicator`.

    >>> detect_launch({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"})
    'torch'
    >>> detect_launch({"PMI_RANK": "0", "PMI_SIZE": "3"}), detect_launch({})
    ('mpi', 'colocated')
"""

from __future__ import annotations

import os
from typing import Mapping

TORCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR")
MPI_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def detect_launch(environ: Mapping[str, str] | None = None) -> str:
    """``"torch"``, ``"mpi"`` or ``"colocated"`` from ``environ`` (default: this process's)."""
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in env or all(v in env for v in TORCH_VARIABLES):
        return "torch"
    if any(v in env for v in MPI_VARIABLES):
        return "mpi"
    return "colocated"
