"""One point of the front as a standard PEFT LoRA bundle.

At a fixed preference ``lambda`` a PaLoRA layer is an ordinary low-rank update, so it can be written as a LoRA:

    W(lambda) = W + s * sum_t lambda_t B_t A_t = W + [lambda_1 s B_1 ... lambda_T s B_T] @ [A_1; ...; A_T]

:func:`export_lora` writes exactly that product as a standard PEFT LoRA bundle (``peft_type: "LORA"``), with the
scaling ``s = palora_alpha / r`` folded into ``B`` and ``lora_alpha`` set to each layer's rank, so that LoRA's own
scaling is 1. Tasks with ``lambda_t = 0`` are dropped, so a layer's rank is ``r`` times the number of non-zero
entries. The bundle loads with plain ``PeftModel.from_pretrained`` in a process that never imports ``peft_palora``.
Only safetensors files are written.
"""

from __future__ import annotations

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
        raise ValueError(
            f"Adapter {adapter_name!r} was trained with `train_base_weights=True`: the targeted base weights changed, "
            "and a LoRA bundle only holds low-rank factors for the ORIGINAL base. Instead, save the full model at the "
            "preference (`model.set_preference(p); model.merge_and_unload().save_pretrained(dir)`), or save the "
            "trained base weights as a new base model and export a LoRA relative to it."
        )
    if preference is None:
        preference = tuner.get_preference(adapter_name)
    lam = validate_preference(preference, num_tasks=config.num_tasks, task_names=config.task_names, name="preference")
    if lam.dim() != 1:
        raise ValueError(
            f"`preference` must be ONE preference of shape ({config.num_tasks},) for the exported LoRA, got a "
            f"per-sample preference of shape {tuple(lam.shape)}."
        )
    lam = lam.detach().to("cpu", torch.float64)
    kept = [t for t in range(config.num_tasks) if lam[t] > 0]

    layers = [(name, module) for name, module in tuner.model.named_modules()
              if isinstance(module, PaLoRALayer) and adapter_name in module.palora_A]
    if not layers:
        raise ValueError(f"Adapter {adapter_name!r} adapts no layer.")
    conv_layout = getattr(config, "conv_layout", "peft")

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    kinds: dict[str, str] = {}
    for path, layer in layers:
        r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
        a, b = layer.palora_A[adapter_name].detach(), layer.palora_B[adapter_name].detach()
        base = layer.get_base_layer()
        if isinstance(layer, ConvNd):
            if conv_layout != "peft":
                raise ValueError(
                    f"Layer {path!r} uses conv_layout={conv_layout!r}; only the 'peft' layout has LoRA's conv form."
                )
            reason = _conv_refusal(base)
            if reason:
                raise ValueError(f"Standard PEFT LoRA cannot represent the PaLoRA adapter of {path!r}: {reason}.")
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

    extras = _carried_state(tuner, adapter_name, config)
    tensors.update(extras)

    r_common = _most_common(list(ranks.values()))
    rank_pattern = {_anchored(path): rank for path, rank in ranks.items() if rank != r_common}
    from peft import LoraConfig

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
    _warn_if_not_servable(ranks, kinds, rank_pattern, config, extras)

    with atomic_directory(save_directory) as staging:
        lora_config.save_pretrained(staging)
        save_file(tensors, os.path.join(staging, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    return save_directory


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
