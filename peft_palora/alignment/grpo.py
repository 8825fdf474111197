"""GRPO for a whole reward front: :class:`PaLoRAGRPOTrainer`, a ``trl.GRPOTrainer`` with one preference per prompt.

``reward_funcs`` maps the PaLoRA model's task names to reward functions (or reward models), one objective each. At
every generation the trainer draws one preference per prompt (by default the paper's annealed schedule,
:class:`~peft_palora.preferences.AnnealedGridSampler` at ``progress = global_step / max_steps``), and

* generates that prompt's ``num_generations`` completions with the model at the prompt's preference (one
  ``generate`` call for the whole batch, with a per-sample preference: one row per prompt row);
* normalises each objective's rewards within the prompt's group, ``(r_t - mean_group) / (std_group + 1e-4)`` (the
  group's unbiased std, as TRL computes it; ``scale_rewards="none"`` leaves out the division), and sums them
  weighted by the prompt's preference: ``advantage = sum_t lambda_t * normalised r_t``;
* computes TRL's policy loss (and the old and reference log-probabilities) with the model at the same per-sample
  preference.

Only the override points TRL uses itself are replaced (``_generate_and_score_completions`` wraps TRL's, then
recomputes the advantages; ``_generate_single_turn``, ``_get_per_token_logps_and_entropies`` and ``_compute_loss``
run TRL's code inside the preference). TRL features that cannot carry a per-sample preference are refused when
the trainer is built, each with the option named.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from transformers import ProcessorMixin
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import nanstd

from peft_palora.preferences import AnnealedGridSampler, PreferenceSampler
from peft_palora.tuner.config import PaLoRAConfig

__all__ = ["PaLoRAGRPOTrainer"]

_EPS = 1e-4  # TRL's: the same epsilon its group normalisation uses


def _palora_config(model: Any) -> PaLoRAConfig:
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, Mapping):
        raise TypeError(
            "`model` must be a PaLoRA PeftModel (get_peft_model(base, PaLoRAConfig(...))), got "
            f"{type(model).__name__}; PaLoRAGRPOTrainer does not load models from names or take `peft_config`."
        )
    config = peft_config.get(getattr(model, "active_adapter", None))
    if not isinstance(config, PaLoRAConfig):
        raise TypeError(
            "`model` must hold an active PaLoRA adapter (PaLoRAConfig); its active adapter is "
            f"{type(config).__name__}."
        )
    return config


def _check_options(args: GRPOConfig, processing_class: Any, **trainer_options: Any) -> None:
    """Refuse the TRL features that cannot carry one preference per sample."""
    reasons = {
        "use_vllm": "vLLM generates with its own copy of the weights, which holds one preference (no per-sample "
        "PaLoRA adapters); generate with transformers (use_vllm=False)",
        "use_transformers_continuous_batching": "continuous batching regroups the requests, so the rows no longer "
        "line up with the per-sample preferences",
    }
    for option, why in reasons.items():
        if getattr(args, option, False):
            raise ValueError(f"`{option}=True` is not supported by PaLoRAGRPOTrainer: {why}.")
    if args.reward_weights is not None:
        raise ValueError(
            "`reward_weights` is not supported by PaLoRAGRPOTrainer: each prompt's preference weighs the objectives "
            "(set `reward_weights=None`)."
        )
    if args.multi_objective_aggregation != "sum_then_normalize":
        raise ValueError(
            "`multi_objective_aggregation` is not used by PaLoRAGRPOTrainer (each objective is normalised in its "
            "group, then weighted by the prompt's preference); leave it at its default."
        )
    if args.scale_rewards not in ("group", "none", True, False):
        raise ValueError(
            f"`scale_rewards={args.scale_rewards!r}` is not supported by PaLoRAGRPOTrainer: the objectives are "
            "normalised per group; use 'group' (default) or 'none'."
        )
    for option, value in trainer_options.items():
        if value is not None:
            raise ValueError(
                f"`{option}` is not supported by PaLoRAGRPOTrainer: its extra generation turns run on subsets of the "
                "rows, which the per-sample preferences do not follow."
            )
    if isinstance(processing_class, ProcessorMixin):
        raise ValueError(
            "`processing_class` is a multimodal processor; PaLoRAGRPOTrainer supports text-only models (a tokenizer)."
        )


class PaLoRAGRPOTrainer(GRPOTrainer):
    """A ``trl.GRPOTrainer`` that trains one PaLoRA policy for every trade-off between several reward objectives.

    Args:
        model: a PaLoRA ``PeftModel`` whose config names its tasks (``PaLoRAConfig(task_names=[...])``).
        reward_funcs: ``{objective: reward function or reward model}``; the objectives must be exactly the model's
            task names (any order). Reward functions follow TRL's signature
            (``f(prompts, completions, **kwargs) -> list[float]``).
        args: a ``trl.GRPOConfig``. Refused: ``use_vllm``, ``use_transformers_continuous_batching``,
            ``reward_weights``, a non-default ``multi_objective_aggregation``, ``scale_rewards="batch"``.
        preference_sampler: a :class:`~peft_palora.preferences.PreferenceSampler` whose ``num_rays`` is the number
            of prompts per generation batch (``generation_batch_size // num_generations``); default
            ``AnnealedGridSampler(T, that number)``. It is called with ``progress = global_step / max_steps`` and
            ``step = global_step``. Evaluation uses the annealed grid at ``progress = 1``.
        reward_processing_classes: as TRL's, or a mapping keyed by objective.
        **kwargs: passed to ``trl.GRPOTrainer`` (``train_dataset``, ``processing_class``, ``callbacks``, ...);
            ``tools``, ``rollout_func``, ``environment_factory`` and ``peft_config`` are refused.

    Logged per objective: ``rewards/<objective>/mean`` and ``.../std`` (TRL's names, keyed by the objective).
    Each output of ``_generate_and_score_completions`` carries a ``preference`` tensor, one row per completion.
    """

    def __init__(
        self,
        model: Any,
        reward_funcs: Mapping[str, Any],
        args: GRPOConfig | None = None,
        *,
        preference_sampler: PreferenceSampler | None = None,
        reward_processing_classes: Any = None,
        **kwargs: Any,
    ) -> None:
        config = _palora_config(model)
        if config.task_names is None:
            raise ValueError(
                "The PaLoRA model has no task names; build it with PaLoRAConfig(task_names=[...]) so that "
                "`reward_funcs` can name each objective."
            )
        self.objectives = list(config.task_names)
        if not isinstance(reward_funcs, Mapping):
            raise TypeError(
                "`reward_funcs` must be a mapping {objective: reward function or model} keyed by the model's task "
                f"names {self.objectives}, got {type(reward_funcs).__name__}."
            )
        if set(reward_funcs) != set(self.objectives):
            missing = [name for name in self.objectives if name not in reward_funcs]
            unknown = [name for name in reward_funcs if name not in self.objectives]
            raise ValueError(
                f"`reward_funcs` must name exactly the model's tasks {self.objectives}: missing {missing}, "
                f"unknown {unknown}."
            )
        if isinstance(reward_processing_classes, Mapping):
            if set(reward_processing_classes) - set(self.objectives):
                raise ValueError(
                    "`reward_processing_classes` names objectives the model does not have: "
                    f"{sorted(set(reward_processing_classes) - set(self.objectives))}; the tasks are {self.objectives}."
                )
            reward_processing_classes = [reward_processing_classes.get(name) for name in self.objectives]
        if kwargs.get("peft_config") is not None:
            raise ValueError(
                "`peft_config` is not supported by PaLoRAGRPOTrainer: pass a model already wrapped with "
                "get_peft_model(base, PaLoRAConfig(...))."
            )
        if args is None:
            args = GRPOConfig("palora-grpo")
        _check_options(
            args, kwargs.get("processing_class"),
            tools=kwargs.get("tools"), rollout_func=kwargs.get("rollout_func"),
            environment_factory=kwargs.get("environment_factory"),
        )
        if preference_sampler is not None:
            if not isinstance(preference_sampler, PreferenceSampler):
                raise TypeError(
                    "`preference_sampler` must be a peft_palora.preferences.PreferenceSampler, got "
                    f"{type(preference_sampler).__name__}."
                )
            if preference_sampler.num_tasks != len(self.objectives):
                raise ValueError(
                    f"`preference_sampler` draws {preference_sampler.num_tasks}-task preferences but the model has "
                    f"{len(self.objectives)} tasks {self.objectives}."
                )
        self._rows: torch.Tensor | None = None  # the per-row preferences of the batch being generated/scored
        self._last_rewards_per_func: torch.Tensor | None = None
        super().__init__(
            model=model,
            reward_funcs=[reward_funcs[name] for name in self.objectives],
            args=args,
            reward_processing_classes=reward_processing_classes,
            **kwargs,
        )
        self.reward_func_names = list(self.objectives)  # TRL logs rewards/<name>/mean under these names
        groups = self.args.generation_batch_size // self.num_generations
        if preference_sampler is None:
            preference_sampler = AnnealedGridSampler(len(self.objectives), groups)
        elif preference_sampler.num_rays != groups:
            raise ValueError(
                f"`preference_sampler` draws {preference_sampler.num_rays} preferences per call but a generation "
                f"batch holds {groups} prompts (generation_batch_size {self.args.generation_batch_size} // "
                f"num_generations {self.num_generations}); give it num_rays={groups}."
            )
        self.preference_sampler = preference_sampler

    # ---- preferences ------------------------------------------------------------------------------------------------
    def _palora_model(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    def _progress(self) -> float:
        max_steps = self.state.max_steps
        return min(1.0, self.state.global_step / max_steps) if max_steps else 0.0

    def group_preferences(self, num_groups: int, train: bool = True) -> torch.Tensor:
        """The preferences of the prompt groups of one generation batch (all processes): ``(num_groups, T)``."""
        if train:
            rows = self.preference_sampler.sample(self._progress(), step=self.state.global_step)
            if rows.shape[0] != num_groups:
                raise ValueError(
                    f"The preference sampler returned {rows.shape[0]} preferences for {num_groups} prompt groups."
                )
            return rows.to(torch.float32)
        return AnnealedGridSampler(len(self.objectives), num_groups).sample(1.0)

    @contextlib.contextmanager
    def _at_rows(self, rows: torch.Tensor | None) -> Iterator[None]:
        """Run the block with the model at per-sample preference ``rows`` (one row per model input row)."""
        if rows is None:
            yield
            return
        with self._palora_model().preference_context(rows):
            yield

    # ---- TRL override points ----------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        local = len(inputs)
        total = local * self.accelerator.num_processes
        if total % num_generations:
            raise ValueError(
                f"A generation batch of {total} rows is not made of whole groups of {num_generations} completions."
            )
        groups = self.group_preferences(total // num_generations, train=mode == "train")
        global_rows = groups.repeat_interleave(num_generations, dim=0)  # completions of a prompt are contiguous
        start = self.accelerator.process_index * local
        local_rows = global_rows[start:start + local]
        self._rows = local_rows
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._rows = None
        rewards_per_func = self._last_rewards_per_func  # (total, T), gathered over processes
        advantages = preference_advantages(
            rewards_per_func, global_rows.to(rewards_per_func.device), num_generations,
            scale=self.scale_rewards not in ("none", False),
        )
        # TRL logged its own advantages for this batch; log ours instead
        logged = self._logs["advantages"]  # a bounded deque
        for _ in range(min(advantages.numel(), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())
        output["advantages"] = advantages[start:start + local].to(output["advantages"].device)
        output["preference"] = local_rows.to(output["advantages"].device)
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        rows = self._rows
        if rows is not None and rows.shape[0] != len(prompt_ids):
            raise RuntimeError(f"{len(prompt_ids)} prompts to generate for {rows.shape[0]} preferences.")
        with self._at_rows(rows):
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images=has_tool_images
            )

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           **kwargs):
        rows = self._rows
        if rows is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size, **kwargs
            )
        if rows.shape[0] != input_ids.shape[0]:
            raise RuntimeError(f"{input_ids.shape[0]} sequences to score for {rows.shape[0]} preferences.")
        chunk = batch_size or input_ids.size(0)
        per_row = {key: value for key, value in kwargs.items() if key in ("token_type_ids", "mm_token_type_ids")}
        other = {key: value for key, value in kwargs.items() if key not in per_row}
        logps, entropies, aux = [], [], []
        for start in range(0, input_ids.size(0), chunk):
            end = min(start + chunk, input_ids.size(0))
            sliced = {key: None if value is None else value[start:end] for key, value in per_row.items()}
            with self._at_rows(rows[start:end]):
                lp, ent, aux_loss = super()._get_per_token_logps_and_entropies(
                    model, input_ids[start:end], attention_mask[start:end], logits_to_keep, batch_size=None,
                    **sliced, **other,
                )
            logps.append(lp)
            entropies.append(ent)
            aux.append(aux_loss)
        return (
            torch.cat(logps, dim=0),
            torch.cat(entropies, dim=0) if entropies[0] is not None else None,
            torch.stack(aux).mean() if aux[0] is not None else None,
        )

    def _compute_loss(self, model, inputs):
        previous, self._rows = self._rows, inputs["preference"]
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._rows = previous


def preference_advantages(
    rewards_per_func: torch.Tensor, preferences: torch.Tensor, num_generations: int, scale: bool = True
) -> torch.Tensor:
    """``sum_t lambda_t * (r_t - mean_group(r_t)) / (std_group(r_t) + 1e-4)`` for every completion.

    ``rewards_per_func`` is ``(N, T)`` (NaN where a reward function returned None), ``preferences`` ``(N, T)`` (the
    preference of each completion's prompt), groups are ``num_generations`` contiguous rows. A completion no
    objective could score gets advantage 0; an objective that is NaN for a completion contributes nothing to it.
    """
    grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])
    centred = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale:
        std = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + _EPS)
    normalised = centred.reshape(rewards_per_func.shape)
    advantages = (normalised * preferences).nansum(dim=1)
    advantages[torch.isnan(rewards_per_func).all(dim=1)] = 0.0
    return torch.nan_to_num(advantages, nan=0.0)

