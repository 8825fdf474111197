"""PaLoRA (Pareto Low-Rank Adapters) as a Hugging Face PEFT method.

Importing this package registers the PEFT type ``PALORA`` so that ``get_peft_model``, ``PeftModel.from_pretrained``
and ``AutoPeftModel.from_pretrained`` work with PaLoRA bundles.
"""

from __future__ import annotations

from ._registration import register as _register
from .config import PaLoRAConfig
from .layer import PaLoRALayer
from .model import PaLoRAModel, palora_layers
from .optimization import adapter_param_groups

__version__ = "0.1.0"

_register()

__all__ = ["PaLoRAConfig", "PaLoRALayer", "PaLoRAModel", "adapter_param_groups", "palora_layers", "__version__"]
