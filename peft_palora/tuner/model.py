"""The PaLoRA tuner: injects PaLoRA layers into a model and owns the preference in force."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, Union

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.constants import EMBEDDING_LAYER_NAMES
from torch import nn

from peft_palora.tuner import state as _per_call
from peft_palora.tuner.bnb import check_base_weights_trainable, check_merge_allowed, dispatch_bnb
from peft_palora.tuner.bundle import check_adapter_tensors, mismatched_sizes_ignored, raise_pending_meaning_problem
from peft_palora.tuner.config import PaLoRAConfig
from peft_palora.tuner.layer import PaLoRALayer, PreferenceState, dispatch_default, dispatch_layer_type_supported
from peft_palora.tuner.preference import validate_preference

PreferenceLike = Union[torch.Tensor, np.ndarray, list, tuple, Mapping[str, float]]  # noqa: UP007 (runtime alias)



# Tried in order for each targeted module, as PEFT's LoRA does: bitsandbytes' quantised linears first (they subclass
# nn.Linear), then the plain layer types. Each returns the PaLoRA layer, or None when the module is not its kind.
DISPATCHERS: list[Callable[..., nn.Module | None]] = [dispatch_bnb, dispatch_default]


def dispatch_layer(target: nn.Module, adapter_name: str, **kwargs: Any) -> nn.Module | None:
    """The PaLoRA layer for ``target`` from the first dispatcher that takes it, or None when none does."""
    for dispatcher in DISPATCHERS:
        new_module = dispatcher(target, adapter_name, **kwargs)
        if new_module is not None:
            return new_module
    return None


class PaLoRAModel(BaseTuner):
    """Creates a PaLoRA model (Pareto Low-Rank Adapters, arXiv 2407.08056) from a pretrained model.

    Every targeted layer receives `num_tasks` low-rank adapters. The preference (a point on the simplex) chooses
    how much each task adapter contributes; change the default at any time with [`set_preference`], or give one for a
    single call with `model(**inputs, preference=...)`, where a `(batch, T)` preference gives every sample its own
    trade-off. A per-call preference is data for that call only: calls in several threads never see each other's.

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

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str, **kwargs: Any) -> None:
        # Set before BaseTuner.__init__, which injects the first adapter (and so needs both).
        self._preference_states: dict[str, PreferenceState] = {}  # the default preference of each adapter
        self._replaced_during_injection: list[tuple[nn.Module, str, nn.Module]] = []
        self._merge_lock = _per_call.MergeLock()  # calls read merged weights; merges rewrite them in place
        self._traced_batch: tuple | None = None  # the batch of the PeftModel call dynamo traces (see PeftModel.forward)
        super().__init__(model, peft_config, adapter_name, **kwargs)

    # ---- injection ----------------------------------------------------------------------------------------------
    def _preference_state(self, adapter_name: str, config: PaLoRAConfig) -> PreferenceState:
        state = self._preference_states.get(adapter_name)
        if state is None or state.num_tasks != config.num_tasks:
            start = None
            if config.default_preference is not None:
                start = validate_preference(
                    config.default_preference, config.num_tasks, config.task_names, name="default_preference"
                )
            state = PreferenceState(config.num_tasks, start)
            self._preference_states[adapter_name] = state
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
        if palora_config.train_base_weights:
            check_base_weights_trainable(target, current_key)  # quantised weights cannot train
        if isinstance(target, PaLoRALayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = dispatch_layer(target, adapter_name, conv_layout=palora_config.conv_layout, **kwargs)
        if new_module is None:
            raise TypeError(
                f"Target module '{current_key}' ({type(target).__name__}) is not supported by PaLoRA. Supported: "
                "torch.nn.Linear, transformers' Conv1D, torch.nn.Embedding, torch.nn.Conv1d/2d/3d, bitsandbytes' "
                "Linear4bit and Linear8bitLt."
            )
        new_module.batch_dim = _batch_dim_of(self.model, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # adding a further adapter does not make it trainable
        self._replace_module(parent, target_name, new_module, target)
        self._replaced_during_injection.append((parent, target_name, target))

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        self._replaced_during_injection = []
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            self._record_base_weight_training(adapter_name)
        except BaseException as error:
            # A refused injection must not leave the user's model half-adapted: put back every replaced layer.
            for parent, target_name, original in reversed(self._replaced_during_injection):
                setattr(parent, target_name, original)
            if not isinstance(error, ValueError) or "not found in the base model" not in str(error):
                raise
            adaptable = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                                if name and dispatch_layer_type_supported(module)})
            raise type(error)(f"{error} Layers of this model that PaLoRA can adapt: {adaptable}.") from error
        finally:
            self._replaced_during_injection = []

    def _post_injection_hook(self, model: nn.Module, config: PaLoRAConfig, adapter_name: str) -> None:
        if hasattr(model, "add_model_tags"):  # transformers models: PEFT copies these tags into the model card
            model.add_model_tags(["palora"])

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
        if isinstance(preference, _per_call.Validated):
            return preference[adapter_name]
        config = self.peft_config[adapter_name]
        if _is_list_of_mappings(preference):  # one {task: weight} dict per sample (e.g. one per user)
            rows = [validate_preference(row, config.num_tasks, config.task_names, name=f"preference[{i}]")
                    for i, row in enumerate(preference)]
            return torch.stack([row.reshape(-1) if row.dim() == 1 else row for row in rows])
        return validate_preference(preference, num_tasks=config.num_tasks, task_names=config.task_names)

    def _target_adapters(self, adapter_name: str | None) -> list[str]:
        if adapter_name is not None:
            if adapter_name not in self.peft_config:
                raise ValueError(f"Unknown adapter {adapter_name!r}; adapters: {sorted(self.peft_config)}.")
            return [adapter_name]
        return [name for name in self.active_adapters if isinstance(self.peft_config[name], PaLoRAConfig)]

    def set_preference(self, preference: PreferenceLike, adapter_name: str | None = None) -> None:
        """Set the default preference: the one every call uses that does not pass its own `preference=`.

        The default is replaced as a whole (never edited in place), so calls running in other threads use either the
        old or the new value throughout. A shared `(T,)` default is also recorded in the adapter's config
        (`default_preference`), so `save_pretrained` stores the chosen trade-off and a reload starts at it.

        The stored default is detached from autograd (it outlives any one backward). To differentiate with respect to
        the preference (e.g. to search a trade-off), pass a tensor that requires grad as the per-call `preference=`:
        it stays in the graph.

        Args:
            preference: shape `(T,)` (one trade-off for the whole batch), `(batch, T)` (one per sample), a dict
                `{task_name: weight}` when the config has `task_names`, or a list of such dicts (one per sample).
                Must be finite, non-negative and sum to 1 (tolerance 1e-4); nothing is renormalised silently.
            adapter_name: the adapter to set; all active adapters by default.

        Raises:
            ValueError: the preference is malformed, or the adapter is merged and the preference is per-sample
                (unmerge first).
        """
        names = self._target_adapters(adapter_name)
        validated = {name: self._validate_for_adapter(preference, name) for name in names}  # all checks first
        for name, value in validated.items():
            self._check_mergeable_if_merged(name, value)
        merged = any(self._merged_layers(name) for name in validated)
        # A merged model's weights hold the default: calls running in other threads must not see them half-rewritten.
        with self._merge_lock.writing() if merged else nullcontext():
            for name, value in validated.items():
                self._preference_states[name].value = value
                self.peft_config[name].default_preference = value.tolist() if value.dim() == 1 else None
            for name in validated:
                for layer in self._merged_layers(name):
                    layer.remerge()

    def get_preference(self, adapter_name: str | None = None) -> torch.Tensor:
        """The preference in force (a copy): inside a call or `preference_context`, that one; else the default."""
        names = self._target_adapters(adapter_name)
        if not names:
            raise ValueError("No active PaLoRA adapter.")
        snapshot = _per_call.current()
        if snapshot is not None and names[0] in snapshot.values:
            return snapshot.values[names[0]].detach().clone()
        return self._preference_states[names[0]].value.clone()

    def preference_context(
        self, preference: PreferenceLike, adapter_name: str | None = None
    ) -> _per_call.ScopedPreferences:
        """Run a block at `preference`: the calls made while the block's code runs use it (also in functions it
        calls); the default, other threads, and the caller of a generator paused inside the block are not affected.
        """
        names = self._target_adapters(adapter_name)
        enclosing = _per_call.current()
        values = dict(enclosing.values) if enclosing is not None else {}
        values.update({name: self._validate_for_adapter(preference, name) for name in names})
        return _per_call.ScopedPreferences(_per_call.CallPreferences(values))

    @torch.compiler.disable
    def _validated_outside_graph(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """`kwargs` with a non-tensor `preference=` given to a compiled model validated eagerly (one graph break before
        the call's graph) into a tensor per adapter, so its values enter the graph as an input, not as constants."""
        preference = kwargs["preference"]
        validated = {name: self._validate_for_adapter(preference, name) for name in self._target_adapters(None)}
        return {**kwargs, "preference": _per_call.Validated(validated)}

    def _merged_layers(self, adapter_name: str) -> list[PaLoRALayer]:
        return [layer for _, layer in self._palora_layers(adapter_name) if adapter_name in layer.merged_adapters]

    def _check_mergeable_if_merged(self, adapter_name: str, value: torch.Tensor) -> None:
        if value.dim() == 2 and self._merged_layers(adapter_name):
            raise ValueError(
                f"Adapter '{adapter_name}' is merged into the weights, which hold ONE preference; a per-sample "
                f"default preference of shape {tuple(value.shape)} needs `unmerge_adapter()` first (a per-sample "
                "`preference=` for one call works on a merged model)."
            )

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Fix the preferences of one call (PeftModel strips `preference=` before calling the base model).

        The snapshot is the per-call `preference=` where given, else the enclosing `preference_context`'s, else the
        default; it reaches the layers through a context variable (`_per_call`), never through shared state.

        Traced by `torch.compile`, the same values reach the layers through each adapter's `PreferenceState.call`,
        written and restored inside the traced call (a side effect of the trace, not a write at run time): the
        preference is an input of the graph, with no graph break in the layers (see `_per_call`). Compiled calls do
        not take the merge lock: re-merge a compiled merged model (`set_preference`) between calls, not during them.
        """
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "`adapter_names=` (PEFT's mixed-adapter batches) is not supported by PaLoRA models. To give samples "
                "different trade-offs, pass a per-sample `preference=` of shape (batch, T); to switch adapters, use "
                "`set_adapter`."
            )
        preference = kwargs.get("preference")
        compiling = _per_call.compiling()
        enclosing = _per_call.enclosing_for_graph() if compiling else _per_call.current()
        values = {}
        for name in self._target_adapters(None):
            if preference is not None:
                values[name] = self._validate_for_adapter(preference, name)
            elif enclosing is not None and name in enclosing.values:
                values[name] = enclosing.values[name]
            else:
                values[name] = self._preference_states[name].value
        batch = _per_call.batch_of(args, kwargs) or (self._traced_batch if compiling else _per_call.call_batch())
        for value in values.values():
            if value.dim() == 2 and batch is not None and value.shape[0] != batch[0]:
                raise ValueError(
                    f"The per-sample preference has {value.shape[0]} rows but the model was called with "
                    f"{batch[0]} samples (`{batch[1]}` has shape {batch[2]}); give exactly one preference row per "
                    "sample, or one (T,) preference for the whole batch."
                )
        if compiling:
            states = [(self._preference_states[name], value) for name, value in values.items()]
            previous = [state.call for state, _ in states]
            for state, value in states:
                state.call = (value, 1)
            try:
                yield
            finally:
                for (state, _), call in zip(states, previous):
                    state.call = call
            return
        expansion = _generation_expansion(self.model, kwargs) if _per_call.generating() else 1
        if self.training:
            _per_call.preserve_in_checkpointing(self.model)
        with self._merge_lock.reading(), _per_call.call_preferences(_per_call.CallPreferences(values, expansion)):
            yield

    # ---- merging ------------------------------------------------------------------------------------------------
    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        check_merge_allowed(self.model)  # 4-bit bases refuse before any layer is merged
        _check_no_tied_targets(self.model)
        for name in self._target_adapters(None):
            value = self._preference_states[name].value
            if value.dim() == 2:
                raise ValueError(
                    f"Adapter '{name}' has a per-sample preference of shape {tuple(value.shape)}; a merge bakes ONE "
                    "preference into the weights. Call `set_preference` with a (T,) preference first."
                )

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge the adapters into the base weights at the preference in force.

        The weight gets `W + delta(lambda)` in place and only lambda (T floats) is remembered: `unmerge_adapter`
        subtracts the same delta. A later `set_preference` re-merges; a call with its own `preference=` adds the
        adapters at the difference, without touching the weights.
        """
        self._check_merge_allowed()
        with self._merge_lock.writing():
            super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Subtract the merged adapters from the base weights again (waits for running calls to finish)."""
        with self._merge_lock.writing():
            super().unmerge_adapter()

    def export_lora(
        self, save_directory: str, preference: PreferenceLike | None = None, adapter_name: str | None = None
    ) -> str:
        """Write a standard PEFT LoRA bundle equal to this model at `preference` (the one in force when None).

        See [`peft_palora.interop.lora.export_lora`].
        """
        from peft_palora.tuner.conversion import export_lora

        return export_lora(self, save_directory, preference=preference, adapter_name=adapter_name)

    def export_task_loras(self, save_directory: str, adapter_name: str | None = None) -> str:
        """Write each task adapter as a standard PEFT LoRA bundle (`save_directory/<task_name>/`) and
        `save_directory/palora_tasks.json`, the task order and the rule that mixes them: the model at `lambda` is
        `add_weighted_adapter(tasks, weights=lambda, combination_type="cat")` of those LoRAs in plain PEFT.

        See [`peft_palora.tuner.conversion.export_task_loras`].
        """
        from peft_palora.tuner.conversion import export_task_loras

        return export_task_loras(self, save_directory, adapter_name=adapter_name)

    # ---- PEFT's LoRA conversion (peft.convert_to_lora / peft.save_as_lora) --------------------------------------
    def _record_base_weight_training(self, adapter_name: str) -> None:
        """Tell each layer whether `adapter_name` trains its base weight (its LoRA conversion depends on it)."""
        config = self.peft_config.get(adapter_name)
        trains = bool(getattr(config, "train_base_weights", False))
        for _, layer in self._palora_layers(adapter_name):
            layer.trains_base_weights[adapter_name] = trains

    def lora_conversion_refusals(self, adapter_name: str = "default") -> dict[str, str]:
        """`{layer path: reason}` for every PaLoRA layer that `peft.convert_to_lora` cannot convert (PEFT itself
        only names the layer types). Empty when the whole adapter converts, at the preference in force."""
        return {
            name: reason
            for name, layer in self._palora_layers(adapter_name)
            if (reason := layer.lora_conversion_refusal(adapter_name)) is not None
        }

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's conversion protocol: whether every PaLoRA layer of `adapter_name` converts (see
        `lora_conversion_refusals` for the reasons when not)."""
        if not any(True for _ in self._palora_layers(adapter_name)):
            return False
        return not self.lora_conversion_refusals(adapter_name)

    # ---- saving and loading -------------------------------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # bias="all" collects every bias, also those inside modules_to_save wrappers, which PEFT saves on their own
        # (as `<module>.bias`): the wrapper's copy and its frozen original would be saved twice and could not be
        # loaded back.
        for key in [key for key in to_return if _is_wrapped_copy_bias(key)]:
            del to_return[key]
        if getattr(config, "train_base_weights", False):
            to_return.update({key: state_dict[key] for key in _base_weight_keys(model, adapter_name, state_dict)})
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # Bundles saved before that was fixed hold `<module>.modules_to_save.bias`, a duplicate of `<module>.bias`.
        state_dict = {key: value for key, value in state_dict.items() if not key.endswith(".modules_to_save.bias")}
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_tensors(remapped, f"The PaLoRA bundle for adapter '{adapter_name}'")
        _check_bundle_matches_model(model, config, adapter_name, remapped)
        raise_pending_meaning_problem()  # the shapes fit: now whether the config reads them as they were saved
        return remapped


def _check_no_tied_targets(model: nn.Module) -> None:
    """Refuse to merge into a weight another module shares (e.g. an input embedding tied to the output head):
    the merge would change that module too, so the merged model would not equal the unmerged one."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for name, module in model.named_modules():
        if isinstance(module, PaLoRALayer):
            names = owners.get(id(module.get_base_layer().weight), [])
            others = [other for other in names if not other.startswith(f"{name}.")]
            if others:
                raise ValueError(
                    f"Cannot merge into '{name}': its weight is tied to {others} (e.g. tie_word_embeddings=True), "
                    "so merging would change those modules too. Serve the adapters unmerged, export the trade-off "
                    "with `export_lora(...)`, or untie the weights before adapting (e.g. load the model with "
                    "`tie_word_embeddings=False`)."
                )


def _is_wrapped_copy_bias(key: str) -> bool:
    return key.endswith(".bias") and (".modules_to_save." in key or ".original_module." in key)


def _is_list_of_mappings(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(row, Mapping) for row in value)


def _batch_dim_of(model: nn.Module, key: str) -> int:
    """Where the samples are in the input of the layer at `key`: dimension 1 inside a module built with
    `batch_first=False` (e.g. `nn.TransformerEncoderLayer`, which feeds its linears (seq, batch, features)), else 0.
    The innermost such module decides. (`nn.MultiheadAttention` itself reads its projection weights directly, so
    its `out_proj` cannot be adapted by any layer-wrapping tuner.)"""
    batch_dim, module = 0, model
    for part in [None, *key.split(".")[:-1]]:  # the model itself first, then each ancestor of the layer
        module = module if part is None else getattr(module, part, None)
        if module is None:
            break
        batch_first = getattr(module, "batch_first", None)
        attention = getattr(module, "self_attn", None)
        if not isinstance(batch_first, bool) and isinstance(attention, nn.MultiheadAttention):
            batch_first = attention.batch_first  # nn.TransformerEncoderLayer/DecoderLayer keep it there only
        if isinstance(batch_first, bool):
            batch_dim = 0 if batch_first else 1
    return batch_dim


def _generation_expansion(model: nn.Module, kwargs: Mapping[str, Any]) -> int:
    """How many rows `generate` makes of each sample: max(num_beams, num_return_sequences), as transformers expands
    the inputs, from the call's arguments, its `generation_config`, or the model's."""
    configs = [kwargs, kwargs.get("generation_config"), getattr(model, "generation_config", None)]

    def first(attribute: str) -> int:
        for config in configs:
            value = config.get(attribute) if isinstance(config, Mapping) else getattr(config, attribute, None)
            if value is not None:
                return int(value)
        return 1

    return max(1, first("num_beams"), first("num_return_sequences"))


def _base_weight_keys(model: nn.Module, adapter_name: str, state_dict: Mapping[str, Any]) -> list[str]:
    """State-dict keys of the base weights (and biases) of the layers that carry `adapter_name`."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, PaLoRALayer) and adapter_name in module.palora_A:
            name = _state_dict_name(name)
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
    # What the config says the bundle holds: nothing else may overwrite the base model.
    # PEFT saves the full table of a targeted embedding, and the input and output embeddings (`embed_tokens`,
    # `lm_head`) of a transformers model whose vocabulary was resized (`save_embedding_layers="auto"` or True),
    # targeted or not: declared by PEFT's own convention, and loaded by PEFT's LoRA.
    embedding_tables = {
        f"{_state_dict_name(name)}.base_layer.weight"
        for name, module in model.named_modules()
        if isinstance(module, PaLoRALayer) and isinstance(module.get_base_layer(), nn.Embedding)
    }
    embedding_prefixes = _saved_embedding_prefixes(model)
    foreign = sorted(
        key for key in given
        if key in model_state and key not in expected | embedding_tables
        and not key.startswith(embedding_prefixes)
        and not _allowed_extra_key(key, config, adapter_name)
    )
    if foreign:
        problems.append(
            "tensors the config does not declare (they would overwrite base weights: with train_base_weights="
            f"{config.train_base_weights}, bias={config.bias!r} and modules_to_save={config.modules_to_save}, a "
            f"bundle holds only adapters, those base layers and modules): {_short_list(foreign)}"
        )
    ignore_mismatched = mismatched_sizes_ignored()
    for key, value in checkpoint.items():
        key = model_key(key)
        if ignore_mismatched:
            continue  # PEFT skips (and reports) mismatched tensors when asked to
        if key in model_state and tuple(value.shape) != tuple(model_state[key].shape):
            problems.append(
                f"shape of {key}: bundle {tuple(value.shape)}, model {tuple(model_state[key].shape)} (the config says "
                f"num_tasks={config.num_tasks}, r={config.r}"
                + (f", rank_pattern={config.rank_pattern}" if getattr(config, "rank_pattern", None) else "")
                + ", so adapters hold num_tasks*r directions)"
            )
    if problems:
        raise ValueError(f"The PaLoRA bundle for adapter '{adapter_name}' does not match the model: " + "; ".join(problems))


def _state_dict_name(name: str) -> str:
    """A module name as the state dict spells it: FSDP1 wrappers (``_fsdp_wrapped_module.``, at any depth) removed."""
    return name.replace("_fsdp_wrapped_module.", "")


def _saved_embedding_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes (``"<module>."``) of the input and output embeddings PEFT saves with an adapter when the
    vocabulary was resized (``get_peft_model_state_dict(save_embedding_layers=...)``): every tensor under them."""
    modules = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)() if hasattr(model, getter) else None
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None:
            modules.append(module)
    if not modules:
        return ()
    prefixes = []
    for name, module in model.named_modules():
        name = _state_dict_name(name)
        # Only under PEFT's embedding names (`embed_tokens`, `lm_head`): another model's embedding table is a base
        # weight a bundle may not overwrite unless its config declares it (as `modules_to_save` or a target).
        if any(module is wanted for wanted in modules) and any(
            re.match(rf"(.*\.)?{embedding}$", name) for embedding in EMBEDDING_LAYER_NAMES
        ):
            prefixes.append(f"{name}.")
    return tuple(prefixes)


def _allowed_extra_key(key: str, config: PaLoRAConfig, adapter_name: str) -> bool:
    """Keys a bundle may hold besides the adapters and trained base layers: modules_to_save copies and the biases
    that `bias` trains."""
    if f".modules_to_save.{adapter_name}." in key:
        return True
    if config.bias == "all" and key.endswith(".bias"):
        return True
    return config.bias == "palora_only" and key.endswith(".base_layer.bias")


def _short_list(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def palora_layers(model: nn.Module) -> list[BaseTunerLayer]:
    """All PaLoRA layers of a model (handy for inspection and tests)."""
    return [module for module in model.modules() if isinstance(module, PaLoRALayer)]

