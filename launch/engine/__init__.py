"""The simulation engine: agents on ranks, the loop, the syncs, checkpoints and health checks.

Owns :class:`Simulation` (the agents of a schedule on this rank and the loop that drives them)
and :func:`simulate`; :class:`launch.AgentOptimizer` (:mod:`.agent_optimizer`: the same engine,
:class:`.core.SyncEngine`, driven by the user's own loop; its control messages :mod:`.control`,
the adopted model's checks :mod:`.adoption`, evaluations :mod:`.evaluation`); the placement of agents on ranks (:mod:`.placement`); the compilation of
every distinct P_t into this rank's program, where each sync's strategy is chosen once
(:mod:`.compile`, :mod:`.program`, :mod:`.blocks`, the weighted-sum kernel :mod:`.kernel`,
overlapped syncs :mod:`.overlap`, slow rules :mod:`.outer_program`, per-level state weights
:mod:`.state_weights`); the finiteness check, carried by the syncs' own collectives, and the
lost-rank handler (:mod:`.finiteness`, :mod:`.flooding`, :mod:`.health`); checkpoints (:mod:`.checkpoint`); diagnostics of a running simulation
(:mod:`.diagnostics`).

Imports: :mod:`launch.comm`, :mod:`agents`, :mod:`topology`; never the command line
(:mod:`launch.cli`), the benchmarks or :mod:`experiments`.  It knows no configuration names.
"""

from launch.engine.checkpoint import CheckpointError, Checkpointer, run_with_checkpoints
from launch.engine.health import NonFiniteError, RankFailureError
from launch.engine.placement import Placement
from launch.engine.simulation import Simulation, SimulationResult, simulate

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
