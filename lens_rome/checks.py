"""Checks of user-given numbers and tensors, each raising an
:class:`~lens_rome.errors.InputError` that names the value.

The one rule for whatever can reach a model's weights (hyper-parameters,
statistics, targets, loaded edits, the final update): it is checked finite
where it enters, with :func:`finite_number` or :func:`finite_tensor`, so that
a NaN never gets as far as ``W_out``.
"""

from __future__ import annotations

import math
from typing import Any

from lens_rome.errors import InputError, NonFiniteError


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
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if not math.isfinite(value):
        raise NonFiniteError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value!r}")
    if positive and not value > 0:
        raise InputError(f"{name} must be > 0, got {value!r}")
    return float(value)


def finite_tensor(tensor: Any, name: str, fix: str) -> Any:
    """``tensor`` if every entry is finite; else :class:`~lens_rome.errors.NonFiniteError`
    saying how many entries are NaN or infinite, and ``fix``."""
    finite = tensor.isfinite()
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise NonFiniteError(f"{name} has {bad} non-finite value(s) (NaN or inf) among "
                             f"{tensor.numel()}; {fix}")
    return tensor
