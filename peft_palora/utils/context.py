"""Context-variable scopes: a value that holds for one block, in one thread or asyncio task only."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


@contextmanager
def contextvar_scope(var: contextvars.ContextVar[T], value: T) -> Iterator[T]:
    """Set ``var`` to ``value`` inside the block and put the previous value back after it, even on an exception."""
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)
