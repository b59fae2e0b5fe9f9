"""The record of a run: ``metrics.csv`` and ``eval.csv``, written as the run goes.

- :mod:`.run`: the interface a recorded run offers (:class:`~.run.Run`), and its implementation
  over an engine (:class:`~.run.EngineRun`);
- :mod:`.metrics`: every agent's loss, gradient norm and distance to the virtual iterate at the
  logged steps, measured off the critical path (``metrics.csv``);
- :mod:`.evaluation`: held-out metrics of every agent and of X a, and the learning rates
  (``eval.csv``).

Imports: :mod:`launch.engine.readout` and below.
"""
