"""Safe saving and loading of PaLoRA bundles through PEFT's own `PeftModel` methods.

`PeftModel.save_pretrained`, `from_pretrained` and `load_adapter` are shared by every PEFT method, so PaLoRA wraps
them (once, idempotently) and changes nothing for other methods. For PaLoRA bundles the wrappers add:

* atomic saves: files are staged inside the target directory and moved over the old ones with `os.replace`;
* safetensors only: `.bin` (pickle) bundles are neither written nor read, not even with `weights_only=True`;
* loud, early errors: an unreadable or truncated `adapter_model.safetensors`, a config that is not JSON, has an
  unknown `peft_type` or lacks a field, are reported with the file's path before PEFT touches the model;
* no half-adapted models: if PEFT refuses the weights after it injected the layers (shape or layer mismatch), the
  injected PaLoRA layers are removed again, so the base model the user passed in is as it was.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from typing import Any

from peft import PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, PeftType
from torch import nn

from ._atomic import atomic_directory
from .hub import is_palora_model
from .layer import PaLoRALayer

PALORA = "PALORA"


def _local_bundle_dir(model_id: Any, subfolder: str | None) -> str | None:
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
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}.")
    peft_type = config.get("peft_type")
    if peft_type not in PeftType.__members__:
        raise ValueError(
            f"{config_path} has peft_type {peft_type!r}, which this PEFT installation does not know "
            f"(e.g. {PALORA!r} for PaLoRA, after `import peft_palora`)."
        )
    if peft_type != PALORA:
        return None

    from .config import PaLoRAConfig

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
    from safetensors import safe_open

    try:
        with safe_open(weights_path, framework="pt") as handle:
            handle.keys()
    except Exception as error:  # safetensors raises its own error type for a torn or foreign file
        raise ValueError(f"{weights_path} is not a readable safetensors file (truncated or damaged?): {error}") from error
    return config


def _remove_palora_layers(model: nn.Module, adapter_name: str) -> None:
    """Put back the base layers that carry only `adapter_name` (undo an injection PEFT could not finish)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, PaLoRALayer) and set(module.palora_A.keys()) <= {adapter_name}:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if getattr(model, "peft_config", None) is not None and set(model.peft_config) <= {adapter_name}:
        del model.peft_config


def _wrap(owner: type, name: str, make_wrapper) -> None:
    original = getattr(owner, name)
    if getattr(original, "_palora_wrapped", False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    wrapper._palora_wrapped = True
    setattr(owner, name, wrapper)


def _save_pretrained(original):
    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any):
        if not is_palora_model(self):
            return original(self, save_directory, *args, **kwargs)
        if kwargs.get("safe_serialization", True) is False:
            raise ValueError("`safe_serialization=False` is not supported: PaLoRA bundles are safetensors only.")
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory` {save_directory!r} is a file; give a directory.")
        if not kwargs.get("is_main_process", True):
            return None
        with atomic_directory(save_directory) as staging:
            card = os.path.join(save_directory, "README.md")
            if os.path.isfile(card):  # PEFT updates an existing card in place; keep the user's edits
                shutil.copy2(card, os.path.join(staging, "README.md"))
            return original(self, staging, *args, **kwargs)

    return save_pretrained


def _from_pretrained(original):
    def from_pretrained(cls, model: nn.Module, model_id: Any, adapter_name: str = "default", *args: Any, **kwargs: Any):
        local_dir = _local_bundle_dir(model_id, kwargs.get("subfolder"))
        is_palora = local_dir is not None and check_local_bundle(local_dir) is not None
        try:
            return original.__func__(cls, model, model_id, adapter_name, *args, **kwargs)
        except Exception:
            if is_palora or any(isinstance(m, PaLoRALayer) for m in model.modules()):
                _remove_palora_layers(model, adapter_name)
            raise

    return classmethod(from_pretrained)


def _load_adapter(original):
    def load_adapter(self, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any):
        local_dir = _local_bundle_dir(model_id, kwargs.get("subfolder"))
        if local_dir is not None:
            check_local_bundle(local_dir)
        existed = adapter_name in self.peft_config
        try:
            return original(self, model_id, adapter_name, *args, **kwargs)
        except Exception:
            if not existed and adapter_name in self.peft_config and is_palora_model(self):
                self.delete_adapter(adapter_name)
            raise

    return load_adapter


def install() -> None:
    """Install the PaLoRA-aware save/load wrappers on `PeftModel` (idempotent)."""
    _wrap(PeftModel, "save_pretrained", _save_pretrained)
    _wrap(PeftModel, "load_adapter", _load_adapter)
    original = PeftModel.__dict__["from_pretrained"]
    if not getattr(original.__func__, "_palora_wrapped", False):
        wrapped = _from_pretrained(original)
        functools.update_wrapper(wrapped.__func__, original.__func__)
        wrapped.__func__._palora_wrapped = True
        PeftModel.from_pretrained = wrapped
