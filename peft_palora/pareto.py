"""Judging a Pareto front: hypervolume, dominance and preference consistency of a set of objective vectors.

:func:`hypervolume`, :func:`non_dominated`, :func:`num_non_dominated` and :func:`preference_consistency` summarise
a set of objective vectors (the quality measures used in the PaLoRA paper). Evaluating a model over a preference
grid to get those vectors is :mod:`peft_palora.fronts.evaluation`.

Conventions shared by the functions below:

* ``points`` is an ``(N, M)`` array-like (list of lists, numpy array or torch tensor): N objective vectors
  with M objectives each.
* ``maximize`` is one bool for all objectives or one bool per objective. The default, ``False``, means that
  lower is better (losses); pass ``True`` for accuracies and the like.
* NaN or infinite values are rejected with a ``ValueError``: a front with a diverged point is a bug to be
  seen, not a number to be averaged.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import moocore
import numpy as np
import torch

# Same tolerance as the model's own preference check, so a grid the model accepts is accepted here.

if TYPE_CHECKING:
    pass

__all__ = [
    "hypervolume",
    "non_dominated",
    "num_non_dominated",
    "preference_consistency",
]

# How many offending entries an error message lists before summarising the rest.
_MAX_LISTED = 5


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






# --------------------------------------------------------------------------------------------------------------
# Evaluating a model over a grid of preferences
# --------------------------------------------------------------------------------------------------------------


















