"""Moved to :mod:`peft_palora.recipes.multimnist`: the MultiMNIST reader is example code, kept apart from the core.

This module forwards every name there, with a ``DeprecationWarning``; it will be removed in a later release.
"""

from __future__ import annotations

import warnings
from typing import Any

from .recipes import multimnist as _moved

warnings.warn(
    "`peft_palora.multimnist` moved to `peft_palora.recipes.multimnist`; import it from there.",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)
