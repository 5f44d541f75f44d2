"""Range checks of config values, with the house error template.

``check_range("optim.lr", -1.0, low=0, low_open=True)`` raises
``UserInputError("`optim.lr` must be a finite number > 0, but is -1.0 instead.")``: the field, the
allowed range and the value, in one line. NaN and infinities are never in range.
"""

from __future__ import annotations

import math
from typing import Any

from speechvq.errors import UserInputError


def describe_range(
    low: float | None,
    high: float | None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> str:
    """``"a finite number in [0, 1)"``, ``"an integer >= 1"``, ... for the bounds given."""
    kind = "an integer" if integer else "a finite number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {_fmt(low)}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {_fmt(high)}"
    return kind


def _fmt(bound: float) -> str:
    """A bound as written: integers in full, other numbers in the shortest form."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def in_range(
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> bool:
    """Whether ``value`` is a (finite; integral if ``integer``) number within the bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if integer and not isinstance(value, int):
        return False
    if not math.isfinite(value):
        return False
    if low is not None and (value <= low if low_open else value < low):
        return False
    return not (high is not None and (value >= high if high_open else value > high))


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> None:
    """Raise :class:`UserInputError` unless ``value`` lies in the range (None passes if ``optional``).

    Args:
        name: the field, as the user writes it (``optim.lr``).
        value: its value.
        low: lower bound, inclusive unless ``low_open``.
        high: upper bound, inclusive unless ``high_open``.
        integer: the value must be an int.
        optional: None is allowed (and means "off").
    """
    if optional and value is None:
        return
    if not in_range(value, low, high, low_open=low_open, high_open=high_open, integer=integer):
        allowed = describe_range(low, high, low_open=low_open, high_open=high_open, integer=integer)
        if optional:
            allowed += " or null"
        raise UserInputError(f"`{name}` must be {allowed}, but is {value!r} instead.")


def check_probability(name: str, value: Any, *, one_open: bool = False) -> None:
    """``value`` in [0, 1] (or [0, 1) with ``one_open``)."""
    check_range(name, value, 0.0, 1.0, high_open=one_open)
