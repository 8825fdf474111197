"""One training step of PaLoRA, shared by both trainers: sample the window, expand the batch, combine the losses.

:class:`PreferenceWindow` is the single place that decides, for one micro-batch,

1. which ``m`` preferences train it: ``sampler.sample(progress, step)`` with ``progress = global_step / max_steps``
   and ``step = global_step * gradient_accumulation_steps + index in the step`` (:func:`window_step`), so a
   resumed or data-parallel run draws exactly what an uninterrupted single-process run draws;
2. how the window runs: one forward over the batch repeated ``m`` times with one preference per sample
   (``"batched"``), or ``m`` forwards (``"sequential"``, for batch norm) -- :func:`window_task_losses`;
3. how the ``(m, T)`` task losses become the scalar to back-propagate: a
   :class:`~peft_palora.objectives.MultiTaskObjective`.

:class:`~peft_palora.training.PaLoRATrainer` (Accelerate) and :class:`~peft_palora.training.hf_trainer.PaLoRAHFTrainer`
(``transformers.Trainer``) both call :meth:`PreferenceWindow.step`, and both take their PaLoRA settings from the
fields of :class:`PaLoRAArguments`, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_palora.fronts.evaluation import LossFn
from peft_palora.objectives import BALANCING_CHOICES, MultiTaskObjective, ObjectiveOutput
from peft_palora.preferences import AnnealedGridSampler, PreferenceSampler
from peft_palora.training.multitask import repeat_batch
from peft_palora.utils.checks import check_int, check_real

WINDOW_MODES = ("auto", "batched", "sequential")


# ---------------------------------------------------------------------------------------------------------------------
# The PaLoRA settings both trainers share
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class PaLoRAArguments:
    """The PaLoRA part of the training arguments: window, schedule, objective, adapter learning rate, front grid.

    Mixed into :class:`~peft_palora.training.PaLoRATrainingArguments` (Accelerate) and
    :class:`~peft_palora.training.hf_trainer.PaLoRAHFTrainingArguments` (``transformers.TrainingArguments``), so both trainers
    read the same fields with the same defaults and the same checks.
    """

    window_size: int = field(default=4, metadata={"help": "Preferences per step (the paper's `num`)."})
    window_mode: str = field(
        default="auto",
        metadata={
            "help": "batched (one forward over the repeated batch), sequential, or auto (batched unless the "
            "model has batch norm)."
        },
    )
    sampler_mul: float = field(default=5.0, metadata={"help": "Annealing exponent of the preference schedule."})
    sampler_epsilon: float = field(default=0.01, metadata={"help": "Margin of the schedule's rays from the vertices."})
    balancing: str = field(default="none", metadata={"help": "Task balancing: none, loss or gradient."})
    consistency_weight: float = field(
        default=0.0, metadata={"help": "Weight of the consistency regulariser (0: off)."}
    )
    consistency_temperature: float = field(default=1.0, metadata={"help": "Temperature of the consistency term."})
    adapter_lr_multiplier: float | None = field(
        default=None, metadata={"help": "Adapters learn at learning_rate times this; default: the number of tasks."}
    )
    eval_points_per_side: int = field(default=11, metadata={"help": "Preference grid resolution of the front."})
    allow_changed_arguments: bool = field(
        default=False,
        metadata={
            "help": "Resume even when arguments that define the run (learning rate, schedule, window, seed, data "
            "size, ...) differ from the checkpoint's; the changes are logged and the new values apply from the "
            "resumed step on. Off: such a resume is refused with the list of changed fields."
        },
    )

    def __post_init__(self) -> None:
        check_palora_arguments(self)


_PALORA_INTS = {"window_size": 1, "eval_points_per_side": 2}
_PALORA_REALS = {
    "sampler_mul": (0, True),
    "sampler_epsilon": (0, True),
    "consistency_weight": (0, True),
    "consistency_temperature": (0, False),
    "adapter_lr_multiplier": (0, False),
}


def check_int_argument(name: str, value: Any, minimum: int | None, optional: bool = False) -> None:
    """Raise a TypeError/ValueError naming ``name`` unless ``value`` is an int ``>= minimum`` (or None if optional)."""
    if value is None and optional:
        return
    check_int(value, f"`{name}`")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}{' or None' if optional else ''}, got {value}.")


def check_real_argument(name: str, value: Any, minimum: float, inclusive: bool, optional: bool = False) -> None:
    """Raise a TypeError/ValueError naming ``name`` unless ``value`` is a finite number above ``minimum``."""
    if value is None and optional:
        return
    check_real(value, f"`{name}`")
    check_real(value, f"`{name}`", minimum=minimum, strict=not inclusive, finite=False)


def check_palora_arguments(args: Any) -> None:
    """Validate the :class:`PaLoRAArguments` fields of ``args`` (any object that has them)."""
    for name, minimum in _PALORA_INTS.items():
        check_int_argument(name, getattr(args, name), minimum)
    for name, (minimum, inclusive) in _PALORA_REALS.items():
        check_real_argument(name, getattr(args, name), minimum, inclusive, optional=name == "adapter_lr_multiplier")
    if not isinstance(args.allow_changed_arguments, bool):
        raise TypeError(f"`allow_changed_arguments` must be a bool, got {args.allow_changed_arguments!r}.")
    if args.window_mode not in WINDOW_MODES:
        raise ValueError(f"`window_mode` must be one of {WINDOW_MODES}, got {args.window_mode!r}.")
    if args.balancing not in BALANCING_CHOICES:
        raise ValueError(f"`balancing` must be one of {BALANCING_CHOICES}, got {args.balancing!r}.")
    if not args.sampler_epsilon < 0.5:
        raise ValueError(f"`sampler_epsilon` must be in [0, 0.5) (at most 1/T), got {args.sampler_epsilon}.")


# ---------------------------------------------------------------------------------------------------------------------
# Window modes and the window's forward
# ---------------------------------------------------------------------------------------------------------------------
def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` holds batch norm, whose batch statistics would mix the preferences of a batched window."""
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


def resolve_window_mode(mode: str, model: nn.Module) -> str:
    """``"auto"`` -> ``"sequential"`` for models with batch norm, else ``"batched"``; other modes are returned."""
    if mode not in WINDOW_MODES:
        raise ValueError(f"`window_mode` must be one of {WINDOW_MODES}, got {mode!r}.")
    if mode == "auto":
        return "sequential" if has_batch_norm(model) else "batched"
    return mode


def window_task_losses(
    model: nn.Module,
    inputs: Mapping[str, Any],
    labels: Mapping[str, torch.Tensor],
    preferences: torch.Tensor,
    loss_fns: Mapping[str, LossFn],
    task_names: Sequence[str],
    mode: str = "batched",
) -> torch.Tensor:
    """The ``(m, T)`` matrix of task losses of one batch under a window of ``m`` preferences.

    ``"batched"`` runs ONE forward: every input tensor is repeated ``m`` times (copy-major, so row ``k * B + b`` is
    sample ``b``) and given the per-sample preferences ``preferences.repeat_interleave(B, 0)`` (row ``k * B + b`` is
    ``preferences[k]``); the logits are then cut back into ``m`` blocks of ``B`` rows. ``"sequential"`` runs ``m``
    forwards, one per preference. Both give the same losses (up to float rounding) for models whose samples do not
    interact, and the batched one amortises the per-call overhead; models with batch norm need the sequential one.

    Args:
        model: a :class:`~peft_palora.training.multitask.MultiTaskModel` (possibly wrapped by Accelerate/DDP) returning
            ``{task: logits}``.
        inputs: the backbone's inputs (no label columns).
        labels: ``{task: labels}`` for the ``B`` samples.
        preferences: ``(m, T)``.
        loss_fns: ``{task: loss_fn(logits, labels) -> scalar}``, each averaging over its samples.
        task_names: the task order of the preference columns.
        mode: ``"batched"`` or ``"sequential"``.
    """
    if preferences.dim() != 2 or preferences.shape[1] != len(task_names):
        raise ValueError(f"`preferences` must have shape (m, {len(task_names)}), got {tuple(preferences.shape)}.")
    num_rays = preferences.shape[0]
    if mode == "batched":
        repeated, batch_size = repeat_batch(inputs, num_rays)
        per_sample = preferences.repeat_interleave(batch_size, dim=0)
        outputs = model(**repeated, preference=per_sample)
        columns = []
        for task in task_names:
            blocks = outputs[task].split(batch_size, dim=0)
            columns.append(torch.stack([loss_fns[task](block, labels[task]) for block in blocks]))
        return torch.stack(columns, dim=1)
    if mode == "sequential":
        rows = []
        for preference in preferences:
            outputs = model(**inputs, preference=preference)
            rows.append(torch.stack([loss_fns[task](outputs[task], labels[task]) for task in task_names]))
        return torch.stack(rows, dim=0)
    raise ValueError(f"`mode` must be 'batched' or 'sequential', got {mode!r}.")


def window_step(global_step: int, index_in_step: int, gradient_accumulation_steps: int) -> int:
    """The ``step`` handed to the sampler for micro-batch ``index_in_step`` of optimisation step ``global_step``.

    ``global_step * gradient_accumulation_steps + index_in_step``: every micro-batch of a run has its own number,
    a pure function of the position in training (not of how many batches this process happened to see), so
    resumed, data-parallel and uninterrupted runs agree.
    """
    return global_step * gradient_accumulation_steps + index_in_step


# ---------------------------------------------------------------------------------------------------------------------
# The window
# ---------------------------------------------------------------------------------------------------------------------
class PreferenceWindow:
    """Samples the preferences of a step, runs the window over a batch and combines the task losses.

    Args:
        task_names: the task order of the preference columns (the model's).
        sampler: a :class:`~peft_palora.preferences.PreferenceSampler` over ``len(task_names)`` tasks.
        objective: the :class:`~peft_palora.objectives.MultiTaskObjective` combining the ``(m, T)`` losses.
        loss_fns: ``{task: loss_fn(logits, labels)}``; cross-entropy for every task by default.
        mode: ``"batched"`` or ``"sequential"`` (resolve ``"auto"`` with :func:`resolve_window_mode`).

    Build it from the arguments with :meth:`from_arguments`, which is what both trainers do.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        sampler: PreferenceSampler,
        objective: MultiTaskObjective,
        loss_fns: Mapping[str, LossFn] | None = None,
        mode: str = "batched",
    ):
        self.task_names = list(task_names)
        num_tasks = len(self.task_names)
        if not isinstance(sampler, PreferenceSampler):
            raise TypeError(f"`preference_sampler` must be a PreferenceSampler, got {type(sampler).__name__}.")
        if sampler.num_tasks != num_tasks:
            raise ValueError(f"`preference_sampler` draws {sampler.num_tasks} tasks, the model has {num_tasks}.")
        if not isinstance(objective, MultiTaskObjective):
            raise TypeError(f"`objective` must be a MultiTaskObjective, got {type(objective).__name__}.")
        if objective.num_tasks != num_tasks:
            raise ValueError(f"`objective` is for {objective.num_tasks} tasks, the model has {num_tasks}.")
        self.loss_fns = dict(loss_fns) if loss_fns is not None else {task: F.cross_entropy for task in self.task_names}
        missing = sorted(set(self.task_names) - set(self.loss_fns))
        if missing:
            raise ValueError(f"`loss_fns` has no loss for tasks {missing}.")
        for task, function in self.loss_fns.items():
            if not callable(function):
                raise TypeError(f"`loss_fns[{task!r}]` must be callable, got {type(function).__name__}.")
        if mode not in ("batched", "sequential"):
            raise ValueError(f"`mode` must be 'batched' or 'sequential', got {mode!r}.")
        self.sampler = sampler
        self.objective = objective
        self.mode = mode

    @classmethod
    def from_arguments(
        cls,
        args: Any,
        model: nn.Module,
        preference_sampler: PreferenceSampler | None = None,
        objective: MultiTaskObjective | None = None,
        loss_fns: Mapping[str, LossFn] | None = None,
    ) -> PreferenceWindow:
        """The window both trainers use: sampler, objective and mode from the :class:`PaLoRAArguments` fields of
        ``args``, unless given explicitly.

        Defaults: ``AnnealedGridSampler(T, window_size, sampler_mul, sampler_epsilon)`` and
        ``MultiTaskObjective(T, balancing, consistency_weight, consistency_temperature)``.
        """
        task_names = list(model.task_names)
        num_tasks = len(task_names)
        if preference_sampler is None:
            preference_sampler = AnnealedGridSampler(
                num_tasks, num_rays=args.window_size, mul=args.sampler_mul, epsilon=args.sampler_epsilon
            )
        if objective is None:
            objective = MultiTaskObjective(
                num_tasks,
                balancing=args.balancing,
                consistency_weight=args.consistency_weight,
                consistency_temperature=args.consistency_temperature,
            )
        return cls(
            task_names, preference_sampler, objective, loss_fns, mode=resolve_window_mode(args.window_mode, model)
        )

    def preferences(self, global_step: int, max_steps: int, step: int) -> torch.Tensor:
        """The ``(m, T)`` window at ``progress = global_step / max_steps`` for sampler step ``step``."""
        progress = min(global_step / max(int(max_steps), 1), 1.0)
        return self.sampler.sample(progress, step=step)

    def task_losses(
        self, model: nn.Module, batch: Mapping[str, Any], preferences: torch.Tensor, unwrapped: nn.Module | None = None
    ) -> torch.Tensor:
        """The ``(m, T)`` task losses of ``batch`` (inputs and label columns) at the window ``preferences``."""
        unwrapped = unwrapped if unwrapped is not None else model
        return window_task_losses(
            model,
            unwrapped.model_inputs(batch),
            unwrapped.labels(batch),
            preferences,
            self.loss_fns,
            self.task_names,
            mode=self.mode,
        )

    def step(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        global_step: int,
        max_steps: int,
        step: int,
        unwrapped: nn.Module | None = None,
        device: torch.device | str | None = None,
        reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[ObjectiveOutput, torch.Tensor]:
        """Sample, run and combine: returns the objective's output (``.loss`` to back-propagate) and the window.

        Args:
            model: the model to call (possibly wrapped by Accelerate/DDP).
            batch: model inputs and every task's label column.
            global_step, max_steps: the position in training (``progress = global_step / max_steps``).
            step: the sampler step, :func:`window_step`.
            unwrapped: the :class:`~peft_palora.training.multitask.MultiTaskModel` under ``model`` (default ``model``).
            device: where the preferences go (default: the device of the model's first parameter).
            reduce_fn: averages the loss balancer's observations over processes.
        """
        unwrapped = unwrapped if unwrapped is not None else model
        if device is None:
            device = next((parameter.device for parameter in unwrapped.parameters()), torch.device("cpu"))
        preferences = self.preferences(global_step, max_steps, step).to(device=device, dtype=torch.float32)
        task_losses = self.task_losses(model, batch, preferences, unwrapped)
        shared = None
        if self.objective.needs_shared_parameters:
            shared = [parameter for parameter in unwrapped.backbone.parameters() if parameter.requires_grad]
        output = self.objective(task_losses, preferences, shared_parameters=shared, reduce_fn=reduce_fn)
        return output, preferences

    def describe(self) -> dict[str, Any]:
        """What defines this window, JSON-ready (stored in checkpoints and compared on resume)."""
        objective = self.objective
        return {
            "task_names": list(self.task_names),
            "preference_sampler": repr(self.sampler),
            "window_mode": self.mode,
            "objective": {
                "type": type(objective).__name__,
                "balancing": objective.balancing,
                "consistency_weight": objective.consistency_weight,
                "consistency_temperature": objective.consistency_temperature,
                "loss_balance_decay": objective.loss_balancer.decay,
                "gradient_balance_eps": objective.gradient_balance_eps,
            },
            "loss_fns": {task: _function_name(function) for task, function in self.loss_fns.items()},
        }


def _function_name(function: Any) -> str:
    module = getattr(function, "__module__", None) or ""
    name = getattr(function, "__qualname__", None) or type(function).__name__
    return f"{module}.{name}" if module else name
