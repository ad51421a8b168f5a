"""Parsing of the static settings shared by the rules (stride, window, dilation)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def is_int(x) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def as_ints(value, n: int) -> tuple[int, ...] | None:
    """One int for every axis, or a tuple/list of ``n`` ints, as a tuple; else ``None``.

    The caller raises its own error for ``None`` (its message names the rule,
    the setting and what it accepts) and checks the range.
    """
    if is_int(value):
        return (int(value),) * n
    if isinstance(value, (tuple, list)) and len(value) == n and all(is_int(x) for x in value):
        return tuple(int(x) for x in value)
    return None


def ints_at_least(
    value, n: int, low: int, malformed: str, too_small: Callable[[tuple[int, ...]], str]
) -> tuple[int, ...]:
    """:func:`as_ints` of ``value``, each entry >= ``low``.

    Raises:
      TypeError: ``malformed``, when ``value`` is neither an int nor ``n`` ints.
      ValueError: ``too_small(values)``, when an entry is below ``low``.
    """
    values = as_ints(value, n)
    if values is None:
        raise TypeError(malformed)
    if min(values) < low:
        raise ValueError(too_small(values))
    return values
