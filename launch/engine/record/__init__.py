"""The record of a run, written as it goes: one implementation for both doors.

- :mod:`.run`: the interface a recorded run offers (:class:`~.run.Run`), and its implementation
  over an engine (:class:`~.run.EngineRun`);
- :mod:`.recorder`: :class:`~.recorder.RunRecord`, what a run records and when;
- :mod:`.metrics`: every agent's loss, gradient norm and distance to the virtual iterate at the
  logged steps, measured off the critical path (``metrics.csv``);
- :mod:`.evaluation`: held-out metrics of every agent and of X a, and the learning rates
  (``eval.csv``);
- :mod:`.clock`: simulated time on a cluster (the ``sim_time`` column);
- :mod:`.tensorboard`: TensorBoard's event files, optionally.

Imports: :mod:`launch.engine.readout`, :mod:`launch.engine.sync` and below.
"""
