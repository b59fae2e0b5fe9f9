"""Agents' settings described as flat, JSON-able records.

What defines a run (its inner optimizer and hyperparameters, its slow rule) is compared in two
places: by the ranks of a job when the engine starts (they must agree) and by a resume against
the checkpoint it continues (it must be the same run).  Both compare these records.

Example:
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    >>> describe_optimizer(opt, "optimizer")["optimizer.momentum"]
    0.9
    >>> normalize({"betas": (0.9, 0.999), "dtype": torch.float64})
    {'betas': [0.9, 0.999], 'dtype': 'torch.float64'}
"""

from __future__ import annotations

import json

import torch


def jsonable(value):
    """``value`` as JSON can hold it: tuples as lists, tensors as numbers (lists), dtypes and any
    other object as their ``str``; mappings recursively."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def normalize(record: dict) -> dict:
    """``record`` as it reads back from JSON (the form saved records have), so that a live record
    and a saved one compare equal when they hold the same values."""
    return json.loads(json.dumps(jsonable(record)))


def describe_optimizer(optimizer: torch.optim.Optimizer, prefix: str) -> dict:
    """``{prefix: class name, prefix.<hyperparameter>: value}``: the optimizer's class and the
    values it was built with (``optimizer.defaults``, which LR schedulers do not touch)."""
    record = {prefix: type(optimizer).__name__}
    record.update({f"{prefix}.{k}": jsonable(v) for k, v in sorted(optimizer.defaults.items())})
    return record
