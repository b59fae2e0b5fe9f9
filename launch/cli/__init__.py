"""The command line: ``python -m launch`` (a hydra app), ``python -m launch.equivalence`` and
``python -m launch.plot``.

Owns the configuration (``conf/``: one group per package), the names it accepts
(:mod:`.registry`, :mod:`.topologies`: topologies, problems, optimizers, slow rules, serial
references), the job builder (:mod:`.build`: one builder per configuration group, every value
validated before any communicator exists), the runs it drives (:mod:`.runs`: the serial reference
and the simulation behind the record's one run interface), the app and its loop (:mod:`.app`: what
a run records as it goes is the engine's :mod:`launch.engine.record`), the end of a run
(:mod:`.finish`) and its summary
(:mod:`.summary`), checkpoints and resumes (:mod:`.resume`), the default run directory
(:mod:`.rundir`), the deviation tracker and its table (:mod:`.deviation`), the equivalence command
(:mod:`.equivalence`), the plot command (:mod:`.plot`) and the error reporting and exit statuses
(:mod:`.errors`).

The only package that knows configuration names.  Imports: :mod:`launch.engine`,
:mod:`launch.comm`, :mod:`agents`, :mod:`topology` and :mod:`experiments` (the problems).
"""
