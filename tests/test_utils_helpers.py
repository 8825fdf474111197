"""The shared helpers of ``peft_palora.utils``: argument checks, the JSON reader, context-variable scopes."""

from __future__ import annotations

import asyncio
import contextvars
import json
import math
from fractions import Fraction

import numpy as np
import pytest

from peft_palora.utils.checks import check_int, check_positive, check_real
from peft_palora.utils.context import contextvar_scope
from peft_palora.utils.json_files import read_json


@pytest.mark.parametrize("value", [0, 3, np.int64(5), True, 2.0, "2", None])
def test_check_int_accepts_exactly_the_non_bool_integers(value):
    expected = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if expected:
        assert check_int(value, "n") == int(value) and type(check_int(value, "n")) is int
    else:
        with pytest.raises(TypeError, match=rf"^n must be an int, got {type(value).__name__} \("):
            check_int(value, "n")


def test_check_int_minimum_names_the_argument():
    assert check_int(-7, "offset") == -7  # no minimum: any int
    with pytest.raises(ValueError, match=r"^`r` must be >= 1, got 0\.$"):
        check_int(0, "`r`", minimum=1)


@pytest.mark.parametrize("value", [0, -2.5, 1e300, np.float32(0.25), Fraction(1, 3), math.inf, math.nan])
def test_check_real_returns_the_float_and_refuses_non_finite_by_default(value):
    if math.isfinite(float(value)):
        assert check_real(value, "x") == float(value)
    else:
        with pytest.raises(ValueError, match=r"^x must be finite, got (inf|nan)\.$"):
            check_real(value, "x")
        assert check_real(value, "x", finite=False) is not None  # allowed when asked for


@pytest.mark.parametrize("value", [True, "1.0", None, 1j, [1.0]])
def test_check_real_refuses_what_is_not_a_real_number(value):
    with pytest.raises(TypeError, match=rf"^w must be a number, got {type(value).__name__} "):
        check_real(value, "w")
    with pytest.raises(TypeError, match=r"^mul must be a real number, got"):
        check_real(value, "mul", expected="a real number")


@pytest.mark.parametrize(
    "value, minimum, strict, finite, ok",
    [
        (0.0, 0, False, True, True), (0.0, 0, True, True, False), (-1e-300, 0, False, True, False),
        (math.inf, 0, False, True, False), (math.inf, 0, False, False, True), (math.nan, 0, False, False, False),
        (2, 2, True, True, False), (3, 2, True, True, True),
    ],
)  # fmt: skip
def test_check_real_minimum_against_plain_comparisons(value, minimum, strict, finite, ok):
    if ok:
        assert check_real(value, "v", minimum=minimum, strict=strict, finite=finite) == float(value)
        return
    bound = ">" if strict else ">="
    prefix = "a finite number " if finite else ""
    with pytest.raises(ValueError, match=rf"^v must be {prefix}{bound} {minimum}, got {float(value)}\.$"):
        check_real(value, "v", minimum=minimum, strict=strict, finite=finite)


def test_check_positive():
    assert check_positive(1e-12, "eps") == 1e-12
    assert check_positive(math.inf, "t", finite=False) == math.inf
    for bad in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"^eps must be a finite number > 0, got"):
            check_positive(bad, "eps")
    with pytest.raises(ValueError, match=r"^`temperature` must be > 0, got 0.0\.$"):
        check_positive(0, "`temperature`", finite=False)


def test_read_json_reads_an_object_and_names_the_file_otherwise(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"a": [1, 2], "b": None}), encoding="utf-8")
    assert read_json(good) == {"a": [1, 2], "b": None}
    cases = {
        "missing.json": (None, "does not exist"),
        "damaged.json": ('{"a": ', "could not be read as JSON"),
        "latin1.json": (b'{"a": "\xe9"}', "could not be read as JSON"),
        "list.json": ("[1, 2]", "must hold a JSON object, got list"),
        "deep.json": ("[" * 100_000 + "]" * 100_000, "could not be read as JSON"),
    }
    for name, (content, problem) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=rf"^multi-task config '.*{name}' {problem}"):
            read_json(path, what="multi-task config")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(ValueError, match=r"folder.json' could not be read as JSON"):
        read_json(tmp_path / "folder.json")


def test_contextvar_scope_restores_the_previous_value_even_on_errors():
    var: contextvars.ContextVar[str] = contextvars.ContextVar("test_scope", default="outer")
    with contextvar_scope(var, "a") as value:
        assert value == "a" and var.get() == "a"
        with pytest.raises(RuntimeError):
            with contextvar_scope(var, "b"):
                assert var.get() == "b"
                raise RuntimeError
        assert var.get() == "a"
    assert var.get() == "outer"


def test_contextvar_scope_is_local_to_each_asyncio_task():
    var: contextvars.ContextVar[int | None] = contextvars.ContextVar("test_scope_tasks", default=None)

    async def worker(value: int) -> list:
        seen = []
        with contextvar_scope(var, value):
            for _ in range(3):
                await asyncio.sleep(0)
                seen.append(var.get())
        seen.append(var.get())
        return seen

    async def main():
        return await asyncio.gather(worker(1), worker(2))

    assert asyncio.run(main()) == [[1, 1, 1, None], [2, 2, 2, None]]
