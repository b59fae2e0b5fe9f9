"""The command line: ``python -m launch`` (a hydra app), ``python -m launch.equivalence`` and
``python -m launch.plot``.

Owns the configuration (``conf/``: one group per package), the names it accepts
(:mod:`.registry`: topologies, problems, optimizers, slow rules, serial references), the job
builder (:mod:`.build`: one builder per configuration group, every value validated), the runs it
drives (:mod:`.runs`: the serial reference and the simulation behind one interface), metrics.csv
(:mod:`.metrics`), eval.csv (:mod:`.evaluation`), summary.json / summary.txt (:mod:`.summary`),
TensorBoard (:mod:`.tensorboard`), the default run directory (:mod:`.rundir`), checkpoint options
(:mod:`.checkpoint_options`), the deviation tracker and its table (:mod:`.deviation`), the
equivalence command (:mod:`.equivalence`), the plot command (:mod:`.plot`) and the error reporting
and exit statuses (:mod:`.errors`).

The only package that knows configuration names.  Imports: :mod:`launch.engine`,
:mod:`launch.comm`, :mod:`agents`, :mod:`topology` and :mod:`experiments` (the problems).
"""
