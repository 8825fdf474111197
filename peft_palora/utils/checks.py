"""Small argument checks shared by the modules (messages name the argument and the value)."""

from __future__ import annotations

import numbers


def check_int(value: object, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; bools are refused (``True`` as a count is almost certainly a bug)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)
