r"""An agent's parameters as views into one contiguous flat buffer.

A sync then moves one buffer with one call, whatever the number of parameter tensors.  The buffer
optionally has room after the parameters for the inner optimizer's mixable state (the ``pullback``
policy mixes parameters and state in the same collective).

    buffer = [ p_0 | 0 | p_1 | 0 | ... | p_{n-1} | 0 | state slots ]
             \________ params (end) ________/      ^ state_offset

**Alignment.**  Every parameter starts at a multiple of :data:`ALIGN_BYTES` bytes of the buffer
(the buffer itself is allocated aligned: 64 bytes on the CPU, 512 on CUDA), as does the state
region: a parameter after an odd-sized one would otherwise leave the vectorised kernels of the
inner optimizer (and of everything that runs on one parameter) on their slow path.  The gaps are
*padding*: zero at creation, and zero forever, because nothing writes them but the syncs, which
mix the agents' buffers linearly (sums of zeros times weights) -- the inner optimizer only sees
the parameters' views, the finiteness marker is element 0 (the first parameter's first entry).
``params`` is the parameter region *in the buffer's layout*, padding included (a live view, what
every sync and readout of the engine works on); :meth:`FlatBuffer.pack` drops the padding (the
parameters back to back, in ``module.parameters()`` order, as a serial reference flattens them),
:meth:`FlatBuffer.split` cuts a vector of the buffer's layout into the parameters' entries, and
:func:`load_flat_` takes either layout.

**Memory format.**  A parameter's view is contiguous.  A parameter that is not (a
``channels_last`` convolution weight) is refused (:func:`check_uniform_parameters`): silently
made contiguous it would change what the model computes with, and kept in its strides its entries
would sit in the buffer in another order than every flat vector's.  Convert the weights back
(``model.to(memory_format=torch.contiguous_format)``) before building the agents; inputs may stay
``channels_last``.

**Detachment** (:func:`detached_parameters`): ``model.half()``, ``model.to(device)`` or
``model.to(memory_format=...)`` after the agents were built replace ``param.data`` with new
tensors; the parameters then no longer live in the buffer and the syncs would mix numbers the
model does not use.  :func:`check_attached` names them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

#: Every parameter (and the state region) starts at a multiple of this many bytes of the buffer.
ALIGN_BYTES = 16


def align_up(n: int, itemsize: int) -> int:
    """``n`` elements of ``itemsize`` bytes rounded up to a multiple of :data:`ALIGN_BYTES`.

    Example:
        >>> align_up(5, 4), align_up(5, 8), align_up(8, 2)
        (8, 6, 8)
    """
    step = max(1, ALIGN_BYTES // itemsize)
    return -(-n // step) * step


def aligned_offsets(numels: Sequence[int], itemsize: int) -> tuple[tuple[int, ...], int]:
    """The start of each of ``numels`` in a buffer of ``itemsize``-byte elements, each aligned
    (:func:`align_up`), in order; and the end of the last (0 for none).

    Example:
        >>> aligned_offsets([5, 3, 4], itemsize=4)
        ((0, 8, 12), 16)
    """
    offsets, end = [], 0
    for n in numels:
        start = align_up(end, itemsize)
        offsets.append(start)
        end = start + n
    return tuple(offsets), end


def parameter_region(module: nn.Module) -> int:
    """Where the state region of ``module``'s flat buffer starts: the parameter region's length,
    padding included (what a sync mixes before the state slots).

    Example:
        >>> parameter_region(nn.Linear(3, 1))      # float32: weight at 0, bias at 4
        8
    """
    params = list(module.parameters())
    _, end = aligned_offsets([p.numel() for p in params], params[0].element_size())
    return align_up(end, params[0].element_size())


class FlatBuffer:
    """One contiguous 1-D buffer: the parameters, each aligned (module docstring), then
    ``state_numel`` slots from ``state_offset``.

    Args:
        shapes: shapes of the parameter tensors, in order.
        dtype, device: of every tensor in the buffer.
        state_numel: size of the state slot region (0 without ``pullback``).

    Attributes: ``numel`` (the parameters' entries, d), ``offsets`` (where each parameter
    starts), ``end`` (where the last one ends: ``params``'s length), ``state_offset`` (where the
    state region starts), ``padded`` (whether ``end > numel``: the layout has padding).
    """

    def __init__(self, shapes: Sequence[torch.Size], dtype: torch.dtype, device, state_numel: int = 0):
        self.shapes = tuple(torch.Size(s) for s in shapes)
        self.numels = tuple(math.prod(s) for s in self.shapes)
        self.numel = sum(self.numels)
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.offsets, self.end = aligned_offsets(self.numels, itemsize)
        self.state_offset = align_up(self.end, itemsize)
        self.padded = self.end != self.numel
        self.buffer = torch.zeros(self.state_offset + state_numel, dtype=dtype, device=device)
        self.params = self.buffer[: self.end]
        self.state = self.buffer[self.state_offset :]

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The entries of each parameter in ``x``, a vector of the buffer's layout (``params``, a
        copy of it, a weighted sum of such): flat views, in order."""
        return [x[o : o + n] for o, n in zip(self.offsets, self.numels)]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (the buffer's layout) without its padding: the d parameter entries back to back
        (a view when the layout has none, else a new tensor)."""
        return x[: self.numel] if not self.padded else torch.cat(self.split(x))

    def views(self) -> list[torch.Tensor]:
        """One view of the parameter region per shape, in order."""
        return [chunk.view(shape) for chunk, shape in zip(self.split(self.params), self.shapes)]


def module_signature(module: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every parameter: what must agree across ranks."""
    return [(n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters()]


def check_uniform_parameters(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The single dtype and device of ``module``'s parameters, or ``ValueError``."""
    params = list(module.parameters())
    if not params:
        raise ValueError("model must have at least one parameter")
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ValueError(
            "model parameters must share one dtype and one device (they live in one flat buffer); "
            f"got dtypes {sorted(map(str, dtypes))} and devices {sorted(map(str, devices))}"
        )
    if not params[0].is_floating_point():
        raise ValueError(f"model parameters must be floating point; got {params[0].dtype}")
    strided = [name for name, p in module.named_parameters() if not p.is_contiguous()]
    if strided:
        raise ValueError(
            f"model parameters must be contiguous (each is a contiguous view into the agent's flat buffer); "
            f"{', '.join(strided)} is not (channels_last?): convert the model with "
            f"model.to(memory_format=torch.contiguous_format) before building the agents (inputs may stay "
            f"channels_last)")
    return params[0].dtype, params[0].device


def check_dtype_device(dtype, device) -> None:
    """``dtype``: None or a floating-point ``torch.dtype``; ``device``: None, or a ``torch.device``
    or device string that names a device this process has.  ``ValueError`` otherwise."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype (e.g. torch.float64); got {dtype!r}")
    if device is None:
        return
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be a torch.device or a string such as 'cpu' or 'cuda:0'; got {device!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"device must name a device such as 'cpu' or 'cuda:0'; got {device!r}") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"device {str(device)!r} is not available: this process sees {count} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"device must be a CPU or CUDA device; got {str(device)!r}")


def flatten_module_(module: nn.Module, state_numel: int = 0) -> FlatBuffer:
    """Move ``module``'s parameters into a new :class:`FlatBuffer`; they become views into it.

    The parameter objects are kept (so optimizers built afterwards see them); only their storage
    changes.  Build the inner optimizer *after* this call.
    """
    dtype, device = check_uniform_parameters(module)
    params = list(module.parameters())
    flat = FlatBuffer([p.shape for p in params], dtype, device, state_numel)
    with torch.no_grad():
        for p, view in zip(params, flat.views()):
            view.copy_(p)
            p.data = view
    return flat


@torch.no_grad()
def load_flat_(module: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Copy a flat parameter vector (in ``module.parameters()`` order) into ``module``: packed
    (d entries back to back) or in the layout of a flat buffer of ``flat``'s dtype (padding
    included: ``FlatBuffer.params``, a readout of it)."""
    params = list(module.parameters())
    numels = [p.numel() for p in params]
    offsets, end = aligned_offsets(numels, flat.element_size())
    if flat.numel() == sum(numels):
        offsets = tuple(sum(numels[:i]) for i in range(len(numels)))
    elif flat.numel() != end:
        raise ValueError(f"flat must have {sum(numels)} entries for this module (or {end} in the layout of "
                         f"a {flat.dtype} flat buffer); got {flat.numel()}")
    for p, offset, n in zip(params, offsets, numels):
        p.copy_(flat[offset : offset + n].view_as(p))
    return module


def detached_parameters(parameters: Sequence[torch.Tensor], flat: FlatBuffer) -> list[int]:
    """The indices of ``parameters`` (a worker's, in order) that are no longer the views into
    ``flat`` that :func:`flatten_module_` made (module docstring): another storage, dtype, device,
    shape or layout."""
    base, itemsize, buffer = flat.buffer.data_ptr(), flat.buffer.element_size(), flat.buffer
    return [i for i, (p, offset, shape) in enumerate(zip(parameters, flat.offsets, flat.shapes))
            if p.data_ptr() != base + offset * itemsize or p.dtype != buffer.dtype or p.device != buffer.device
            or p.shape != shape or not p.is_contiguous()]


def check_attached(parameters: Sequence[torch.Tensor], flat: FlatBuffer, names: Sequence[str]) -> None:
    """``ValueError`` naming the parameters that no longer live in ``flat``
    (:func:`detached_parameters`; ``names`` in the same order)."""
    detached = detached_parameters(parameters, flat)
    if detached:
        shown = ", ".join(f"{names[i]} (now {parameters[i].dtype} on {parameters[i].device})" for i in detached[:5])
        more = f" and {len(detached) - 5} more" if len(detached) > 5 else ""
        raise ValueError(
            f"the model's parameters no longer live in the agent's flat buffer ({flat.buffer.dtype} on "
            f"{flat.buffer.device}): {shown}{more}. model.half(), model.to(device or dtype) or "
            f"model.to(memory_format=...) after the agents were built replaces param.data, and the syncs would "
            f"mix numbers the model no longer uses; do it before wrapping the optimizer")


def cpu_copy(obj):
    """``obj`` with every tensor replaced by a detached, compact CPU copy (dicts, lists and tuples
    are copied recursively; other values are kept): a state to save that shares nothing with the
    live one."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [cpu_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(cpu_copy(v) for v in obj)
    return obj
