"""Building and running a sync: X <- X P_t on this rank's agents.

- :mod:`.compile`: :func:`~.compile.compile_sync`, the one place where a sync's strategy is
  chosen (a pure function of the schedule, the placement and the options);
- :mod:`.program`: a plan compiled for one rank; :mod:`.blocks`: its steps (all-reduce,
  overlapped hub, PREMUL_SUM on NCCL, point-to-point mixes); :mod:`.ordered`: the steps of the
  exact syncs (every sum added in agent order: chain, gather, ordered hub); :mod:`.kernel`: the
  one weighted-sum kernel;
- :mod:`.overlap`: overlapped syncs; :mod:`.state_weights`: per-level state policies' weights;
  :mod:`.slow_rule`: the sync of a state-dependent slow update (outer optimizers, adaptive alpha).

Imports: :mod:`launch.comm`, :mod:`agents`, :mod:`topology`, :mod:`launch.engine.placement`,
:mod:`launch.engine.guard`.
"""
