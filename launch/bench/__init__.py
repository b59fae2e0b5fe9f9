"""The benchmarks: ``python -m launch.bench`` (the command line is :mod:`.cli`).

Every figure is a ratio of two things timed side by side in one run, interleaved (A, B, A, B, ...)
over ``repeats`` rounds, and the median of the per-round ratios is reported, because the machines
are shared and noisy.  One module per kind of run: :mod:`.timing` (the interleaving),
:mod:`.workloads` (models and batches), :mod:`.colocated` (B1, B5), :mod:`.distributed` (B2, B3,
GPU: tasks run on spawned ranks), :mod:`.memory` (B4; fresh processes), :mod:`.post_local` (B6:
against PyTorch's post-local SGD), :mod:`.cli_logging` (B7: torchrun jobs of the command line),
:mod:`.gpu` (``--gpu``, the prepared GPU run), :mod:`.suite` (the configuration and the runners),
:mod:`.processes` (spawning ranks, killing process groups), :mod:`.rank` (the entry point of one
spawned rank).

Imports: :mod:`launch.engine`, :mod:`launch.comm`, :mod:`agents`, :mod:`topology`; never the
command line.
"""
