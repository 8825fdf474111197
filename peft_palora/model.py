"""The PaLoRA tuner: injects PaLoRA layers into a model and owns the preference in force."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Union

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .config import PaLoRAConfig
from .layer import PaLoRALayer, PreferenceState, dispatch_layer, dispatch_layer_type_supported
from .preferences import validate_preference

PreferenceLike = Union[torch.Tensor, np.ndarray, list, tuple, Mapping[str, float]]  # noqa: UP007 (runtime alias)

# Keyword arguments whose leading dimension is the batch, in the order a transformers model is most likely to get them.
_BATCH_INPUT_NAMES = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features", "x")


class PaLoRAModel(BaseTuner):
    """Creates a PaLoRA model (Pareto Low-Rank Adapters, arXiv 2407.08056) from a pretrained model.

    Every targeted layer receives `num_tasks` low-rank adapters. The preference (a point on the simplex) chooses
    how much each task adapter contributes; change it at any time with [`set_preference`] or per call with
    `model(**inputs, preference=...)`, where a `(batch, T)` preference gives every sample its own trade-off.

    Example:

        ```py
        >>> import peft_palora
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_palora.PaLoRAConfig(num_tasks=2, r=4, target_modules=["query"]))
        >>> model.set_preference([0.7, 0.3])
        ```
    """

    prefix: str = "palora_"
    tuner_layer_cls = PaLoRALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # ---- injection ----------------------------------------------------------------------------------------------
    def _preference_state(self, adapter_name: str, config: PaLoRAConfig) -> PreferenceState:
        states = self.__dict__.setdefault("_preference_states", {})
        state = states.get(adapter_name)
        if state is None or state.num_tasks != config.num_tasks:
            state = PreferenceState(config.num_tasks)
            states[adapter_name] = state
        return state

    def _create_and_replace(
        self,
        palora_config: PaLoRAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        r, alpha = palora_config.rank_and_alpha_for(current_key)
        kwargs = {
            "num_tasks": palora_config.num_tasks,
            "r": r,
            "scaling": float(alpha) / r,
            "dropout": palora_config.palora_dropout,
            "init_weights": palora_config.init_weights,
            "preference_state": self._preference_state(adapter_name, palora_config),
        }
        if isinstance(target, PaLoRALayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = dispatch_layer(target, adapter_name, **kwargs)
        if new_module is None:
            raise TypeError(
                f"Target module '{current_key}' ({type(target).__name__}) is not supported by PaLoRA. Supported: "
                "torch.nn.Linear, transformers' Conv1D, torch.nn.Embedding, torch.nn.Conv1d/2d/3d."
            )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # adding a further adapter does not make it trainable
        self._replace_module(parent, target_name, new_module, target)
        self.__dict__.setdefault("_replaced_during_injection", []).append((parent, target_name, target))

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_replaced_during_injection"] = []
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException as error:
            # A refused injection must not leave the user's model half-adapted: put back every replaced layer.
            for parent, target_name, original in reversed(self.__dict__["_replaced_during_injection"]):
                setattr(parent, target_name, original)
            if not isinstance(error, ValueError) or "not found in the base model" not in str(error):
                raise
            adaptable = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                                if name and dispatch_layer_type_supported(module)})
            raise type(error)(f"{error} Layers of this model that PaLoRA can adapt: {adaptable}.") from error
        finally:
            self.__dict__.pop("_replaced_during_injection", None)

    def _post_injection_hook(self, model: nn.Module, config: PaLoRAConfig, adapter_name: str) -> None:
        if hasattr(model, "add_model_tags"):  # transformers models: PEFT copies these tags into the model card
            model.add_model_tags(["palora"])
        if self.__dict__.get("_batch_check_handle") is None:
            # A hook on the base model sees its real inputs whichever PeftModel subclass (or none) calls it.
            self._batch_check_handle = model.register_forward_pre_hook(self._check_batch_pre_hook, with_kwargs=True)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        handle = self.__dict__.pop("_batch_check_handle", None)
        if handle is not None:
            handle.remove()
        return model

    def _palora_layers(self, adapter_name: str | None = None) -> Iterator[tuple[str, PaLoRALayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, PaLoRALayer) and (adapter_name is None or adapter_name in module.palora_A):
                yield name, module

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for adapter_name in self.active_adapters:
            config = self.peft_config[adapter_name]
            if not config.train_base_weights or config.inference_mode:
                continue
            for _, layer in self._palora_layers(adapter_name):
                layer.get_base_layer().requires_grad_(True)

    # ---- preferences --------------------------------------------------------------------------------------------
    def _validate_for_adapter(self, preference: PreferenceLike, adapter_name: str) -> torch.Tensor:
        config = self.peft_config[adapter_name]
        return validate_preference(preference, num_tasks=config.num_tasks, task_names=config.task_names)

    def _target_adapters(self, adapter_name: str | None) -> list[str]:
        if adapter_name is not None:
            if adapter_name not in self.peft_config:
                raise ValueError(f"Unknown adapter {adapter_name!r}; adapters: {sorted(self.peft_config)}.")
            return [adapter_name]
        return [name for name in self.active_adapters if isinstance(self.peft_config[name], PaLoRAConfig)]

    def _states(self) -> dict[str, PreferenceState]:
        return self.__dict__.setdefault("_preference_states", {})

    def set_preference(self, preference: PreferenceLike, adapter_name: str | None = None) -> None:
        """Set the preference in force until the next call.

        Args:
            preference: shape `(T,)` (one trade-off for the whole batch), `(batch, T)` (one per sample), or a dict
                `{task_name: weight}` when the config has `task_names`. Must be finite, non-negative and sum to 1
                (tolerance 1e-4); nothing is renormalised silently.
            adapter_name: the adapter to set; all active adapters by default.

        Raises:
            ValueError: the preference is malformed, or the adapter is merged at another preference (unmerge first).
        """
        names = self._target_adapters(adapter_name)
        validated = {name: self._validate_for_adapter(preference, name) for name in names}  # all checks first
        for name, value in validated.items():
            self._check_mergeable_if_merged(name, value)
        for name, value in validated.items():
            self._states()[name].value = value
        self._remerge(validated)

    def get_preference(self, adapter_name: str | None = None) -> torch.Tensor:
        """The preference in force (a copy): shape `(T,)` or `(batch, T)`."""
        names = self._target_adapters(adapter_name)
        if not names:
            raise ValueError("No active PaLoRA adapter.")
        return self._states()[names[0]].value.clone()

    @contextmanager
    def preference_context(self, preference: PreferenceLike, adapter_name: str | None = None) -> Iterator[None]:
        """Run a block at `preference`, then restore the preference that was in force before."""
        names = self._target_adapters(adapter_name)
        previous = {name: self._states()[name].value for name in names}
        self.set_preference(preference, adapter_name)
        try:
            yield
        finally:
            for name, value in previous.items():
                self._states()[name].value = value
            self._remerge(previous)

    def _merged_layers(self, adapter_name: str) -> list[PaLoRALayer]:
        return [layer for _, layer in self._palora_layers(adapter_name) if adapter_name in layer.merged_adapters]

    def _check_mergeable_if_merged(self, adapter_name: str, value: torch.Tensor) -> None:
        if value.dim() == 2 and self._merged_layers(adapter_name):
            raise ValueError(
                f"Adapter '{adapter_name}' is merged into the weights, which hold ONE preference; a per-sample "
                f"preference of shape {tuple(value.shape)} needs `unmerge_adapter()` first."
            )

    def _remerge(self, adapter_names: Mapping[str, Any]) -> None:
        """Keep merged weights at the preference in force: re-merge from the exact pre-merge weights."""
        for name in adapter_names:
            for layer in self._merged_layers(name):
                layer.remerge()

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Apply `preference=` for one call (PeftModel strips the argument before calling the base model)."""
        # `generate` expands every sample into num_beams * num_return_sequences contiguous rows.
        expansion = int(kwargs.get("num_beams") or 1) * int(kwargs.get("num_return_sequences") or 1)
        previous_expansion, self._row_expansion = self._row_expansion, expansion
        try:
            preference = kwargs.get("preference")
            if preference is None:
                yield
                return
            if self.training and any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules()):
                raise ValueError(
                    "`preference=` cannot be used while training with gradient checkpointing: the checkpointed "
                    "layers re-run during backward, after this call has ended. Use `set_preference(...)` before the "
                    "forward."
                )
            with self.preference_context(preference):
                yield
        finally:
            self._row_expansion = previous_expansion

    _row_expansion: int = 1

    def _check_batch_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Before every forward of the base model: a per-sample preference must have one row per sample."""
        batch_size = _batch_size(args, kwargs)
        if batch_size is None:
            return
        for name in self._target_adapters(None):
            value = self._states()[name].value
            if value.dim() == 2 and batch_size not in (value.shape[0], value.shape[0] * self._row_expansion):
                raise ValueError(
                    f"The per-sample preference has {value.shape[0]} rows but the batch has {batch_size} samples."
                )

    # ---- merging ------------------------------------------------------------------------------------------------
    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        for name in self._target_adapters(None):
            value = self._states()[name].value
            if value.dim() == 2:
                raise ValueError(
                    f"Adapter '{name}' has a per-sample preference of shape {tuple(value.shape)}; a merge bakes ONE "
                    "preference into the weights. Call `set_preference` with a (T,) preference first."
                )

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge the adapters into the base weights at the preference in force (`unmerge_adapter` restores exactly)."""
        self._check_merge_allowed()
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    # ---- saving and loading -------------------------------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if getattr(config, "train_base_weights", False):
            to_return.update({key: state_dict[key] for key in _base_weight_keys(model, adapter_name, state_dict)})
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        _check_bundle_matches_model(model, config, adapter_name, remapped)
        return remapped


def _base_weight_keys(model: nn.Module, adapter_name: str, state_dict: Mapping[str, Any]) -> list[str]:
    """State-dict keys of the base weights (and biases) of the layers that carry `adapter_name`."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, PaLoRALayer) and adapter_name in module.palora_A:
            name = name.removeprefix("_fsdp_wrapped_module.")
            for param in ("weight", "bias"):
                key = f"{name}.base_layer.{param}"
                if key in state_dict:
                    keys.append(key)
    return keys


def _check_bundle_matches_model(model: nn.Module, config: PaLoRAConfig, adapter_name: str, checkpoint: dict) -> None:
    """Refuse a bundle that does not fit the model, before anything is loaded (never a silent partial load)."""
    model_state = model.state_dict()
    prefix = "base_model.model."
    has_prefix = any(key.startswith(prefix) for key in model_state)

    def model_key(key: str) -> str:
        return key if has_prefix else key.removeprefix(prefix)

    expected = {
        key
        for key in model_state
        if any(f".{attr}.{adapter_name}" in key for attr in PaLoRALayer.adapter_layer_names)
        and key.rsplit(".", 1)[-1] == adapter_name
    }
    if getattr(config, "train_base_weights", False):
        expected |= set(_base_weight_keys(model, adapter_name, model_state))
    given = {model_key(key) for key in checkpoint}

    problems = []
    missing = sorted(expected - given)
    if missing:
        problems.append(
            f"missing from the bundle (its config's target_modules adapt layers its weights do not hold): "
            f"{_short_list(missing)}"
        )
    unexpected = sorted(key for key in given if key not in model_state)
    if unexpected:
        problems.append(
            "in the bundle but not in the model (another base model, or a config whose target_modules differ from "
            f"the weights'): {_short_list(unexpected)}"
        )
    for key, value in checkpoint.items():
        key = model_key(key)
        if key in model_state and tuple(value.shape) != tuple(model_state[key].shape):
            problems.append(
                f"shape of {key}: bundle {tuple(value.shape)}, model {tuple(model_state[key].shape)} (the config says "
                f"num_tasks={config.num_tasks}, r={config.r}"
                + (f", rank_pattern={config.rank_pattern}" if getattr(config, "rank_pattern", None) else "")
                + ", so adapters hold num_tasks*r directions)"
            )
    if problems:
        raise ValueError(f"The PaLoRA bundle for adapter '{adapter_name}' does not match the model: " + "; ".join(problems))


def _short_list(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _batch_size(args: tuple, kwargs: Mapping[str, Any]) -> int | None:
    for name in _BATCH_INPUT_NAMES:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
        return args[0].shape[0]
    return None


def palora_layers(model: nn.Module) -> list[BaseTunerLayer]:
    """All PaLoRA layers of a model (handy for inspection and tests)."""
    return [module for module in model.modules() if isinstance(module, PaLoRALayer)]

