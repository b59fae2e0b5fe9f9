"""Communicators, placement, the simulation loop and the command-line entry point.

The Python entry point is :func:`launch.simulate` (or :class:`launch.Simulation` for step-by-step
control); ``python -m launch`` is the hydra app (:mod:`launch.app`; the default job with no override).
"""

from launch.communicator import LAUNCHES, Communicator, LocalCommunicator, make_communicator
from launch.placement import Placement
from launch.simulation import Simulation, SimulationResult, simulate

__all__ = [
    "Communicator",
    "LocalCommunicator",
    "LAUNCHES",
    "make_communicator",
    "Placement",
    "Simulation",
    "SimulationResult",
    "simulate",
]
