r"""An agent's parameters as views into one contiguous flat buffer.

A sync then moves one buffer with one call, whatever the number of parameter tensors.  The buffer
optionally has room after the parameters for the inner optimizer's mixable state (the ``pullback``
policy mixes parameters and state in the same collective).

    buffer = [ p_0 | p_1 | ... | p_{n-1} | state slots ]
             \_______ params (numel) ___/ \_ state_numel _/
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class FlatBuffer:
    """One contiguous 1-D buffer: ``numel`` parameter entries followed by ``state_numel`` slots.

    Args:
        shapes: shapes of the parameter tensors, in order.
        dtype, device: of every tensor in the buffer.
        state_numel: size of the state slot region (0 without ``pullback``).
    """

    def __init__(self, shapes: Sequence[torch.Size], dtype: torch.dtype, device, state_numel: int = 0):
        self.shapes = tuple(torch.Size(s) for s in shapes)
        self.numels = tuple(math.prod(s) for s in self.shapes)
        self.numel = sum(self.numels)
        self.buffer = torch.zeros(self.numel + state_numel, dtype=dtype, device=device)
        self.params = self.buffer[: self.numel]
        self.state = self.buffer[self.numel :]

    def views(self) -> list[torch.Tensor]:
        """One view of the parameter region per shape, in order."""
        return [
            chunk.view(shape)
            for chunk, shape in zip(self.params.split(self.numels), self.shapes)
        ]


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
    """Copy a flat parameter vector (in ``module.parameters()`` order) into ``module``."""
    params = list(module.parameters())
    total = sum(p.numel() for p in params)
    if flat.numel() != total:
        raise ValueError(f"flat must have {total} entries for this module; got {flat.numel()}")
    for p, chunk in zip(params, flat.split([p.numel() for p in params])):
        p.copy_(chunk.view_as(p))
    return module


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
