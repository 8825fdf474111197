"""DPO for a whole front: one PaLoRA policy trained on several preference datasets, one per objective.

:class:`PaLoRADPOTrainer` is a ``trl.DPOTrainer``. It changes three of TRL's own override points and nothing else:

* ``_prepare_dataset``: ``train_dataset`` (and ``eval_dataset``) map objective names to TRL preference datasets. Each
  is prepared by TRL (prompt extraction, EOS, tokenisation, truncation filter), then the objectives are *zipped*: row
  ``i`` of the training set holds pair ``i`` of every objective (a shorter dataset is cycled, ``i mod n_t``), so every
  batch of ``B`` rows carries ``B`` pairs of each objective.
* the data collator: TRL's ``DataCollatorForPreference`` over the ``T * B`` pairs (objective-major: pair
  ``p = t * B + b``), plus an ``objective_ids`` column.
* ``_compute_loss``: the PaLoRA objective below; the reference is the adapters-disabled model, as TRL does for PEFT.

**The loss of one micro-batch.** The window ``Λ`` is ``m`` preferences drawn by the sampler at
``progress = global_step / max_steps`` (:class:`~peft_palora.preferences.AnnealedGridSampler` by default, the paper's
schedule). The batch is tiled over the window: copy ``k`` of every chosen and rejected sequence runs at ``λ_k`` in one
policy forward (``model(..., preference=rows)``, one row per sequence). The reference log-probabilities do not depend
on the preference, so they are computed once per pair and reused for every copy. With ``ℓ_{k,t,b}`` TRL's per-pair
DPO loss (``loss_type``, ``beta``) of pair ``b`` of objective ``t`` at ``λ_k``::

    L_DPO,t(λ_k) = (1/B) Σ_b ℓ_{k,t,b}
    loss         = (1/m) Σ_k Σ_t λ_{k,t} L_DPO,t(λ_k)

i.e. pair ``b`` of objective ``t`` in copy ``k`` has weight ``λ_{k,t} / (m B)``: the window average of
``Σ_t λ_t L_DPO,t``. Several ``loss_type`` entries add up with ``loss_weights``, as in TRL.

Logged on top of TRL's metrics: ``loss/<objective>`` (``L_DPO,t`` averaged over the window, unweighted) and
``rewards/<objective>/{chosen,rejected,margins,accuracies}``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from peft_palora.preferences import AnnealedGridSampler, PreferenceSampler
from peft_palora.training.window import window_step
from peft_palora.tuner.config import PaLoRAConfig

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
SUPPORTED_LOSS_TYPES = ("sigmoid", "hinge", "ipo")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------
def split_by_objective(
    dataset: Dataset,
    objectives: Mapping[str, str],
    *,
    prompt_column: str = "prompt",
    response_columns: tuple[str, str] = ("response_0", "response_1"),
) -> dict[str, Dataset]:
    """One multi-label preference dataset as ``{objective: dataset}`` in TRL's format (``prompt``, ``chosen``,
    ``rejected``).

    Made for PKU-SafeRLHF-style data: every row has a prompt, two responses, and one label column per objective
    holding the id (0 or 1) of the response that objective prefers, e.g.
    ``split_by_objective(data, {"helpful": "better_response_id", "harmless": "safer_response_id"})``.

    Args:
        dataset: a ``datasets.Dataset`` with ``prompt_column``, both ``response_columns`` and every label column.
        objectives: ``{objective name: label column}``; the names must be the PaLoRA model's task names.
        prompt_column: the prompt column.
        response_columns: the two response columns; a label ``j`` picks ``response_columns[j]`` as chosen.

    Returns:
        ``{objective: Dataset}``, each with exactly the columns ``prompt``, ``chosen``, ``rejected``, row ``i`` from
        row ``i`` of ``dataset``.

    Raises:
        TypeError: ``dataset`` is not a ``datasets.Dataset`` or ``objectives`` is not a mapping of strings.
        ValueError: no objectives, an empty dataset, a missing column, or a label that is not 0 or 1 (the row is
            named).
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"`dataset` must be a datasets.Dataset, got {type(dataset).__name__}.")
    if not isinstance(objectives, Mapping):
        raise TypeError(f"`objectives` must be a mapping {{objective: label column}}, got {type(objectives).__name__}.")
    if not objectives:
        raise ValueError("`objectives` is empty; give at least one {objective: label column}.")
    for name, column in objectives.items():
        if not isinstance(name, str) or not isinstance(column, str):
            raise TypeError(f"`objectives` must map names (str) to label columns (str); got {name!r}: {column!r}.")
    if not isinstance(response_columns, (tuple, list)) or len(response_columns) != 2:
        raise ValueError(f"`response_columns` must name exactly two columns, got {response_columns!r}.")
    if len(dataset) == 0:
        raise ValueError("`dataset` is empty.")
    needed = [prompt_column, *response_columns, *objectives.values()]
    missing = [column for column in needed if column not in dataset.column_names]
    if missing:
        raise ValueError(f"`dataset` has no column(s) {missing}; its columns: {dataset.column_names}.")

    prompts = dataset[prompt_column]
    responses = [dataset[response_columns[0]], dataset[response_columns[1]]]
    result = {}
    for name, column in objectives.items():
        labels = dataset[column]
        chosen, rejected = [], []
        for row, label in enumerate(labels):
            if isinstance(label, bool) or label not in (0, 1):
                raise ValueError(f"`dataset[{column!r}]` must hold 0 or 1 (the preferred response); row {row} has "
                                 f"{label!r}.")
            chosen.append(responses[label][row])
            rejected.append(responses[1 - label][row])
        result[name] = Dataset.from_dict({"prompt": list(prompts), "chosen": chosen, "rejected": rejected})
    return result


def _check_objective_datasets(datasets: Any, task_names: list[str], argument: str) -> dict[str, Dataset]:
    if isinstance(datasets, (Dataset, IterableDataset)) or not isinstance(datasets, Mapping):
        raise TypeError(
            f"`{argument}` must be a mapping {{objective: preference dataset}} with the objectives {task_names} "
            f"(one TRL dataset with `prompt`, `chosen`, `rejected` per objective), got {type(datasets).__name__}. "
            "To split one multi-label dataset, use `split_by_objective`."
        )
    if set(datasets) != set(task_names):
        raise ValueError(
            f"`{argument}` has the objectives {sorted(map(str, datasets))} but the PaLoRA model's task names are "
            f"{task_names}; give exactly one dataset per task (missing: {sorted(set(task_names) - set(datasets))}, "
            f"unknown: {sorted(map(str, set(datasets) - set(task_names)))})."
        )
    checked = {}
    for name in task_names:
        dataset = datasets[name]
        if not isinstance(dataset, Dataset):
            raise TypeError(f"`{argument}[{name!r}]` must be a datasets.Dataset (map-style), got "
                            f"{type(dataset).__name__}.")
        if len(dataset) == 0:
            raise ValueError(f"`{argument}[{name!r}]` is empty.")
        columns = dataset.column_names
        if "image" in columns or "images" in columns:
            raise ValueError(f"`{argument}[{name!r}]` has images; PaLoRADPOTrainer supports text datasets only.")
        missing = [column for column in ("chosen", "rejected") if column not in columns]
        if missing:
            raise ValueError(
                f"`{argument}[{name!r}]` has no column(s) {missing}; a preference dataset needs `prompt`, `chosen` "
                f"and `rejected` (its columns: {columns})."
            )
        checked[name] = dataset
    return checked


def zip_objectives(prepared: Mapping[str, Dataset], task_names: list[str]) -> Dataset:
    """Row ``i`` holds pair ``i mod n_t`` of every objective ``t``: columns ``prompt_ids``, ``chosen_ids`` and
    ``rejected_ids``, each a list of ``T`` token lists in task order. The length is the largest ``n_t``."""
    length = max(len(prepared[name]) for name in task_names)
    columns: dict[str, list] = {column: [] for column in TOKEN_COLUMNS}
    for column in TOKEN_COLUMNS:
        per_task = [prepared[name][column] for name in task_names]
        columns[column] = [[values[i % len(values)] for values in per_task] for i in range(length)]
    return Dataset.from_dict(columns)


@dataclass
class ObjectivePairsCollator:
    """Collates zipped rows: TRL's collator over the ``T * B`` pairs, objective-major (pair ``t * B + b`` is row
    ``b``'s pair of objective ``t``), plus ``objective_ids`` ``(T * B,)``."""

    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    num_objectives: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        pairs = [
            {column: example[column][task] for column in TOKEN_COLUMNS}
            for task in range(self.num_objectives)
            for example in examples
        ]
        batch = self.collator(pairs)
        batch["objective_ids"] = torch.arange(self.num_objectives).repeat_interleave(len(examples))
        return batch


# ---------------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------------
def _check_options(args: DPOConfig, compute_metrics: Any) -> None:
    """Refuse the TRL options that cannot carry a per-sample preference (or are not implemented here)."""
    unsupported = [loss for loss in args.loss_type if loss not in SUPPORTED_LOSS_TYPES]
    if unsupported:
        raise ValueError(f"`loss_type` {unsupported} is not supported by PaLoRADPOTrainer; use any of "
                         f"{list(SUPPORTED_LOSS_TYPES)} (per-pair losses that can be weighted by the preference).")
    refused = {
        "precompute_ref_log_probs": (args.precompute_ref_log_probs, "the reference of a PaLoRA model is the "
                                     "adapters-disabled model, computed once per pair and step on the fly"),
        "padding_free": (args.padding_free, "TRL disables it, and packed rows would share one preference"),
        "use_liger_kernel": (args.use_liger_kernel, "its fused loss does not take per-sample preferences"),
        "use_weighting": (args.use_weighting, "WPO weights are not combined with the preference weights"),
        "ld_alpha": (args.ld_alpha is not None, "length-desensitised log-probs are not implemented"),
        "sync_ref_model": (args.sync_ref_model, "the reference is the adapters-disabled model"),
        "f_divergence_type": (args.f_divergence_type != "reverse_kl", "only standard DPO (reverse_kl) is implemented"),
        "router_aux_loss_coef": (bool(args.router_aux_loss_coef), "the MoE auxiliary loss is not carried"),
    }
    for option, (is_set, why) in refused.items():
        if is_set:
            raise ValueError(f"`{option}` is not supported by PaLoRADPOTrainer: {why}. Leave it at its default.")
    if compute_metrics is not None:
        raise ValueError("`compute_metrics` is not supported by PaLoRADPOTrainer (the fused LM head builds no logits); "
                         "the evaluation logs the per-objective losses and rewards.")


def _palora_task_names(model: Any, peft_config: Any) -> tuple[list[str], PaLoRAConfig]:
    config = peft_config if peft_config is not None else getattr(model, "peft_config", {}).get("default")
    if not isinstance(config, PaLoRAConfig):
        raise TypeError(
            "`model` must be a PaLoRA PEFT model (`get_peft_model(base, PaLoRAConfig(...))`), or a base model given "
            f"with `peft_config=PaLoRAConfig(...)`; got a {type(model).__name__} whose config is "
            f"{type(config).__name__}."
        )
    if not config.task_names:
        raise ValueError("The PaLoRAConfig needs `task_names`: they name the objectives of `train_dataset`.")
    if config.train_base_weights:
        raise ValueError("`train_base_weights=True` is not supported by PaLoRADPOTrainer: the reference is the "
                         "adapters-disabled model, which would then move during training.")
    return list(config.task_names), config


class PaLoRADPOTrainer(DPOTrainer):
    """A ``trl.DPOTrainer`` that trains one PaLoRA policy for every trade-off between several preference datasets.

    Args:
        model: a PaLoRA PEFT model whose config has ``task_names`` (the objectives), or a base model with
            ``peft_config=PaLoRAConfig(...)``.
        ref_model: ``None`` (the reference is the adapters-disabled model, as TRL does for PEFT models) or a frozen
            model (it is preference-free, so it is run once per pair).
        args: a ``trl.DPOConfig``. The options that cannot carry a per-sample preference are refused with a
            ``ValueError`` naming them (``precompute_ref_log_probs``, ``padding_free``, ``use_liger_kernel``,
            ``use_weighting``, ``ld_alpha``, ``sync_ref_model``, a non-default ``f_divergence_type``, MoE auxiliary
            loss); ``loss_type`` may hold ``"sigmoid"``, ``"hinge"`` and ``"ipo"``.
        train_dataset: ``{objective: dataset}``, one TRL preference dataset (``prompt``, ``chosen``, ``rejected``;
            standard or conversational) per task name of the model. Zipped as the module docstring says.
        eval_dataset: ``None`` or a mapping like ``train_dataset``; evaluated with the window of the current step.
        preference_sampler: any :class:`~peft_palora.preferences.PreferenceSampler` over the ``T`` objectives;
            default ``AnnealedGridSampler(T, window_size)``.
        window_size: the number ``m`` of preferences per step of the default sampler (the batch runs ``m`` times).

    The remaining arguments are ``trl.DPOTrainer``'s.
    """

    _tag_names = ["trl", "dpo", "palora"]
    _name = "PaLoRA-DPO"

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: DPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Mapping[str, Dataset] | None = None,
        eval_dataset: Mapping[str, Dataset] | None = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: Any = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        *,
        preference_sampler: PreferenceSampler | None = None,
        window_size: int = 4,
    ):
        if isinstance(model, str):
            raise TypeError("`model` must be a model object here (a PaLoRA PEFT model, or a base model with "
                            "`peft_config=PaLoRAConfig(...)`), not a name.")
        task_names, _ = _palora_task_names(model, peft_config)
        num_tasks = len(task_names)
        if args is None:
            args = DPOConfig(output_dir="palora-dpo")
        if not isinstance(args, DPOConfig):
            raise TypeError(f"`args` must be a trl.DPOConfig, got {type(args).__name__}.")
        _check_options(args, compute_metrics)
        if data_collator is not None:
            raise ValueError("`data_collator` is not supported by PaLoRADPOTrainer: it collates one pair per "
                             "objective per row with TRL's preference collator.")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: a mapping {objective: preference dataset}.")
        train = _check_objective_datasets(train_dataset, task_names, "train_dataset")
        evaluation = None if eval_dataset is None else _check_objective_datasets(eval_dataset, task_names,
                                                                               "eval_dataset")
        if preference_sampler is None:
            if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
                raise ValueError(f"`window_size` must be an int >= 1, got {window_size!r}.")
            preference_sampler = AnnealedGridSampler(num_tasks, num_rays=window_size)
        if not isinstance(preference_sampler, PreferenceSampler):
            raise TypeError(f"`preference_sampler` must be a peft_palora PreferenceSampler, got "
                            f"{type(preference_sampler).__name__}.")
        if preference_sampler.num_tasks != num_tasks:
            raise ValueError(f"`preference_sampler` draws preferences over {preference_sampler.num_tasks} tasks; the "
                             f"model has {num_tasks} ({task_names}).")
        self.task_names = task_names
        self.preference_sampler = preference_sampler
        self._window_position = (0, 0)
        self._objective_datasets = {"train": train, "eval": evaluation}
        had_ref_adapter = "ref" in getattr(model, "peft_config", {})

        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=train[task_names[0]],  # TRL checks its type; `_prepare_dataset` replaces it by all of them
            eval_dataset=None if evaluation is None else evaluation[task_names[0]],
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        # TRL copies an existing adapter into a "ref" adapter to use as the reference. A PaLoRA reference must be
        # preference-free, so it is the adapters-disabled model instead (TRL's choice for a new adapter).
        if not had_ref_adapter and "ref" in self.model.peft_config:
            self.model.delete_adapter("ref")
            self.model.set_adapter("default")
        self.data_collator = ObjectivePairsCollator(self.data_collator, num_tasks)

    # ---- data ---------------------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: DPOConfig, dataset_name: str) -> Any:
        pending = getattr(self, "_objective_datasets", {}).get(dataset_name)
        if pending is None:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        prepared = {}
        for name, objective_dataset in pending.items():
            prepared[name] = super()._prepare_dataset(objective_dataset, processing_class, args,
                                                      f"{dataset_name}[{name}]")
            if len(prepared[name]) == 0:
                raise ValueError(
                    f"`{dataset_name}_dataset[{name!r}]` has no pair left after tokenisation: every prompt fills "
                    f"`max_length`={args.max_length}. Raise `max_length` or shorten the prompts."
                )
        self._objective_datasets[dataset_name] = None
        return zip_objectives(prepared, self.task_names)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """``Trainer.evaluate`` on the eval set given at construction, or on ``eval_dataset``: a mapping
        ``{objective: preference dataset}`` like ``train_dataset`` (prepared and zipped the same way)."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            self._objective_datasets["eval"] = _check_objective_datasets(eval_dataset, self.task_names,
                                                                         "eval_dataset")
            eval_dataset = self._prepare_dataset(None, self.processing_class, self.args, "eval")
        # TRL's `evaluate` only prepares datasets, which is done above for a mapping: go straight to Trainer's.
        return super(DPOTrainer, self).evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                                metric_key_prefix=metric_key_prefix)

    # ---- preferences --------------------------------------------------------------------------------------------
    def _sampler_step(self) -> int:
        global_step, index = self._window_position
        if global_step != self.state.global_step:
            global_step, index = self.state.global_step, 0
        return window_step(global_step, index, self.args.gradient_accumulation_steps)

    def current_preferences(self) -> torch.Tensor:
        """The ``(m, T)`` window of the current micro-batch: the sampler at ``progress = global_step / max_steps``
        and step ``global_step * gradient_accumulation_steps + micro-batch`` (so a resumed run draws the same)."""
        progress = min(self.state.global_step / max(int(self.state.max_steps or 0), 1), 1.0)
        return self.preference_sampler.sample(progress, step=self._sampler_step())

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        loss = super().training_step(model, inputs, *args, **kwargs)
        global_step, index = self._window_position
        self._window_position = (
            (global_step, index + 1) if global_step == self.state.global_step else (self.state.global_step, 1)
        )
        return loss

    # ---- loss ---------------------------------------------------------------------------------------------------
    def sequence_log_probs(
        self, model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], preference: torch.Tensor | None
    ) -> torch.Tensor:
        """Summed completion log-probabilities of each sequence of a collated batch, ``(rows,)``.

        ``preference`` is one row per sequence (policy), or ``None`` for the reference (adapters disabled, or
        ``ref_model``), run without gradients.
        """
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False,
                  "labels": labels, "fused_lm_head": True}
        seq_len = completion_mask.shape[1] - 1
        if preference is not None:
            outputs = model(**kwargs, preference=preference)
            return outputs.log_probs[:, -seq_len:].sum(dim=1)
        if self.ref_model is not None:
            reference, context = self.ref_model, contextlib.nullcontext()
        else:
            reference, context = self.model, use_adapter(self.accelerator.unwrap_model(self.model), adapter_name=None)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            with context:
                outputs = reference(**kwargs)
        return outputs.log_probs[:, -seq_len:].sum(dim=1)

    def _per_pair_loss(self, delta: torch.Tensor, lengths: tuple[torch.Tensor, torch.Tensor],
                       logratios: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        loss = torch.zeros_like(delta)
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sigmoid":
                per_pair = -F.logsigmoid(self.beta * delta)
            elif loss_type == "hinge":
                per_pair = torch.relu(1 - self.beta * delta)
            else:  # ipo, length-normalised as in TRL
                ipo_delta = logratios[0] / lengths[0] - logratios[1] / lengths[1]
                per_pair = (ipo_delta - 1 / (2 * self.beta)) ** 2
            loss = loss + weight * per_pair
        return loss

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool):
        mode = "train" if self.model.training else "eval"
        device = inputs["input_ids"].device
        objective_ids = inputs["objective_ids"]
        num_pairs = objective_ids.numel()
        num_tasks = len(self.task_names)
        per_objective = num_pairs // num_tasks
        window = self.current_preferences().to(device=device, dtype=torch.float32)
        num_rays = window.shape[0]

        sequences = {key: inputs[key] for key in ("input_ids", "attention_mask", "completion_mask")}
        tiled = {}
        for key, value in sequences.items():
            chosen, rejected = value.chunk(2, dim=0)
            tiled[key] = torch.cat([chosen.repeat(num_rays, 1), rejected.repeat(num_rays, 1)])
        pair_preferences = window.repeat_interleave(num_pairs, dim=0)  # row k * P + p is λ_k
        logps = self.sequence_log_probs(model, tiled, torch.cat([pair_preferences, pair_preferences]))
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        ref_chosen, ref_rejected = self.sequence_log_probs(model, sequences, None).chunk(2, dim=0)
        chosen_logratios = chosen_logps - ref_chosen.repeat(num_rays)
        rejected_logratios = rejected_logps - ref_rejected.repeat(num_rays)
        lengths = [mask.sum(dim=1).clamp(min=1).repeat(num_rays) for mask in inputs["completion_mask"].chunk(2)]
        per_pair = self._per_pair_loss(chosen_logratios - rejected_logratios, lengths,
                                       (chosen_logratios, rejected_logratios))

        pair_objectives = objective_ids.repeat(num_rays)
        weights = pair_preferences.gather(1, pair_objectives[:, None]).squeeze(1) / (num_rays * per_objective)
        loss = (weights.to(per_pair.dtype) * per_pair).sum()

        self._log_metrics(mode, per_pair.detach(), chosen_logratios.detach(), rejected_logratios.detach(),
                          pair_objectives, chosen_logps.detach(), rejected_logps.detach(), window, inputs)
        if return_outputs:
            return loss, {"per_pair_loss": per_pair.detach(), "preferences": window}
        return loss

    def _log_metrics(self, mode: str, per_pair: torch.Tensor, chosen_logratios: torch.Tensor,
                     rejected_logratios: torch.Tensor, pair_objectives: torch.Tensor, chosen_logps: torch.Tensor,
                     rejected_logps: torch.Tensor, window: torch.Tensor, inputs: Mapping[str, Any]) -> None:
        metrics = self._metrics[mode]
        gather = self.accelerator.gather_for_metrics
        chosen_rewards = self.beta * chosen_logratios
        rejected_rewards = self.beta * rejected_logratios
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
        metrics["num_tokens"] = [self._total_train_tokens]
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps).mean().item())
        for task, name in enumerate(self.task_names):
            mask = pair_objectives == task
            margins = chosen_rewards[mask] - rejected_rewards[mask]
            metrics[f"loss/{name}"].append(gather(per_pair[mask]).mean().item())
            metrics[f"rewards/{name}/chosen"].append(gather(chosen_rewards[mask]).mean().item())
            metrics[f"rewards/{name}/rejected"].append(gather(rejected_rewards[mask]).mean().item())
            metrics[f"rewards/{name}/margins"].append(gather(margins).mean().item())
            metrics[f"rewards/{name}/accuracies"].append(gather((margins > 0).float()).mean().item())
            metrics[f"preference/{name}"].append(window[:, task].mean().item())

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, return_outputs=False)
        return loss.detach(), None, None


__all__ = ["ObjectivePairsCollator", "PaLoRADPOTrainer", "split_by_objective", "zip_objectives"]
