"""One point of the front as a standard PEFT LoRA bundle.

At a fixed preference ``lambda`` a PaLoRA layer is an ordinary low-rank update, so it can be written as a LoRA:

    W(lambda) = W + s * sum_t lambda_t B_t A_t = W + [lambda_1 s B_1 ... lambda_T s B_T] @ [A_1; ...; A_T]

:func:`export_lora` writes exactly that product as a standard PEFT LoRA bundle (``peft_type: "LORA"``), with the
scaling ``s = palora_alpha / r`` folded into ``B`` and ``lora_alpha`` set to each layer's rank, so that LoRA's own
scaling is 1. Tasks with ``lambda_t = 0`` are dropped, so a layer's rank is ``r`` times the number of non-zero
entries. The bundle loads with plain ``PeftModel.from_pretrained`` in a process that never imports ``peft_palora``.

:func:`export_task_loras` writes the T task adapters themselves, one LoRA bundle per task (``s B_t`` and ``A_t``,
which is :func:`export_lora` at the task's one-hot preference), and ``palora_tasks.json`` with the rule that mixes
them into any trade-off in plain PEFT (``add_weighted_adapter(tasks, weights=lambda, combination_type="cat")``).
Only safetensors files are written.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from typing import Any

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_palora.tuner.bundle import check_output_apart_from_input, loaded_bundle_dir
from peft_palora.tuner.config import PaLoRAConfig
from peft_palora.tuner.layer import ConvNd, Embedding, PaLoRALayer
from peft_palora.tuner.preference import validate_preference
from peft_palora.utils.atomic import atomic_directory

# The ranks vLLM accepts for `--max-lora-rank` (its default is 16); an adapter of rank r needs a choice >= r.
VLLM_MAX_LORA_RANK_CHOICES = (1, 8, 16, 32, 64, 128, 256, 320, 512)


VLLM_DEFAULT_MAX_LORA_RANK = 16


_PREFIX = "base_model.model."


_BIAS_TO_LORA = {"none": "none", "all": "all", "palora_only": "lora_only"}


def _anchored(path: str) -> str:
    """A `rank_pattern`/`alpha_pattern` key that matches the module `path` and nothing else.

    PEFT matches pattern keys with ``re.match(r"(.*\\.)?(KEY)$", name)``; the leading ``^`` fails as soon as the
    optional prefix group consumed anything, so the key only matches the full path.
    """
    return "^" + re.escape(path) + "$"


def _target_modules_for(paths: list[str], all_module_names: list[str]) -> list[str] | str:
    """`target_modules` selecting exactly `paths`: the list of full paths, or an anchored regex when a path is also
    the dotted suffix of another module's name (PEFT matches list entries as suffixes)."""
    chosen = set(paths)
    collides = any(
        name not in chosen and any(name.endswith("." + path) for path in chosen) for name in all_module_names
    )
    if not collides:
        return sorted(chosen)
    return "^(?:" + "|".join(re.escape(path) for path in sorted(chosen)) + ")$"


def _plain_module_names(model: nn.Module) -> list[str]:
    """Names of the modules of the underlying base model (PEFT's wrapper internals left out)."""
    skip = ("base_layer", "original_module", "modules_to_save")
    names = []
    for name, _ in model.named_modules():
        parts = name.split(".")
        if name and not any(part in skip or part.startswith(("palora_", "lora_")) for part in parts):
            names.append(name)
    return names


def _most_common(values: list[int]) -> int:
    counts = Counter(values)
    best = max(counts.values())
    return min(value for value, count in counts.items() if count == best)  # ties: the smallest, deterministically


def _conv_refusal(base: nn.Module) -> str | None:
    """Why PEFT's LoRA conv (``lora_A``: a plain conv with the base kernel, stride and padding; ``lora_B``: 1x1) cannot
    hold the same update as a PaLoRA conv on this base layer, or None when it can."""
    problems = []
    if base.groups != 1:
        problems.append(
            f"groups={base.groups} (LoRA's lora_A sees all input channels and PEFT cannot merge grouped LoRA convs, "
            "while a PaLoRA delta is block-diagonal per group)"
        )
    if any(d != 1 for d in base.dilation):
        problems.append(f"dilation={tuple(base.dilation)} (LoRA's lora_A conv is built without the base dilation)")
    if base.padding_mode != "zeros":
        problems.append(f"padding_mode={base.padding_mode!r} (LoRA's lora_A conv pads with zeros)")
    return "; ".join(problems) or None


def _unwrap_palora(model: Any) -> tuple[Any, Any]:
    """(tuner, peft_model_or_None) for a PaLoRA `PeftModel`, a `PaLoRAModel` or a `MultiTaskModel` around one."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    def is_palora(tuner: Any) -> bool:  # the PaLoRAModel (checked by its PEFT prefix: it imports this module)
        return isinstance(tuner, BaseTuner) and getattr(tuner, "prefix", None) == "palora_"

    backbone = getattr(model, "backbone", None)
    if not isinstance(model, PeftModel) and not is_palora(model) and isinstance(backbone, PeftModel):
        model = backbone  # a MultiTaskModel: its heads are not part of a LoRA bundle
    if isinstance(model, PeftModel):
        tuner = model.base_model
        if is_palora(tuner):
            return tuner, model
    elif is_palora(model):
        return model, None
    raise TypeError(
        f"`model` must be a PaLoRA PeftModel (from get_peft_model with a PaLoRAConfig) or its PaLoRAModel, got "
        f"{type(model).__name__}."
    )


def export_lora(
    model: Any, save_directory: str | os.PathLike, preference: Any = None, adapter_name: str | None = None
) -> str:
    """Write a standard PEFT LoRA bundle equal to the PaLoRA model at one preference.

    Every adapted layer becomes one LoRA layer with ``A' = [A_t; ...]`` and ``B' = [lambda_t s B_t ...]`` over the
    tasks with ``lambda_t > 0`` (``s`` the layer's ``palora_alpha / r``), so its rank is ``r`` times the number of
    non-zero entries. ``lora_alpha`` equals the (most common) rank and ``alpha_pattern`` each other layer's rank, so
    LoRA's scaling is 1 everywhere, also for servers that read only ``r`` and ``lora_alpha``. Layers whose rank differs
    from the most common one get ``rank_pattern``/``alpha_pattern`` entries anchored to their full path.
    ``target_modules`` lists the exact adapted modules; ``modules_to_save`` and trained biases are carried over under
    the key names LoRA uses.

    PEFT's own ``peft.save_as_lora(path, model, rank)`` also converts a PaLoRA model at the preference in force (its
    conversion protocol, see ``PaLoRALayer.supports_lora_conversion``), but through a truncated SVD of every layer's
    delta, for linear layers only. This writer stays because it is exact (the factors themselves, no SVD, no rank to
    choose), takes any preference without setting it, and also writes embedding and convolution adapters,
    ``modules_to_save`` and trained biases.

    A warning (one per call) says when the bundle will not load on typical LoRA servers such as vLLM: non-linear
    targets (embeddings, convolutions), a rank above vLLM's default ``--max-lora-rank`` of 16, per-layer ranks,
    ``modules_to_save`` or biases.

    Args:
        model: a PaLoRA `PeftModel`, its `PaLoRAModel`, or a `MultiTaskModel` (its backbone is exported; the task
            heads are not part of a LoRA bundle).
        save_directory: folder to write ``adapter_config.json`` and ``adapter_model.safetensors`` into; each file is
            replaced atomically.
        preference: one ``(T,)`` preference (sequence, array, tensor or ``{task: weight}`` dict); the one in force
            when None. Per-sample ``(batch, T)`` preferences are refused.
        adapter_name: the PaLoRA adapter to export; the active one when None.

    Returns:
        The path of ``save_directory``.

    Raises:
        TypeError: `model` is not a PaLoRA model.
        ValueError: a malformed or per-sample preference, ``train_base_weights=True`` (the base weights changed, which
            a LoRA bundle cannot carry), or a layer standard LoRA cannot represent (grouped, dilated or non-zero-padded
            convolutions, the paper's conv layout).
    """
    tuner, adapter_name, config, save_directory = _export_setup(model, save_directory, adapter_name, "export_lora")
    if preference is None:
        preference = tuner.get_preference(adapter_name)
    lam = validate_preference(preference, num_tasks=config.num_tasks, task_names=config.task_names, name="preference")
    if lam.dim() != 1:
        raise ValueError(
            f"`preference` must be ONE preference of shape ({config.num_tasks},) for the exported LoRA, got a "
            f"per-sample preference of shape {tuple(lam.shape)}."
        )
    layers = _adapted_layers(tuner, adapter_name, config)
    tensors, ranks, kinds = _lora_factors(layers, adapter_name, lam.detach().to("cpu", torch.float64))
    extras = _carried_state(tuner, adapter_name, config)
    tensors.update(extras)
    lora_config, rank_pattern = _lora_config(tuner, config, ranks, kinds)
    _warn_if_not_servable(ranks, kinds, rank_pattern, config, extras)

    with atomic_directory(save_directory) as staging:
        _write_lora(staging, lora_config, tensors)
    return save_directory


TASK_LORAS_INDEX = "palora_tasks.json"


def export_task_loras(model: Any, save_directory: str | os.PathLike, adapter_name: str | None = None) -> str:
    """Write each task adapter as a standard PEFT LoRA bundle, plus the rule that mixes them into any trade-off.

    ``save_directory/<task_name>/`` holds task ``t``'s LoRA: ``A = A_t`` and ``B = s B_t`` (``s`` the layer's
    ``palora_alpha / r``, folded in; ``lora_alpha`` equals the rank, so LoRA's own scaling is 1). It is
    :func:`export_lora` at the one-hot preference of task ``t``, so each bundle alone is the model at that vertex.
    ``save_directory/palora_tasks.json`` (:data:`TASK_LORAS_INDEX`) lists the task order and the rule

        W(lambda) = W + sum_t lambda_t * (B_t' @ A_t')      (B_t', A_t' the factors in folder <task_t>)

    which plain PEFT computes, with no approximation, as
    ``add_weighted_adapter(tasks, weights=lambda, adapter_name="mix", combination_type="cat")``: PEFT's ``cat``
    stacks the adapters' factors and multiplies each ``A`` by ``weight * scaling`` (here ``lambda_t * 1``), and the
    mixed adapter's scaling is 1, so the weights are the preference itself (no square root, no renormalisation).
    The mixed adapter has rank ``T * r``. Task folders are named after ``task_names`` (``task_0``, ... when the
    config has none); those names are also the adapter names in the recipe.

    Only frozen-base models can be split this way, and only when nothing outside the low-rank adapters was trained:
    PEFT refuses to mix adapters that carry ``modules_to_save`` or trained biases.

    Args:
        model: a PaLoRA `PeftModel`, its `PaLoRAModel`, or a `MultiTaskModel` (its backbone).
        save_directory: the folder to write (the task folders and the index); replaced atomically as a whole.
        adapter_name: the PaLoRA adapter to export; the active one when None.

    Returns:
        The path of ``save_directory``.

    Raises:
        TypeError: `model` is not a PaLoRA model.
        ValueError: ``train_base_weights=True``, ``modules_to_save`` or ``bias`` other than ``"none"``, a task name
            that cannot be a folder name, or a layer standard LoRA cannot represent (as for :func:`export_lora`).
    """
    tuner, adapter_name, config, save_directory = _export_setup(
        model, save_directory, adapter_name, "export_task_loras"
    )
    shared = []
    if config.modules_to_save:
        shared.append(f"modules_to_save={sorted(config.modules_to_save)}")
    if config.bias != "none":
        shared.append(f"bias={config.bias!r}")
    if shared:
        raise ValueError(
            f"Adapter {adapter_name!r} trains {' and '.join(shared)}, full weights shared by all tasks: task LoRAs are "
            "mixed with PEFT's add_weighted_adapter, which refuses several adapters that carry modules_to_save (and "
            "PEFT allows only one adapter with a bias). Export one trade-off with everything in it with "
            "`model.export_lora(save_directory, preference=...)` instead."
        )
    tasks = _task_folder_names(model, config)
    layers = _adapted_layers(tuner, adapter_name, config)
    bundles = []
    for t in range(config.num_tasks):
        one_hot = torch.zeros(config.num_tasks, dtype=torch.float64)
        one_hot[t] = 1.0
        tensors, ranks, kinds = _lora_factors(layers, adapter_name, one_hot)
        lora_config, rank_pattern = _lora_config(tuner, config, ranks, kinds)
        bundles.append((tasks[t], lora_config, tensors))
    # Each task LoRA has the layer's rank r; PEFT's mix stacks them to T * r: that is what a server must accept.
    mixed_ranks = {path: rank * config.num_tasks for path, rank in ranks.items()}
    _warn_if_not_servable(mixed_ranks, kinds, rank_pattern, config, {})

    default = tuner.get_preference(adapter_name).detach().to("cpu", torch.float64)
    index = {
        "format": "palora_task_loras",
        "version": 1,
        "tasks": tasks,
        "rule": (
            "W(lambda) = W + sum_t lambda_t * (B_t @ A_t), where (A_t, B_t) are the LoRA factors in folder <tasks[t]> "
            "(LoRA scaling 1: lora_alpha equals the rank; the PaLoRA scale palora_alpha / r is folded into B_t). "
            "lambda is on the simplex (non-negative, sums to 1), in the order of `tasks`."
        ),
        "peft_recipe": [
            "from peft import PeftModel",
            f"model = PeftModel.from_pretrained(base_model, '<dir>/{tasks[0]}', adapter_name='{tasks[0]}')",
            *(f"model.load_adapter('<dir>/{task}', adapter_name='{task}')" for task in tasks[1:]),
            f"model.add_weighted_adapter({tasks!r}, weights=lambda_, adapter_name='mix', combination_type='cat')",
            "model.set_adapter('mix')",
            "model.eval()  # PEFT builds the mixed adapter's lora_dropout modules in training mode",
        ],
        "weights": (
            "weights = lambda itself: PEFT's combination_type='cat' multiplies each task's A by weight * scaling "
            "(scaling 1 here) and stacks the factors, so the mix is exact, of rank T * r."
        ),
        "default_preference": default.tolist() if default.dim() == 1 else None,
        "base_model_name_or_path": config.base_model_name_or_path,
        "revision": config.revision,
        "palora": {"r": config.r, "palora_alpha": config.palora_alpha, "num_tasks": config.num_tasks},
    }
    with atomic_directory(save_directory) as staging:
        for task, lora_config, tensors in bundles:
            _write_lora(os.path.join(staging, task), lora_config, tensors)
        with open(os.path.join(staging, TASK_LORAS_INDEX), "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2)
            handle.write("\n")
    return save_directory


def trained_base_refusal(model: Any, adapter_name: str, what: str) -> str:
    """The message for `what` (an export) on an adapter trained with ``train_base_weights=True``: what works instead.

    A ``MultiTaskModel`` (it has ``heads``) merges into a ``MergedMultiTaskModel``, which has no ``save_pretrained``:
    its backbone and heads are saved separately.
    """
    if isinstance(getattr(model, "heads", None), nn.ModuleDict):
        save = (
            "`model.set_preference(p); merged = model.merge_and_unload(); merged.backbone.save_pretrained(dir)` "
            "(a transformers backbone; else `safetensors.torch.save_model(merged.backbone, path)`), and its heads with "
            "`peft_palora.training.multitask.save_task_heads(merged.heads, dir)`"
        )
    else:
        save = "`model.set_preference(p); model.merge_and_unload().save_pretrained(dir)`"
    return (
        f"Adapter {adapter_name!r} was trained with `train_base_weights=True`: the targeted base weights changed, "
        f"and {what} writes LoRA factors for the ORIGINAL base only. Instead, save the full model at one preference: "
        f"{save}; or keep every trade-off by saving the PaLoRA bundle itself (`model.save_pretrained(dir)`, which "
        "holds the trained base layers)."
    )


def _export_setup(model: Any, save_directory: Any, adapter_name: str | None, what: str):
    """(tuner, adapter name, config, save directory) after the checks every export shares."""
    tuner, _ = _unwrap_palora(model)
    if not isinstance(save_directory, (str, os.PathLike)) or not os.fspath(save_directory):
        raise TypeError(f"`save_directory` must be a non-empty path, got {save_directory!r}.")
    save_directory = os.fspath(save_directory)
    names = tuner._target_adapters(adapter_name)
    if not names:
        raise ValueError("The model has no active PaLoRA adapter; pass `adapter_name`.")
    adapter_name = names[0]
    config: PaLoRAConfig = tuner.peft_config[adapter_name]
    if loaded_bundle_dir(config) is not None:
        check_output_apart_from_input(save_directory, loaded_bundle_dir(config), "`save_directory`",
                                      f"PaLoRA bundle folder adapter {adapter_name!r} was loaded from:")
    if config.train_base_weights:
        raise ValueError(trained_base_refusal(model, adapter_name, what))
    return tuner, adapter_name, config, save_directory


def _task_folder_names(model: Any, config: PaLoRAConfig) -> list[str]:
    """The task names, used as folder and PEFT adapter names: the config's, else a MultiTaskModel's, else task_<t>."""
    names = config.task_names
    heads = getattr(model, "heads", None)
    if names is None and isinstance(heads, nn.ModuleDict) and len(heads) == config.num_tasks:
        names = list(heads.keys())
    if names is None:
        names = [f"task_{t}" for t in range(config.num_tasks)]
    folded = [name.casefold() for name in names]
    for name in names:
        if not name or "." in name or "/" in name or "\\" in name or os.sep in name or not name.isprintable():
            raise ValueError(
                f"Task name {name!r} cannot name a folder and a PEFT adapter (it needs to be non-empty and free of "
                "'.', '/' and '\\'); rename the tasks in the config's `task_names`."
            )
        if folded.count(name.casefold()) > 1:
            raise ValueError(f"Task names {names} differ only in case; their folders would collide on some systems.")
        if name == TASK_LORAS_INDEX:
            raise ValueError(f"Task name {name!r} is the index file's name.")
    return list(names)


def _adapted_layers(tuner: Any, adapter_name: str, config: PaLoRAConfig) -> list[tuple[str, PaLoRALayer]]:
    """The layers carrying `adapter_name`, after checking standard LoRA can represent each of them."""
    layers = [(name, module) for name, module in tuner.model.named_modules()
              if isinstance(module, PaLoRALayer) and adapter_name in module.palora_A]
    if not layers:
        raise ValueError(f"Adapter {adapter_name!r} adapts no layer.")
    conv_layout = getattr(config, "conv_layout", "peft")
    for path, layer in layers:
        if isinstance(layer, ConvNd):
            if conv_layout != "peft":
                raise ValueError(
                    f"Layer {path!r} uses conv_layout={conv_layout!r}; only the 'peft' layout has LoRA's conv form."
                )
            reason = _conv_refusal(layer.get_base_layer())
            if reason:
                raise ValueError(f"Standard PEFT LoRA cannot represent the PaLoRA adapter of {path!r}: {reason}.")
    return layers


def _lora_factors(
    layers: list[tuple[str, PaLoRALayer]], adapter_name: str, lam: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, str]]:
    """LoRA tensors (keys as PEFT saves them), rank and kind per layer for the float64 (T,) preference `lam`.

    Per layer ``A' = [A_t; ...]`` and ``B' = [lambda_t s B_t ...]`` over the tasks with ``lambda_t > 0``.
    """
    kept = [t for t in range(lam.shape[0]) if lam[t] > 0]
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    kinds: dict[str, str] = {}
    for path, layer in layers:
        r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
        a, b = layer.palora_A[adapter_name].detach(), layer.palora_B[adapter_name].detach()
        base = layer.get_base_layer()
        rows = torch.cat([torch.arange(t * r, (t + 1) * r) for t in kept])
        scale = torch.cat([torch.full((r,), float(lam[t]) * scaling, dtype=torch.float64) for t in kept])
        a_out = a.index_select(0, rows.to(a.device)).to("cpu").clone().contiguous()
        b_sel = b.index_select(1, rows.to(b.device)).to("cpu", torch.float64)
        b_out = (b_sel * scale.view(1, -1, *([1] * (b.dim() - 2)))).to(b.dtype).contiguous()
        if isinstance(layer, Embedding):
            kinds[path] = "embedding"
            tensors[f"{_PREFIX}{path}.lora_embedding_A"] = a_out
            tensors[f"{_PREFIX}{path}.lora_embedding_B"] = b_out
        else:
            if isinstance(layer, ConvNd):
                kinds[path] = "conv"
            else:
                kinds[path] = "conv1d_gpt2" if isinstance(base, Conv1D) else "linear"
            tensors[f"{_PREFIX}{path}.lora_A.weight"] = a_out
            tensors[f"{_PREFIX}{path}.lora_B.weight"] = b_out
        ranks[path] = a_out.shape[0]
    return tensors, ranks, kinds


def _lora_config(tuner: Any, config: PaLoRAConfig, ranks: dict[str, int], kinds: dict[str, str]):
    """(LoraConfig, rank_pattern) for the layers' ranks, with LoRA's scaling 1 on every layer."""
    from peft import LoraConfig

    r_common = _most_common(list(ranks.values()))
    rank_pattern = {_anchored(path): rank for path, rank in ranks.items() if rank != r_common}
    lora_config = LoraConfig(
        r=r_common,
        lora_alpha=r_common,
        alpha_pattern=dict(rank_pattern),
        rank_pattern=rank_pattern,
        target_modules=_target_modules_for(list(ranks), _plain_module_names(tuner.model)),
        lora_dropout=float(config.palora_dropout),
        fan_in_fan_out=any(kind == "conv1d_gpt2" for kind in kinds.values()),
        bias=_BIAS_TO_LORA[config.bias],
        modules_to_save=sorted(config.modules_to_save) if config.modules_to_save else None,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
    return lora_config, rank_pattern


def _write_lora(directory: str, lora_config: Any, tensors: dict[str, torch.Tensor]) -> None:
    os.makedirs(directory, exist_ok=True)
    lora_config.save_pretrained(directory)
    save_file(tensors, os.path.join(directory, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})


def _carried_state(tuner: Any, adapter_name: str, config: PaLoRAConfig) -> dict[str, torch.Tensor]:
    """The trained copies of `modules_to_save` and the trained biases, under the keys LoRA bundles use."""
    out: dict[str, torch.Tensor] = {}
    for name, module in tuner.model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for key, value in module.modules_to_save[adapter_name].state_dict().items():
                out[f"{_PREFIX}{name}.{key}"] = value.detach().to("cpu").clone().contiguous()
    if config.bias != "none":
        for name, module in tuner.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper) or "modules_to_save" in name.split("."):
                continue
            bias = getattr(module, "bias", None)
            if not isinstance(bias, nn.Parameter):
                continue
            owner = name.removesuffix(".base_layer")
            if config.bias == "palora_only" and not (
                owner != name and isinstance(tuner.model.get_submodule(owner), PaLoRALayer)
            ):
                continue
            out[f"{_PREFIX}{name}.bias"] = bias.detach().to("cpu").clone().contiguous()
    return out


def _warn_if_not_servable(ranks, kinds, rank_pattern, config, extras) -> None:
    reasons = []
    odd = sorted({kind for kind in kinds.values() if kind in ("embedding", "conv")})
    if odd:
        reasons.append(
            f"it adapts {' and '.join(k + ' layers' for k in odd)} (vLLM serves LoRA on linear layers; embedding LoRA "
            "only in some versions and models, conv LoRA not at all)"
        )
    max_rank = max(ranks.values())
    if max_rank > VLLM_DEFAULT_MAX_LORA_RANK:
        needed = next((c for c in VLLM_MAX_LORA_RANK_CHOICES if c >= max_rank), None)
        reasons.append(
            f"its rank is up to {max_rank}, above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}"
            + (f" (serve with --max-lora-rank {needed})" if needed else " and above every --max-lora-rank vLLM offers")
        )
    if rank_pattern:
        reasons.append(
            f"{len(rank_pattern)} layers have another rank than r={_most_common(list(ranks.values()))} "
            "(rank_pattern); "
            "LoRA's scaling is 1 on every layer, so servers that read only `r` and `lora_alpha` compute it right if "
            "they accept per-layer ranks"
        )
    if any(key.endswith(".bias") for key in extras) and config.bias != "none":
        reasons.append(
            f"it carries trained biases (bias={config.bias!r}), full tensors that LoRA servers refuse or ignore"
        )
    if config.modules_to_save:
        reasons.append(
            f"it carries modules_to_save {sorted(config.modules_to_save)}, full weights that LoRA servers refuse or "
            "ignore (vLLM rejects them as unsupported LoRA weights)"
        )
    if reasons:
        warnings.warn(
            "The exported LoRA loads with PEFT, but may not load on standard LoRA servers (e.g. vLLM): "
            + "; ".join(reasons) + ".",
            UserWarning,
            stacklevel=3,
        )
