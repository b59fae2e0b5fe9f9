"""The co-located communicator: one rank holds every agent, and nothing moves."""

from __future__ import annotations

import torch

from launch.comm.base import Communicator


class LocalCommunicator(Communicator):
    """One rank holding every agent: the plans run as local tensor math and nothing moves."""

    backend = "local"

    def all_gather_object(self, obj) -> list:
        return [obj]

    def broadcast_object(self, obj, src: int):
        if src != 0:
            raise ValueError(f"src must be 0 on a single rank; got {src}")
        return obj

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        if src != 0:
            raise ValueError(f"src must be 0 on a single rank; got {src}")

    def all_reduce_(self, tensor: torch.Tensor, ranks: tuple[int, ...], *, premul: float | None = None) -> None:
        if ranks != (0,):
            raise ValueError(f"ranks must be (0,) on a single rank; got {ranks}")
        if premul is not None:
            tensor.mul_(premul)
