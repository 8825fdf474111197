"""Checks of PaLoRA bundles before PEFT reads them, and the rollback of a refused load.

* `check_local_bundle`: the files of a local bundle (config JSON, fields, safetensors readable; never a pickle).
* `check_modules_to_save_present`: a config that lists `modules_to_save` must come with their tensors.
* `ignoring_mismatched_sizes`: carries `from_pretrained(..., ignore_mismatched_sizes=True)` to the tuner's load check.
* `restore_base_model`: undo an injection whose weights could not be loaded (PaLoRA layers and modules_to_save
  wrappers), so a refused `PeftModel.from_pretrained` leaves the user's model as it was.
"""

from __future__ import annotations

import contextvars
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, PeftType
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from peft_palora.tuner.layer import PaLoRALayer

PALORA = "PALORA"
_PEFT_PREFIX = "base_model.model."


def local_bundle_dir(model_id: Any, subfolder: str | None) -> str | None:
    """The local directory `model_id` (and `subfolder`) names, or None for a Hub id or a missing path."""
    if not isinstance(model_id, (str, os.PathLike)):
        return None
    path = os.path.join(model_id, subfolder) if subfolder else os.fspath(model_id)
    return path if os.path.isdir(path) else None


def check_local_bundle(directory: str) -> dict | None:
    """Validate a local PaLoRA bundle's files; returns its config dict, or None when it is not a PaLoRA bundle."""
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {type(error).__name__}: {str(error)[:200]}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}.")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in PeftType.__members__:
        raise ValueError(
            f"{config_path} has peft_type {str(peft_type)[:80]!r}, which this PEFT installation does not know "
            f"(e.g. {PALORA!r} for PaLoRA, after `import peft_palora`)."
        )
    if peft_type != PALORA:
        return None

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    PaLoRAConfig = PEFT_TYPE_TO_CONFIG_MAPPING[PALORA]  # the registered class (tuner.config imports this module)
    known = set(PaLoRAConfig.__dataclass_fields__)
    unknown = sorted(set(config) - known - {"runtime_config"})
    if unknown:
        raise ValueError(f"{config_path} has fields PaLoRAConfig does not know: {unknown}.")
    try:
        PaLoRAConfig(**{k: v for k, v in config.items() if k in known and k != "peft_type"})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path} is not a valid PaLoRA config: {error}") from error

    weights_path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        pickled = os.path.isfile(os.path.join(directory, WEIGHTS_NAME))
        raise ValueError(
            f"No {SAFETENSORS_WEIGHTS_NAME} in {directory}"
            + (f"; PaLoRA does not load the pickle file {WEIGHTS_NAME}." if pickled else ".")
        )
    bundle_keys(directory)  # readable?
    return config


def bundle_keys(directory: str) -> set[str]:
    """The tensor names of a bundle's safetensors file (its header only is read)."""
    from safetensors import safe_open

    weights_path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
    try:
        with safe_open(weights_path, framework="pt") as handle:
            return set(handle.keys())
    except Exception as error:  # safetensors raises its own error type for a torn or foreign file
        raise ValueError(f"{weights_path} is not a readable safetensors file (truncated or damaged?): {error}") from error


def check_modules_to_save_present(peft_model: nn.Module, directory: str, config: dict) -> None:
    """Every module the bundle's config lists in `modules_to_save` must have its tensors in the bundle.

    PEFT would otherwise fail with a bare `KeyError` deep inside `set_peft_model_state_dict`.
    """
    wanted = config.get("modules_to_save") or []  # `config`: the bundle's config, as check_local_bundle read it
    if not wanted:
        return
    keys = bundle_keys(directory)
    missing = []
    base = peft_model.get_base_model()
    for name, module in base.named_modules():
        if not name or not any(name == target or name.endswith(f".{target}") for target in wanted):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        elif any(isinstance(parent, ModulesToSaveWrapper) for parent in _ancestors(base, name)):
            continue  # inside a wrapper already counted
        for param in module.state_dict():
            key = f"{_PEFT_PREFIX}{name}.{param}"
            if key not in keys:
                missing.append(key)
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise ValueError(
            f"{os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)} lacks the tensors of modules_to_save "
            f"{wanted} that its config lists: {shown}."
        )


def _ancestors(model: nn.Module, name: str) -> Iterator[nn.Module]:
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield model.get_submodule(".".join(parts[:i]))


_IGNORE_MISMATCHED: contextvars.ContextVar[bool] = contextvars.ContextVar("palora_ignore_mismatched", default=False)


@contextmanager
def ignoring_mismatched_sizes(ignore: bool) -> Iterator[None]:
    token = _IGNORE_MISMATCHED.set(ignore)
    try:
        yield
    finally:
        _IGNORE_MISMATCHED.reset(token)


def mismatched_sizes_ignored() -> bool:
    """Whether the running load passed `ignore_mismatched_sizes=True` (mismatched tensors are then skipped)."""
    return _IGNORE_MISMATCHED.get()


def restore_base_model(model: nn.Module, adapter_name: str) -> None:
    """Put back the base layers and modules that carry only `adapter_name` (undo an injection PEFT could not finish)."""
    for name, module in list(model.named_modules()):
        replacement = None
        if isinstance(module, PaLoRALayer) and set(module.palora_A.keys()) <= {adapter_name}:
            replacement = module.get_base_layer()
        elif isinstance(module, ModulesToSaveWrapper) and set(module.modules_to_save.keys()) <= {adapter_name}:
            replacement = module.original_module
        if replacement is not None and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, replacement)
    if getattr(model, "peft_config", None) is not None and set(model.peft_config) <= {adapter_name}:
        del model.peft_config
