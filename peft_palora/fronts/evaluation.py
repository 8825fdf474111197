"""Evaluating a PaLoRA model over a grid of preferences: the front as a table, a report and a plot.

* :func:`evaluate_front` (any evaluation, one preference at a time) and :func:`evaluate_front_batched` (one
  forward pass per batch for *all* preferences, using per-sample preferences) produce the table of objective
  vectors, one row per preference;
* :func:`evaluate_multitask` gives the per-task losses and metrics of a multi-task model over a dataloader;
* :func:`write_front_report` writes the table's hypervolume, JSON report and plot.

The numbers themselves (hypervolume, dominance, consistency) come from :mod:`peft_palora.pareto`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from peft_palora.pareto import (
    _as_points,
    _check_task_names,
    _describe_rows,
    _to_float_array,
)
from peft_palora.tuner.preference import SUM_TOLERANCE as PREFERENCE_SUM_TOLERANCE
from peft_palora.utils.atomic import atomic_write_text

if TYPE_CHECKING:
    import datasets
    import evaluate
    import pandas as pd

__all__ = [
    "accuracy",
    "evaluate_front",
    "evaluate_front_batched",
    "evaluate_multitask",
    "load_front_quality_metric",
    "write_front_report",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | float]

FRONT_QUALITY_METRIC_PATH = os.path.join(os.path.dirname(__file__), "metrics", "front_quality", "front_quality.py")


def load_front_quality_metric(**kwargs: Any) -> evaluate.EvaluationModule:
    """Loads the shipped ``front_quality`` ``evaluate`` metric (offline: it is a local module).

    Keyword arguments go to ``evaluate.load``; ``reference_point=...`` and ``maximize=...`` given here become
    the metric's defaults, which keeps ``evaluate.combine`` free of metric-specific compute arguments.
    """
    import evaluate

    return evaluate.load(FRONT_QUALITY_METRIC_PATH, **kwargs)


def _as_preference_grid(preferences: Any) -> np.ndarray:
    grid = _as_points(preferences, "preferences", allow_empty=False)
    negative = (grid < 0).any(axis=1)
    if negative.any():
        raise ValueError(f"`preferences` has negative entries in row(s) {_describe_rows(np.flatnonzero(negative))}")
    off_simplex = np.abs(grid.sum(axis=1) - 1.0) > PREFERENCE_SUM_TOLERANCE
    if off_simplex.any():
        raise ValueError(
            f"every preference must sum to 1 (tolerance {PREFERENCE_SUM_TOLERANCE}); row(s) "
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


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------
def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max logit is the label."""
    return (logits.argmax(dim=-1) == labels).float().mean()


@torch.no_grad()
def evaluate_multitask(
    model: nn.Module,
    dataloader: Any,
    preference: Any = None,
    loss_fns: Mapping[str, LossFn] | None = None,
    metric_fns: Mapping[str, MetricFn] | None = None,
    gather: Callable[[Any], Any] | None = None,
    unwrapped: nn.Module | None = None,
) -> dict[str, float]:
    """``{<task>_loss, <task>_<metric>}`` of a :class:`MultiTaskModel` over ``dataloader`` at ``preference``.

    Args:
        model: the multi-task model (possibly wrapped by Accelerate; then pass ``unwrapped`` too).
        preference: ``(T,)`` preference for this evaluation; ``None`` keeps the one in force.
        loss_fns: ``{task: loss_fn(logits, labels)}``; cross-entropy by default.
        metric_fns: ``{name: fn(logits, labels)}``; ``{"accuracy": accuracy}`` by default.
        gather: combines each batch's ``(logits, labels)`` across processes (``accelerator.gather_for_metrics``).
    """
    unwrapped = unwrapped if unwrapped is not None else model
    task_names = unwrapped.task_names
    loss_fns = dict(loss_fns) if loss_fns is not None else {task: F.cross_entropy for task in task_names}
    metric_fns = dict(metric_fns) if metric_fns is not None else {"accuracy": accuracy}
    logits: dict[str, list[torch.Tensor]] = {task: [] for task in task_names}
    labels: dict[str, list[torch.Tensor]] = {task: [] for task in task_names}
    for batch in dataloader:
        inputs = unwrapped.model_inputs(batch)
        batch_labels = unwrapped.labels(batch)
        outputs = model(**inputs) if preference is None else model(**inputs, preference=preference)
        batch_logits = {task: outputs[task].float() for task in task_names}
        if gather is not None:
            batch_logits, batch_labels = gather((batch_logits, batch_labels))
        for task in task_names:
            logits[task].append(batch_logits[task].cpu())
            labels[task].append(batch_labels[task].cpu())
    metrics: dict[str, float] = {}
    for task in task_names:
        task_logits, task_labels = torch.cat(logits[task]), torch.cat(labels[task])
        metrics[f"{task}_loss"] = float(loss_fns[task](task_logits, task_labels))
        for name, metric_fn in metric_fns.items():
            metrics[f"{task}_{name}"] = float(metric_fn(task_logits, task_labels))
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# Reporting the front
# ---------------------------------------------------------------------------------------------------------------------
def write_front_report(
    front: Any,
    output_dir: str,
    task_names: Sequence[str],
    metric: str = "accuracy",
    maximize: bool = True,
    reference: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Write the front's metrics (``front.json``), hypervolume and plot (``front.png``) to ``output_dir``.

    Args:
        front: the table of :meth:`PaLoRATrainer.evaluate_front` (``pref_<task>`` and ``<task>_<metric>`` columns).
        metric: the per-task metric whose front is measured, e.g. ``"accuracy"`` or ``"loss"``.
        maximize: whether larger values of ``metric`` are better.
        reference: the hypervolume's reference point; default the origin when maximising, else 1.1 x the worst
            value of each task.

    Returns:
        ``{"hypervolume": float, "reference": [...], "json": path, "plot": path or None}``; the plot is drawn for
        two tasks only.
    """
    from peft_palora.pareto import hypervolume

    columns = [f"{task}_{metric}" for task in task_names]
    missing = [column for column in columns if column not in front.columns]
    if missing:
        raise ValueError(f"`front` has no columns {missing}; available: {list(front.columns)}.")
    points = front[columns].to_numpy(dtype=float)
    preferences = front[[f"pref_{task}" for task in task_names]].to_numpy(dtype=float)
    if reference is None:
        reference = [0.0] * len(task_names) if maximize else (points.max(axis=0) * 1.1).tolist()
    volume = float(hypervolume(points, reference=reference, maximize=maximize))
    os.makedirs(output_dir, exist_ok=True)
    report = {
        "task_names": list(task_names),
        "metric": metric,
        "maximize": maximize,
        "hypervolume": volume,
        "reference": [float(value) for value in reference],
        "front": front.to_dict(orient="records"),
    }
    json_path = os.path.join(output_dir, "front.json")
    atomic_write_text(json_path, json.dumps(report, indent=2))
    plot_path = None
    if len(task_names) == 2:
        from peft_palora.fronts.plotting import plot_front_2d

        plot_path = plot_front_2d(
            points,
            preferences,
            path=os.path.join(output_dir, "front.png"),
            labels=[f"{task} {metric}" for task in task_names],
            maximize=maximize,
            task_names=list(task_names),
            title=f"PaLoRA front (hypervolume {volume:.4f})",
        )
    return {"hypervolume": volume, "reference": report["reference"], "json": json_path, "plot": plot_path}
