"""Checks of PaLoRA bundles before PEFT reads them, and the rollback of a refused load.

* `check_local_bundle`: the files of a local bundle (config JSON, fields, safetensors readable; never a pickle), and
  the meaning recorded in the safetensors metadata (`bundle_metadata`) against the config.
* `check_adapter_tensors`: every tensor a bundle loads is a finite floating-point tensor.
* `check_modules_to_save_present`: a config that lists `modules_to_save` must come with their tensors.
* `mismatched_sizes_ignored`: whether the running load passed `ignore_mismatched_sizes=True`, for the tuner's check.
* `restore_base_model`: undo an injection whose weights could not be loaded (PaLoRA layers and modules_to_save
  wrappers), so a refused `PeftModel.from_pretrained` leaves the user's model as it was.
"""

from __future__ import annotations

import contextvars
import json
import os
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, PeftType
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from peft_palora.tuner.layer import PaLoRALayer
from peft_palora.utils.context import contextvar_scope

PALORA = "PALORA"
_PEFT_PREFIX = "base_model.model."


def local_bundle_dir(model_id: Any, subfolder: str | None) -> str | None:
    """The local directory `model_id` (and `subfolder`) names, or None for a Hub id or a missing path."""
    if not isinstance(model_id, (str, os.PathLike)):
        return None
    path = os.path.join(model_id, subfolder) if subfolder else os.fspath(model_id)
    return path if os.path.isdir(path) else None


def check_local_bundle(directory: str, check_meaning: bool = False) -> dict | None:
    """Validate a local PaLoRA bundle's files; returns its config dict, or None when it is not a PaLoRA bundle.

    ``check_meaning=True`` also checks the safetensors metadata against the config (`check_bundle_metadata`). A load
    leaves that to the tuner's load check (see `pending_meaning_problem`), which reports a shape mismatch, the more
    specific error, first.
    """
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
    if check_meaning:
        check_bundle_metadata(weights_path, config)
    return config


# What a bundle's tensors mean, recorded in the safetensors header (`__metadata__`, string values only) when a PaLoRA
# model is saved: the weights alone hold only T*r directions per layer, so a config edited from T=3, r=2 to T=2,
# r=3 (or with its task names reordered) would load them silently with another meaning.
METADATA_FORMAT_VERSION = "1"
_METADATA_FIELDS = ("num_tasks", "r", "task_names", "conv_layout")


def bundle_metadata(config: Any) -> dict[str, str]:
    """The safetensors metadata recording the meaning of a PaLoRA adapter's tensors (a config object or dict)."""
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    metadata = {"palora_format_version": METADATA_FORMAT_VERSION}
    for field in _METADATA_FIELDS:
        metadata[f"palora_{field}"] = json.dumps(get(field))
    return metadata


def check_bundle_metadata(weights_path: str, config: dict) -> None:
    """Refuse a bundle whose config says something else than its safetensors file records (T, r, task names,
    conv layout). Bundles saved before the metadata was written (no ``palora_format_version``) are not checked."""
    problem = bundle_meaning_problem(weights_path, config)
    if problem is not None:
        raise ValueError(problem)


def bundle_meaning_problem(weights_path: str, config: dict) -> str | None:
    """The message of `check_bundle_metadata`, or None when the bundle's metadata agrees with ``config``."""
    from safetensors import safe_open

    try:
        with safe_open(weights_path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error type for a torn or foreign file
        raise ValueError(f"{weights_path} is not a readable safetensors file (truncated or damaged?): {error}") from error
    if "palora_format_version" not in metadata:
        return None
    problems = []
    for field in _METADATA_FIELDS:
        key = f"palora_{field}"
        if key not in metadata:
            continue
        try:
            recorded = json.loads(metadata[key])
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(f"{weights_path} has unreadable metadata {key}={metadata[key][:80]!r}.") from None
        given = config.get(field)
        if field == "num_tasks" and given is None and isinstance(config.get("task_names"), list):
            given = len(config["task_names"])
        if field == "conv_layout" and given is None:
            given = "peft"
        if given != recorded:
            problems.append(f"{field}: the tensors were saved with {recorded!r}, the config says {given!r}")
    if not problems:
        return None
    return (
        f"{weights_path} does not mean what {os.path.join(os.path.dirname(weights_path), CONFIG_NAME)} says ("
        + "; ".join(problems) + "). The config was edited or belongs to another bundle; loading would give the "
        "adapters another meaning."
    )


_PENDING_MEANING_PROBLEM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "palora_pending_meaning_problem", default=None
)


def pending_meaning_problem(problem: str | None) -> AbstractContextManager[str | None]:
    """Carry a metadata disagreement found before a load to the tuner's load check, which raises it once the
    tensors' shapes are known to fit (a shape mismatch is reported first, as the more specific error)."""
    return contextvar_scope(_PENDING_MEANING_PROBLEM, problem)


def raise_pending_meaning_problem() -> None:
    problem = _PENDING_MEANING_PROBLEM.get()
    if problem is not None:
        raise ValueError(problem)


def check_adapter_tensors(tensors: dict, where: str) -> None:
    """Every tensor of a bundle must be a finite floating-point tensor (no NaN/inf, no integer or bool weights)."""
    import torch

    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            continue
        if not value.dtype.is_floating_point:
            raise ValueError(f"{where}: tensor {key!r} has dtype {value.dtype}; adapter weights must be floating point.")
        if value.numel() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: tensor {key!r} holds NaN or infinite values.")


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


def missing_saved_adapters(model: nn.Module, adapter_name: str, saved_keys: set[str]) -> list[str]:
    """The adapter tensors of `adapter_name` that a just-saved bundle lacks (PEFT's saved names: no adapter name).

    A state dict taken from inside a nested FSDP1 wrapper, or a user's `state_dict=` without some adapters, would
    otherwise write a bundle that cannot be loaded back (PEFT's LoRA loads such a bundle without its adapters)."""
    missing = []
    for name, module in model.named_modules():
        if isinstance(module, PaLoRALayer) and adapter_name in module.palora_A:
            name = name.replace("_fsdp_wrapped_module.", "")
            missing += [key for attr in PaLoRALayer.adapter_layer_names if (key := f"{name}.{attr}") not in saved_keys]
    return missing


_LOAD_FUNCTION = ("peft.utils.save_and_load", "set_peft_model_state_dict")


def mismatched_sizes_ignored() -> bool:
    """Whether the running load is `set_peft_model_state_dict(..., ignore_mismatched_sizes=True)` (PEFT then skips
    mismatched tensors and warns, so the tuner's check must not refuse them).

    Every load path goes through that function: `PeftModel.from_pretrained`, `load_adapter`, `AutoPeftModel*`, and
    users who call it directly. It calls the tuner's `_remap_adapter_state_dict_for_load` hook without the flag, so
    the flag is read from that function's frame. What would break it: a PEFT that renames the function or its
    argument, or calls the hook from elsewhere; then this answers False and mismatched shapes are refused as without
    the flag (`tests/test_registration.py` checks the frame on the installed PEFT).
    """
    frame = sys._getframe(1)
    while frame is not None:
        if (frame.f_globals.get("__name__"), frame.f_code.co_name) == _LOAD_FUNCTION:
            return frame.f_locals.get("ignore_mismatched_sizes") is True
        frame = frame.f_back
    return False


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


# The config fields that fix what an adapter's tensors mean: a bundle loaded into an existing adapter must agree.
_MEANING_FIELDS = ("num_tasks", "task_names", "r", "rank_pattern", "palora_alpha", "alpha_pattern", "target_modules",
                   "exclude_modules", "layers_to_transform", "layers_pattern", "conv_layout")


def _comparable(field: str, value: Any) -> Any:
    if field in ("target_modules", "exclude_modules") and isinstance(value, (list, tuple, set, frozenset)):
        return sorted(value)
    if field in ("rank_pattern", "alpha_pattern") and not value:
        return {}
    if field == "layers_to_transform" and isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if field == "palora_alpha" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def check_existing_adapter_matches(existing: Any, bundle_config: dict, directory: str, adapter_name: str) -> None:
    """Refuse to load a bundle into an existing adapter whose config gives its tensors another meaning.

    PEFT loads the tensors of a bundle into an adapter that already exists without reading the bundle's config:
    reordered task names would select the wrong task, another T or r another split of the same directions.
    """
    problems = []
    for field in _MEANING_FIELDS:
        if field not in bundle_config:
            continue
        have = getattr(existing, field, None)
        given = bundle_config[field]
        if field == "num_tasks" and given is None and isinstance(bundle_config.get("task_names"), list):
            given = len(bundle_config["task_names"])
        if field == "conv_layout" and given is None:
            given = "peft"
        if _comparable(field, have) != _comparable(field, given):
            problems.append(f"{field}: adapter {have!r}, bundle {given!r}")
    if problems:
        raise ValueError(
            f"Cannot load {os.path.join(directory, CONFIG_NAME)} into the existing adapter '{adapter_name}': its "
            "config differs in what the tensors mean (" + "; ".join(problems) + "). Load it under a new "
            "`adapter_name`, or delete the adapter first."
        )


def check_output_apart_from_input(output: str | os.PathLike, source: str | os.PathLike, output_name: str,
                                  source_name: str) -> None:
    """Refuse an output folder that is, contains or lies inside an input bundle (symlinks resolved): writing it
    would replace or mix into the very bundle being read."""
    out, src = os.path.realpath(output), os.path.realpath(source)
    if out == src:
        relation = "is"
    elif out.startswith(src.rstrip(os.sep) + os.sep):
        relation = "is inside"
    elif src.startswith(out.rstrip(os.sep) + os.sep):
        relation = "contains"
    else:
        return
    raise ValueError(
        f"{output_name} {os.fspath(output)!r} {relation} the {source_name} {os.fspath(source)!r} (resolved: {out!r}, "
        f"{src!r}); writing there would destroy or change its input. Choose a folder outside it."
    )


def loaded_bundle_dir(config: Any) -> str | None:
    """The local folder an adapter was loaded from (recorded by the PaLoRA `load_adapter`), or None."""
    return getattr(config, "_palora_loaded_from", None)
