"""Reading JSON files the package or its users wrote: one reader, one kind of error."""

from __future__ import annotations

import json
import os
from typing import Any


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict[str, Any]:
    """The JSON object stored in ``path``.

    Raises:
        ValueError: naming ``what`` and the file, when it is missing, unreadable, not UTF-8, not JSON (or nested too
            deeply to parse), or holds something other than a JSON object. The cause is chained.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"{what} {path!r} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{what} {path!r} could not be read as JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path!r} must hold a JSON object, got {type(data).__name__}.")
    return data
