"""What one agent is and does: parameters in a flat buffer, inner optimizer, state policies,
and the serial reference optimizers (:class:`Lookahead`, :class:`MultilayerLookahead`)."""

from agents.agent import Agent, StateLayout, probe_state_layout
from agents.flat import FlatBuffer, flatten_module_, load_flat_
from agents.level_policy import resolve_policy
from agents.nested import NestedLookahead
from agents.reference import Lookahead, MultilayerLookahead
from agents.state_policy import POLICIES, validate_policy

__all__ = [
    "Agent",
    "StateLayout",
    "probe_state_layout",
    "FlatBuffer",
    "flatten_module_",
    "load_flat_",
    "Lookahead",
    "MultilayerLookahead",
    "NestedLookahead",
    "resolve_policy",
    "POLICIES",
    "validate_policy",
]
