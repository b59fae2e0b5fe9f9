"""Schedules t -> P_t, their validation and consensus vectors, and their compilation to plans.

Example:
    >>> import topology
    >>> s = topology.multilayer((3, 2), (0.5, 0.5))
    >>> plan = topology.compile_plan(s.matrix(5))
    >>> plan.blocks[0].receivers, plan.num_all_reduces
    ((0, 1, 2), 1)
"""

from topology.nested import nested
from topology.data_parallel import data_parallel
from topology.phases import PhasedSchedule, phases
from topology.slow import with_slow_agent
from topology.stagewise import stagewise_lookahead
from topology.plan import Block, Mix, Plan, compile_plan
from topology.schedule import MultilayerSchedule, Schedule, from_matrices, lookahead, multilayer
from topology.validation import check_mixing_matrix
from topology import checks, decentralized, diagnostics, graphs, word  # noqa: E402  (gossip, workers, spectral gap)

__all__ = [
    "Block",
    "Mix",
    "Plan",
    "compile_plan",
    "Schedule",
    "MultilayerSchedule",
    "PhasedSchedule",
    "phases",
    "data_parallel",
    "lookahead",
    "multilayer",
    "nested",
    "with_slow_agent",
    "stagewise_lookahead",
    "from_matrices",
    "check_mixing_matrix",
    "checks",
    "word",
    "decentralized",
    "diagnostics",
    "graphs",
]
