"""PaLoRA (Pareto Low-Rank Adapters) as a Hugging Face PEFT method.

Importing this package registers the PEFT type ``PALORA`` so that ``get_peft_model``, ``PeftModel.from_pretrained``
and ``AutoPeftModel.from_pretrained`` work with PaLoRA bundles. The training pieces (Accelerate, ``transformers``'
Trainer) are imported on first use, so that ``import peft_palora`` stays cheap.

The modules, by layer (one idea each; PEFT's ``tuners/lora/`` is the model for the first group):

* the PEFT tuner: ``config``, ``layer`` (one formula per layer type), ``bnb`` (quantised bases), ``model``,
  ``peft_model`` (the PaLoRA ``PeftModel`` classes), ``_registration``, ``_per_call`` (the preference of one call),
  ``_folded_conv``, ``_bundle_checks``, ``_atomic``;
* the method: ``preferences`` (validation, grids, samplers), ``objectives``, ``window`` (sample, expand, combine);
* training: ``optimization``, ``training`` (Accelerate), ``hf_trainer`` (``transformers.Trainer``), ``multitask``;
* fronts: ``pareto``, ``plotting``, ``metrics/front_quality``;
* outside surfaces: ``hub``, ``cli``, ``lora_interop`` (standard LoRA bundles in and out);
* example code, never imported by the rest: ``recipes`` (datasets, small backbones, MultiMNIST).
"""

from __future__ import annotations

import importlib
from typing import Any

from ._registration import register as _register
from .config import PaLoRAConfig
from .layer import PaLoRALayer
from .model import PaLoRAModel, palora_layers
from .optimization import adapter_param_groups

__version__ = "0.1.0"

_register()

_LAZY = {
    "MultiTaskModel": "multitask",
    "PaLoRATrainer": "training",
    "PaLoRATrainingArguments": "training",
    "PaLoRAHFTrainer": "hf_trainer",
    "PaLoRAHFTrainingArguments": "hf_trainer",
    "FrontEvaluationCallback": "hf_trainer",
    "PaLoRAArguments": "window",
    "PreferenceWindow": "window",
    "MergedMultiTaskModel": "multitask",
    "from_lora_adapters": "lora_interop",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FrontEvaluationCallback",
    "MergedMultiTaskModel",
    "PaLoRAArguments",
    "PaLoRAHFTrainingArguments",
    "PreferenceWindow",
    "MultiTaskModel",
    "PaLoRAConfig",
    "PaLoRAHFTrainer",
    "PaLoRALayer",
    "PaLoRAModel",
    "PaLoRATrainer",
    "PaLoRATrainingArguments",
    "__version__",
    "adapter_param_groups",
    "from_lora_adapters",
    "palora_layers",
]
