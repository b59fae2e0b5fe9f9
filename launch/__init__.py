"""The multi-agent simulator's Python API, and its entry points.

- :class:`Simulation` / :func:`simulate`: every agent of a schedule on the ranks a communicator
  spans (:mod:`launch.engine`);
- :class:`AgentOptimizer`: the same engine driven by your own training loop, as a
  ``torch.optim.Optimizer`` around your inner optimizer (:mod:`launch.engine.own_loop.agent_optimizer`);
- :func:`make_communicator`, :class:`Communicator`, :class:`LocalCommunicator`: where the agents
  run (:mod:`launch.comm`);
- ``python -m launch``: the hydra app (:mod:`launch.cli`); ``python -m launch.equivalence``:
  compare a configuration everywhere it runs; ``python -m launch.plot``: figures and tables of a
  run or a sweep; ``python -m launch.bench``: the benchmarks (:mod:`launch.bench`).

Inside, one sub-package per job: ``comm`` <- ``engine`` <- ``cli`` / ``bench`` (arrows: "is
imported by"); ``launch`` itself imports only ``comm`` and ``engine``.
"""

from launch.comm import LAUNCHES, Communicator, LocalCommunicator, make_communicator
from launch.engine import Checkpointer, Placement, Simulation, SimulationResult, simulate
from launch.engine.own_loop.agent_optimizer import AgentOptimizer

__all__ = [
    "AgentOptimizer",
    "Checkpointer",
    "Communicator",
    "LocalCommunicator",
    "LAUNCHES",
    "make_communicator",
    "Placement",
    "Simulation",
    "SimulationResult",
    "simulate",
]
