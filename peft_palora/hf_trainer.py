"""PaLoRA inside ``transformers.Trainer``, for users who already train that way.

:class:`PaLoRAHFTrainer` is a ``Trainer`` whose loss is PaLoRA's: at every step it draws a window of preferences at
``progress = global_step / max_steps``, runs the window (one batched forward by default) and returns the
multi-task objective. Its optimizer gives the task adapters ``T`` times the learning rate. Everything else
(accumulation, mixed precision, checkpoints, logging, distributed training) is the Trainer's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from .multitask import MultiTaskModel
from .objectives import MultiTaskObjective
from .preferences import AnnealedGridSampler, PreferenceSampler
from .training import LossFn, resolve_window_mode, window_task_losses


class PaLoRAHFTrainer(Trainer):
    """A ``transformers.Trainer`` for a :class:`~peft_palora.multitask.MultiTaskModel`.

    Args:
        preference_sampler: rays per step; default ``AnnealedGridSampler(T, window_size, sampler_mul,
            sampler_epsilon)``.
        window_size: preferences per step when no sampler is given.
        sampler_mul, sampler_epsilon: the default sampler's schedule.
        loss_fns: ``{task: loss_fn(logits, labels)}``; cross-entropy by default.
        objective: a :class:`~peft_palora.objectives.MultiTaskObjective` (plain linear scalarisation by default).
        window_mode: ``"auto"``, ``"batched"`` or ``"sequential"`` (see :func:`~peft_palora.training.window_task_losses`).
        adapter_lr_multiplier: adapters learn at ``learning_rate`` times this; default the number of tasks.

    The batches must carry the model inputs and the label columns named by ``model.label_columns``; the Trainer's
    ``remove_unused_columns`` cannot see through ``MultiTaskModel.forward(**batch)`` and is switched off.
    """

    def __init__(
        self,
        *args: Any,
        preference_sampler: PreferenceSampler | None = None,
        window_size: int = 4,
        sampler_mul: float = 5.0,
        sampler_epsilon: float = 0.01,
        loss_fns: Mapping[str, LossFn] | None = None,
        objective: MultiTaskObjective | None = None,
        window_mode: str = "auto",
        adapter_lr_multiplier: float | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        model = self.model
        if not isinstance(model, MultiTaskModel):
            raise TypeError(f"PaLoRAHFTrainer needs a MultiTaskModel, got {type(model).__name__}.")
        if set(model.label_columns) != set(model.task_names):
            raise ValueError(f"`model.label_columns` must name every task {model.task_names}.")
        self.args.remove_unused_columns = False
        self.task_names = model.task_names
        self.preference_sampler = preference_sampler or AnnealedGridSampler(
            model.num_tasks, num_rays=window_size, mul=sampler_mul, epsilon=sampler_epsilon
        )
        if self.preference_sampler.num_tasks != model.num_tasks:
            raise ValueError(
                f"`preference_sampler` draws {self.preference_sampler.num_tasks} tasks, the model has {model.num_tasks}."
            )
        self.loss_fns = dict(loss_fns) if loss_fns is not None else {task: F.cross_entropy for task in self.task_names}
        missing = sorted(set(self.task_names) - set(self.loss_fns))
        if missing:
            raise ValueError(f"`loss_fns` has no loss for tasks {missing}.")
        self.objective = objective or MultiTaskObjective(model.num_tasks)
        self.window_mode = resolve_window_mode(window_mode, model)
        self.adapter_lr_multiplier = adapter_lr_multiplier

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW over ``peft_palora.adapter_param_groups``: adapters at ``lr * T``, the rest at ``lr``."""
        if self.optimizer is None:
            from .optimization import adapter_param_groups

            groups = adapter_param_groups(
                self.model,
                lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                adapter_lr_multiplier=self.adapter_lr_multiplier,
            )
            self.optimizer = torch.optim.AdamW(
                groups, betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon
            )
        return self.optimizer

    def current_preferences(self) -> torch.Tensor:
        """The window for the current step: a pure function of ``(global_step, max_steps)``."""
        max_steps = max(int(self.state.max_steps or 0), 1)
        progress = min(self.state.global_step / max_steps, 1.0)
        return self.preference_sampler.sample(progress, step=self.state.global_step)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        unwrapped = self.accelerator.unwrap_model(model)
        preferences = self.current_preferences().to(device=self.args.device, dtype=torch.float32)
        task_losses = window_task_losses(
            model,
            unwrapped.model_inputs(inputs),
            unwrapped.labels(inputs),
            preferences,
            self.loss_fns,
            self.task_names,
            mode=self.window_mode,
        )
        shared = None
        if self.objective.needs_shared_parameters:
            shared = [parameter for parameter in unwrapped.backbone.parameters() if parameter.requires_grad]
        output = self.objective(task_losses, preferences, shared_parameters=shared)
        if return_outputs:
            return output.loss, {"task_losses": output.task_losses, "preferences": preferences}
        return output.loss
