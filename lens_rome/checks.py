"""Checks of user-given numbers, each raising :class:`~lens_rome.errors.InputError` that names it."""

from __future__ import annotations

import math
from typing import Any

from lens_rome.errors import InputError


def positive_int(value: Any, name: str, *, optional: bool = False) -> Any:
    """``value`` if it is an int >= 1 (or None when ``optional``); bools are refused."""
    if optional and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an integer >= 1{' or None' if optional else ''}, "
                         f"got {value!r}")
    return value


def finite_number(value: Any, name: str, *, minimum: float | None = None,
                  positive: bool = False) -> float:
    """``value`` as a float if it is a finite real number (>= ``minimum``, > 0 if ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value!r}")
    if positive and not value > 0:
        raise InputError(f"{name} must be > 0, got {value!r}")
    return float(value)
