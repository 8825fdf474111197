"""The one definition of a valid preference, shared by the layers, the trainers and the evaluation code.

:func:`validate_preference` turns user input (list, numpy array, tensor, ``{task: weight}`` dict) into a float32
tensor, or raises a ``ValueError``/``TypeError`` that says what is wrong. It never renormalises silently.
Grids and samplers, which produce preferences, are :mod:`peft_palora.preferences`.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from peft_palora.utils.checks import check_int

#: Tolerance on ``|Σ_t λ_t - 1|`` for preferences given in float32 or wider.
SUM_TOLERANCE = 1e-4


_MAX_VALUES_IN_MESSAGE = 4


def _format_values(values: torch.Tensor) -> str:
    """Short, readable rendering of offending values for error messages."""
    if values.numel() == 0:
        return str(values.tolist())
    flat = values.detach().reshape(-1, values.shape[-1]) if values.ndim else values.reshape(1, 1)
    rows = [[round(float(v), 6) for v in row] for row in flat[:_MAX_VALUES_IN_MESSAGE].tolist()]
    text = str(rows[0]) if values.ndim == 1 else str(rows)
    if flat.shape[0] > _MAX_VALUES_IN_MESSAGE:
        text = text[:-1] + f", ... ({flat.shape[0]} rows)]"
    return text


class _Given:
    """What the walk over a user's preference found besides the values: the coarsest float resolution among the
    inputs (``eps`` of their dtype, 0 for exact ones: ints and Python floats count as float64) and whether a
    tensor in it requires grad."""

    def __init__(self) -> None:
        self.resolution = 0.0
        self.requires_grad = False

    def saw(self, eps: float) -> None:
        self.resolution = max(self.resolution, eps)


def _leaf_to_float(value, name: str, given: _Given | None = None) -> float:
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must contain numbers, got the string {value!r}.")
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must contain numbers, got the bool {value!r}; write 0.0 or 1.0 instead.")
    if isinstance(value, np.generic):  # numpy scalars (np.float16(0.3), np.int64(1), ...): as in an array
        if value.dtype.kind not in "iuf":
            raise TypeError(f"{name} must contain real numbers, got a numpy {value.dtype} ({value!r}).")
        if given is not None:
            given.saw(_numpy_resolution(value.dtype))
        return float(value)
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:  # an int (or Fraction, Decimal) beyond the float range: not a finite preference
            text = str(value)
            shown = text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} characters)"
            raise ValueError(f"{name} must be finite, got {shown}, which is too large (beyond the float range).") from None
    raise TypeError(f"{name} must contain numbers, got {type(value).__name__} ({value!r}).")


def _nested_to_floats(value, name: str, given: _Given | None = None):
    """Walk nested lists/tuples (and the arrays inside them) and return the same nesting of python floats.

    ``np.asarray`` alone would quietly turn ``True`` into ``1.0`` and ``"0.5"`` into an error only sometimes, so
    every leaf is checked explicitly. ``given`` collects the inputs' resolution and whether any requires grad.
    """
    if isinstance(value, torch.Tensor):
        _check_tensor(value, name)
        if given is not None:
            given.saw(_tensor_resolution(value.dtype))
            given.requires_grad |= value.requires_grad
        return value.detach().cpu().to(torch.float64).tolist()
    if isinstance(value, np.ndarray):
        _check_numpy_dtype(value.dtype, name)
        if given is not None:
            given.saw(_numpy_resolution(value.dtype))
        return value.astype(np.float64).tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return _leaf_to_float(value, name, given)
    return [_nested_to_floats(item, name, given) for item in value]


def _stack_keeping_graph(value, device: torch.device) -> torch.Tensor:
    """The float32 tensor of a nested sequence whose leaves passed :func:`_nested_to_floats`, built with
    differentiable operations so that gradients reach the tensors in it."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.astype(np.float32)).to(device)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return torch.stack([_stack_keeping_graph(item, device) for item in value])
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def _first_tensor_requiring_grad(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value if value.requires_grad else None
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        for item in value:
            found = _first_tensor_requiring_grad(item)
            if found is not None:
                return found
    return None


def _tensor_resolution(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0


def _numpy_resolution(dtype: np.dtype) -> float:
    return float(np.finfo(dtype).eps) if dtype.kind == "f" else 0.0


def _check_tensor(value: torch.Tensor, name: str) -> None:
    _check_tensor_dtype(value.dtype, name)
    if value.is_meta:
        raise ValueError(f"{name} is a meta tensor, which holds no values; give a tensor with data.")


def _check_tensor_dtype(dtype: torch.dtype, name: str) -> None:
    if dtype == torch.bool:
        raise TypeError(f"{name} must hold numbers, got a bool tensor; convert it with .float() if you mean 0/1.")
    if dtype.is_complex:
        raise TypeError(f"{name} must hold real numbers, got a tensor of dtype {dtype}.")
    if dtype.is_floating_point and dtype.itemsize < 2:
        # float8 cannot hold 0.3 closer than 0.3125: a sum check at that resolution would accept nearly anything
        raise TypeError(
            f"{name} has dtype {dtype}, too coarse for a preference (its rounding alone moves the sum by up to "
            f"{torch.finfo(dtype).eps:g}); give float16, bfloat16 or wider."
        )


def _check_numpy_dtype(dtype: np.dtype, name: str) -> None:
    if dtype.kind == "b":
        raise TypeError(f"{name} must hold numbers, got a bool array; convert it with .astype(float) if you mean 0/1.")
    if dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got a numpy array of dtype {dtype}.")


def _from_mapping(pref: Mapping, num_tasks: int, task_names: Sequence[str] | None, name: str, given: _Given) -> list:
    """The weights of a ``{task: weight}`` dict in task order, each a number or a 0-d tensor (kept for its graph)."""
    if task_names is None:
        raise ValueError(
            f"{name} was given as a dict, which needs task names to order its entries; this model has none. "
            f"Pass a sequence of {num_tasks} weights instead, or set task_names in the config."
        )
    known = list(task_names)
    unknown = [key for key in pref if key not in known]
    if unknown:
        raise ValueError(f"{name} has unknown task name(s) {unknown}; the known task names are {known}.")
    missing = [task for task in known if task not in pref]
    if missing:
        raise ValueError(
            f"{name} must give a weight for every task; missing {missing} (known task names: {known}). "
            "Give 0.0 for tasks you want to ignore."
        )
    weights = []
    for task in known:
        weight, weight_name = pref[task], f"{name}[{task!r}]"
        if isinstance(weight, torch.Tensor) and weight.ndim == 0:
            _nested_to_floats(weight, weight_name, given)  # checks the dtype, notes resolution and grad
        elif isinstance(weight, np.ndarray) and weight.ndim == 0:
            _check_numpy_dtype(weight.dtype, weight_name)
            weight = weight[()]
            _leaf_to_float(weight, weight_name, given)
        else:
            _leaf_to_float(weight, weight_name, given)
        weights.append(weight)
    return weights


def _sum_tolerance(resolution: float) -> float:
    """How far from 1 a row may sum: ``SUM_TOLERANCE``, or ``eps`` of the coarsest float dtype given if larger.

    Rounding each entry ``λ_t`` of an exact preference to a float dtype moves it by at most ``eps/2 * λ_t``
    (half a unit in the last place), so it moves the sum by at most ``eps/2 * Σ λ_t = eps/2``, however many tasks
    there are; ``eps`` leaves room for one more rounding (e.g. ``1 - p`` computed in that dtype) and subnormals.
    """
    return max(SUM_TOLERANCE, resolution)


def validate_preference(
    pref,
    num_tasks: int,
    task_names: Sequence[str] | None = None,
    batch_size: int | None = None,
    name: str = "preference",
) -> torch.Tensor:
    """Check a preference and return it as a float32 tensor of shape ``(T,)`` or ``(B, T)``.

    Accepted forms: a sequence, numpy array or tensor of shape ``(T,)`` (one preference for the whole batch) or
    ``(B, T)`` (one per sample), or a dict ``{task_name: weight}`` naming every task (needs ``task_names``).
    Sequences and dicts may hold Python numbers, numpy scalars (``np.float16(0.3)``) and 0-d tensors, checked
    exactly like an array or tensor of the same dtype. Tensors of any real dtype (float8 excepted: too coarse) are
    converted to float32 and stay on their device; the result never aliases the input, so later in-place edits of
    the input cannot change a stored preference.

    Gradients: when a tensor in ``pref`` requires grad, the result is computed from it with differentiable
    operations (a dtype cast, ``torch.stack`` for sequences and dicts of 0-d tensors), so it stays in the autograd
    graph and ``backward`` reaches the input: a preference can be optimised (e.g. to search a trade-off).

    Every row must be finite, non-negative and sum to 1. The sum is computed in float64 from the values as given
    and must be within ``1e-4`` of 1, or within ``eps`` of the coarsest float dtype among the inputs when that is
    larger (float16: ``2**-10``, bfloat16: ``2**-7``): rounding a valid preference to that dtype moves its sum by
    at most ``eps/2``, whatever the number of tasks. Nothing is renormalised: a preference that does not sum to 1 is
    almost always a bug (e.g. raw loss weights), and rescaling it silently would change the trade-off the user asked
    for.

    Args:
        pref: the preference.
        num_tasks: ``T``, the number of tasks.
        task_names: names of the tasks, in order; required for the dict form.
        batch_size: if given, a ``(B, T)`` preference must have ``B == batch_size``.
        name: what to call the argument in error messages.

    Raises:
        TypeError: for strings, bools, complex numbers, float8 tensors or objects that are not numbers.
        ValueError: for a wrong shape, batch size, unknown/missing task names, NaN/inf, negative entries, or rows
            that do not sum to 1.
    """
    num_tasks = check_int(num_tasks, "num_tasks", minimum=1)
    if batch_size is not None:
        batch_size = check_int(batch_size, "batch_size", minimum=1)

    if isinstance(pref, torch.Tensor) and torch.compiler.is_compiling():
        return _validate_in_graph(pref, num_tasks, batch_size, name)

    given = _Given()
    if isinstance(pref, Mapping):
        pref = _from_mapping(pref, num_tasks, task_names, name, given)
    if isinstance(pref, torch.Tensor):
        _check_tensor(pref, name)
        given.saw(_tensor_resolution(pref.dtype))
        exact = pref.detach().cpu().to(torch.float64)  # checked on the CPU: float64 exists on every device there
        values = pref.to(dtype=torch.float32, copy=True)
    elif isinstance(pref, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of {num_tasks} numbers, got the string {pref!r}.")
    elif isinstance(pref, np.ndarray):
        _check_numpy_dtype(pref.dtype, name)
        given.saw(_numpy_resolution(pref.dtype))
        exact = torch.from_numpy(pref.astype(np.float64, copy=True))
        values = exact.to(torch.float32)
    elif isinstance(pref, Sequence):
        nested = _nested_to_floats(pref, name, given)
        try:
            array = np.asarray(nested, dtype=np.float64)
        except ValueError:
            raise ValueError(
                f"{name} must have shape (T,) or (batch, T) with T={num_tasks}; got ragged nested sequences."
            ) from None
        exact = torch.from_numpy(array)
        values = exact.to(torch.float32)
        if given.requires_grad:
            source = _first_tensor_requiring_grad(pref)
            values = _stack_keeping_graph(pref, source.device)
    else:
        raise TypeError(
            f"{name} must be a sequence, numpy array, tensor or dict of task weights, got {type(pref).__name__}."
        )

    if values.ndim not in (1, 2):
        raise ValueError(
            f"{name} must have shape (T,) or (batch, T) with T={num_tasks}; got shape {tuple(values.shape)} "
            f"({values.ndim} dimension(s))."
        )
    if values.shape[-1] != num_tasks:
        raise ValueError(
            f"{name} must have {num_tasks} entries (one per task), got {values.shape[-1]}: {_format_values(values)}."
        )
    if values.ndim == 2:
        if values.shape[0] == 0:
            raise ValueError(f"{name} has shape {tuple(values.shape)}: a batch of preferences cannot be empty.")
        if batch_size is not None and values.shape[0] != batch_size:
            raise ValueError(
                f"{name} has {values.shape[0]} rows but the batch has {batch_size} samples; give one preference "
                "per sample, or a single (T,) preference for the whole batch."
            )

    rows = exact.reshape(-1, num_tasks)
    # a float64 value beyond float32's range is finite as given but not as stored
    finite = torch.isfinite(rows).all(dim=1) & torch.isfinite(values.detach().cpu().reshape(-1, num_tasks)).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"{name} must be finite, got {_format_values(rows[~finite])}.")
    negative = (rows < 0).any(dim=1)
    if bool(negative.any()):
        raise ValueError(f"{name} must be non-negative, got {_format_values(rows[negative])}.")
    tolerance = _sum_tolerance(given.resolution)
    sums = rows.sum(dim=1)
    off = (sums - 1).abs() > tolerance
    if bool(off.any()):
        bad_sums = [round(float(s), 6) for s in sums[off][:_MAX_VALUES_IN_MESSAGE].tolist()]
        raise ValueError(
            f"{name} must sum to 1 (tolerance {tolerance:g}); got {_format_values(rows[off])} with sum(s) "
            f"{bad_sums}. Preferences are not renormalised automatically."
        )
    return values


def _check_shape(values: torch.Tensor, num_tasks: int, batch_size: int | None, name: str) -> None:
    if values.ndim not in (1, 2):
        raise ValueError(
            f"{name} must have shape (T,) or (batch, T) with T={num_tasks}; got shape {tuple(values.shape)} "
            f"({values.ndim} dimension(s))."
        )
    if values.shape[-1] != num_tasks:
        raise ValueError(f"{name} must have {num_tasks} entries (one per task), got shape {tuple(values.shape)}.")
    if values.ndim == 2:
        if values.shape[0] == 0:
            raise ValueError(f"{name} has shape {tuple(values.shape)}: a batch of preferences cannot be empty.")
        if batch_size is not None and values.shape[0] != batch_size:
            raise ValueError(
                f"{name} has {values.shape[0]} rows but the batch has {batch_size} samples; give one preference "
                "per sample, or a single (T,) preference for the whole batch."
            )


def _validate_in_graph(pref: torch.Tensor, num_tasks: int, batch_size: int | None, name: str) -> torch.Tensor:
    """:func:`validate_preference` for a tensor inside a ``torch.compile`` graph: no ``.item()``, no Python branch on
    the values, so the preference stays an input of the graph (a new value never recompiles).

    The dtype and shape are checked while tracing (they are part of the graph's guards) and raise the usual
    ``TypeError``/``ValueError``. The values (finite, non-negative, rows summing to 1 within the same tolerance) are
    checked by the graph itself with ``torch._assert_async``: a bad value raises a ``RuntimeError`` carrying the
    message below when the graph runs (a compiled graph cannot raise ``ValueError`` nor show the values).
    """
    _check_tensor(pref, name)
    _check_shape(pref, num_tasks, batch_size, name)
    tolerance = _sum_tolerance(_tensor_resolution(pref.dtype))
    exact = pref.detach().to(torch.float32 if pref.device.type == "mps" else torch.float64)
    values = pref.to(dtype=torch.float32, copy=True)
    valid = (
        torch.isfinite(exact).all()
        & torch.isfinite(values.detach()).all()
        & (exact >= 0).all()
        & ((exact.sum(dim=-1) - 1).abs() <= tolerance).all()
    )
    torch._assert_async(
        valid,
        f"{name} must be finite, non-negative and sum to 1 (tolerance {tolerance:g}) in every row; nothing is "
        "renormalised. (Checked inside the compiled graph, which cannot show the values: run the call eagerly to "
        "see them.)",
    )
    return values
