"""The door of the user's own training loop: :class:`~.agent_optimizer.AgentOptimizer`.

- :mod:`.agent_optimizer`: a ``torch.optim.Optimizer`` whose ``step()`` is the inner step
  followed by the sync of P_t;
- :mod:`.control`: how the ranks that run no loop (slow weights only) follow those that do;
- :mod:`.adoption`: what is checked and built before the user's model is adopted;
- :mod:`.environment`: which launcher started this process (``comm="auto"``).

Imports: every other part of :mod:`launch.engine` (it is a door, at the top).
"""
