"""Pictures of a Pareto front: 2-task and 3-task fronts, and each task's metric against its preference weight.

Every function draws on its own ``matplotlib.figure.Figure`` and renders it with the Agg rasteriser, never
through ``pyplot``: nothing opens a window, the caller's pyplot state and backend are left untouched, and
no figure outlives the call. Images are written atomically (a temporary file in the target directory, then
``os.replace``) so a reader never sees half a PNG, and each function returns the path it wrote.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from peft_palora.pareto import _as_maximize_flags, _as_points, non_dominated

__all__ = ["plot_front_2d", "plot_front_3d", "plot_metrics_vs_preference"]

_DPI = 150
# Above this many points, per-point preference labels would overlap into noise.
_MAX_ANNOTATED_POINTS = 15
_PREFERENCE_COLORMAP = "viridis"


def _save_png(figure: Figure, path: str | os.PathLike) -> str:
    """Renders ``figure`` to ``path`` atomically and returns the path as a string."""
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"`path` must end with .png; got {path!r}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            figure.savefig(handle, format="png", dpi=_DPI)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def _objective_labels(points: Any, labels: Sequence[str] | None, num_objectives: int) -> list[str]:
    if labels is None:
        columns = getattr(points, "columns", None)  # a pandas DataFrame names its own objectives
        labels = (
            [str(c) for c in columns] if columns is not None else [f"objective {i + 1}" for i in range(num_objectives)]
        )
    if isinstance(labels, str) or len(labels) != num_objectives:
        raise ValueError(f"`labels` must give one name per objective ({num_objectives}); got {labels!r}")
    return [str(label) for label in labels]


def _axis_labels(labels: list[str], flags: np.ndarray | None) -> list[str]:
    if flags is None:
        return labels
    return [f"{label} ({'higher' if flag else 'lower'} is better)" for label, flag in zip(labels, flags)]


def _check_preferences(preferences: Any, num_points: int, num_tasks: int | None = None) -> np.ndarray | None:
    if preferences is None:
        return None
    grid = _as_points(preferences, "preferences", allow_empty=False)
    if grid.shape[0] != num_points:
        raise ValueError(f"`preferences` has {grid.shape[0]} rows but there are {num_points} points")
    if num_tasks is not None and grid.shape[1] != num_tasks:
        raise ValueError(f"`preferences` must have {num_tasks} columns (one per task); got {grid.shape[1]}")
    return grid


def _task_labels(task_names: Sequence[str] | None, objective_labels: list[str], num_tasks: int | None) -> list[str]:
    if task_names is None:
        if num_tasks is not None and num_tasks != len(objective_labels):
            return [f"task {t + 1}" for t in range(num_tasks)]
        return objective_labels
    if isinstance(task_names, str) or (num_tasks is not None and len(task_names) != num_tasks):
        raise ValueError(f"`task_names` must give one name per task ({num_tasks}); got {task_names!r}")
    return [str(name) for name in task_names]


def _format_preference(preference: np.ndarray) -> str:
    return "(" + ", ".join(f"{weight:.2g}" for weight in preference) + ")"


def _dominance_mask(points: np.ndarray, maximize: Any) -> tuple[np.ndarray | None, np.ndarray]:
    """Direction flags and non-dominated mask; without ``maximize`` dominance is unknown, so all are kept."""
    if maximize is None:
        return None, np.ones(points.shape[0], dtype=bool)
    flags = _as_maximize_flags(maximize, points.shape[1])
    return flags, np.asarray(non_dominated(points, flags.tolist()))


def _scatter_by_dominance(axes, coordinates: list[np.ndarray], colors, mask: np.ndarray, show_legend: bool, **kwargs):
    """Filled markers for non-dominated points, hollow ones for dominated points (legend in neutral grey)."""
    from matplotlib.lines import Line2D

    colors = np.asarray(colors)
    axes.scatter(
        *[c[mask] for c in coordinates], c=colors[mask], s=45, edgecolors="black", linewidths=0.6, zorder=3, **kwargs
    )
    if (~mask).any():
        axes.scatter(
            *[c[~mask] for c in coordinates],
            facecolors="none",
            edgecolors=colors[~mask],
            s=45,
            linewidths=1.4,
            zorder=3,
            **kwargs,
        )
    if show_legend:
        handles = [
            Line2D(
                [],
                [],
                linestyle="",
                marker="o",
                markerfacecolor="0.55",
                markeredgecolor="black",
                label="non-dominated",
            ),
            Line2D([], [], linestyle="", marker="o", markerfacecolor="none", markeredgecolor="0.4", label="dominated"),
        ]
        axes.legend(handles=handles, loc="best", fontsize=8)


def plot_front_2d(
    points: Any,
    preferences: Any = None,
    *,
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
    maximize: bool | Sequence[bool] | None = None,
    task_names: Sequence[str] | None = None,
    title: str | None = None,
) -> str:
    """Scatter plot of a 2-task front, each point coloured (and, for small grids, labelled) by its preference.

    Args:
        points: ``(N, 2)`` objective vectors (array, tensor or a 2-column DataFrame whose column names become the
            axis labels).
        preferences: optional ``(N, T)`` preferences that produced the points; the colour is the weight on the
            first task, and the points are joined in that order to show the path the preference traces.
        path: where to write the PNG (parent directories are created).
        labels: the two objective names; default ``"objective 1"``, ``"objective 2"``.
        maximize: when given (bool or one per objective), axis labels say which way is better and dominated
            points are drawn hollow.
        task_names: names of the tasks the preference weighs; default ``labels`` (objective t is task t).
        title: optional figure title.

    Returns:
        ``path`` as a string.
    """
    array = _as_points(points, allow_empty=False)
    if array.shape[1] != 2:
        raise ValueError(f"`points` must have 2 objectives for a 2-D front; got {array.shape[1]}")
    names = _objective_labels(points, labels, 2)
    grid = _check_preferences(preferences, array.shape[0])
    tasks = _task_labels(task_names, names, None if grid is None else grid.shape[1])
    flags, mask = _dominance_mask(array, maximize)

    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    axes = figure.add_subplot()
    if grid is None:
        colors = np.tile(np.array([[0.12, 0.47, 0.71, 1.0]]), (array.shape[0], 1))
    else:
        mappable = _colour_mappable()
        colors = mappable.to_rgba(grid[:, 0])
        figure.colorbar(mappable, ax=axes, label=f"preference weight on {tasks[0]}")
        order = np.argsort(grid[:, 0], kind="stable")
        axes.plot(array[order, 0], array[order, 1], color="0.7", linewidth=1.0, zorder=1)
        if array.shape[0] <= _MAX_ANNOTATED_POINTS:
            for point, preference in zip(array, grid):
                axes.annotate(
                    _format_preference(preference),
                    point,
                    textcoords="offset points",
                    xytext=(5, 5),
                    fontsize=7,
                    color="0.25",
                )
    _scatter_by_dominance(axes, [array[:, 0], array[:, 1]], colors, mask, show_legend=flags is not None)
    x_label, y_label = _axis_labels(names, flags)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.grid(True, alpha=0.3)
    axes.set_title(title or "Pareto front")
    return _save_png(figure, path)


def _colour_mappable():
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    return ScalarMappable(norm=Normalize(vmin=0.0, vmax=1.0), cmap=_PREFERENCE_COLORMAP)


def _simplex_coordinates(grid: np.ndarray) -> np.ndarray:
    """Barycentric -> Cartesian: the three tasks sit at the corners of an equilateral triangle."""
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3.0) / 2.0]])
    return grid @ corners


def plot_front_3d(
    points: Any,
    preferences: Any = None,
    *,
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
    maximize: bool | Sequence[bool] | None = None,
    task_names: Sequence[str] | None = None,
    title: str | None = None,
) -> str:
    """3-D scatter of a 3-task front; with preferences, a ternary preference map in matching colours beside it.

    Each point's colour is its preference read as RGB (pure red, green and blue are the single-task corners),
    so a point in the front and the preference that produced it share a colour in the two panels.

    Args:
        points: ``(N, 3)`` objective vectors.
        preferences: optional ``(N, 3)`` preferences.
        path, labels, maximize, task_names, title: as in :func:`plot_front_2d`.

    Returns:
        ``path`` as a string.
    """
    array = _as_points(points, allow_empty=False)
    if array.shape[1] != 3:
        raise ValueError(f"`points` must have 3 objectives for a 3-D front; got {array.shape[1]}")
    names = _objective_labels(points, labels, 3)
    grid = _check_preferences(preferences, array.shape[0], num_tasks=3)
    tasks = _task_labels(task_names, names, 3)
    flags, mask = _dominance_mask(array, maximize)
    if grid is None:
        colors = np.tile(np.array([[0.12, 0.47, 0.71, 1.0]]), (array.shape[0], 1))
    else:
        colors = np.column_stack([np.clip(grid, 0.0, 1.0), np.ones(array.shape[0])])

    figure = Figure(figsize=(12.0, 5.5) if grid is not None else (7.0, 6.0), layout="constrained")
    front_axes = figure.add_subplot(1, 2 if grid is not None else 1, 1, projection="3d")
    _scatter_by_dominance(
        front_axes,
        [array[:, 0], array[:, 1], array[:, 2]],
        colors,
        mask,
        show_legend=flags is not None,
        depthshade=False,  # keep the colours equal to the preference panel's
    )
    for setter, label in zip(
        (front_axes.set_xlabel, front_axes.set_ylabel, front_axes.set_zlabel), _axis_labels(names, flags)
    ):
        setter(label, labelpad=8)
    if grid is not None:
        front_axes.set_title("objectives")
    front_axes.set_box_aspect(None, zoom=0.85)  # leaves room for the z label

    if grid is not None:
        simplex_axes = figure.add_subplot(1, 2, 2)
        corners = _simplex_coordinates(np.eye(3))
        simplex_axes.fill(corners[:, 0], corners[:, 1], facecolor="0.96", edgecolor="0.4", linewidth=1.0)
        for corner, name, offset in zip(corners, tasks, [(-0.04, -0.06), (0.04, -0.06), (0.0, 0.04)]):
            simplex_axes.text(
                corner[0] + offset[0],
                corner[1] + offset[1],
                f"all weight on\n{name}",
                ha="center",
                va="center",
                fontsize=9,
            )
        coordinates = _simplex_coordinates(grid)
        simplex_axes.scatter(
            coordinates[:, 0], coordinates[:, 1], c=colors, s=45, edgecolors="black", linewidths=0.6, zorder=3
        )
        simplex_axes.set_aspect("equal")
        simplex_axes.set_xlim(-0.2, 1.2)
        simplex_axes.set_ylim(-0.15, 1.0)
        simplex_axes.axis("off")
        simplex_axes.set_title("preferences (same colours)")
    figure.suptitle(title or "Pareto front")
    return _save_png(figure, path)


def _table_columns(table: Any) -> dict[str, np.ndarray]:
    """Columns of a pandas DataFrame, a ``datasets.Dataset`` or a dict of sequences, as numpy arrays."""
    if hasattr(table, "to_pandas") and not hasattr(table, "columns"):  # datasets.Dataset
        table = table.to_pandas()
    if hasattr(table, "columns") and hasattr(table, "__getitem__"):
        return {str(name): np.asarray(table[name]) for name in table.columns}
    if isinstance(table, Mapping):
        return {str(name): np.asarray(values) for name, values in table.items()}
    raise TypeError(
        f"`table` must be a DataFrame, a datasets.Dataset or a dict of columns; got {type(table).__name__}"
    )


def _default_metric_columns(task: str, candidates: list[str]) -> list[str]:
    """Metric columns that name the task as a whole token, e.g. ``accuracy_sst2`` or ``sst2/loss`` for ``sst2``."""
    return [name for name in candidates if task in re.split(r"[^0-9A-Za-z]+", name)]


def plot_metrics_vs_preference(
    table: Any,
    *,
    path: str | os.PathLike,
    metrics: Mapping[str, str | Sequence[str]] | None = None,
    title: str | None = None,
) -> str:
    """One panel per task: that task's metric(s) against its preference weight ``λ_t``.

    A well-behaved front shows each task's metric improving monotonically as its weight grows (see
    :func:`peft_palora.pareto.preference_consistency` for the number). With three or more tasks several
    preferences share a ``λ_t``; all are plotted, and the line joins their means.

    Args:
        table: the output of :func:`peft_palora.pareto.evaluate_front` (DataFrame, ``datasets.Dataset`` or dict
            of columns), with ``pref_<task>`` columns and metric columns.
        path: where to write the PNG.
        metrics: ``{task: column or list of columns}``; only the tasks named get a panel. By default every
            task gets one, with the metric columns that contain its name as a token (``acc_a``, ``a/loss`` for
            task ``a``).
        title: optional figure title.

    Returns:
        ``path`` as a string.
    """
    columns = _table_columns(table)
    tasks = [name[len("pref_") :] for name in columns if name.startswith("pref_")]
    if not tasks:
        raise ValueError(f"`table` has no `pref_<task>` columns; columns are {sorted(columns)}")
    candidates = [name for name in columns if not name.startswith("pref_")]
    if metrics is None:
        metrics = {task: _default_metric_columns(task, candidates) for task in tasks}
    elif not isinstance(metrics, Mapping):
        raise TypeError(f"`metrics` must map task name -> column(s); got {type(metrics).__name__}")
    else:
        unknown = sorted(set(metrics) - set(tasks))
        if unknown:
            raise ValueError(f"`metrics` names tasks {unknown} that have no `pref_<task>` column; tasks are {tasks}")
        tasks = [task for task in tasks if task in metrics]
    selected: dict[str, list[str]] = {}
    for task in tasks:
        chosen = metrics[task]
        chosen = [chosen] if isinstance(chosen, str) else list(chosen)
        missing = [name for name in chosen if name not in columns]
        if missing:
            raise ValueError(f"`metrics` names columns {missing} that `table` lacks; columns are {sorted(columns)}")
        if not chosen:
            raise ValueError(
                f"no metric column found for task '{task}'; pass metrics={{'{task}': '<column>'}} "
                f"(columns are {sorted(columns)})"
            )
        selected[task] = chosen

    figure = Figure(figsize=(4.2 * len(tasks), 3.8), layout="constrained")
    for index, task in enumerate(tasks):
        axes = figure.add_subplot(1, len(tasks), index + 1)
        weights = columns[f"pref_{task}"].astype(np.float64)
        for color_index, metric in enumerate(selected[task]):
            values = columns[metric].astype(np.float64)
            color = f"C{color_index}"
            axes.scatter(weights, values, color=color, s=18, alpha=0.6)
            levels = np.unique(weights)
            means = [values[weights == level].mean() for level in levels]
            axes.plot(levels, means, color=color, marker="o", markersize=3, label=metric)
        axes.set_xlabel(f"λ_{task} (preference weight on {task})")
        axes.set_ylabel(selected[task][0] if len(selected[task]) == 1 else "metric value")
        axes.set_xlim(-0.05, 1.05)
        axes.grid(True, alpha=0.3)
        axes.set_title(f"task {task}")
        if len(selected[task]) > 1:
            axes.legend(fontsize=8)
    figure.suptitle(title or "Task metrics against preference")
    return _save_png(figure, path)
