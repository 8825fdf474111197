"""Small argument checks shared by the modules (messages name the argument, the problem and the value).

``name`` is written into the message as given: pass ``"`r`"`` to get the back-quoted form of the config fields.
Bools are refused wherever a number is expected (``True`` as a count or a rate is almost certainly a bug).
"""

from __future__ import annotations

import math
import numbers


def check_int(value: object, name: str, minimum: int | None = None) -> int:
    """``value`` as an int (>= ``minimum`` when given); TypeError for a non-int or a bool, ValueError below it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def check_real(
    value: object,
    name: str,
    *,
    minimum: float | None = None,
    strict: bool = False,
    finite: bool = True,
    expected: str = "a number",
) -> float:
    """``value`` as a float; TypeError for a non-real or a bool (``expected`` is the noun of its message).

    ``finite``: NaN and infinities are refused. ``minimum``: values below it (at or below it when ``strict``) are
    refused; NaN always fails a minimum. Messages: ``"<name> must be finite, got nan."``,
    ``"<name> must be a finite number >= 0, got -1.0."`` (``"<name> must be > 0, got 0.0."`` when not ``finite``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} ({value!r}).")
    number = float(value)
    if minimum is not None:
        below = not (number > minimum if strict else number >= minimum)  # written so that NaN is below too
        if below or (finite and not math.isfinite(number)):
            bound = f"{'>' if strict else '>='} {minimum}"
            raise ValueError(f"{name} must be {'a finite number ' if finite else ''}{bound}, got {number}.")
    elif finite and not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}.")
    return number


def check_positive(value: object, name: str, *, finite: bool = True, expected: str = "a number") -> float:
    """``value`` as a float > 0, finite unless ``finite=False``: ``check_real(..., minimum=0, strict=True)``."""
    return check_real(value, name, minimum=0, strict=True, finite=finite, expected=expected)
