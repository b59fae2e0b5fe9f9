"""What stops a run, loudly and on every rank alike, instead of letting it go silently wrong.

- :mod:`.health`: the errors a run reports (:class:`~.health.NonFiniteError`,
  :class:`~.health.RankFailureError`) and the lost-rank handler :func:`~.health.collective` that
  every collective of a run goes through;
- :mod:`.finiteness`: the finiteness check (NaN or Inf stops every rank, before it is saved);
- :mod:`.windows`: how far the finiteness check's markers travel through a schedule's own
  collectives (the windows in which every rank learns of a finding).

Imports: :mod:`launch.comm`, :mod:`topology`, :mod:`launch.engine.placement`.
"""
