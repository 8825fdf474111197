"""PaLoRA (Pareto Low-Rank Adapters) as a Hugging Face PEFT method.

Importing this package registers the PEFT type ``PALORA`` so that ``get_peft_model``, ``PeftModel.from_pretrained``
and ``AutoPeftModel.from_pretrained`` work with PaLoRA bundles. Everything beyond the tuner is imported on first use,
so that ``import peft_palora`` stays cheap.

The package, by layer; each layer imports only from the layers above it in this list (``docs/concepts.md``):

* ``utils``: argument checks, JSON files, atomic files (nothing PaLoRA-specific);
* ``tuner``: the PEFT tuner, as ``peft/tuners/palora/`` would hold it;
* ``preferences``, ``objectives``, ``pareto``: the method without PEFT (grids, samplers, losses, hypervolume);
* ``fronts``: evaluating a model over a preference grid, plots, the ``evaluate`` metric;
* ``training``: the multi-task model, the preference window, the Accelerate and ``transformers`` trainers;
* ``interop``: standard LoRA bundles in and out, the Hub;
* ``cli``: the ``palora`` command.
"""

from __future__ import annotations

from peft_palora.tuner import PaLoRAConfig, PaLoRALayer, PaLoRAModel, palora_layers
from peft_palora.tuner.compat import register as _register
from peft_palora.utils.lazy import lazy_exports

__version__ = "0.1.0"

_register()

_LAZY = {
    "adapter_param_groups": "peft_palora.training.optimization",
    "MultiTaskModel": "peft_palora.training.multitask",
    "MergedMultiTaskModel": "peft_palora.training.multitask",
    "PaLoRATrainer": "peft_palora.training.trainer",
    "PaLoRATrainingArguments": "peft_palora.training.trainer",
    "PaLoRAHFTrainer": "peft_palora.training.hf_trainer",
    "PaLoRAHFTrainingArguments": "peft_palora.training.hf_trainer",
    "FrontEvaluationCallback": "peft_palora.training.hf_trainer",
    "PaLoRAArguments": "peft_palora.training.window",
    "PreferenceWindow": "peft_palora.training.window",
    "from_lora_adapters": "peft_palora.interop.lora",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "FrontEvaluationCallback",
    "MergedMultiTaskModel",
    "MultiTaskModel",
    "PaLoRAArguments",
    "PaLoRAConfig",
    "PaLoRAHFTrainer",
    "PaLoRAHFTrainingArguments",
    "PaLoRALayer",
    "PaLoRAModel",
    "PaLoRATrainer",
    "PaLoRATrainingArguments",
    "PreferenceWindow",
    "__version__",
    "adapter_param_groups",
    "from_lora_adapters",
    "palora_layers",
]
