"""PaLoRA (Pareto Low-Rank Adapters) as a Hugging Face PEFT method.

Importing this package registers the PEFT type ``PALORA`` so that ``get_peft_model``, ``PeftModel.from_pretrained``
and ``AutoPeftModel.from_pretrained`` work with PaLoRA bundles. The training pieces (Accelerate, ``transformers``'
Trainer) are imported on first use, so that ``import peft_palora`` stays cheap.
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
