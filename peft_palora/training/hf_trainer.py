"""PaLoRA inside ``transformers.Trainer``, for users who already train that way.

:class:`PaLoRAHFTrainer` is a ``Trainer`` for a :class:`~peft_palora.training.multitask.MultiTaskModel`:

* its loss is PaLoRA's, computed by the same :class:`~peft_palora.training.window.PreferenceWindow` as the Accelerate
  trainer's (same schedule, same sampler step, same default objective, same :class:`PaLoRAArguments` fields);
* its optimizer gives the task adapters ``T`` times the learning rate;
* ``remove_unused_columns`` works: the columns the backbone's ``forward`` accepts and the label columns are kept,
  the rest (the raw text, say) is dropped, so ``dataset.map(tokenize)`` + ``processing_class=tokenizer`` just works;
* ``evaluate()`` returns each task's loss and metrics (accuracy by default) at the preference in force, plus
  ``eval_loss`` (their preference-weighted sum);
* checkpoints hold the adapter bundle, the heads and any other trainable tensor -- not the frozen base model --
  and resuming refuses a run whose PaLoRA-defining arguments changed;
* :class:`FrontEvaluationCallback` evaluates the front over a preference grid at every evaluation and logs its
  hypervolume; fronts are computed by :func:`~peft_palora.training.core.compute_front`, as in the Accelerate
  trainer;
* ``label_smoothing_factor`` smooths each task's training cross-entropy (evaluation reports the plain one);
  ``neftune_noise_alpha`` is refused: NEFTune perturbs the token embeddings of a language model's fine-tuning, which
  a multi-task model with heads is not.

Everything else (accumulation, mixed precision, logging, distributed training) is the Trainer's own.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_palora.fronts.evaluation import MetricFn, evaluate_multitask
from peft_palora.objectives import MultiTaskObjective
from peft_palora.preferences import PreferenceSampler, simplex_grid
from peft_palora.training.core import (
    WindowPosition,
    build_optimizer,
    check_checkpoint_files,
    check_metric_fns,
    check_multitask_model,
    check_resume,
    compute_front,
    dataset_size,
    eval_mode,
    per_sample_front_applies,
    process_reducer,
    run_definition,
    shard_batches,
)
from peft_palora.training.multitask import MultiTaskModel
from peft_palora.training.window import LossFn, PaLoRAArguments, PreferenceWindow, check_palora_arguments
from peft_palora.utils.atomic import atomic_write_text
from peft_palora.utils.checks import check_int
from peft_palora.utils.json_files import read_json

logger = logging.getLogger(__name__)

RUN_DEFINITION_NAME = "palora_run.json"
EXTRA_TRAINABLE_NAME = "trainable_extra.safetensors"
_PALORA_FIELDS = tuple(f.name for f in fields(PaLoRAArguments))


@dataclass
class PaLoRAHFTrainingArguments(TrainingArguments, PaLoRAArguments):
    """``transformers.TrainingArguments`` plus the PaLoRA fields of :class:`~peft_palora.training.window.PaLoRAArguments`
    (window, schedule, objective, adapter learning rate, front grid), read by ``HfArgumentParser`` like any other.
    """

    def __post_init__(self) -> None:
        TrainingArguments.__post_init__(self)
        check_palora_arguments(self)


class PaLoRAHFTrainer(Trainer):
    """A ``transformers.Trainer`` for a :class:`~peft_palora.training.multitask.MultiTaskModel`.

    Args:
        preference_sampler: rays per step; default ``AnnealedGridSampler(T, window_size, sampler_mul,
            sampler_epsilon)``.
        loss_fns: ``{task: loss_fn(logits, labels)}``; cross-entropy by default.
        metric_fns: ``{name: fn(logits, labels)}`` reported per task by :meth:`evaluate`; accuracy by default.
        objective: a :class:`~peft_palora.objectives.MultiTaskObjective`; default one built from the ``balancing``
            and ``consistency_*`` arguments (plain linear scalarisation), as in the Accelerate trainer.
        **kwargs: the ``Trainer``'s own arguments, and any field of :class:`~peft_palora.training.window.PaLoRAArguments`
            (``window_size``, ``window_mode``, ``sampler_mul``, ``sampler_epsilon``, ``balancing``,
            ``consistency_weight``, ``consistency_temperature``, ``adapter_lr_multiplier``, ``eval_points_per_side``,
            ``allow_changed_arguments``). Those are read from ``args`` when it is a
            :class:`PaLoRAHFTrainingArguments`; a keyword given here overrides it.

    The batches must carry the backbone's inputs and the label columns named by ``model.label_columns``.
    """

    def __init__(
        self,
        *args: Any,
        preference_sampler: PreferenceSampler | None = None,
        loss_fns: Mapping[str, LossFn] | None = None,
        metric_fns: Mapping[str, MetricFn] | None = None,
        objective: MultiTaskObjective | None = None,
        **kwargs: Any,
    ):
        overrides = {name: kwargs.pop(name) for name in _PALORA_FIELDS if name in kwargs}
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        smoothing = _check_trainer_flags(training_args, loss_fns)
        # The Trainer reads the smoothing factor off `model.config` for its own label smoother, which a multi-task
        # model has no use for: it is applied to each task's loss below instead.
        if smoothing:
            training_args.label_smoothing_factor = 0.0
        try:
            super().__init__(*args, **kwargs)
        finally:
            if smoothing:
                training_args.label_smoothing_factor = smoothing
        model = check_multitask_model(self.model, "the model of PaLoRAHFTrainer")
        defaults = {name: getattr(self.args, name) for name in _PALORA_FIELDS if hasattr(self.args, name)}
        self.palora_args = PaLoRAArguments(**{**defaults, **overrides})
        self.task_names = model.task_names
        self.label_smoothing_factor = smoothing
        self.loss_fns = dict(loss_fns) if loss_fns is not None else {task: F.cross_entropy for task in self.task_names}
        window_losses = loss_fns
        if smoothing:
            smoothed = functools.partial(F.cross_entropy, label_smoothing=smoothing)
            window_losses = {task: smoothed for task in self.task_names}
        # sampling, expanding and combining: the same object as in the Accelerate trainer
        self.window = PreferenceWindow.from_arguments(
            self.palora_args, model, preference_sampler=preference_sampler, objective=objective, loss_fns=window_losses
        )
        self.preference_sampler = self.window.sampler
        self.objective = self.window.objective
        self.window_mode = self.window.mode
        self.adapter_lr_multiplier = self.palora_args.adapter_lr_multiplier
        self.metric_fns = check_metric_fns(metric_fns)
        if self.args.label_names is None:
            self.label_names = list(model.label_columns.values())
        # PaLoRA's loss is a mean per micro-batch: the Trainer must divide it by the accumulation steps itself
        self.model_accepts_loss_kwargs = False
        self._position = WindowPosition()

    # ---- columns ------------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        """Keep what the backbone's ``forward`` accepts plus the label columns (``MultiTaskModel.forward(**batch)``
        hides both from the Trainer's own inspection)."""
        if self._signature_columns is None:
            import inspect

            base = self.accelerator.unwrap_model(self.model).get_base_model()
            parameters = inspect.signature(base.forward).parameters
            columns = [
                name
                for name, parameter in parameters.items()
                if parameter.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
            ]
            labels = list(self.accelerator.unwrap_model(self.model).label_columns.values())
            self._signature_columns = list(dict.fromkeys(columns + labels + list(self.label_names)))

    # ---- optimisation -------------------------------------------------------------------------------------------
    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW over ``peft_palora.adapter_param_groups``: adapters at ``lr * T``, the rest at ``lr``."""
        if self.optimizer is None:
            args = self.args
            self.optimizer = build_optimizer(
                self.model,
                args.learning_rate,
                args.weight_decay,
                self.adapter_lr_multiplier,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
            )
        return self.optimizer

    def _sampler_step(self) -> int:
        return self._position.sampler_step(self.state.global_step, self.args.gradient_accumulation_steps)

    def current_preferences(self) -> torch.Tensor:
        """The window of the current micro-batch: a pure function of ``(global_step, max_steps, micro-batch)``."""
        return self.window.preferences(self.state.global_step, self.state.max_steps or 0, self._sampler_step())

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        loss = super().training_step(model, inputs, *args, **kwargs)
        self._position.advance(self.state.global_step)
        return loss

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        """The multi-task objective of the window (:meth:`PreferenceWindow.step`)."""
        output, preferences = self.window.step(
            model,
            inputs,
            self.state.global_step,
            self.state.max_steps or 0,
            self._sampler_step(),
            unwrapped=self.accelerator.unwrap_model(model),
            device=self.args.device,
            reduce_fn=process_reducer(self.accelerator) if self.accelerator.num_processes > 1 else None,
        )
        if return_outputs:
            return output.loss, {"task_losses": output.task_losses, "preferences": preferences}
        return output.loss

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
        preference: Any = None,
    ) -> dict[str, float]:
        """Each task's loss and metrics on the eval set at ``preference`` (default: the one in force).

        Returns ``{<prefix>_<task>_loss, <prefix>_<task>_<metric>, <prefix>_loss, ...}``, where ``<prefix>_loss``
        is the preference-weighted sum of the task losses, so ``metric_for_best_model="loss"`` and early stopping
        work. The callbacks (e.g. :class:`FrontEvaluationCallback`) see the metrics before they are logged and may
        add to them.
        """
        override = eval_dataset is not None
        eval_dataset = eval_dataset if override else self.eval_dataset
        if isinstance(eval_dataset, dict):
            metrics = {}
            for name, dataset in eval_dataset.items():
                metrics.update(
                    self.evaluate(
                        eval_dataset=dataset if override else name,
                        ignore_keys=ignore_keys,
                        metric_key_prefix=f"{metric_key_prefix}_{name}",
                        preference=preference,
                    )
                )
            return metrics
        dataloader = self.get_eval_dataloader(eval_dataset)
        model = self.accelerator.unwrap_model(self.model)
        start = time.time()
        raw = self._evaluate_at(dataloader, preference)
        weights = _weights_for_loss(model, preference)
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in raw.items()}
        task_losses = [raw[f"{task}_loss"] for task in self.task_names]
        metrics[f"{metric_key_prefix}_loss"] = (
            float(sum(w * loss for w, loss in zip(weights, task_losses)))
            if weights is not None
            else float(sum(task_losses) / len(task_losses))
        )
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        if self.state.epoch is not None:
            metrics["epoch"] = self.state.epoch
        self.callback_handler.eval_dataloader = dataloader
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self.log(metrics)
        return metrics

    def _evaluate_at(self, dataloader: Any, preference: Any = None) -> dict[str, float]:
        """Each task's loss and metrics over ``dataloader`` at ``preference``, gathered from every process."""
        model = self.accelerator.unwrap_model(self.model)
        with eval_mode(model):
            return evaluate_multitask(
                model,
                _Prepared(self, dataloader),
                preference=preference,
                loss_fns=self.loss_fns,
                metric_fns=self.metric_fns,
                gather=self.accelerator.gather_for_metrics,
                unwrapped=model,
            )

    def evaluate_front(self, preferences: Any = None, eval_dataset: Any = None):
        """The front over ``preferences`` (default ``simplex_grid(T, eval_points_per_side)``) on the eval set
        (:func:`~peft_palora.training.core.compute_front`): ``pref_<task>`` columns, then per task ``<task>_loss``
        and ``<task>_<metric>``. With the default loss and metrics the whole grid runs in one forward per batch,
        from the ``label_columns`` (:meth:`MultiTaskModel.per_sample_metrics`)."""
        if preferences is None:
            preferences = simplex_grid(len(self.task_names), self.palora_args.eval_points_per_side)
        dataloader = self.get_eval_dataloader(eval_dataset)
        num_processes = self.accelerator.num_processes
        return compute_front(
            self.accelerator.unwrap_model(self.model),
            preferences,
            batches=functools.partial(_Prepared, self, dataloader),
            evaluate_at=functools.partial(self._evaluate_at, dataloader),
            per_sample=per_sample_front_applies(self.loss_fns, self.metric_fns),
            reduce_sum=process_reducer(self.accelerator, "sum") if num_processes > 1 else None,
        )

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def run_definition(self) -> dict[str, Any]:
        """What defines this run (the PaLoRA window and the optimisation settings), stored in every checkpoint as
        ``palora_run.json`` and compared when resuming."""
        args = self.args
        specific = {}
        if self.label_smoothing_factor:  # absent when off, so that earlier checkpoints still compare equal
            specific["label_smoothing_factor"] = self.label_smoothing_factor
        return run_definition(
            self.window,
            args,
            adapter_lr_multiplier=self.adapter_lr_multiplier,  # a keyword given to the trainer overrides `args`
            num_train_epochs=args.num_train_epochs,
            per_device_train_batch_size=args.per_device_train_batch_size,
            world_size=args.world_size,
            dataset_size=dataset_size(self.train_dataset),
            **specific,
        )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save what training changes: the adapter bundle, the heads, any other trainable tensor
        (``trainable_extra.safetensors``), the tokenizer and the run definition -- not the frozen base model."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        model.save_trainable(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        atomic_write_text(os.path.join(output_dir, RUN_DEFINITION_NAME), json.dumps(self.run_definition(), indent=2))
        atomic_write_text(os.path.join(output_dir, "training_args.json"), self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        target.load_trainable(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info(
            "Loading best model from %s (score: %s).", self.state.best_model_checkpoint, self.state.best_metric
        )
        self.accelerator.unwrap_model(self.model).load_trainable(self.state.best_model_checkpoint)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``; when resuming, first refuses a checkpoint saved by a run whose definition
        (:meth:`run_definition`) differs, naming the changed fields, unless ``allow_changed_arguments``."""
        path = resume_from_checkpoint
        if path is True:
            from transformers.trainer_utils import get_last_checkpoint

            path = get_last_checkpoint(self.args.output_dir)
            if path is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
            resume_from_checkpoint = path
        if isinstance(path, str):
            # Every file first, so that a torn one is named (transformers would raise a bare OSError/JSONDecodeError).
            check_checkpoint_files(path)
            definition = os.path.join(path, RUN_DEFINITION_NAME)
            if os.path.isfile(definition):
                stored = read_json(definition, what="run definition")
                check_resume(stored, self.run_definition(), path, self.palora_args.allow_changed_arguments, logger)
        self._position.reset()
        return super().train(resume_from_checkpoint, *args, **kwargs)


def _check_trainer_flags(args: Any, loss_fns: Mapping[str, LossFn] | None) -> float:
    """Refuse the ``TrainingArguments`` flags a multi-task model cannot honour; returns the label smoothing."""
    if args is None:
        return 0.0
    if getattr(args, "neftune_noise_alpha", None) is not None:
        raise ValueError(
            f"`neftune_noise_alpha` ({args.neftune_noise_alpha!r}) is not supported by PaLoRAHFTrainer: NEFTune adds "
            "noise to the input embeddings of a language model being instruction-tuned, and a multi-task model "
            "with task heads has no such single embedding to perturb. Leave it None."
        )
    smoothing = getattr(args, "label_smoothing_factor", 0.0) or 0.0
    if smoothing and loss_fns is not None:
        raise ValueError(
            f"`label_smoothing_factor` ({smoothing}) smooths the default cross-entropy of every task; with "
            "`loss_fns` given, smooth inside them (e.g. F.cross_entropy(..., label_smoothing=...)) and leave it 0."
        )
    return float(smoothing)


class _Prepared:
    """Iterate a dataloader with the Trainer's ``_prepare_inputs`` (device placement) applied to every batch."""

    def __init__(self, trainer: Trainer, dataloader: Any):
        self.trainer, self.dataloader = trainer, dataloader

    def __iter__(self):
        for batch in self.dataloader:
            yield self.trainer._prepare_inputs(batch)

    def __len__(self) -> int:
        return len(self.dataloader)


def _weights_for_loss(model: MultiTaskModel, preference: Any) -> list[float] | None:
    """The ``(T,)`` preference the eval loss is weighted with, or None when it is per-sample."""
    if preference is None:
        value = model.get_preference()
    else:
        from peft_palora.preferences import validate_preference

        value = validate_preference(preference, model.num_tasks, task_names=model.task_names)
    value = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    if value.dim() != 1:
        return None
    return value.tolist()


class FrontEvaluationCallback(TrainerCallback):
    """At every evaluation of a :class:`PaLoRAHFTrainer`, evaluate the front over a preference grid and log its
    hypervolume as ``eval_front_hypervolume``.

    The per-sample metrics come from the model's ``label_columns`` (:meth:`MultiTaskModel.per_sample_metrics`:
    accuracy and loss per task), and the whole grid runs in one forward per batch
    (:func:`~peft_palora.training.core.compute_front`, one preference at a time for batch statistics).

    Args:
        preferences: the ``(P, T)`` grid; default ``simplex_grid(T, points_per_side)``.
        points_per_side: the default grid's resolution (default: the trainer's ``eval_points_per_side``, 11).
        metric: ``"accuracy"`` (maximised, reference 0 by default) or ``"loss"`` (minimised; give ``reference``).
        reference: the hypervolume's reference point, one value per task.

    Attributes:
        fronts: ``{global_step: table}`` of every front evaluated (pandas DataFrames).
    """

    def __init__(
        self,
        preferences: Any = None,
        points_per_side: int | None = None,
        metric: str = "accuracy",
        reference: Sequence[float] | None = None,
    ):
        if metric not in ("accuracy", "loss"):
            raise ValueError(f"`metric` must be 'accuracy' or 'loss', got {metric!r}.")
        if metric == "loss" and reference is None:
            raise ValueError('`metric="loss"` needs a `reference` point (the worst loss per task worth counting).')
        if points_per_side is not None:
            check_int(points_per_side, "`points_per_side`", minimum=2)
        self.preferences = preferences
        self.points_per_side = points_per_side
        self.metric = metric
        self.reference = None if reference is None else [float(value) for value in reference]
        self.fronts: dict[int, Any] = {}

    def on_evaluate(self, args, state, control, metrics=None, model=None, eval_dataloader=None, **kwargs):
        from accelerate import PartialState

        from peft_palora.pareto import hypervolume

        if not isinstance(model, MultiTaskModel):
            raise TypeError(f"FrontEvaluationCallback needs a MultiTaskModel, got {type(model).__name__}.")
        if eval_dataloader is None:
            raise ValueError("FrontEvaluationCallback needs an eval dataset (`eval_dataset=` of the Trainer).")
        task_names = model.task_names
        preferences = self.preferences
        if preferences is None:
            points = self.points_per_side or getattr(args, "eval_points_per_side", None) or 11
            preferences = simplex_grid(len(task_names), points)
        batches = functools.partial(shard_batches, eval_dataloader, 0, 1, next(model.parameters()).device)
        state_ = PartialState()  # the Trainer's: each process evaluates its part of the eval set
        front = compute_front(
            model,
            preferences,
            batches=batches,
            evaluate_at=lambda: evaluate_multitask(model, batches()),
            reduce_sum=process_reducer(state_, "sum") if state_.num_processes > 1 else None,
        )
        columns = [f"{task}_{self.metric}" for task in task_names]
        maximize = self.metric == "accuracy"
        reference = self.reference if self.reference is not None else [0.0] * len(task_names)
        volume = float(hypervolume(front[columns].to_numpy(dtype=float), reference=reference, maximize=maximize))
        self.fronts[state.global_step] = front
        if metrics is not None:
            metrics["eval_front_hypervolume"] = volume
        return control

