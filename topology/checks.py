"""Shared argument checks: integers, reals, step sizes, booleans, choices and dtype names.

The lowest layer of the project: it imports nothing of it, so that every package (topology,
agents, launch, experiments) may use it.  Every check returns the value in its plain Python type
(``int``, ``float``, ``bool``) or raises ``ValueError`` with a message of the form
``"<name> must be <what is allowed>; got <value>"``, ``name`` being the argument or
configuration key as the user typed it.  The checks are pure functions of their arguments, so
every rank that checks the same configuration raises the same error before any collective.

What counts as what:

* an integer is a ``numbers.Integral`` (``int``, numpy integers) but not a ``bool``;
* a real is a ``numbers.Real`` (``int``, ``float``, numpy floats, ``Fraction``) but not a
  ``bool``; it must be finite (NaN and infinities are refused) and convertible to a float;
  ``Decimal``, strings, tensors and complex numbers are refused;
* a boolean is ``True`` or ``False`` (or a numpy bool), nothing else: not 0 / 1, not "true".

Example:
    >>> check_integer(3, "k", minimum=1)
    3
    >>> check_integer(True, "k", minimum=1)
    Traceback (most recent call last):
        ...
    ValueError: k must be an integer >= 1; got True of type bool
    >>> check_real(0.0, "lr", minimum=0.0)
    0.0
    >>> check_step_size(1.5, "alpha")
    Traceback (most recent call last):
        ...
    ValueError: alpha must be a real number in (0, 1]; got 1.5
    >>> dtype_from_name("bfloat16", "launch.dtype")
    torch.bfloat16
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import numpy as np
import torch


def is_integer(value) -> bool:
    """Whether ``value`` is an integer in the sense of this module (``numbers.Integral``, not bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_finite_real(value) -> bool:
    """Whether ``value`` is a finite real number (``numbers.Real``, not bool)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(float(value)))


def check_integer(value, name: str, *, minimum: int | None = None, maximum: int | None = None,
                  kind: str | None = None, optional: str | None = None) -> int | None:
    """An integer (bool refused) in [minimum, maximum] (either end optional); returns an ``int``.
    ``kind``: the noun of the message instead of the interval ("a positive integer");
    ``optional``: None is accepted too, and returned (the message says what it means: "null
    (<optional>) or ...")."""
    if optional is not None and value is None:
        return None
    if kind is not None:
        allowed = kind
    elif minimum is not None and maximum is not None:
        allowed = f"an integer in [{minimum}, {maximum}]"
    elif minimum is not None:
        allowed = f"an integer >= {minimum}"
    elif maximum is not None:
        allowed = f"an integer <= {maximum}"
    else:
        allowed = "an integer"
    if optional is not None:
        allowed = f"null{f' ({optional})' if optional else ''} or {allowed}"
    if not is_integer(value):
        raise ValueError(f"{name} must be {allowed}; got {value!r} of type {type(value).__name__}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {allowed}; got {value!r}")
    return value


def check_positive_int(value, name: str) -> int:
    """An integer >= 1 (bool refused): "<name> must be a positive integer"."""
    return check_integer(value, name, minimum=1, kind="a positive integer")


def check_number(value, name: str, minimum: float | None = None) -> float:
    """A finite real number >= ``minimum`` (bool refused), as a float: "<name> must be a finite
    number [>= minimum]"."""
    return check_real(value, name, minimum=minimum, kind="a finite number")


def _interval(minimum, maximum, min_open: bool, max_open: bool) -> str:
    if minimum is not None and maximum is not None:
        return f"in {'(' if min_open else '['}{minimum:g}, {maximum:g}{')' if max_open else ']'}"
    if minimum is not None:
        return f"{'>' if min_open else '>='} {minimum:g}"
    if maximum is not None:
        return f"{'<' if max_open else '<='} {maximum:g}"
    return ""


def check_real(
    value,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    kind: str = "a finite real",
    unit: str | None = None,
    optional: str | None = None,
) -> float | None:
    """A finite real number (bool refused) between ``minimum`` and ``maximum`` (either optional;
    an end is excluded when ``min_open`` / ``max_open``); returns a ``float``.  ``kind`` is the
    noun of the message, ``unit`` what the number counts ("<name> must be <kind> <interval>
    (<unit>); got <value>"); ``optional``: None is accepted too, and returned (the message says
    what it means: "null (<optional>) or ...")."""
    if optional is not None and value is None:
        return None
    allowed = " ".join(part for part in (kind, _interval(minimum, maximum, min_open, max_open)) if part)
    if unit is not None:
        allowed += f" ({unit})"
    if optional is not None:
        allowed = f"null{f' ({optional})' if optional else ''} or {allowed}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {allowed}; got {value!r}")
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError) as err:  # e.g. an int too large for a float
        raise ValueError(f"{name} must be {allowed}; got {value!r}") from err
    if not math.isfinite(number):
        raise ValueError(f"{name} must be {allowed}; got {value!r}")
    low_bad = minimum is not None and (number <= minimum if min_open else number < minimum)
    high_bad = maximum is not None and (number >= maximum if max_open else number > maximum)
    if low_bad or high_bad:
        raise ValueError(f"{name} must be {allowed}; got {value!r}")
    return number


def check_step_size(value, name: str) -> float:
    """A probability or slow step size: a real number in (0, 1] (finite by construction)."""
    return check_real(value, name, minimum=0.0, maximum=1.0, min_open=True, kind="a real number")


def check_bool(value, name: str) -> bool:
    """``True`` or ``False`` (a numpy bool too); 0, 1, strings and None are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be true or false; got {value!r}")
    return bool(value)


def check_choice(value, allowed: Iterable, name: str):
    """One of ``allowed`` (compared with ``==``; unhashable values are refused, not an error)."""
    allowed = tuple(allowed)
    try:
        ok = bool(value in allowed)
    except (TypeError, ValueError, RuntimeError):  # an array or tensor compared elementwise
        ok = False
    if not ok or isinstance(value, (bool, np.bool_)) and not any(a is value for a in allowed):
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")
    return value


def check_list(value, name: str, what: str) -> list:
    """A list or tuple (any ``Sequence`` but a string or bytes; a mapping is no ``Sequence``) of
    ``what``; returns a list.  Its items are the caller's to check."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list of {what}; got {value!r}")
    return list(value)


def as_list(value, name: str, what: str) -> list:
    """The items of any iterable ``value`` (a generator too) as a list; ``ValueError`` naming
    ``name`` when it is not iterable.  Its items are the caller's to check."""
    try:
        return list(value)
    except TypeError as err:
        raise ValueError(f"{name} must be a sequence of {what}; got {value!r}") from err


#: The floating dtypes a run may use, by the name a configuration file gives.
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def dtype_from_name(name, key: str) -> torch.dtype:
    """The ``torch.dtype`` of a name of :data:`DTYPES` (``"float32"``; ``"torch.float32"`` and a
    ``torch.dtype`` of the table are accepted too); ``ValueError`` naming ``key`` otherwise."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if isinstance(name, str) and name.removeprefix("torch.") in DTYPES:
        return DTYPES[name.removeprefix("torch.")]
    raise ValueError(f"{key} must be one of {', '.join(DTYPES)}; got {name!r}")


__all__ = [
    "DTYPES",
    "as_list",
    "check_bool",
    "check_choice",
    "check_integer",
    "check_number",
    "check_positive_int",
    "check_list",
    "check_real",
    "check_step_size",
    "dtype_from_name",
    "is_finite_real",
    "is_integer",
]
