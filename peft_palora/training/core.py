"""What the two trainers share, so that each is only its framework's glue.

:class:`~peft_palora.training.trainer.PaLoRATrainer` (Accelerate) and
:class:`~peft_palora.training.hf_trainer.PaLoRAHFTrainer` (``transformers.Trainer``) both

* check their model and metrics with :func:`check_multitask_model` and :func:`check_metric_fns`;
* build their optimiser with :func:`build_optimizer` (AdamW over ``adapter_param_groups``: adapters at ``lr * T``);
* number the micro-batches of a step with one :class:`WindowPosition` (the sampler step of
  :func:`~peft_palora.training.window.window_step`), and train each with
  :meth:`~peft_palora.training.window.PreferenceWindow.step`;
* describe their run with :func:`run_definition` and refuse a resume that would change it with :func:`check_resume`,
  or one from a damaged checkpoint with :func:`check_checkpoint_files`;
* compute a front with :func:`compute_front`, the one place that picks between
  :func:`~peft_palora.fronts.evaluation.evaluate_front_batched` (one forward per batch for the whole grid) and
  :func:`~peft_palora.fronts.evaluation.evaluate_front` (one preference at a time, where batching would change the
  numbers).
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_palora.fronts.evaluation import MetricFn, accuracy, evaluate_front, evaluate_front_batched
from peft_palora.training.multitask import MultiTaskModel, uses_batch_statistics
from peft_palora.training.optimization import adapter_param_groups
from peft_palora.training.window import PreferenceWindow, window_step
from peft_palora.utils.json_files import read_json


# ---------------------------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------------------------
def check_multitask_model(model: Any, owner: str = "`model`") -> MultiTaskModel:
    """Raise unless ``model`` is a :class:`MultiTaskModel` whose ``label_columns`` name every task."""
    if not isinstance(model, MultiTaskModel):
        raise TypeError(f"{owner} must be a MultiTaskModel, got {type(model).__name__}.")
    if set(model.label_columns) != set(model.task_names):
        raise ValueError(f"`model.label_columns` must name every task {model.task_names}.")
    return model


def check_metric_fns(metric_fns: Mapping[str, MetricFn] | None) -> dict[str, MetricFn]:
    """``metric_fns`` as a dict (``{"accuracy": accuracy}`` when None); every value must be callable."""
    metric_fns = dict(metric_fns) if metric_fns is not None else {"accuracy": accuracy}
    for key, function in metric_fns.items():
        if not callable(function):
            raise TypeError(f"`metric_fns[{key!r}]` must be callable, got {type(function).__name__}.")
    return metric_fns


# ---------------------------------------------------------------------------------------------------------------------
# Optimiser
# ---------------------------------------------------------------------------------------------------------------------
def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, adapter_lr_multiplier: float | None, **adamw_kwargs: Any
) -> torch.optim.AdamW:
    """AdamW over :func:`~peft_palora.training.optimization.adapter_param_groups`: adapters at ``lr * T``."""
    groups = adapter_param_groups(
        model, lr=lr, weight_decay=weight_decay, adapter_lr_multiplier=adapter_lr_multiplier
    )
    return torch.optim.AdamW(groups, **adamw_kwargs)


def process_reducer(state: Any, reduction: str = "mean") -> Callable[[torch.Tensor], torch.Tensor]:
    """``tensor -> its mean (or sum) over the processes`` of ``state`` (an ``Accelerator`` or ``PartialState``); the
    identity for one process. Keeps the loss balancer's running averages and the logged sums equal on every process.
    """

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        if state.num_processes == 1:
            return tensor
        from accelerate.utils import reduce as reduce_over_processes

        return reduce_over_processes(tensor.to(state.device), reduction=reduction)

    return reduce


# ---------------------------------------------------------------------------------------------------------------------
# Which micro-batch of which step
# ---------------------------------------------------------------------------------------------------------------------
class WindowPosition:
    """Counts the micro-batches already run in the current optimisation step, to give each its sampler step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.global_step, self.index = -1, 0

    def sampler_step(self, global_step: int, gradient_accumulation_steps: int) -> int:
        """:func:`~peft_palora.training.window.window_step` of the next micro-batch of step ``global_step``."""
        index = self.index if global_step == self.global_step else 0
        return window_step(global_step, index, gradient_accumulation_steps)

    def advance(self, global_step: int) -> None:
        """One micro-batch of step ``global_step`` has run."""
        if global_step == self.global_step:
            self.index += 1
        else:
            self.global_step, self.index = global_step, 1


# ---------------------------------------------------------------------------------------------------------------------
# What defines a run
# ---------------------------------------------------------------------------------------------------------------------
def dataset_size(dataset: Any) -> int | None:
    """``len(dataset)``, or None for an iterable dataset (or none at all)."""
    if dataset is None:
        return None
    try:
        return len(dataset)
    except TypeError:
        return None


def run_definition(window: PreferenceWindow, args: Any, **specific: Any) -> dict[str, Any]:
    """What defines a run, JSON-ready: the window, the optimisation settings both trainers share, then ``specific``
    (what only one framework knows). Stored in every checkpoint and compared by :func:`check_resume`."""
    definition = {
        "format": 1,
        **window.describe(),
        "max_steps": args.max_steps,
        "learning_rate": args.learning_rate,
        "adapter_lr_multiplier": args.adapter_lr_multiplier,
        "weight_decay": args.weight_decay,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "warmup_steps": args.warmup_steps,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_grad_norm": args.max_grad_norm,
        "seed": args.seed,
    }
    definition.update(specific)
    return json_ready(definition)


def json_ready(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples as lists, tensors as numbers, other objects as their repr)."""
    if isinstance(value, Mapping):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def run_changes(stored: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{field: (stored value, current value)}`` for every field of two JSON-ready run definitions that differs
    (nested dicts are compared field by field, named ``outer.inner``; a field present on one side only counts)."""
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(stored) | set(current), key=str):
        name = f"{prefix}{key}"
        old, new = stored.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changes.update(run_changes(old, new, prefix=f"{name}."))
        elif old != new:
            changes[name] = (old, new)
    return changes


def check_resume(
    stored: Mapping[str, Any], current: Mapping[str, Any], checkpoint: str, allow_changed_arguments: bool, logger: Any
) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume from ``checkpoint`` when the run it was saved by differs from this one (compared in their
    JSON forms, :func:`json_ready`).

    Raises a ValueError naming every changed field (``name: old -> new``) unless ``allow_changed_arguments``; then
    the changes are logged as a warning and returned.
    """
    changes = run_changes(json_ready(stored), json_ready(current))
    if not changes:
        return changes
    listing = "; ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changes.items())
    if not allow_changed_arguments:
        raise ValueError(
            f"cannot resume from {checkpoint!r}: this run differs from the one that saved it ({listing}), so the "
            "resumed run would not be the uninterrupted one. Restore those arguments, or pass "
            "allow_changed_arguments=True to resume anyway with the new values."
        )
    logger.warning("resuming from %s with changed arguments (old -> new): %s", checkpoint, listing)
    return changes


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` inside, the previous train/eval mode restored after (also on error)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def per_sample_front_applies(loss_fns: Mapping[str, Any], metric_fns: Mapping[str, Any]) -> bool:
    """Whether the trainer's evaluation is what :meth:`MultiTaskModel.per_sample_metrics` averages: cross-entropy
    per task and accuracy. Other losses and metrics need not be per-sample averages, so they cannot be batched."""
    return all(function is F.cross_entropy for function in loss_fns.values()) and dict(metric_fns) == {
        "accuracy": accuracy
    }


def compute_front(
    model: MultiTaskModel,
    preferences: Any,
    *,
    batches: Callable[[], Iterable[Mapping[str, Any]]],
    evaluate_at: Callable[[], Mapping[str, float]],
    per_sample: bool = True,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
):
    """The front of ``model`` over ``preferences``, the one way both trainers compute it.

    Where the evaluation is a per-sample average (``per_sample``: cross-entropy and accuracy from the label columns)
    and the model's samples do not interact (no batch norm on batch statistics), the whole grid runs in one forward
    per batch (:func:`~peft_palora.fronts.evaluation.evaluate_front_batched` with
    :meth:`MultiTaskModel.per_sample_metrics`); otherwise each preference is set in turn and ``evaluate_at()`` is
    called (:func:`~peft_palora.fronts.evaluation.evaluate_front`). Both give ``pref_<task>`` columns, then per
    task ``<task>_loss`` and ``<task>_<metric>``.

    Args:
        model: the (unwrapped) multi-task model; it is put in eval mode for the call.
        batches: returns a fresh iterable of device-ready batches (labels included) for the batched path.
        evaluate_at: evaluates the model at the preference in force (the other path).
        per_sample: whether the batched path computes what ``evaluate_at`` computes.
        reduce_sum: for a data-parallel run whose processes each see a disjoint part of the data in ``batches``:
            sums a tensor over the processes, so that the table is the average over the whole data.
    """
    task_names = list(model.task_names)
    with eval_mode(model):
        if not per_sample or uses_batch_statistics(model):
            return evaluate_front(model, preferences, lambda _model: evaluate_at(), task_names=task_names)
        counter = _Counting(batches())
        table = evaluate_front_batched(
            model, preferences, counter, model.per_sample_metrics, task_names=task_names
        )
    metrics = [column for column in table.columns if not column.startswith("pref_")]
    if reduce_sum is not None:
        local = torch.as_tensor(table[metrics].to_numpy(dtype="float64") * counter.samples, dtype=torch.float64)
        totals = reduce_sum(torch.cat([local.flatten(), torch.tensor([float(counter.samples)], dtype=torch.float64)]))
        totals = totals.double().cpu()
        table[metrics] = (totals[:-1] / totals[-1]).reshape(local.shape).numpy()
    ordered = [f"pref_{task}" for task in task_names]
    for task in task_names:
        ordered += [f"{task}_loss"] + [c for c in metrics if c.startswith(f"{task}_") and c != f"{task}_loss"]
    return table[ordered + [column for column in table.columns if column not in ordered]]


class _Counting:
    """Iterates ``batches`` once, counting the samples it hands out."""

    def __init__(self, batches: Iterable[Mapping[str, Any]]):
        self.batches, self.samples = batches, 0

    def __iter__(self):
        from peft_palora.training.multitask import batch_size_of

        for batch in self.batches:
            self.samples += batch_size_of(batch)
            yield batch


def shard_batches(
    dataloader: Iterable[Mapping[str, Any]], process_index: int, num_processes: int, device: torch.device | str
) -> Iterator[dict[str, Any]]:
    """The batches of an unsharded ``dataloader`` whose index is ``process_index`` modulo ``num_processes``, moved
    to ``device``: the processes of a data-parallel run see disjoint parts that together are the whole data, each
    sample once (no padding copies)."""
    for index, batch in enumerate(dataloader):
        if index % num_processes == process_index:
            yield {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Damaged checkpoints
# ---------------------------------------------------------------------------------------------------------------------
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


def _damaged(checkpoint: str, file: str, problem: str) -> ValueError:
    return ValueError(
        f"Cannot resume from {checkpoint!r}: {file!r} {problem}. The checkpoint is damaged (an interrupted copy, a "
        "full disk?); resume from an earlier checkpoint, or delete this one."
    )


def check_checkpoint_files(checkpoint: str, required: Iterable[str] = ()) -> None:
    """Refuse a damaged checkpoint folder before anything of it is loaded: a ValueError names the file.

    Every ``*.json`` must hold a JSON object, every ``*.safetensors`` must read completely, and every file
    ``torch.save`` wrote (``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``: zip archives) must pass its CRC check (read as
    an archive; nothing is unpickled). ``required`` names files that must be there (an RNG state: without it a resume
    would silently not restore the random state).
    """
    from safetensors.torch import load_file

    if not os.path.isdir(checkpoint):
        raise ValueError(f"Cannot resume from {checkpoint!r}: it is not a folder.")
    for name in required:
        if not os.path.isfile(os.path.join(checkpoint, name)):
            raise _damaged(checkpoint, os.path.join(checkpoint, name), "is missing")
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".json"):
            try:
                read_json(path, what="checkpoint file")
            except ValueError as error:
                raise _damaged(checkpoint, path, f"is not a readable JSON object ({error})") from error
        elif name.endswith(".safetensors"):
            try:
                load_file(path)
            except Exception as error:  # safetensors raises its own error type for a torn file
                raise _damaged(checkpoint, path, f"is not a readable safetensors file ({error})") from error
        elif name.endswith(_TORCH_SUFFIXES):
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
            except (OSError, zipfile.BadZipFile, EOFError) as error:
                raise _damaged(checkpoint, path, f"is not a readable torch archive ({error})") from error
            if bad is not None:
                raise _damaged(checkpoint, path, f"fails its CRC check (entry {bad!r})")
