"""The command line: ``python -m launch`` (a hydra app) and ``python -m launch.equivalence``.

Owns the configuration (``conf/``: one group per package), the names it accepts
(:mod:`.registry`: topologies, problems, optimizers, slow rules, serial references), the job
builder (:mod:`.build`: one builder per configuration group), the runs it drives (:mod:`.runs`:
the serial reference and the simulation behind one interface), metrics.csv (:mod:`.metrics`),
checkpoint options (:mod:`.checkpoint_options`), the deviation tracker and its table
(:mod:`.deviation`), the equivalence command (:mod:`.equivalence`) and its error reporting
(:mod:`.errors`).

The only package that knows configuration names.  Imports: :mod:`launch.engine`,
:mod:`launch.comm`, :mod:`agents`, :mod:`topology` and :mod:`experiments` (the problems).
"""
