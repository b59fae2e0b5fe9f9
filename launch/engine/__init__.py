"""The simulation engine: the agents of a schedule on this rank, behind two doors.

Split by job, one import direction inside (``placement`` <- ``guard`` <- ``sync`` <- ``core`` <-
``readout``, ``store`` <- ``simulation``, ``own_loop``):

- :mod:`.placement`: which rank holds which agent;
- :mod:`.guard`: the errors a run reports, the lost-rank handler and the finiteness check;
- :mod:`.sync`: compiling every distinct P_t into this rank's program (the one place where a
  sync's strategy is chosen) and running it;
- :mod:`.core`: :class:`~.core.SyncEngine`, the per-rank engine both doors hold;
- :mod:`.readout`: what the agents hold, read out (X c, levels, distances);
- :mod:`.store`: checkpoints;
- the doors: :class:`Simulation` (:mod:`.simulation`, the built-in loop) and
  :class:`launch.AgentOptimizer` (:mod:`.own_loop`, the user's loop).

Imports: :mod:`launch.comm`, :mod:`agents`, :mod:`topology`; never the command line
(:mod:`launch.cli`), the benchmarks or :mod:`experiments`.  It knows no configuration names.
"""

from launch.engine.store.checkpoint import CheckpointError, Checkpointer
from launch.engine.guard.health import NonFiniteError, RankFailureError
from launch.engine.placement import Placement
from launch.engine.simulation import Simulation, SimulationResult, run_with_checkpoints, simulate

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "run_with_checkpoints",
    "NonFiniteError",
    "RankFailureError",
    "Placement",
    "Simulation",
    "SimulationResult",
    "simulate",
]
