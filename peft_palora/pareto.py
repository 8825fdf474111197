"""Tools for judging a Pareto front: hypervolume, dominance, preference consistency, and front evaluation.

A PaLoRA model is one point of a front per preference, so judging it means evaluating it on a grid of
preferences and summarising the resulting objective vectors. This module does both halves:

* :func:`hypervolume`, :func:`non_dominated`, :func:`num_non_dominated` and :func:`preference_consistency`
  summarise a set of objective vectors (the quality measures used in the PaLoRA paper);
* :func:`evaluate_front` (any evaluation, one preference at a time) and :func:`evaluate_front_batched` (one
  forward pass per batch for *all* preferences, using per-sample preferences) produce the table of objective
  vectors, one row per preference.

Conventions shared by the functions below:

* ``points`` is an ``(N, M)`` array-like (list of lists, numpy array or torch tensor): N objective vectors
  with M objectives each.
* ``maximize`` is one bool for all objectives or one bool per objective. The default, ``False``, means that
  lower is better (losses); pass ``True`` for accuracies and the like.
* NaN or infinite values are rejected with a ``ValueError``: a front with a diverged point is a bug to be
  seen, not a number to be averaged.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import moocore
import numpy as np
import torch

if TYPE_CHECKING:
    import datasets
    import evaluate
    import pandas as pd

__all__ = [
    "evaluate_front",
    "evaluate_front_batched",
    "hypervolume",
    "load_front_quality_metric",
    "non_dominated",
    "num_non_dominated",
    "preference_consistency",
]

# Same tolerance as the model's own preference check, so a grid the model accepts is accepted here.
_PREFERENCE_SUM_TOLERANCE = 1e-4
# How many offending entries an error message lists before summarising the rest.
_MAX_LISTED = 5

FRONT_QUALITY_METRIC_PATH = os.path.join(os.path.dirname(__file__), "metrics", "front_quality", "front_quality.py")


# --------------------------------------------------------------------------------------------------------------
# Input normalisation
# --------------------------------------------------------------------------------------------------------------


def _to_float_array(values: Any, name: str) -> np.ndarray:
    """Converts a list, numpy array or torch tensor (any device or dtype) to a float64 numpy array."""
    if isinstance(values, torch.Tensor):
        return values.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"`{name}` must be numeric array-like (list, numpy array or tensor); got {error}") from None
    return array


def _describe_rows(rows: np.ndarray) -> str:
    listed = ", ".join(str(int(row)) for row in rows[:_MAX_LISTED])
    more = f" and {len(rows) - _MAX_LISTED} more" if len(rows) > _MAX_LISTED else ""
    return f"{listed}{more}"


def _as_points(points: Any, name: str = "points", allow_empty: bool = True) -> np.ndarray:
    """Validates ``points`` as a finite ``(N, M)`` array; an empty input becomes an ``(0, 0)`` array."""
    array = _to_float_array(points, name)
    if allow_empty and array.ndim == 1 and array.size == 0:
        return array.reshape(0, 0)
    if allow_empty and array.ndim == 2 and array.shape[0] == 0:
        return array
    if array.ndim != 2:
        raise ValueError(
            f"`{name}` must be 2-D with shape (num_points, num_objectives); got shape {tuple(array.shape)}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"`{name}` must have at least one row and one column; got shape {tuple(array.shape)}")
    not_finite = ~np.isfinite(array).all(axis=1)
    if not_finite.any():
        raise ValueError(
            f"`{name}` contains NaN or infinite values in row(s) {_describe_rows(np.flatnonzero(not_finite))}"
        )
    return array


def _as_maximize_flags(maximize: Any, num_objectives: int, name: str = "maximize") -> np.ndarray:
    """Turns ``maximize`` (a bool, or one bool per objective) into a boolean array of length ``num_objectives``."""
    if isinstance(maximize, (bool, np.bool_)):
        return np.full(num_objectives, bool(maximize))
    if isinstance(maximize, torch.Tensor):
        maximize = maximize.tolist()
    if isinstance(maximize, np.ndarray):
        maximize = maximize.tolist()
    if not isinstance(maximize, Sequence) or isinstance(maximize, (str, bytes)):
        raise TypeError(f"`{name}` must be a bool or a sequence of bools; got {type(maximize).__name__}")
    flags = list(maximize)
    if not all(isinstance(flag, (bool, np.bool_)) for flag in flags):
        raise TypeError(f"`{name}` must contain only bools; got {flags!r}")
    if len(flags) != num_objectives:
        raise ValueError(f"`{name}` has {len(flags)} entries but the points have {num_objectives} objectives")
    return np.asarray(flags, dtype=bool)


def _minimization_form(points: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """Negates maximised objectives, so that lower is better everywhere (negation is exact in floating point)."""
    return np.where(flags, -points, points)


# --------------------------------------------------------------------------------------------------------------
# Front-quality measures
# --------------------------------------------------------------------------------------------------------------


def hypervolume(points: Any, reference: Any, maximize: bool | Sequence[bool] = False) -> float:
    """Exact hypervolume of the region dominated by ``points`` and bounded by ``reference``.

    The hypervolume is the volume of the union of the boxes spanned between each point and the reference
    point; larger is better. It is computed exactly, for any number of objectives, by ``moocore``.

    Args:
        points: ``(N, M)`` objective vectors (list, numpy array or tensor).
        reference: ``(M,)`` reference point. It must *bound* the points: every point must be at least as good
            as the reference in every objective (``point <= reference`` where minimising, ``point >= reference``
            where maximising). A point that is worse than the reference in some objective raises a
            ``ValueError`` naming the point and objective, rather than being silently dropped, because a
            silently dropped point would make a worse front look as good as a better one. A point equal to
            the reference in some objective is accepted and adds zero volume.
        maximize: one bool, or one bool per objective: whether higher is better for that objective.

    Returns:
        The hypervolume as a Python float. An empty set of points has hypervolume ``0.0`` (the reference
        point and ``maximize`` are still validated).

    Raises:
        ValueError: non-finite values, mismatched dimensions, wrong-length ``maximize``, or a reference point
            that does not bound the points.
        TypeError: non-numeric input or a non-bool ``maximize``.
    """
    reference_array = _to_float_array(reference, "reference")
    if reference_array.ndim != 1 or reference_array.size == 0:
        raise ValueError(
            f"`reference` must be a 1-D vector with one value per objective; got shape {tuple(reference_array.shape)}"
        )
    if not np.isfinite(reference_array).all():
        raise ValueError(f"`reference` must be finite; got {reference_array.tolist()}")
    num_objectives = reference_array.shape[0]
    flags = _as_maximize_flags(maximize, num_objectives)

    point_array = _as_points(points)
    if point_array.shape[0] == 0:
        if point_array.shape[1] not in (0, num_objectives):
            raise ValueError(
                f"`points` has {point_array.shape[1]} objectives but `reference` has {num_objectives} entries"
            )
        return 0.0
    if point_array.shape[1] != num_objectives:
        raise ValueError(
            f"`points` has {point_array.shape[1]} objectives but `reference` has {num_objectives} entries"
        )

    minimized_points = _minimization_form(point_array, flags)
    minimized_reference = _minimization_form(reference_array, flags)
    worse = minimized_points > minimized_reference
    if worse.any():
        rows, objectives = np.nonzero(worse)
        details = [
            f"point {row} objective {obj} ({point_array[row, obj]:g} vs reference {reference_array[obj]:g}, "
            f"{'maximized' if flags[obj] else 'minimized'})"
            for row, obj in zip(rows[:_MAX_LISTED], objectives[:_MAX_LISTED])
        ]
        more = f" and {len(rows) - _MAX_LISTED} more" if len(rows) > _MAX_LISTED else ""
        raise ValueError(
            "`reference` does not bound the points: every point must be at least as good as the reference in "
            f"every objective, but these are worse: {'; '.join(details)}{more}. Choose a reference beyond the "
            "worst value of each objective (e.g. the nadir point plus a margin) or remove those points."
        )
    return float(moocore.hypervolume(minimized_points, ref=minimized_reference))


def non_dominated(points: Any, maximize: bool | Sequence[bool] = False) -> torch.Tensor | np.ndarray:
    """Marks the points that no other point dominates.

    Point ``a`` dominates ``b`` when ``a`` is at least as good in every objective and strictly better in one.
    Exact duplicates do not dominate each other, so *every* copy of a non-dominated point is marked ``True``
    (use :func:`num_non_dominated` to count distinct vectors).

    Returns:
        A boolean mask of shape ``(N,)``: a ``torch.BoolTensor`` (on the input's device) when ``points`` is a
        tensor, a numpy bool array otherwise.
    """
    point_array = _as_points(points)
    if point_array.shape[0] == 0:
        mask = np.zeros(0, dtype=bool)
    else:
        flags = _as_maximize_flags(maximize, point_array.shape[1])
        mask = np.asarray(
            moocore.is_nondominated(_minimization_form(point_array, flags), keep_weakly=True), dtype=bool
        )
    if isinstance(points, torch.Tensor):
        return torch.from_numpy(mask).to(points.device)
    return mask


def num_non_dominated(points: Any, maximize: bool | Sequence[bool] = False) -> int:
    """Number of *distinct* non-dominated objective vectors.

    Duplicates count once: preferences that collapse onto the same outputs give one trade-off, not several,
    and counting them separately would reward such a collapse.
    """
    point_array = _as_points(points)
    if point_array.shape[0] == 0:
        return 0
    mask = np.asarray(non_dominated(point_array, maximize))
    return int(np.unique(point_array[mask], axis=0).shape[0])


def preference_consistency(
    preferences: Any,
    metrics: Any,
    *,
    higher_is_better: bool | Sequence[bool] = True,
    task_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """How faithfully the preference steers each task: Spearman correlation between ``λ_t`` and task t's metric.

    A model whose task-t metric improves whenever more weight goes to task t scores 1.0 for that task; one
    that ignores the preference scores about 0, one that reacts backwards scores -1.

    Args:
        preferences: ``(N, T)`` preferences at which the model was evaluated.
        metrics: ``(N, T)`` metric of task t (column t) at each preference.
        higher_is_better: one bool, or one per task: whether a higher metric is better (``True`` for
            accuracy, ``False`` for losses). Scores are oriented so that 1.0 always means "consistent".
        task_names: names used in the keys; defaults to ``"0"``, ``"1"``, ...

    Returns:
        ``{"spearman_<task>": rho_t for each task, "mean_spearman": mean over tasks}``. A task whose
        preference or metric column is constant has no rank correlation: its entry is ``nan``, and so is the
        mean (reported rather than hidden).
    """
    from scipy.stats import ConstantInputWarning, spearmanr

    preference_array = _as_points(preferences, "preferences", allow_empty=False)
    metric_array = _as_points(metrics, "metrics", allow_empty=False)
    if preference_array.shape != metric_array.shape:
        raise ValueError(
            f"`preferences` {tuple(preference_array.shape)} and `metrics` {tuple(metric_array.shape)} must have the "
            "same shape (one row per preference, one column per task)"
        )
    num_points, num_tasks = preference_array.shape
    if num_points < 2:
        raise ValueError(f"a rank correlation needs at least 2 preferences; got {num_points}")
    flags = _as_maximize_flags(higher_is_better, num_tasks, name="higher_is_better")
    names = _check_task_names(task_names, num_tasks)

    result: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        for task, name in enumerate(names):
            oriented = metric_array[:, task] if flags[task] else -metric_array[:, task]
            result[f"spearman_{name}"] = float(spearmanr(preference_array[:, task], oriented).statistic)
    result["mean_spearman"] = float(np.mean(list(result.values())))
    return result


def _check_task_names(task_names: Sequence[str] | None, num_tasks: int) -> list[str]:
    if task_names is None:
        return [str(task) for task in range(num_tasks)]
    if isinstance(task_names, str) or not isinstance(task_names, Sequence):
        raise TypeError(f"`task_names` must be a sequence of strings; got {type(task_names).__name__}")
    names = [str(name) for name in task_names]
    if len(names) != num_tasks:
        raise ValueError(f"`task_names` has {len(names)} names but there are {num_tasks} tasks")
    if len(set(names)) != len(names):
        raise ValueError(f"`task_names` must be unique; got {names}")
    return names


def load_front_quality_metric(**kwargs: Any) -> evaluate.EvaluationModule:
    """Loads the shipped ``front_quality`` ``evaluate`` metric (offline: it is a local module).

    Keyword arguments go to ``evaluate.load``; ``reference_point=...`` and ``maximize=...`` given here become
    the metric's defaults, which keeps ``evaluate.combine`` free of metric-specific compute arguments.
    """
    import evaluate

    return evaluate.load(FRONT_QUALITY_METRIC_PATH, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Evaluating a model over a grid of preferences
# --------------------------------------------------------------------------------------------------------------


def _as_preference_grid(preferences: Any) -> np.ndarray:
    grid = _as_points(preferences, "preferences", allow_empty=False)
    negative = (grid < 0).any(axis=1)
    if negative.any():
        raise ValueError(f"`preferences` has negative entries in row(s) {_describe_rows(np.flatnonzero(negative))}")
    off_simplex = np.abs(grid.sum(axis=1) - 1.0) > _PREFERENCE_SUM_TOLERANCE
    if off_simplex.any():
        raise ValueError(
            f"every preference must sum to 1 (tolerance {_PREFERENCE_SUM_TOLERANCE}); row(s) "
            f"{_describe_rows(np.flatnonzero(off_simplex))} do not"
        )
    return grid


def _model_task_names(model: Any) -> list[str] | None:
    """Task names from the model's PaLoRA config, when it has one."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping) or not configs:
        return None
    active = getattr(model, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        active = active[0] if active else None
    config = configs.get(active) if active in configs else next(iter(configs.values()))
    names = getattr(config, "task_names", None)
    return [str(name) for name in names] if names else None


def _resolve_task_names(model: Any, task_names: Sequence[str] | None, num_tasks: int) -> list[str]:
    if task_names is None:
        task_names = _model_task_names(model)
    return _check_task_names(task_names, num_tasks)


def _as_metric_dict(result: Any, index: int, source: str) -> dict[str, float]:
    if not isinstance(result, Mapping):
        raise TypeError(f"`{source}` must return a dict of metric name -> number; got {type(result).__name__}")
    metrics: dict[str, float] = {}
    for key, value in result.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"`{source}` returned a tensor with {value.numel()} elements for '{key}' at preference {index}; "
                    "expected a scalar"
                )
            value = value.item()
        try:
            metrics[str(key)] = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"`{source}` returned a non-numeric value for '{key}' at preference {index}: {value!r}"
            ) from None
    return metrics


def _build_table(
    grid: np.ndarray, names: list[str], rows: list[dict[str, float]], return_dataset: bool
) -> pd.DataFrame | datasets.Dataset:
    import pandas as pd

    preference_columns = {f"pref_{name}": grid[:, task] for task, name in enumerate(names)}
    clashes = sorted(set(preference_columns) & set(rows[0]))
    if clashes:
        raise ValueError(f"metric names {clashes} clash with the preference columns; rename those metrics")
    table = pd.concat([pd.DataFrame(preference_columns), pd.DataFrame(rows)], axis=1)
    if return_dataset:
        import datasets

        return datasets.Dataset.from_pandas(table, preserve_index=False)
    return table


def _warn_if_training(model: Any) -> None:
    if getattr(model, "training", False):
        warnings.warn(
            "the model is in training mode, so dropout makes the front noisy; call model.eval() first",
            stacklevel=3,
        )


def evaluate_front(
    model: Any,
    preferences: Any,
    eval_fn: Callable[[Any], Mapping[str, float]],
    *,
    task_names: Sequence[str] | None = None,
    return_dataset: bool = False,
) -> pd.DataFrame | datasets.Dataset:
    """Evaluates ``model`` at every preference of a grid, one preference at a time.

    For each row ``pref`` of ``preferences`` this calls ``model.set_preference(pref)`` and then
    ``eval_fn(model)``, which must return a dict of metric name -> number. This works with any evaluation
    (a ``Trainer.evaluate`` call, an ``evaluate`` metric, non-decomposable metrics such as F1); when the
    metrics are per-sample averages, :func:`evaluate_front_batched` gives the same table much faster.
    The preference that was in force before the call is restored afterwards, also when ``eval_fn`` raises.
    The model's train/eval mode is left alone (a warning is issued in training mode).

    Args:
        model: anything with ``set_preference`` and ``get_preference``, typically a PaLoRA ``PeftModel``.
        preferences: ``(P, T)`` preferences on the simplex, e.g. ``peft_palora.preferences.simplex_grid(2, 11)``.
        eval_fn: ``eval_fn(model) -> dict[str, float]``; every call must return the same keys.
        task_names: names for the preference columns; defaults to the model config's ``task_names`` or the
            task indices.
        return_dataset: return a ``datasets.Dataset`` instead of a ``pandas.DataFrame``.

    Returns:
        One row per preference, in order: columns ``pref_<task>`` followed by the metrics.
    """
    grid = _as_preference_grid(preferences)
    names = _resolve_task_names(model, task_names, grid.shape[1])
    if not callable(eval_fn):
        raise TypeError(f"`eval_fn` must be callable; got {type(eval_fn).__name__}")
    for method in ("set_preference", "get_preference"):
        if not callable(getattr(model, method, None)):
            raise TypeError(f"`model` must have a `{method}` method (a PaLoRA model); got {type(model).__name__}")
    _warn_if_training(model)

    previous = model.get_preference()
    if isinstance(previous, torch.Tensor):
        previous = previous.detach().clone()
    rows: list[dict[str, float]] = []
    try:
        for index, preference in enumerate(grid):
            model.set_preference(torch.from_numpy(preference.copy()).to(torch.float32))
            row = _as_metric_dict(eval_fn(model), index, "eval_fn")
            if rows and set(row) != set(rows[0]):
                raise ValueError(
                    f"`eval_fn` returned keys {sorted(row)} at preference {index} but {sorted(rows[0])} at "
                    "preference 0; it must return the same metrics every time"
                )
            rows.append(row)
    finally:
        if previous is not None:
            model.set_preference(previous)
    return _build_table(grid, names, rows, return_dataset)


def _repeat_batch(batch: Mapping[str, Any], repeats: int) -> tuple[dict[str, Any], int, torch.device]:
    """Stacks ``repeats`` copies of every tensor of ``batch`` along the batch dimension (copy-major order)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"each batch must be a mapping of input name -> tensor; got {type(batch).__name__}")
    tensors = {key: value for key, value in batch.items() if isinstance(value, torch.Tensor) and value.ndim > 0}
    if not tensors:
        raise ValueError("each batch must contain at least one tensor with a batch dimension")
    sizes = {key: value.shape[0] for key, value in tensors.items()}
    batch_size = next(iter(sizes.values()))
    if len(set(sizes.values())) != 1:
        raise ValueError(f"all tensors of a batch must share the batch dimension; got sizes {sizes}")
    if batch_size == 0:
        raise ValueError("batches must not be empty")
    repeated = dict(batch)
    for key, value in tensors.items():
        repeated[key] = value.repeat(repeats, *([1] * (value.ndim - 1)))
    return repeated, batch_size, next(iter(tensors.values())).device


def evaluate_front_batched(
    model: Any,
    preferences: Any,
    batches: Iterable[Mapping[str, Any]],
    metric_fn: Callable[[Any, Mapping[str, Any]], Mapping[str, Any]],
    *,
    label_names: Sequence[str] = (),
    task_names: Sequence[str] | None = None,
    return_dataset: bool = False,
) -> pd.DataFrame | datasets.Dataset:
    """Evaluates ``model`` at every preference of a grid with one forward pass per batch.

    Each batch of size B is repeated P times (P = number of preferences) and run once as
    ``model(**repeated, preference=per_sample)``, where ``per_sample`` is the ``(P * B, T)`` matrix giving
    rows ``p * B .. p * B + B - 1`` the preference ``p``. This trades P forward passes for one P times larger,
    which is much faster on accelerators; pick B so that ``P * B`` samples fit in memory.

    Args:
        model: a model whose forward accepts ``preference=`` of shape ``(batch, T)``.
        preferences: ``(P, T)`` preferences on the simplex.
        batches: iterable of input dicts (e.g. a ``DataLoader``); every tensor must share the batch dimension
            B, and non-tensor entries are passed through unchanged.
        metric_fn: ``metric_fn(outputs, repeated_batch) -> dict[str, tensor of shape (P * B,)]``: one value
            per sample (e.g. ``(logits.argmax(-1) == labels).float()`` or a per-sample loss), aligned with the
            rows of ``repeated_batch`` (the whole batch, labels included, repeated P times).
        label_names: batch entries that ``metric_fn`` needs but the model's forward does not accept (e.g. the
            targets of a plain ``nn.Module``); they are repeated with the rest but left out of the forward call.
        task_names: names for the preference columns; defaults to the model config's ``task_names``.
        return_dataset: return a ``datasets.Dataset`` instead of a ``pandas.DataFrame``.

    Returns:
        The same table as :func:`evaluate_front` with an ``eval_fn`` that averages ``metric_fn``'s per-sample
        values over all samples: one row per preference, columns ``pref_<task>`` then the metrics. Only
        per-sample averages can be computed this way; use :func:`evaluate_front` for anything else.
        The model's stored preference and train/eval mode are not changed.
    """
    grid = _as_preference_grid(preferences)
    num_preferences = grid.shape[0]
    names = _resolve_task_names(model, task_names, grid.shape[1])
    if not callable(metric_fn):
        raise TypeError(f"`metric_fn` must be callable; got {type(metric_fn).__name__}")
    if isinstance(label_names, str) or not isinstance(label_names, Iterable):
        raise TypeError(f"`label_names` must be a sequence of batch keys; got {label_names!r}")
    withheld = set(label_names)
    _warn_if_training(model)

    sums: dict[str, np.ndarray] = {}
    num_samples = 0
    with torch.no_grad():
        for batch_index, batch in enumerate(batches):
            repeated, batch_size, device = _repeat_batch(batch, num_preferences)
            per_sample = torch.from_numpy(np.repeat(grid, batch_size, axis=0)).to(device=device, dtype=torch.float32)
            model_inputs = {key: value for key, value in repeated.items() if key not in withheld}
            outputs = model(**model_inputs, preference=per_sample)
            values = metric_fn(outputs, repeated)
            if not isinstance(values, Mapping):
                raise TypeError(
                    f"`metric_fn` must return a dict of metric name -> per-sample values; got {type(values).__name__}"
                )
            if sums and set(values) != set(sums):
                raise ValueError(
                    f"`metric_fn` returned keys {sorted(values)} for batch {batch_index} but {sorted(sums)} before"
                )
            for key, value in values.items():
                per_row = _to_float_array(value, f"metric_fn()['{key}']").reshape(-1)
                if per_row.shape[0] != num_preferences * batch_size:
                    raise ValueError(
                        f"`metric_fn` returned {per_row.shape[0]} values for '{key}' in batch {batch_index}; "
                        f"expected one per sample of the repeated batch ({num_preferences} x {batch_size})"
                    )
                batch_sums = per_row.reshape(num_preferences, batch_size).sum(axis=1)
                sums[key] = sums.get(key, 0.0) + batch_sums
            num_samples += batch_size
    if num_samples == 0:
        raise ValueError("`batches` is empty: there is nothing to evaluate")

    rows = [
        {key: float(total[index] / num_samples) for key, total in sums.items()} for index in range(num_preferences)
    ]
    return _build_table(grid, names, rows, return_dataset)
