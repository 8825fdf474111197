"""Standard PEFT LoRA bundles in and out: build PaLoRA from single-task LoRAs, export a saved bundle's trade-off.

:func:`from_lora_adapters` turns T single-task LoRAs of one base model into the T task adapters of a PaLoRA model
that equals LoRA ``t`` at the one-hot preference of task ``t`` and interpolates their weight updates in between,
ready to train the front. :func:`export_lora_from_bundle` loads a saved PaLoRA bundle and writes one trade-off as a
LoRA (the model-level writer is :func:`peft_palora.tuner.conversion.export_lora`).

Only safetensors files are read or written; nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_palora.tuner.bundle import check_adapter_tensors
from peft_palora.tuner.config import PaLoRAConfig
from peft_palora.tuner.conversion import (
    _PREFIX,
    _anchored,
    _conv_refusal,
    _most_common,
    _plain_module_names,
    _target_modules_for,
    export_lora,
    export_task_loras,
)
from peft_palora.tuner.layer import ConvNd, Embedding, Linear
from peft_palora.utils.checks import check_int, check_positive
from peft_palora.utils.json_files import read_json

__all__ = ["export_lora", "export_lora_from_bundle", "from_lora_adapters"]



# LoRA config fields that change nothing PaLoRA has to represent (bookkeeping, the targets, dropout, init schemes
# that leave the base weights alone) or that `from_lora_adapters` reads and folds (ranks, alphas, rsLoRA).
_LORA_FIELDS_READ = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "use_rslora",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "megatron_core",
    "runtime_config", "ensure_weight_tying", "bias", "modules_to_save",
}
# Initialisations that leave the base weights as they are (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA rewrite them, so a
# bundle trained with those is relative to a modified base).
_BASE_PRESERVING_INITS = (True, False, "gaussian", "eva")


# ---- shared helpers -------------------------------------------------------------------------------------------------














# ---- export ---------------------------------------------------------------------------------------------------------








# ---- export from a saved bundle -------------------------------------------------------------------------------------


def export_lora_from_bundle(
    bundle_dir: str | os.PathLike,
    save_directory: str | os.PathLike,
    preference: Any = None,
    base: str | os.PathLike | nn.Module | None = None,
) -> str:
    """Load a saved PaLoRA bundle onto its base model (offline) and :func:`export_lora` it.

    Args:
        bundle_dir: a local PaLoRA bundle folder.
        save_directory: where to write the LoRA bundle.
        preference: the ``(T,)`` preference to export, in any form `export_lora` accepts, or a string as typed on a
            command line: ``"0.7,0.3"`` (task order) or ``"topic=0.7,sentiment=0.3"``. None exports the loaded
            model's preference in force, which is the uniform preference ``1/T`` for a freshly loaded bundle.
        base: the base model: a local folder (``from_pretrained``, offline) or an ``nn.Module``. When None,
            ``<bundle_dir>/base_model`` if it exists, else the bundle's ``base_model_name_or_path`` (a local folder or
            a model in the local Hugging Face cache).

    Returns:
        The path of ``save_directory``.
    """
    if not isinstance(bundle_dir, (str, os.PathLike)) or not os.path.isdir(bundle_dir):
        raise ValueError(f"`bundle_dir` must be an existing folder, got {bundle_dir!r}.")
    if isinstance(preference, str):
        preference = parse_preference_string(preference)
    peft_model = _load_palora_bundle(bundle_dir, base, save_directory)
    return export_lora(peft_model, save_directory, preference=preference)


def export_task_loras_from_bundle(
    bundle: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike | nn.Module | None = None
) -> str:
    """Load a saved PaLoRA bundle onto its base model (offline) and :func:`export_task_loras` it: ``out/<task>/``
    is one plain PEFT LoRA per task and ``out/palora_tasks.json`` the rule that mixes them (``palora export-task-loras``).

    Args:
        bundle: a local PaLoRA bundle folder.
        out: the folder to write.
        base: the base model, as for :func:`export_lora_from_bundle`.

    Returns:
        The path of ``out``.
    """
    return export_task_loras(_load_palora_bundle(bundle, base, out, name="bundle", out_name="out"), out)


def _load_palora_bundle(
    bundle_dir: Any,
    base: str | os.PathLike | nn.Module | None,
    save_directory: Any,
    name: str = "bundle_dir",
    out_name: str = "save_directory",
):
    """The PaLoRA `PeftModel` of a local bundle on its base model (`base`, else ``base_model/``, else the config's),
    once the output folder `save_directory` is known to lie apart from the bundle (an export never replaces its input).
    """
    from peft import PeftModel

    from peft_palora.tuner.bundle import check_local_bundle, check_output_apart_from_input

    if not isinstance(bundle_dir, (str, os.PathLike)) or not os.path.isdir(bundle_dir):
        raise ValueError(f"`{name}` must be an existing folder, got {bundle_dir!r}.")
    bundle_dir = os.fspath(bundle_dir)
    if not isinstance(save_directory, (str, os.PathLike)) or not os.fspath(save_directory):
        raise TypeError(f"`{out_name}` must be a non-empty path, got {save_directory!r}.")
    check_output_apart_from_input(save_directory, bundle_dir, f"`{out_name}`", f"PaLoRA bundle `{name}`")
    config = check_local_bundle(bundle_dir)
    if config is None:
        raise ValueError(f"{bundle_dir} holds no PaLoRA bundle ({CONFIG_NAME} missing or peft_type is not 'PALORA').")
    if isinstance(base, nn.Module):
        base_model = base
    else:
        if base is not None and not isinstance(base, (str, os.PathLike)):
            raise TypeError(f"`base` must be a path, an nn.Module or None, got {type(base).__name__}.")
        bundled = os.path.join(bundle_dir, "base_model")
        if base is not None:
            source = os.fspath(base)
        else:
            source = bundled if os.path.isdir(bundled) else config.get("base_model_name_or_path")
        if not source:
            raise ValueError(
                f"The bundle {bundle_dir} names no base model and has no base_model/ folder; pass `base`."
            )
        base_model = _load_base_model(source, config.get("task_type"), config.get("revision"))
    return PeftModel.from_pretrained(base_model, bundle_dir)


def parse_preference_string(text: str) -> list[float] | dict[str, float]:
    """A preference typed as text: ``"0.7,0.3"`` (task order) or ``"topic=0.7,sentiment=0.3"`` (by task name).

    Only the syntax is checked here; `validate_preference` checks the values against the model's tasks.
    """
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in parts):
        raise ValueError(f"`preference` {text!r} must be comma-separated numbers, e.g. '0.7,0.3'.")
    named = ["=" in part for part in parts]
    if any(named) and not all(named):
        raise ValueError(f"`preference` {text!r} mixes 'task=weight' entries with bare numbers.")
    try:
        if all(named):
            pairs = [part.split("=", 1) for part in parts]
            names = [name.strip() for name, _ in pairs]
            if len(set(names)) != len(names):
                raise ValueError(f"`preference` {text!r} names a task twice.")
            return {name: float(value) for name, (_, value) in zip(names, pairs)}
        return [float(part) for part in parts]
    except ValueError as error:
        if "names a task twice" in str(error):
            raise
        raise ValueError(f"`preference` {text!r} holds something that is not a number: {error}") from error


def _load_base_model(source: str, task_type: str | None, revision: str | None) -> nn.Module:
    import transformers

    auto_classes = {
        "SEQ_CLS": "AutoModelForSequenceClassification",
        "CAUSAL_LM": "AutoModelForCausalLM",
        "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
        "TOKEN_CLS": "AutoModelForTokenClassification",
        "QUESTION_ANS": "AutoModelForQuestionAnswering",
    }
    auto = getattr(transformers, auto_classes.get(task_type or "", "AutoModel"))
    kwargs = {"revision": revision} if revision and not os.path.isdir(source) else {}
    try:
        return auto.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError as error:
        raise ValueError(
            f"Could not load the base model {source!r} offline ({error}); pass `base` (a local folder or a model)."
        ) from error


# ---- import ---------------------------------------------------------------------------------------------------------


class _LoraLayerFactors:
    __slots__ = ("kind", "a", "b", "scaling")

    def __init__(self, kind: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        self.kind, self.a, self.b, self.scaling = kind, a, b, scaling


def _read_lora_bundle(task: str, path: str, model: nn.Module) -> tuple[dict[str, Any], dict[str, _LoraLayerFactors]]:
    """The config and per-layer factors of one LoRA bundle, after checking PaLoRA can represent it on `model`."""
    where = f"LoRA bundle {path!r} (task {task!r})"
    config = read_json(os.path.join(path, CONFIG_NAME), what=f"{where}: config")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where} is not a LoRA bundle: peft_type is {config.get('peft_type')!r}, expected 'LORA'.")
    _check_lora_features(where, config)

    weights_path = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        pickled = os.path.isfile(os.path.join(path, WEIGHTS_NAME))
        raise ValueError(
            f"{where}: no {SAFETENSORS_WEIGHTS_NAME}"
            + (f"; the pickle file {WEIGHTS_NAME} is never loaded (convert it to safetensors)." if pickled else ".")
        )
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{where}: cannot read {weights_path}: {error}") from error
    check_adapter_tensors(state, f"{where}: {weights_path}")

    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    base_params = dict(model.named_parameters())
    for key, value in state.items():
        name = key.removeprefix(_PREFIX)
        match = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)", name)
        if match:
            pieces.setdefault(match.group(1), {})[match.group(2)] = value
            continue
        if "lora_" in name:
            raise ValueError(f"{where}: holds {key!r}, a LoRA feature PaLoRA cannot represent (e.g. DoRA, lora_bias).")
        base_name = name.replace(".base_layer.", ".")
        own = base_params.get(base_name)
        if own is not None and own.shape == value.shape and torch.equal(own.detach().cpu(), value.to(own.dtype)):
            continue  # a saved copy of an unchanged base weight (PEFT saves targeted embeddings' base weights)
        raise ValueError(
            f"{where}: holds {key!r}, a full weight that differs from the base model's (a trained modules_to_save, "
            "bias or embedding). PaLoRA's task adapters are low-rank only; pass `modules_to_save=[...]` to train such "
            "modules afresh, shared by all tasks."
        )

    modules = dict(model.named_modules())
    factors: dict[str, _LoraLayerFactors] = {}
    for module_path, parts in sorted(pieces.items()):
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
        b = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"{where}: layer {module_path!r} has only one of its two LoRA factors.")
        base = modules.get(module_path)
        if base is None:
            raise ValueError(f"{where}: adapts {module_path!r}, which the base model does not have (another base?).")
        base = base.get_base_layer() if isinstance(base, BaseTunerLayer) else base
        rank = a.shape[0]
        kind, expected_a, expected_b = _expected_shapes(where, module_path, base, rank, embedding)
        if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
            raise ValueError(
                f"{where}: layer {module_path!r} has factors of shapes {tuple(a.shape)} and {tuple(b.shape)}, but the "
                f"base {type(base).__name__} needs {expected_a} and {expected_b} (another base model?)."
            )
        r = rank_pattern.get(get_pattern_key(list(rank_pattern), module_path), r_default)
        alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module_path), alpha_default)
        if rank == 0:
            raise ValueError(f"{where}: layer {module_path!r} has rank-0 factors; a LoRA layer needs rank >= 1.")
        if r != rank:
            raise ValueError(f"{where}: layer {module_path!r} has rank {rank} in its weights but r={r} in its config.")
        scaling = float(alpha) / (math.sqrt(r) if rslora else r)
        factors[module_path] = _LoraLayerFactors(kind, a, b, scaling)
    if not factors:
        raise ValueError(f"{where}: holds no LoRA factors.")
    return config, factors


def _check_lora_features(where: str, config: Mapping[str, Any]) -> None:
    from peft import LoraConfig

    defaults = {}
    for f in dataclasses.fields(LoraConfig):
        defaults[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    for key, value in config.items():
        if key in _LORA_FIELDS_READ:
            continue
        if value in (None, False, {}, []) or (key in defaults and value == defaults[key]):
            continue
        raise ValueError(
            f"{where} uses {key}={value!r}, a LoRA feature PaLoRA cannot represent (PaLoRA task adapters are plain "
            "low-rank products B @ A on an unchanged base)."
        )
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where} trains biases (bias={config['bias']!r}); PaLoRA task adapters cannot carry them.")
    init = config.get("init_lora_weights", True)
    if init not in _BASE_PRESERVING_INITS:
        raise ValueError(
            f"{where} was initialised with init_lora_weights={init!r}, which rewrites the base weights; its factors "
            "are relative to that modified base. Convert it to a plain LoRA first (PEFT's "
            "`path_initial_model_for_weight_conversion`)."
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if value is not None and not _positive_finite(value, integer=key == "r"):
            raise ValueError(
                f"{where} has an invalid {key}={value!r}; it must be a positive finite "
                + ("int." if key == "r" else "number.")
            )
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, Mapping):
            raise ValueError(f"{where} has an invalid {key}={pattern!r}; it must map layer names to numbers.")
        for name, value in pattern.items():
            if not _positive_finite(value, integer=integer):
                raise ValueError(
                    f"{where} has an invalid {key}[{name!r}]={value!r}; it must be a positive finite "
                    + ("int." if integer else "number.")
                )


def _positive_finite(value: Any, integer: bool) -> bool:
    try:
        check_int(value, "", minimum=1) if integer else check_positive(value, "")
    except (TypeError, ValueError):
        return False
    return True


def _expected_shapes(where, path, base, rank, embedding):
    if embedding:
        if not isinstance(base, nn.Embedding):
            raise ValueError(f"{where}: embedding factors for {path!r}, which is a {type(base).__name__}.")
        return "embedding", (rank, base.num_embeddings), (base.embedding_dim, rank)
    if isinstance(base, Conv1D):
        fan_in, fan_out = base.weight.shape
        return "linear", (rank, fan_in), (fan_out, rank)
    if isinstance(base, nn.Linear):
        return "linear", (rank, base.in_features), (base.out_features, rank)
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        reason = _conv_refusal(base)
        if reason:
            raise ValueError(f"{where}: PaLoRA cannot represent LoRA's adapter of the conv {path!r}: {reason}.")
        ones = (1,) * (base.weight.dim() - 2)
        return "conv", (rank, base.in_channels, *base.kernel_size), (base.out_channels, rank, *ones)
    raise ValueError(
        f"{where}: adapts {path!r}, a {type(base).__name__}; PaLoRA adapts nn.Linear, transformers' Conv1D, "
        "nn.Embedding and nn.Conv1d/2d/3d."
    )


_FIXED_BY_IMPORT = ("task_names", "num_tasks", "target_modules", "rank_pattern", "alpha_pattern", "init_weights",
                    "exclude_modules", "layers_to_transform", "layers_pattern", "peft_type")


def from_lora_adapters(model: nn.Module, adapters: Mapping[str, str | os.PathLike], **config_overrides: Any):
    """Build a PaLoRA model whose T task adapters are T single-task LoRA adapters of the same base model.

    Task ``t`` gets the factors of LoRA ``t``, with that LoRA's scaling (``lora_alpha / r``, or ``/ sqrt(r)`` for
    rsLoRA, per layer after its ``rank_pattern``/``alpha_pattern``) folded into ``B``. The PaLoRA model therefore
    equals LoRA ``t`` exactly at the one-hot preference of task ``t``, and in between its weight update is the
    preference-weighted sum of the LoRA updates. Each layer's PaLoRA rank is the largest rank any of the LoRAs
    (or `r` in `config_overrides`) has there; a smaller LoRA fills the first rows of its task's block and the other
    directions get a freshly initialised ``A`` row and a zero ``B`` column: they change nothing until training, and
    unlike zero rows in ``A`` they do train. Layers whose rank differs from the most common one get
    ``rank_pattern`` entries anchored to their full path. By default ``palora_alpha`` equals each layer's rank (scaling
    1); whatever the scaling, it is divided out of the imported ``B``.

    Args:
        model: the base model all the LoRAs were trained on (not yet wrapped by PEFT). It is adapted in place.
        adapters: ``{task_name: path}``, one local LoRA bundle folder (``adapter_config.json`` with
            ``peft_type: "LORA"`` and ``adapter_model.safetensors``) per task, in task order (at least two).
        **config_overrides: further `PaLoRAConfig` fields (``palora_alpha``, ``palora_dropout``, ``modules_to_save``,
            ``train_base_weights``, ``bias``, ``task_type``, ``r`` as a minimum rank, ...). The fields the LoRAs fix
            (``task_names``, ``num_tasks``, ``target_modules``, ``rank_pattern``, ``alpha_pattern``, ...) are refused.

    Returns:
        The PaLoRA `PeftModel`, with adapter ``"default"``, trainable like any PaLoRA model.

    Raises:
        TypeError: `model` is not an ``nn.Module`` or already a PEFT model, `adapters` is not a mapping, an override
            is not a `PaLoRAConfig` field.
        ValueError: fewer than two adapters, a name that is not a non-empty string, a missing folder, a bundle that is
            not LoRA (or safetensors), uses a feature PaLoRA cannot represent (DoRA, ``lora_bias``, trained biases or
            ``modules_to_save``, base-rewriting initialisations, ...), or targets other modules than the first bundle.
    """
    from peft import PeftModel, get_peft_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module (the base model), got {type(model).__name__}.")
    if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise TypeError("`model` must be the plain base model; it already holds PEFT adapters.")
    if not isinstance(adapters, Mapping):
        raise TypeError(
            f"`adapters` must be a mapping {{task_name: LoRA bundle path}}, got {type(adapters).__name__}."
        )
    if len(adapters) < 2:
        raise ValueError(f"`adapters` must name at least two tasks (PaLoRA needs T >= 2), got {len(adapters)}.")
    for task, path in adapters.items():
        if not isinstance(task, str) or not task:
            raise ValueError(f"`adapters` keys must be non-empty task names (str), got {task!r}.")
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"`adapters[{task!r}]` must be a path to a LoRA bundle, got {type(path).__name__}.")
        if not os.path.isdir(path):
            raise ValueError(f"`adapters[{task!r}]`: {os.fspath(path)!r} is not an existing folder.")
    fields = set(PaLoRAConfig.__dataclass_fields__)
    for key in config_overrides:
        if key not in fields:
            raise TypeError(f"Unknown PaLoRAConfig field {key!r} in the overrides.")
        if key in _FIXED_BY_IMPORT:
            raise ValueError(f"`{key}` is set by from_lora_adapters from the LoRA bundles and cannot be overridden.")

    tasks = list(adapters)
    bundles = [_read_lora_bundle(task, os.fspath(adapters[task]), model) for task in tasks]
    first_config, first_factors = bundles[0]
    layer_paths = sorted(first_factors)
    for task, (config, factors) in zip(tasks[1:], bundles[1:]):
        where = f"LoRA bundle {os.fspath(adapters[task])!r} (task {task!r})"
        missing, extra = sorted(set(layer_paths) - set(factors)), sorted(set(factors) - set(layer_paths))
        if missing or extra:
            raise ValueError(
                f"{where} adapts other modules than the bundle of task {tasks[0]!r}: "
                + (f"it lacks {missing}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"it adds {extra}" if extra else "")
                + ". Every LoRA must target the same modules of the same base model."
            )
        name_a, name_b = first_config.get("base_model_name_or_path"), config.get("base_model_name_or_path")
        if name_a and name_b and name_a != name_b:
            warnings.warn(
                f"{where} names base model {name_b!r}, the bundle of task {tasks[0]!r} {name_a!r}; their layer shapes "
                "match, so they are combined.",
                UserWarning,
                stacklevel=2,
            )

    min_rank = config_overrides.pop("r", 1)
    check_int(min_rank, "`r` (the minimum rank per task adapter)", minimum=1)
    ranks = {path: max(int(min_rank), *(factors[path].a.shape[0] for _, factors in bundles)) for path in layer_paths}
    r = _most_common(list(ranks.values()))
    rank_pattern = {_anchored(path): rank for path, rank in ranks.items() if rank != r}
    settings: dict[str, Any] = {
        "task_names": tasks,
        "r": r,
        "target_modules": _target_modules_for(layer_paths, _plain_module_names(model)),
        "rank_pattern": rank_pattern,
        "init_weights": True,
        "base_model_name_or_path": first_config.get("base_model_name_or_path"),
        "revision": first_config.get("revision"),
        "task_type": first_config.get("task_type"),
        "fan_in_fan_out": any(isinstance(model.get_submodule(path), Conv1D) for path in layer_paths),
    }
    if "palora_alpha" not in config_overrides:
        settings["palora_alpha"] = float(r)
        settings["alpha_pattern"] = {key: float(rank) for key, rank in rank_pattern.items()}
    settings.update(config_overrides)
    peft_model = get_peft_model(model, PaLoRAConfig(**settings))

    modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for path in layer_paths:
            layer = modules[path]
            if not isinstance(layer, (Linear, Embedding, ConvNd)) or "default" not in layer.palora_A:
                raise RuntimeError(f"PaLoRA did not adapt {path!r} as expected (got {type(layer).__name__}).")
            a, b = layer.palora_A["default"], layer.palora_B["default"]
            rank, scaling = layer.r["default"], layer.scaling["default"]
            if rank != ranks[path]:
                raise RuntimeError(f"{path!r} got rank {rank}, expected {ranks[path]}.")
            b.zero_()
            for t, (_, factors) in enumerate(bundles):
                piece = factors[path]
                rt = piece.a.shape[0]
                a[t * rank : t * rank + rt].copy_(piece.a.to(a.device, a.dtype))
                folded = piece.b.to(torch.float64) * (piece.scaling / scaling)
                b[:, t * rank : t * rank + rt].copy_(folded.to(b.device, b.dtype))
    return peft_model
