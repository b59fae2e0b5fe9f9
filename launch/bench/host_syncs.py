"""Counting host synchronisations: on CUDA, the ones PyTorch reports; anywhere, their causes.

On CUDA, :func:`count_cuda_syncs` runs a block under ``torch.cuda.set_sync_debug_mode("warn")``
and counts the warnings PyTorch emits for every synchronizing operation (a device-to-host read,
a copy from pageable memory without ``non_blocking``, ``nonzero``...).  On any device,
:class:`HostReads` (a ``TorchFunctionMode``) counts the calls that *would* synchronise on CUDA:
reads of a tensor on the host (``.item()``, ``.cpu()``, ``.tolist()``, ``float(t)``, ``bool(t)``
...; a read of what ``.cpu()`` returned is not counted again) and tensors made from Python numbers
(``torch.tensor``: a host-to-device copy on CUDA).  The test suite checks the engine with the
latter on CPU; ``python -m launch.bench --gpu`` counts the former on a GPU.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

#: Calls that read a tensor on the host (a synchronisation when the tensor is on a GPU).
READS = frozenset({"item", "cpu", "tolist", "numpy", "__float__", "__bool__", "__int__", "__index__"})
#: Calls that make a tensor from Python numbers (a host-to-device copy on a GPU).
FROM_PYTHON = frozenset({"tensor", "as_tensor", "from_numpy"})


class HostReads(TorchFunctionMode):
    """Counts the torch functions and tensor methods called in its ``with`` block (``calls``)."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()
        self._host: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        on_host = bool(args) and any(args[0] is h for h in self._host)
        if not (name in READS and on_host):
            self.calls[name] += 1
        out = func(*args, **(kwargs or {}))
        if name == "cpu" or (on_host and isinstance(out, torch.Tensor)):
            self._host.append(out)
        return out

    def reads(self) -> int:
        """Host reads of a tensor (module docstring)."""
        return sum(self.calls[name] for name in READS)

    def made(self) -> int:
        """Tensors made from Python numbers."""
        return sum(self.calls[name] for name in FROM_PYTHON)


class _Count:
    count = 0


@contextlib.contextmanager
def count_cuda_syncs():
    """``with count_cuda_syncs() as c: ...``: ``c.count`` synchronizing CUDA operations ran in
    the block (``torch.cuda.set_sync_debug_mode("warn")``; the mode is restored after)."""
    result = _Count()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield result
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    result.count = sum("synchroniz" in str(w.message) for w in caught)


@contextlib.contextmanager
def count_host_syncs(device: str):
    """:func:`count_cuda_syncs` on CUDA; elsewhere the reads :class:`HostReads` counts (the
    synchronisations the same code would make on CUDA), as ``c.count``."""
    if torch.device(device).type == "cuda":
        with count_cuda_syncs() as result:
            yield result
        return
    result = _Count()
    with HostReads() as reads:
        yield result
    result.count = reads.reads()
