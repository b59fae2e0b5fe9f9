"""The benchmarks behind ``python -m launch.bench`` (see :mod:`launch.bench`).

Every figure is a ratio of two things timed side by side in one run, interleaved (A, B, A, B, ...)
over ``repeats`` rounds, and the median of the per-round ratios is reported, because the machines
are shared and noisy.  One module per kind of run: :mod:`.timing` (the interleaving),
:mod:`.workloads` (models and batches), :mod:`.colocated` (B1, B5), :mod:`.distributed` (B2, B3,
GPU; spawned processes), :mod:`.memory` (B4; fresh processes).
"""
